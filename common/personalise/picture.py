"""The before-and-after picture of one frame, coloured by the residual (``personalise.png``).

Depth maps: one row per view (up to :data:`MAX_ROWS`), the captured depth, then the residual
``|rendered − captured|`` before and after, coloured on one scale (pixels where only one of the two
has depth in grey: the hand's outline disagrees there). Scans: the scan, then the posed mesh before
and after, each vertex coloured by its distance to the scan, in two views.
"""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np

from common.utils.vis import BACKGROUND_BGR, SKIN_BGR, SUPERSAMPLE, _view_matrix, fit_views, paint_mesh

MAX_ROWS = 3
PANEL = 192        # px: a depth panel's side
MESH_PANEL = 320   # px: a mesh panel's side
TEXT = (40, 40, 40)
MISMATCH_BGR = (170, 170, 170)


def colour_scale(values: np.ndarray, top: float) -> np.ndarray:
    """``[..., 3]`` uint8 BGR of ``values`` on OpenCV's TURBO map from 0 (blue) to ``top`` (red)."""
    scaled = np.clip(np.asarray(values, np.float64) / max(top, 1e-9), 0, 1)
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0]
    return lut[np.round(scaled * 255).astype(np.int64)]


def _label(img: np.ndarray, text: str, y: int = 16) -> None:
    cv2.putText(img, text, (6, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, TEXT, 1, cv2.LINE_AA)


def _legend(width: int, top: float, units: str = "mm", note: str = "") -> np.ndarray:
    """A colour bar from 0 to ``top`` (labelled ``'<top> <units>'``) and a line of ``note`` under it."""
    label = f"{top:.1f} {units}"
    (label_w, _), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    bar = np.full((34, width, 3), BACKGROUND_BGR, np.uint8)
    right = width - label_w - 14
    bar[4:16, 60:right] = colour_scale(np.linspace(0, top, right - 60)[None].repeat(12, 0), top)
    cv2.putText(bar, "0", (44, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, TEXT, 1, cv2.LINE_AA)
    cv2.putText(bar, label, (right + 6, 15), cv2.FONT_HERSHEY_SIMPLEX, 0.4, TEXT, 1, cv2.LINE_AA)
    if note:
        cv2.putText(bar, note, (60, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.35, TEXT, 1, cv2.LINE_AA)
    return bar


def _depth_panel(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    shade = np.where(depth > 0, 230 - 190 * np.clip((depth - lo) / max(hi - lo, 1e-9), 0, 1), 0)
    img = np.repeat(shade[..., None], 3, axis=2).astype(np.uint8)
    img[depth <= 0] = BACKGROUND_BGR
    return cv2.resize(img, (PANEL, PANEL), interpolation=cv2.INTER_NEAREST)


def _residual_panel(rendered: np.ndarray, captured: np.ndarray, top: float) -> np.ndarray:
    both = (rendered > 0) & (captured > 0)
    one = (rendered > 0) ^ (captured > 0)
    img = np.empty(rendered.shape + (3,), np.uint8)
    img[:] = BACKGROUND_BGR
    img[one] = MISMATCH_BGR
    img[both] = colour_scale(np.abs(rendered - captured)[both], top)
    return cv2.resize(img, (PANEL, PANEL), interpolation=cv2.INTER_NEAREST)


def depth_picture(captured: np.ndarray, before: np.ndarray, after: np.ndarray, cameras: Sequence[str],
                  title: str, top: Optional[float] = None) -> np.ndarray:
    """The depth-map figure of one frame.

    Args:
        captured, before, after: ``[N, H, W]`` depth crops (mm, 0 = none) of the frame's views.
        cameras: the views' camera names.
        title: the first line (the frame and its mean residuals).
        top: the colour scale's top (mm); default the 95th percentile of the residual before.
    """
    rows = min(MAX_ROWS, len(captured))
    if top is None:
        both = (before > 0) & (captured > 0)
        top = float(np.percentile(np.abs(before - captured)[both], 95)) if both.any() else 1.0
        top = max(top, 1.0)
    lines = []
    for n in range(rows):
        seen = captured[n][captured[n] > 0]
        lo, hi = (float(seen.min()), float(seen.max())) if seen.size else (0.0, 1.0)
        lines.append(([_depth_panel(captured[n], lo, hi), _residual_panel(before[n], captured[n], top),
                       _residual_panel(after[n], captured[n], top)],
                      (f"captured, camera {cameras[n]}", "before", "after")))
    return _figure(lines, title, top, "residual |rendered - captured| (grey: only one of the two has depth)")


def _figure(rows, title: str, top: float, note: str) -> np.ndarray:
    """Rows of labelled panels ``[(panels, labels), …]`` under a title line, over the colour bar."""
    lines = []
    for panels, labels in rows:
        for panel, text in zip(panels, labels):
            _label(panel, text)
        lines.append(np.concatenate(panels, axis=1))
    body = np.concatenate(lines, axis=0)
    head = np.full((26, body.shape[1], 3), BACKGROUND_BGR, np.uint8)
    _label(head, title, 18)
    return np.concatenate([head, body, _legend(body.shape[1], top, "mm", note)], axis=0)


def _mesh_panel(vertices: np.ndarray, faces: np.ndarray, view: str, frame: np.ndarray, centre, scale,
                vertex_values: Optional[np.ndarray], top: float) -> np.ndarray:
    cam = (np.asarray(vertices, np.float64) @ frame - centre) @ _view_matrix(view).T
    big = MESH_PANEL * SUPERSAMPLE
    px = np.stack([big / 2 + cam[:, 0] * scale * SUPERSAMPLE, big / 2 - cam[:, 1] * scale * SUPERSAMPLE], 1)
    img = np.full((big, big, 3), BACKGROUND_BGR, np.uint8)
    if vertex_values is None:
        colour = SKIN_BGR
    else:
        colour = colour_scale(np.asarray(vertex_values)[faces].mean(axis=1), top).astype(np.float64) * 1.25
    paint_mesh(img, px, cam, faces, colour, cull_back=False)
    return cv2.resize(img, (MESH_PANEL, MESH_PANEL), interpolation=cv2.INTER_AREA)


def scan_picture(scan_points: np.ndarray, scan_faces: Optional[np.ndarray], before: np.ndarray, after: np.ndarray,
                 faces: np.ndarray, distance_before: np.ndarray, distance_after: np.ndarray, frame: np.ndarray,
                 title: str, top: Optional[float] = None, views: Sequence[str] = ("palm", "side")) -> np.ndarray:
    """The scan figure of one frame: the scan, the mesh before and after coloured by each vertex's
    distance to the scan (mm).

    Args:
        scan_points, scan_faces: the scan (mm; faces None for a point cloud, drawn as dots).
        before, after: ``[V, 3]`` the posed meshes (mm); faces: ``[F, 3]``.
        distance_before, distance_after: ``[V]`` mm.
        frame: ``[3, 3]`` the hand's axes in world coordinates (the root's rotation), for the views.
        title: the first line.
        top: the colour scale's top (mm); default the 95th percentile before.
    """
    if top is None:
        top = max(1.0, float(np.percentile(distance_before, 95)))
    centre, scale = fit_views([scan_points, before, after], views, MESH_PANEL, frame)
    rows = []
    for view in views:
        if scan_faces is not None:
            scan_panel = _mesh_panel(scan_points, scan_faces, view, frame, centre, scale, None, top)
        else:
            scan_panel = np.full((MESH_PANEL, MESH_PANEL, 3), BACKGROUND_BGR, np.uint8)
            cam = (scan_points @ frame - centre) @ _view_matrix(view).T
            for x, y in np.stack([MESH_PANEL / 2 + cam[:, 0] * scale, MESH_PANEL / 2 - cam[:, 1] * scale], 1):
                cv2.circle(scan_panel, (int(round(x)), int(round(y))), 1, tuple(int(c) for c in SKIN_BGR * 0.8), -1)
        rows.append(([scan_panel, _mesh_panel(before, faces, view, frame, centre, scale, distance_before, top),
                      _mesh_panel(after, faces, view, frame, centre, scale, distance_after, top)],
                     (f"scan ({view})", "before", "after")))
    return _figure(rows, title, top, "each vertex's distance to the scan")

