"""Shaded pictures of hand meshes with OpenCV and numpy (no PyTorch3D): for looking at results.

Views are named in the hand's own frame, given as ``frame`` (a 3x3 rotation whose columns are the
hand's axes in the mesh's coordinates, e.g. the wrist's global rotation ``global_pose[root][:3, :3]``;
the identity for meshes already in the wrist's frame, such as the decoder's output). In that frame,
as in the released model and the default hand, ``x`` points from the wrist to the fingers, ``y``
out of the palm and ``z`` to the thumb side of a right hand. Every view has the fingers up:

* ``"palm"``: looking at the palm (a right hand's thumb on the viewer's right),
* ``"back"``: looking at the back of the hand (thumb on the left),
* ``"side"``: looking from the thumb side (palm on the left),
* ``"ulnar"``: looking from the little-finger side (palm on the right).

Rendering: orthographic, one scale for all panels fitted to the mesh's extent, painter's algorithm
(triangles sorted far to near, filled with ``cv2.fillConvexPoly``), flat Lambert + ambient shading
from a fixed light. Antialiasing comes from drawing at twice the size and shrinking (INTER_AREA):
``LINE_AA`` on every triangle would leave faint seams between neighbouring triangles.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from common.errors import OutputError
from common.io.atomic import atomic_write_bytes

# Rows: the camera's right, up and towards-the-viewer axes, in the hand frame.
VIEWS = {
    "palm": np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], np.float64),
    "back": np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], np.float64),
    "side": np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], np.float64),
    "ulnar": np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1]], np.float64),
}
SKIN_BGR = np.array([135.0, 170.0, 215.0])
BACKGROUND_BGR = (235, 235, 235)
LIGHT = np.array([-0.35, 0.45, 0.82])  # in camera space: from the upper left, in front
SUPERSAMPLE = 2


def _view_matrix(view) -> np.ndarray:
    if isinstance(view, str):
        if view not in VIEWS:
            raise ValueError(f"render_mesh: unknown view '{view}', expected one of {', '.join(VIEWS)} "
                             "or a 3x3 rotation matrix")
        return VIEWS[view]
    m = np.asarray(view, np.float64)
    if m.shape != (3, 3):
        raise ValueError(f"render_mesh: a view must be a name or a 3x3 matrix, got shape {m.shape}")
    return m


def render_mesh(vertices_mm, faces, image_size: int = 512, views: Sequence = ("palm", "side", "back"),
                frame=None, joints_mm=None, parents=None, cull_back: bool = True,
                color_bgr=SKIN_BGR, face_colors=None, fit=None) -> np.ndarray:
    """Orthographic, flat-shaded pictures of a triangle mesh, one square panel per view, side by side.

    Args:
        vertices_mm: ``[V, 3]`` vertices. faces: ``[F, 3]`` vertex indices (outward = counter-clockwise).
        image_size: side of each panel in pixels.
        views: names from :data:`VIEWS` or 3x3 matrices whose rows are the camera's right, up and
            towards-the-viewer axes in the hand frame.
        frame: 3x3 hand frame in mesh coordinates (columns = axes); identity when ``None``.
        joints_mm: optional ``[J, 3]`` joints drawn as dots, with ``parents`` ``[J]`` (-1 for the root)
            as parent-to-child lines.
        cull_back: skip faces turned away from the viewer (right for closed meshes); otherwise they
            are drawn darker, as seen through holes in an open mesh.
        color_bgr: base colour; face_colors: optional ``[F, 3]`` BGR base colour per face (e.g. to mark faces).
        fit: ``(centre [3] mm in the hand frame, scale px/mm)`` from :func:`fit_views`, to frame
            several meshes alike (an animation); fitted to this mesh when ``None``.
    Returns:
        ``uint8 [image_size, image_size * len(views), 3]`` BGR image.
    """
    verts = np.asarray(vertices_mm, np.float64)
    faces = np.asarray(faces, np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3 or len(verts) == 0:
        raise ValueError(f"render_mesh: expected vertices of shape [V, 3] with V > 0, got {verts.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3 or (faces.size and (faces.min() < 0 or faces.max() >= len(verts))):
        raise ValueError(f"render_mesh: expected faces [F, 3] indexing {len(verts)} vertices, got {faces.shape}")
    frame = np.eye(3) if frame is None else np.asarray(frame, np.float64)
    local = verts @ frame  # coordinates in the hand frame
    cams = [_view_matrix(v) for v in views]
    centre, scale = fit_views([verts], views, image_size, frame) if fit is None else fit
    centre = np.asarray(centre, np.float64)
    colors = np.broadcast_to(np.asarray(color_bgr if face_colors is None else face_colors, np.float64),
                             (len(faces), 3))
    panels = []
    for view, m in zip(views, cams):
        panel = _render_view((local - centre) @ m.T, faces, image_size, scale, cull_back, colors,
                             None if joints_mm is None else (np.asarray(joints_mm) @ frame - centre) @ m.T,
                             parents)
        if isinstance(view, str):
            cv2.putText(panel, view, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (90, 90, 90), 1, cv2.LINE_AA)
        panels.append(panel)
    return np.concatenate(panels, axis=1)


def fit_views(vertex_sets, views: Sequence = ("palm", "side", "back"), image_size: int = 512,
              frame=None) -> tuple:
    """The framing :func:`render_mesh` uses: one centre and one scale for all panels, such that
    the widest projected extent of all the meshes fits 90 % of a panel.

    Args:
        vertex_sets: ``[V, 3]`` arrays (mm), or one ``[N, V, 3]`` array (e.g. an animation's frames).
    Returns:
        ``(centre [3] mm in the hand frame, scale px/mm)``.
    """
    frame = np.eye(3) if frame is None else np.asarray(frame, np.float64)
    local = np.concatenate([np.asarray(v, np.float64).reshape(-1, 3) for v in vertex_sets]) @ frame
    centre = 0.5 * (local.min(0) + local.max(0))
    extent = max(np.ptp((local - centre) @ _view_matrix(v)[:2].T, axis=0).max() for v in views)
    return centre, 0.9 * image_size / max(extent, 1e-9)


def paint_mesh(img: np.ndarray, pixels: np.ndarray, view: np.ndarray, faces: np.ndarray, color,
               cull_back: bool = True, shift: int = 4) -> np.ndarray:
    """Painter's algorithm: fill the mesh's triangles into ``img`` (in place), far ones first.

    Args:
        img: ``uint8 [H, W, 3]`` BGR canvas.
        pixels: ``[V, 2]`` vertex positions in ``img``'s pixel coordinates (x right, y down).
        view: ``[V, 3]`` vertices in a right-handed viewing frame with ``+z`` towards the viewer
            (orders the faces and shades them).
        faces: ``[F, 3]`` vertex indices (outward = counter-clockwise); color: ``[3]`` or ``[F, 3]`` BGR.
        cull_back: skip faces turned away from the viewer, else draw them darker.
        shift: fractional bits of the fixed-point coordinates handed to OpenCV.
    Returns:
        ``img``.
    """
    tri = view[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norm = np.linalg.norm(normal, axis=1)
    keep = norm > 0
    normal[keep] /= norm[keep, None]
    front = normal[:, 2] > 0
    if cull_back:
        keep &= front
    light = LIGHT / np.linalg.norm(LIGHT)
    lambert = np.clip(np.where(front, 1.0, -1.0) * (normal @ light), 0.0, None)  # back faces lit from behind
    shade = np.where(front, 0.28 + 0.72 * lambert, 0.18 + 0.25 * lambert)
    colors = np.clip(shade[:, None] * np.broadcast_to(np.asarray(color, np.float64), (len(faces), 3)), 0, 255)
    order = np.flatnonzero(keep)
    order = order[np.argsort(tri[order, :, 2].mean(1), kind="stable")]  # far (small z) first
    pts = np.round(pixels[faces] * (1 << shift)).astype(np.int32)
    for f in order:
        cv2.fillConvexPoly(img, pts[f], colors[f].tolist(), lineType=cv2.LINE_8, shift=shift)
    return img


def _render_view(cam, faces, size, scale, cull_back, color, joints, parents) -> np.ndarray:
    big = size * SUPERSAMPLE
    # camera coordinates -> pixels (y down)
    px = np.stack([big / 2 + cam[:, 0] * scale * SUPERSAMPLE, big / 2 - cam[:, 1] * scale * SUPERSAMPLE], 1)
    img = np.full((big, big, 3), BACKGROUND_BGR, np.uint8)
    paint_mesh(img, px, cam, faces, color, cull_back)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    if joints is not None:
        jp = np.stack([size / 2 + joints[:, 0] * scale, size / 2 - joints[:, 1] * scale], 1)
        jp = np.round(jp * 16).astype(np.int32)
        for j, p in enumerate([] if parents is None else parents):
            if p >= 0:
                cv2.line(img, tuple(jp[p]), tuple(jp[j]), (60, 160, 40), 2, cv2.LINE_AA, shift=4)
        for p in jp:
            cv2.circle(img, tuple(p), 3 * 16, (30, 30, 200), -1, cv2.LINE_AA, shift=4)
    return img


def save_image(path, img: np.ndarray) -> None:
    """Write an image atomically (see :mod:`common.io.atomic`); the format follows the suffix.

    Raises:
        OutputError: (an ``OSError``) OpenCV could not encode the image, or the file cannot be
            written; nothing is written to ``path``.
    """
    path = Path(path)
    try:
        ok, buf = cv2.imencode(path.suffix or ".png", img)
    except cv2.error as err:
        ok, reason = False, str(err).strip().splitlines()[-1]
    else:
        reason = "cv2.imencode returned False"
    if not ok:
        raise OutputError(f"save_image: could not write {path} ({reason}; image shape "
                          f"{getattr(img, 'shape', '?')}, dtype {getattr(img, 'dtype', '?')}; "
                          "use an image suffix such as .png or .jpg)")
    atomic_write_bytes(path, buf.tobytes())
