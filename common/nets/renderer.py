"""Differentiable depth rendering of posed hand meshes (DESIGN §6).

Convention (everything OpenCV-style, millimetres, pixels)::

    x_c      = camrot · (x − campos)                 world mm → camera mm
    (u, v)   = (fx·x_c/z_c + cx,  fy·y_c/z_c + cy)    u right, v down
    (u', v') = A · [u, v, 1]                          2×3 crop affine
    depth    = z_c (mm) of the nearest surface,       0 where nothing is seen

Pixel centres sit at **integer** coordinates: the pixel in row ``r``, column
``c`` of the output covers ``[c − ½, c + ½] × [r − ½, r + ½]`` and is sampled at
``(u', v') = (c, r)``.  This is what ``cv2.projectPoints`` and ``cv2.warpAffine``
assume, so the crop affine built for the images applies unchanged to the mesh.

Two backends (``backend=`` / config ``renderer_backend``: ``auto``, ``pytorch3d``,
``native``; :func:`resolve_backend`).  ``pytorch3d`` is PyTorch3D's rasteriser (imported on
first use, never at import time); ``native`` is the project's own
(:mod:`common.nets.rasterizer`), which applies PyTorch3D's rules to the same screen vertices
and gives the same maps bit for bit in the tests, clipping included, on the CPU and on CUDA,
with no dependency beyond torch.  ``auto`` takes PyTorch3D where it imports.

How it is done with PyTorch3D (0.7.9).  Rather than building a PyTorch3D camera,
each view's vertices are handed to :func:`pytorch3d.renderer.mesh.rasterize_meshes`
already in its screen space, ``(x_ndc, y_ndc, z_c)``:

* PyTorch3D samples output pixel ``(r, c)`` at ``x_ndc = (W − 1 − 2c) / S``,
  ``y_ndc = (H − 1 − 2r) / S`` with ``S = min(H, W)`` (+X left, +Y up, the
  shorter side spans [−1, 1], the longer one proportionally more).  Setting
  ``x_ndc = (W − 1 − 2u') / S`` and ``y_ndc = (H − 1 − 2v') / S`` therefore puts
  the point ``(u', v')`` exactly where the pixel centre ``(c, r) = (u', v')``
  is sampled, for square and non-square images alike.
* The third coordinate is the camera depth ``z_c`` itself, so ``zbuf`` comes out
  in mm.  Screen coordinates are a projective function of camera coordinates
  (``u' · z_c`` is linear in ``x_c``, affine included), so along a planar
  triangle ``1/z_c`` — not ``z_c`` — is linear in screen space.  Linear
  (screen-space) barycentrics would bias the depth of any tilted triangle; with
  ``perspective_correct=True`` PyTorch3D weights the barycentrics by ``1/z_i``,
  which makes the interpolated ``zbuf`` the exact camera depth of the triangle's
  plane along the pixel's ray.
* Near plane: triangles are clipped against ``z_c = near`` by PyTorch3D's own
  clipper (``z_clip_value=near``).  With ``perspective_correct=True`` it
  interpolates ``x_ndc·z`` linearly in ``z``, which is exact here because
  ``x_ndc·z_c`` is a linear function of the camera coordinates.  Triangles
  entirely behind the plane disappear, those crossing it are cut (into one or
  two triangles) at exactly ``z_c = near``; depth is never below ``near``.
* Far plane: a pixel whose nearest surface lies beyond ``far`` reads 0.  With
  one depth per pixel this is the same as discarding every fragment beyond
  ``far``: if the nearest one is beyond, all are.
* Back faces are kept (the hand template has an open wrist, through which the
  inside is visible, as in a real depth camera).

Tiled rasterisation on the CPU.  PyTorch3D bins faces into tiles only on CUDA; its
CPU kernel tests every pixel against every face of the pixel's mesh, and spends a
further ~6.5 µs of bookkeeping on each face of the batch (about what 2,000 of those
pixel tests cost).  So with ``tile_size`` set (the default, CPU only) the renderer does
the binning itself around that kernel: each view is cut into ``h × w`` tiles
(``tile_size`` square, cut to the image if larger), each face is assigned to the tiles
holding pixel centres it may cover, and every non-empty tile of every view becomes one
small mesh (its faces in ascending order, each with its own three vertices) of a
single ``rasterize_meshes`` call on ``h × w`` images; the tiles' maps are pasted back.
The tile whose top-left pixel is ``(r0, c0)`` samples its pixel ``(r − r0, c − c0)``
at the point where the full image samples ``(r, c)`` when a full-image vertex
``(x_ndc, y_ndc, z)`` becomes ``((S·x_ndc + w − W + 2c0)/s, (S·y_ndc + h − H + 2r0)/s, z)``
with ``s = min(h, w)`` (the formulas above with ``u' − c0`` and ``v' − r0``); this is
computed in float64 from the float32 full-image coordinates, then rounded.

A face goes to a tile when its screen bounding box, widened by 0.01 pixel, holds one
of the tile's pixel centres, and, when that box holds at most four of them, when the
triangle itself (widened the same way) holds one: most faces of a hand are about a
pixel in size, and many hold no pixel centre at all.  Faces the kernel always skips
(entirely behind the near plane, zero area) go nowhere; faces cut by the near plane go
to every tile, as their clipped outline is only known inside PyTorch3D.  PyTorch3D's
work for one pixel depends only on the faces it tests there, and each pixel still
tests every face that could cover it, in the same order, so the result is the
untiled one up to float32 rounding of the moved coordinates (~1e-6 pixel): the same
coverage, depths within a few float32 ulps, and the same face everywhere except where
two faces meet at the pixel centre at the same depth, where rounding may pick either
(at most one covered pixel in a few thousand in the tests).  Gradients agree likewise
(to ~1e-4 of their largest value; moving the vertices by a few float32 ulps changes
them more).  The
(tile, face) pairs come from tensor operations on each face's range of tiles; when
they would not cut the kernel's work, or would exceed ``_MAX_TILE_COPIES`` per face of
the batch (which bounds the memory, e.g. for a mesh mostly across the near plane), the
views are rendered whole.  On CUDA PyTorch3D bins by itself and views are rendered whole.

The native (vectorised) rasteriser.  PyTorch3D's kernel, even tiled, spends most of a CPU
training iteration on per-face bookkeeping.  :mod:`common.nets.rasterizer` takes the same
decisions (near-plane clipping into one or two triangles, sample points, box test, zero-area
and depth skips, coverage by perspective-corrected barycentrics > 0, depth, nearest face with
the lowest index on a tie, ``faces_per_pixel`` nearest) for all (face, pixel) pairs at once,
with the kernel's float32 formulas in its order of operations, its memory bounded by chunk
sizes: on this project's machines its face and depth maps equal PyTorch3D's bit for bit, and
it is several times faster on the CPU (BENCHMARKS.md).  The ``pytorch3d`` backend uses it too
on the CPU where no face is cut by the near plane and ``faces_per_pixel`` is 1 (the case the
vectorised rasteriser handled before it clipped), and PyTorch3D for the rest, for CUDA and for
:meth:`DepthRenderer.rasterize` with a gradient (PyTorch3D's backward).  Non-finite inputs are
refused with an error naming them, with either backend.

Gradients.  :meth:`DepthRenderer.forward` takes its values from the rasteriser and its gradient
from :func:`plane_depth`: the depth of a covered pixel written as a function of its face's
three vertices (where the pixel's ray meets the face's plane), computed for all covered pixels
at once and differentiated by autograd.  For a fixed covering face this is the function
PyTorch3D's perspective-correct ``zbuf`` computes, so the gradient is the same; but PyTorch3D's
CPU backward spends tensor bookkeeping on every pixel (about 30 µs each: 44 % of a
``cpu_small.yaml`` training iteration, 87 % of a default one at batch 1), and this costs
1–30 ms per batch (BENCHMARKS.md).  It is
also exact for faces cut by the near plane (the cut leaves the plane unchanged), where
PyTorch3D 0.7.9's clipper (``clip.py``, ``_find_verts_intersecting_clipping_plane``) detaches
the interpolation weight of one of the two cut points.  Pixels without a face get no gradient;
there is no silhouette gradient.  With the ``native`` backend this is the gradient everywhere,
also with respect to the cameras (``plane_depth`` is a function of them too) and through
:meth:`DepthRenderer.rasterize`; with ``pytorch3d``, when a camera tensor requires a gradient,
or through :meth:`DepthRenderer.rasterize`, the gradient is PyTorch3D's (equal to float32
rounding where nothing is clipped; tests/test_renderer.py).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

# PyTorch3D's kEpsilon (the CPU kernel skips faces whose screen area, in its NDC units, is within
# it of zero) and its edge function, shared with the vectorised rasteriser.
from common.nets.rasterizer import _P3D_EPS, _edge, cuts_near_plane, rasterize_depth

__all__ = ["project_points", "DepthRenderer", "DEFAULT_TILE_SIZE", "BACKENDS", "resolve_backend",
           "pytorch3d_available", "RendererBackendError"]

log = logging.getLogger(__name__)

# The renderer_backend option's values (DepthRenderer's ``backend``).
BACKENDS = ("auto", "pytorch3d", "native")

# What to tell a user who asked for PyTorch3D where it does not import.
PYTORCH3D_INSTALL_HINT = ("install the tested stack with `pip install -r requirements.txt` (torch==2.12.1 with "
                          "easypytorch3d==0.7.9.post1, PyTorch3D's binary for that torch), or set "
                          "renderer_backend: native (the project's own rasteriser, any torch)")


class RendererBackendError(ValueError):
    """A renderer backend that cannot run here (unknown name, or PyTorch3D asked for but missing)."""


_PYTORCH3D = {}       # the imported API, or the reason it does not import (filled on first use)
_ANNOUNCED = set()    # backends already named in the log


def _pytorch3d_api():
    """``(rasterize_meshes, Meshes)`` from PyTorch3D, imported on first use (never at import
    time: the project runs without it); raises :class:`RendererBackendError` when missing."""
    if not _PYTORCH3D:
        try:
            from pytorch3d.renderer.mesh import rasterize_meshes
            from pytorch3d.structures import Meshes
            _PYTORCH3D["api"] = (rasterize_meshes, Meshes)
        except Exception as err:  # ImportError, or a binary built for another torch (OSError, ...)
            _PYTORCH3D["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
    if "api" not in _PYTORCH3D:
        raise RendererBackendError(f"renderer_backend 'pytorch3d': PyTorch3D does not import here "
                                   f"({_PYTORCH3D['error']}); {PYTORCH3D_INSTALL_HINT}")
    return _PYTORCH3D["api"]


def pytorch3d_available() -> bool:
    """Whether PyTorch3D's rasteriser imports in this environment."""
    try:
        _pytorch3d_api()
        return True
    except RendererBackendError:
        return False


def resolve_backend(name: str = "auto") -> str:
    """``'auto'`` → ``'pytorch3d'`` where PyTorch3D imports, else ``'native'``; ``'pytorch3d'``
    and ``'native'`` as asked (the former raises :class:`RendererBackendError`, one line saying
    how to install it, where it does not import). The first time a backend is chosen the log
    says which."""
    if name not in BACKENDS:
        raise RendererBackendError(f"renderer_backend: expected one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "pytorch3d":
        _pytorch3d_api()
        chosen, why = "pytorch3d", "asked for"
    elif name == "native":
        chosen, why = "native", "asked for"
    elif pytorch3d_available():
        chosen, why = "pytorch3d", "auto: PyTorch3D imports"
    else:
        chosen, why = "native", f"auto: PyTorch3D does not import ({_PYTORCH3D['error']})"
    if chosen not in _ANNOUNCED:
        _ANNOUNCED.add(chosen)
        log.info("renderer backend: %s (%s)", "PyTorch3D's rasteriser" if chosen == "pytorch3d"
                 else "the project's own rasteriser (common/nets/rasterizer.py)", why)
    return chosen

# Camera depth (mm) used instead of z when |z| is below it, only to keep the
# division finite for vertices on the camera plane. Such vertices are always
# behind the near plane (near > 0), so the clipper removes or cuts their faces;
# replacing z by this value moves the cut point by at most ~1e-6 of a pixel.
_Z_GUARD = 1e-6

# Default tile size of the CPU path (pixels), chosen by measurement (main/bench.py renderer).
DEFAULT_TILE_SIZE = 16

# Slack (pixels) added around a face's screen box (plus this fraction of the coordinates'
# magnitude) and around the triangle when deciding which pixel centres it may cover.  The
# kernel's coordinates differ from the float64 values used for the decision by float32
# rounding only (~1e-5 pixel at 256 pixels).
_TILE_MARGIN_PX = 1e-2
_TILE_MARGIN_REL = 1e-6

# Faces whose box reaches at most this many pixel centres of a tile are tested for containing
# one of them (see _covers_a_pixel_centre).
_COVER_TEST_PIXELS = 4
_COVER_TEST_CHUNK = 1 << 16

# PyTorch3D's CPU kernel spends on each face of its batch, whatever the image size, about as
# long as on this many (pixel, face) bounding-box tests (measured: ~6.5 us against ~2-4.5 ns).
_FACE_COST_PIXELS = 2048

# The tiled path is used only if the (tile, face) pairs it makes are at most this many times
# the faces of the call (hand crops: 0.3-1.5): bounds its memory, ~150 bytes per pair at the
# peak, the untiled path's ~50 bytes per face plus ~30 bytes per pixel aside.
_MAX_TILE_COPIES = 4


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _check_tensor(name: str, t, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor of shape {expected}, got dtype {t.dtype}")


def _check_finite(name: str, t: Optional[torch.Tensor]) -> None:
    """A clear error naming ``name`` and the first index of a NaN or infinity in ``t``."""
    if t is None:
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{name}: non-finite value {float(t[index])} at index {index} of {_shape(t)} "
                         f"({int(bad.sum())} such values); expected finite numbers")


def _validate_cameras(points: torch.Tensor, camrot, campos, focal, princpt, affine,
                      points_name: str = "points") -> Tuple[int, int, int]:
    """Check the shapes of the projection inputs; returns ``(B, N, V)``."""
    _check_tensor(points_name, points, "[B, V, 3]")
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"{points_name}: expected [B, V, 3] (mm), got {_shape(points)}")
    B, V = int(points.shape[0]), int(points.shape[1])
    _check_tensor("camrot", camrot, "[B, N, 3, 3]")
    if camrot.dim() != 4 or camrot.shape[0] != B or camrot.shape[-2:] != (3, 3):
        raise ValueError(
            f"camrot: expected [B, N, 3, 3] matching {points_name}' batch B={B}, got {_shape(camrot)}")
    N = int(camrot.shape[1])
    for name, t, tail in (("campos", campos, (3,)), ("focal", focal, (2,)), ("princpt", princpt, (2,))):
        spec = f"[B, N, {tail[0]}]"
        _check_tensor(name, t, spec)
        if _shape(t) != (B, N) + tail:
            raise ValueError(f"{name}: expected {spec} with B={B}, N={N} (from {points_name} and camrot), "
                             f"got {_shape(t)}")
    if affine is not None:
        _check_tensor("affine", affine, "[B, N, 2, 3]")
        if _shape(affine) != (B, N, 2, 3):
            raise ValueError(f"affine: expected [B, N, 2, 3] with B={B}, N={N} (from {points_name} and camrot), "
                             f"got {_shape(affine)}")
    for name, t in (("camrot", camrot), ("campos", campos), ("focal", focal), ("princpt", princpt),
                    ("affine", affine)):
        if t is not None and t.device != points.device:
            raise ValueError(f"{name}: on device {t.device}, but {points_name} is on {points.device}")
    return B, N, V


def _to_camera(points: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor) -> torch.Tensor:
    """``[B, V, 3]`` world mm → ``[B, N, V, 3]`` camera mm."""
    d = points[:, None, :, :] - campos[:, :, None, :]                      # [B, N, V, 3]
    # Written as a broadcast product and sum rather than a (batched) matmul so
    # that a view's numbers do not depend on how many views share the call.
    return (camrot[:, :, None, :, :] * d[:, :, :, None, :]).sum(-1)


def _camera_to_pixels(xc: torch.Tensor, z: torch.Tensor, focal, princpt, affine) -> torch.Tensor:
    """Camera coordinates ``[B, N, V, 3]`` and divisor ``z [B, N, V]`` → ``(u', v') [B, N, V, 2]``."""
    u = focal[:, :, None, 0] * (xc[..., 0] / z) + princpt[:, :, None, 0]
    v = focal[:, :, None, 1] * (xc[..., 1] / z) + princpt[:, :, None, 1]
    if affine is not None:
        a = affine[:, :, None, :, :]                                        # [B, N, 1, 2, 3]
        u, v = (a[..., 0, 0] * u + a[..., 0, 1] * v + a[..., 0, 2],
                a[..., 1, 0] * u + a[..., 1, 1] * v + a[..., 1, 2])
    return torch.stack((u, v), dim=-1)


def project_points(points: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor,
                   focal: torch.Tensor, princpt: torch.Tensor,
                   affine: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Project world points into every view (pinhole, no distortion, then the crop affine).

    Args:
        points: ``[B, V, 3]`` world coordinates, mm.
        camrot: ``[B, N, 3, 3]`` world→camera rotation (``x_c = camrot · (x − campos)``).
        campos: ``[B, N, 3]`` camera centres in world coordinates, mm.
        focal: ``[B, N, 2]`` ``(fx, fy)`` in pixels.
        princpt: ``[B, N, 2]`` ``(cx, cy)`` in pixels.
        affine: ``[B, N, 2, 3]`` crop affine applied to ``(u, v, 1)``, or None for none.

    Returns:
        ``[B, N, V, 3]``: ``(u', v')`` in pixels of the (cropped) image, OpenCV
        convention (u right, v down, pixel centres at integers, as
        ``cv2.projectPoints``), and the camera depth ``z_c`` in mm.  Points with
        ``z_c = 0`` project to ±inf/nan; the caller decides what to do with them.
    """
    _validate_cameras(points, camrot, campos, focal, princpt, affine)
    xc = _to_camera(points, camrot, campos)
    z = xc[..., 2]
    return torch.cat((_camera_to_pixels(xc, z, focal, princpt, affine), z[..., None]), dim=-1)


def _parse_image_size(image_size) -> Tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        H, W = (int(s) for s in image_size)
        ok = (H, W) == tuple(image_size) and H > 0 and W > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"image_size: expected (H, W) positive ints or one int, got {image_size!r}")
    return H, W


class DepthRenderer(nn.Module):
    """Render depth maps of a batch of meshes seen from several cameras each.

    All ``B·N`` (sample, view) pairs are rasterised in one call.  With the ``native``
    backend by :func:`common.nets.rasterizer.rasterize_depth` (PyTorch3D's kernel's
    rules, vectorised, clipping included) on the CPU and on CUDA; with ``pytorch3d``, on
    the CPU by the same function where it equals PyTorch3D bit for bit (no face cut by
    the near plane, one face per pixel) and else by PyTorch3D, on CUDA as a batch of
    ``B·N`` meshes sharing ``faces`` (or with ``tile_size`` off), on the CPU as a batch
    of the non-empty tiles of all views (see the module docstring).  Runs on the
    device of its inputs (move the module with ``.to(device)`` so ``faces`` follows).

    Args:
        faces: ``[F, 3]`` integer vertex indices of the triangles.  Kept as a
            non-persistent buffer: it belongs to the hand model, not to a checkpoint.
        image_size: ``(H, W)`` of the rendered maps in pixels (an int for square).
        near: near clipping plane, camera depth in mm (> 0).  Faces are clipped there.
        far: a pixel whose nearest surface is farther than this (mm) reads 0.
        faces_per_pixel: faces kept per pixel by the rasteriser; only the nearest
            is used, so 1 (the default) is all a depth map needs.
        bin_size, max_faces_per_bin: PyTorch3D's coarse-to-fine binning, used on CUDA only (the
            CPU rasteriser is the naive per-pixel loop, ``bin_size=0``).
            ``bin_size=None`` lets PyTorch3D pick from the image size.
            ``max_faces_per_bin=None`` uses the largest count a bin can ever need:
            a bin belongs to one mesh, so it never holds more than the mesh's
            ``F`` faces (``2F`` when near-plane clipping splits faces, in which
            case that is what is used).  This is usually far below PyTorch3D's
            own default (a fifth of all faces in the batch), and never
            overflows, so no faces are silently dropped.
        tile_size: side in pixels of the tiles of the CPU path (the tiles of an
            image smaller than that are cut to the image); ``None`` or 0 renders
            each view whole, as on CUDA.  The result is the same either way, up to
            float32 rounding; tiles only make it faster.
        cpu_rasteriser: for the ``pytorch3d`` backend: ``'vectorised'`` (default): on the
            CPU, depth without a gradient through the rasteriser (what :meth:`forward`
            needs) comes from the vectorised rasteriser, except when a face is cut by the
            near plane or ``faces_per_pixel > 1``; ``'pytorch3d'``: always PyTorch3D.
        backend: ``'auto'`` (default: PyTorch3D where it imports, else the project's own
            rasteriser), ``'pytorch3d'`` or ``'native'`` (config option ``renderer_backend``;
            see :func:`resolve_backend`).  ``tile_size``, ``bin_size``,
            ``max_faces_per_bin`` and ``cpu_rasteriser`` are PyTorch3D's; the native
            rasteriser bounds its memory by its own chunk sizes.
    """

    def __init__(self, faces: torch.Tensor, image_size: Union[int, Sequence[int]] = (256, 256),
                 near: float = 1.0, far: float = 99999.0, faces_per_pixel: int = 1,
                 bin_size: Optional[int] = None, max_faces_per_bin: Optional[int] = None,
                 tile_size: Optional[int] = DEFAULT_TILE_SIZE, cpu_rasteriser: str = "vectorised",
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(faces, torch.Tensor):
            faces = torch.as_tensor(faces)
        if faces.dim() != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
            raise ValueError(f"faces: expected [F, 3] vertex indices with F > 0, got {_shape(faces)}")
        if faces.is_floating_point() or faces.dtype == torch.bool:
            raise ValueError(f"faces: expected an integer tensor, got dtype {faces.dtype}")
        if int(faces.min()) < 0:
            raise ValueError("faces: vertex indices must be >= 0")
        self.image_size = _parse_image_size(image_size)
        if not near > 0:
            raise ValueError(f"near: expected a positive depth in mm, got {near}")
        if not far > near:
            raise ValueError(f"far: expected far > near ({near}), got {far}")
        if int(faces_per_pixel) < 1:
            raise ValueError(f"faces_per_pixel: expected >= 1, got {faces_per_pixel}")
        if bin_size is not None and int(bin_size) < 0:
            raise ValueError(f"bin_size: expected None or >= 0, got {bin_size}")
        if max_faces_per_bin is not None and int(max_faces_per_bin) < 1:
            raise ValueError(f"max_faces_per_bin: expected None or >= 1, got {max_faces_per_bin}")
        if tile_size is not None and (isinstance(tile_size, bool) or int(tile_size) != tile_size
                                      or int(tile_size) < 0):
            raise ValueError(f"tile_size: expected None or an int >= 0, got {tile_size!r}")
        self.near = float(near)
        self.far = float(far)
        self.faces_per_pixel = int(faces_per_pixel)
        self.bin_size = None if bin_size is None else int(bin_size)
        self.max_faces_per_bin = None if max_faces_per_bin is None else int(max_faces_per_bin)
        self.tile_size = int(tile_size) if tile_size else None
        if cpu_rasteriser not in ("vectorised", "pytorch3d"):
            raise ValueError(f"cpu_rasteriser: expected 'vectorised' or 'pytorch3d', got {cpu_rasteriser!r}")
        self.cpu_rasteriser = cpu_rasteriser
        self.backend = resolve_backend(backend)
        self.register_buffer("faces", faces.detach().to(torch.int64).clone(), persistent=False)
        self._min_vertex_num = int(faces.max()) + 1

    def extra_repr(self) -> str:
        return (f"faces={self.faces.shape[0]}, image_size={self.image_size}, near={self.near}, "
                f"far={self.far}, faces_per_pixel={self.faces_per_pixel}, tile_size={self.tile_size}, "
                f"cpu_rasteriser={self.cpu_rasteriser!r}, backend={self.backend!r}")

    def screen_vertices(self, vertices: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor,
                        focal: torch.Tensor, princpt: torch.Tensor,
                        affine: Optional[torch.Tensor]) -> torch.Tensor:
        """Vertices in PyTorch3D's screen space for every view: ``[B, N, V, 3]``.

        ``(x_ndc, y_ndc)`` as in the module docstring and the camera depth in mm
        (kept away from 0 by ``_Z_GUARD``, see there).
        """
        xc = _to_camera(vertices, camrot, campos)
        z = xc[..., 2]
        z = torch.where(z.abs() < _Z_GUARD, torch.full_like(z, _Z_GUARD), z)
        uv = _camera_to_pixels(xc, z, focal, princpt, affine)
        H, W = self.image_size
        s = float(min(H, W))
        x_ndc = (W - 1 - 2 * uv[..., 0]) / s
        y_ndc = (H - 1 - 2 * uv[..., 1]) / s
        return torch.stack((x_ndc, y_ndc, z), dim=-1)

    def forward(self, vertices: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor,
                focal: torch.Tensor, princpt: torch.Tensor,
                affine: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Render depth maps.

        Args:
            vertices: ``[B, V, 3]`` world coordinates, mm.
            camrot: ``[B, N, 3, 3]`` world→camera rotations.
            campos: ``[B, N, 3]`` camera centres, mm.
            focal: ``[B, N, 2]`` ``(fx, fy)``, pixels.
            princpt: ``[B, N, 2]`` ``(cx, cy)``, pixels.
            affine: ``[B, N, 2, 3]`` crop affine into the ``(H, W)`` image, or None
                when the cameras already describe the rendered image.

        Returns:
            ``[B, N, H, W]`` depth in mm (camera z of the nearest surface), 0 where
            no face covers the pixel centre; dtype of ``vertices`` (the rasteriser
            itself works in float32).
        """
        cameras = (camrot, campos, focal, princpt, affine)
        camera_grad = any(t is not None and t.requires_grad for t in cameras)
        # The native backend always differentiates plane_depth (cameras included); PyTorch3D's
        # backward is used for a camera gradient with the pytorch3d backend.
        own_gradient = (torch.is_grad_enabled() and (vertices.requires_grad or camera_grad)
                        and (self.backend == "native" or not camera_grad))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not own_gradient):
            face, zbuf = self.rasterize(vertices, *cameras)
        face, depth = face[..., 0], zbuf[..., 0]
        if own_gradient:
            # The value stays the rasteriser's; the gradient is that of the same depth written as a
            # function of the covering face's vertices (see the module docstring).
            covered = torch.nonzero(face >= 0, as_tuple=True)
            plane = plane_depth(vertices, self.faces, covered, face[covered], *cameras)
            depth = depth.to(plane.dtype).index_put(covered, plane - plane.detach(), accumulate=True)
        seen = (face >= 0) & (depth <= self.far)
        return torch.where(seen, depth, torch.zeros_like(depth)).to(vertices.dtype)

    def rasterize(self, vertices: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor,
                  focal: torch.Tensor, princpt: torch.Tensor,
                  affine: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """PyTorch3D's fragments for every view, before the far plane and the 0 fill.

        Same arguments as :meth:`forward`.  Returns ``(face, zbuf)``, both
        ``[B, N, H, W, faces_per_pixel]``: ``face`` (int64) the index into ``faces``
        of the k-th nearest face at each pixel centre, −1 for none; ``zbuf``
        (float32, differentiable) its camera depth in mm, −1 for none.  The gradient is
        PyTorch3D's backward with the ``pytorch3d`` backend, :func:`plane_depth`'s with
        ``native``.

        Raises:
            ValueError: wrong shapes or devices, or a non-finite input (naming it).
        """
        B, N, V = _validate_cameras(vertices, camrot, campos, focal, princpt, affine, "vertices")
        for name, t in (("vertices", vertices), ("camrot", camrot), ("campos", campos), ("focal", focal),
                        ("princpt", princpt), ("affine", affine)):
            _check_finite(name, t)
        if V < self._min_vertex_num:
            raise ValueError(f"vertices: faces index vertex {self._min_vertex_num - 1}, "
                             f"but vertices has only V={V} ([B, V, 3] = {_shape(vertices)})")
        if self.faces.device != vertices.device:
            raise ValueError(f"vertices: on device {vertices.device}, but the renderer's faces are on "
                             f"{self.faces.device}; move the module with .to(device)")
        H, W = self.image_size
        K = self.faces_per_pixel
        M = B * N
        if M == 0:
            return (torch.full((B, N, H, W, K), -1, dtype=torch.int64, device=vertices.device),
                    vertices.new_full((B, N, H, W, K), -1.0, dtype=torch.float32))

        verts = self.screen_vertices(vertices, camrot, campos, focal, princpt, affine)
        # The PyTorch3D kernels are float32 only.
        verts = verts.reshape(M, V, 3).to(torch.float32)
        if self.backend == "native":
            face, zbuf = rasterize_depth(verts.detach(), self.faces, self.image_size, self.near, K)
            face, zbuf = face.reshape(B, N, H, W, K), zbuf.reshape(B, N, H, W, K)
            if torch.is_grad_enabled() and verts.requires_grad:
                covered = torch.nonzero(face >= 0, as_tuple=True)
                plane = plane_depth(vertices, self.faces, covered[:4], face[covered], camrot, campos, focal,
                                    princpt, affine)
                zbuf = zbuf.index_put(covered, (plane - plane.detach()).to(zbuf.dtype), accumulate=True)
            return face, zbuf
        out = None
        if not vertices.is_cuda:
            if (self.cpu_rasteriser == "vectorised" and K == 1
                    and not (torch.is_grad_enabled() and verts.requires_grad)
                    and not cuts_near_plane(verts, self.faces, self.near)):
                out = rasterize_depth(verts, self.faces, self.image_size, self.near)
            if out is None and self.tile_size:
                out = self._rasterize_tiled(verts)
        if out is None:
            out = self._rasterize_whole(verts)
        face, zbuf = out
        return face.reshape(B, N, H, W, K), zbuf.reshape(B, N, H, W, K)

    def _raster_settings(self) -> dict:
        return dict(blur_radius=0.0, faces_per_pixel=self.faces_per_pixel, perspective_correct=True,
                    clip_barycentric_coords=False, cull_backfaces=False, z_clip_value=self.near,
                    cull_to_frustum=False)

    def _rasterize_whole(self, verts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every view as one mesh of one ``rasterize_meshes`` call: ``[M, V, 3]`` screen
        vertices → ``face``, ``zbuf`` ``[M, H, W, K]``."""
        rasterize_meshes, Meshes = _pytorch3d_api()
        M, F = int(verts.shape[0]), int(self.faces.shape[0])
        meshes = Meshes(verts=verts, faces=self.faces[None].expand(M, F, 3))
        if verts.is_cuda:
            bin_size = self.bin_size
            max_faces_per_bin = self.max_faces_per_bin
            if max_faces_per_bin is None:
                clips = bool((verts[..., 2] < self.near).any())
                max_faces_per_bin = 2 * F if clips else F
        else:
            # Binned rasterisation is not implemented on the CPU.
            bin_size, max_faces_per_bin = 0, None
        pix_to_face, zbuf, _, _ = rasterize_meshes(
            meshes, image_size=self.image_size, bin_size=bin_size, max_faces_per_bin=max_faces_per_bin,
            **self._raster_settings())
        # Packed face index m·F + f → f.
        face = torch.where(pix_to_face >= 0, pix_to_face % F, pix_to_face)
        return face, zbuf

    def _tile_layout(self) -> Tuple[int, int, int, int]:
        """``(h, w, tiles down, tiles across)`` of the CPU tiling."""
        H, W = self.image_size
        h, w = min(self.tile_size, H), min(self.tile_size, W)
        return h, w, -(-H // h), -(-W // w)

    @torch.no_grad()
    def _tile_pairs(self, verts: torch.Tensor, max_pairs: int):
        """Which faces each tile needs, from the views' screen vertices ``[M, V, 3]``.

        Returns ``(tile, mface)``: for every (tile, face) pair, sorted by tile then face,
        the global tile index ``(m·tiles_down + ty)·tiles_across + tx`` and the face as
        ``m·F + f``; or None when there would be more than ``max_pairs`` pairs.
        """
        H, W = self.image_size
        h, w, nty, ntx = self._tile_layout()
        S = float(min(H, W))
        M, V, F = int(verts.shape[0]), int(verts.shape[1]), int(self.faces.shape[0])
        fv = verts[:, self.faces]                                           # [M, F, 3, 3]
        x, y, z = fv.unbind(-1)
        # Faces the kernel skips whatever the pixel: entirely behind the near plane (PyTorch3D's
        # clipper culls them) or of zero area (the kernel's float32 expression, same numbers).
        behind = (z < self.near).sum(-1)                                    # [M, F]
        area = _edge(x[..., 0], y[..., 0], x[..., 1], y[..., 1], x[..., 2], y[..., 2])
        skip = (behind == 3) | ((area <= _P3D_EPS) & (area >= -_P3D_EPS))
        # Faces cut by the near plane (or with non-finite coordinates) may reach any pixel.
        anywhere = ((behind > 0) & (behind < 3)) | ~torch.isfinite(fv[..., :2]).flatten(-2).all(-1)
        del behind, area
        x_lo, x_hi = torch.aminmax(x, dim=-1)
        y_lo, y_hi = torch.aminmax(y, dim=-1)
        del fv, x, y, z

        def centres(ndc_lo, ndc_hi, size):
            # Pixel coordinate p = (size − 1 − S·ndc)/2 of the box's ends (float64: exact images of
            # the float32 values the kernel sees) → first and last pixel centre it may reach.
            p_lo = (size - 1 - S * ndc_hi.double()) / 2
            p_hi = (size - 1 - S * ndc_lo.double()) / 2
            margin = _TILE_MARGIN_PX + _TILE_MARGIN_REL * torch.maximum(p_lo.abs(), p_hi.abs())
            return torch.ceil(p_lo - margin).clamp(min=0), torch.floor(p_hi + margin).clamp(max=size - 1)

        c_lo, c_hi = centres(x_lo, x_hi, W)
        r_lo, r_hi = centres(y_lo, y_hi, H)
        del x_lo, x_hi, y_lo, y_hi
        keep = anywhere | (~skip & (c_lo <= c_hi) & (r_lo <= r_hi))
        del skip
        c_lo = torch.where(anywhere, 0.0, c_lo.clamp(max=W - 1)).long()
        r_lo = torch.where(anywhere, 0.0, r_lo.clamp(max=H - 1)).long()
        c_hi = torch.where(anywhere, W - 1.0, c_hi.clamp(min=0)).long()
        r_hi = torch.where(anywhere, H - 1.0, r_hi.clamp(min=0)).long()
        tx0, ty0 = c_lo // w, r_lo // h
        nx = c_hi // w - tx0 + 1
        count = torch.where(keep, nx * (r_hi // h - ty0 + 1), 0).reshape(-1)    # [M·F]
        del keep
        total = int(count.sum())
        if total > max_pairs:
            return None
        # Expand every kept face into its tiles: the k-th pair of face i is the tile
        # (ty0 + k // nx, tx0 + k % nx) of its range.
        mface = torch.nonzero(count).squeeze(1)                             # m·F + f, ascending
        n = count[mface]
        owner = torch.repeat_interleave(torch.arange(len(mface), device=verts.device), n, output_size=total)
        k = torch.arange(total, device=verts.device) - (torch.cumsum(n, 0) - n)[owner]
        mface = mface[owner]
        del owner
        nx = nx.reshape(-1)[mface]
        ty = ty0.reshape(-1)[mface] + torch.div(k, nx, rounding_mode="floor")
        tx = tx0.reshape(-1)[mface] + torch.remainder(k, nx)
        del k, nx
        # Drop the pairs where the face contains none of the pixel centres of the tile its box
        # reaches (most faces of a hand are about a pixel or smaller): tested when those are
        # at most _COVER_TEST_PIXELS centres, with the same margin, in float64.
        cols = (torch.maximum(c_lo.reshape(-1)[mface], tx * w), torch.minimum(c_hi.reshape(-1)[mface], tx * w + w - 1))
        rows = (torch.maximum(r_lo.reshape(-1)[mface], ty * h), torch.minimum(r_hi.reshape(-1)[mface], ty * h + h - 1))
        test = ((cols[1] - cols[0] + 1) * (rows[1] - rows[0] + 1) <= _COVER_TEST_PIXELS) & ~anywhere.reshape(-1)[mface]
        test = torch.nonzero(test).squeeze(1)
        keep = torch.ones_like(mface, dtype=torch.bool)
        for chunk in torch.split(test, _COVER_TEST_CHUNK):                  # bounds the memory
            tm = mface[chunk]
            tv = verts.reshape(M * V, 3)[torch.div(tm, F, rounding_mode="floor")[:, None] * V + self.faces[tm % F]]
            keep[chunk] = _covers_a_pixel_centre(
                (W - 1 - S * tv[..., 0].double()) / 2, (H - 1 - S * tv[..., 1].double()) / 2,
                cols[0][chunk], cols[1][chunk], rows[0][chunk], rows[1][chunk])
        del cols, rows, test
        mface, ty, tx = mface[keep], ty[keep], tx[keep]
        tile = (torch.div(mface, F, rounding_mode="floor") * nty + ty) * ntx + tx
        # Pairs were made in (m, f) order; a stable sort by tile keeps faces ascending in each.
        tile, order = torch.sort(tile, stable=True)
        return tile, mface[order]

    def _rasterize_tiled(self, verts: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The CPU path: all non-empty tiles of all views in one ``rasterize_meshes`` call.
        Same result as :meth:`_rasterize_whole`, or None when tiling does not pay."""
        H, W = self.image_size
        h, w, nty, ntx = self._tile_layout()
        M, V = int(verts.shape[0]), int(verts.shape[1])
        F, K = int(self.faces.shape[0]), self.faces_per_pixel
        # The kernel's cost is about (_FACE_COST_PIXELS + pixels) per face of a mesh; tiling is
        # used when it is smaller for the faces' (tile, face) pairs than for the whole views.
        # (Even one tile saves the faces that reach no pixel centre.)
        max_pairs = min(_MAX_TILE_COPIES * M * F,
                        (M * F * (_FACE_COST_PIXELS + H * W)) // (_FACE_COST_PIXELS + h * w))
        pairs = self._tile_pairs(verts, max_pairs)
        if pairs is None:
            return None
        tile, mface = pairs
        empty_face = torch.full((M * nty * ntx, h, w, K), -1, dtype=torch.int64, device=verts.device)
        empty_z = verts.new_full((M * nty * ntx, h, w, K), -1.0)
        if len(tile) == 0:
            # Nothing on screen.  Like the untiled path, keep the output in the graph (with zero
            # gradients): a sum over no element is an exact 0 connected to the vertices.
            return self._paste(empty_face), self._paste(empty_z + verts[:0].sum())
        tiles, per_tile = torch.unique_consecutive(tile, return_counts=True)

        # The faces' vertices, moved into their tile's screen space (float64 arithmetic on the
        # float32 inputs, so each tile coordinate is the correctly rounded image of the
        # full-image one; z is untouched).
        S = min(H, W)
        m = torch.div(mface, F, rounding_mode="floor")
        vidx = m[:, None] * V + self.faces[mface - m * F]                  # [P, 3]
        fv = verts.reshape(M * V, 3)[vidx]                                  # [P, 3, 3]
        ty = torch.div(tile, ntx, rounding_mode="floor") % nty
        tx = tile % ntx
        shift = torch.stack((w - W + 2 * w * tx, h - H + 2 * h * ty), -1).to(torch.float64)   # [P, 2]
        xy = fv[..., :2].double().mul_(S).add_(shift[:, None, :]).div_(min(h, w))
        fv = torch.cat((xy.to(torch.float32), fv[..., 2:]), -1)
        del xy, vidx, shift

        first = torch.cumsum(per_tile, 0) - per_tile
        rasterize_meshes, _ = _pytorch3d_api()
        pix_to_face, zbuf, _, _ = rasterize_meshes(
            _TileBatch(fv, first, per_tile), image_size=(h, w), bin_size=0, max_faces_per_bin=1,
            **self._raster_settings())
        # Tile-batch face (pair) index → f.
        face = torch.where(pix_to_face >= 0, mface[pix_to_face.clamp(min=0)] % F, pix_to_face)
        face = empty_face.index_copy_(0, tiles, face)
        zbuf = empty_z.index_copy(0, tiles, zbuf)
        return self._paste(face), self._paste(zbuf)

    def _paste(self, t: torch.Tensor) -> torch.Tensor:
        """``[M·tiles, h, w, K]`` tiles in (m, ty, tx) order → ``[M, H, W, K]`` images."""
        H, W = self.image_size
        h, w, nty, ntx = self._tile_layout()
        K = t.shape[-1]
        t = t.reshape(-1, nty, ntx, h, w, K).permute(0, 1, 3, 2, 4, 5).reshape(-1, nty * h, ntx * w, K)
        return t[:, :H, :W]


def plane_depth(vertices: torch.Tensor, faces: torch.Tensor, pixels: Tuple[torch.Tensor, ...],
                pixel_faces: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor, focal: torch.Tensor,
                princpt: torch.Tensor, affine: Optional[torch.Tensor]) -> torch.Tensor:
    """Camera depth (mm) where each covered pixel's ray meets the plane of its face.

    The ray of crop pixel ``(c, r)`` goes through the camera-pixel ``(u, v) = A⁻¹ (c, r)``, i.e.
    along ``d = ((u − cx)/fx, (v − cy)/fy, 1)`` in camera space; the plane through the face's
    camera-space vertices ``a, b, c`` with normal ``n = (b − a) × (c − a)`` meets it at
    ``z = (n · a) / (n · d)``. This is the depth PyTorch3D's perspective-correct ``zbuf`` holds
    (also for a face cut by the near plane: the cut keeps the plane), as a differentiable
    function of the vertices.

    Args:
        vertices: ``[B, V, 3]`` world mm; faces: ``[F, 3]``.
        pixels: ``(b, n, r, c)``, four ``[P]`` index tensors: sample, view, row, column of each
            covered pixel.
        pixel_faces: ``[P]`` the face covering each of them.
        camrot, campos, focal, princpt, affine: as :meth:`DepthRenderer.forward`.
    Returns:
        ``[P]`` depths (mm).
    """
    b, n, r, c = pixels
    dtype = vertices.dtype
    corners = vertices[b[:, None], faces[pixel_faces]]                            # [P, 3, 3] world
    rot = camrot[b, n].to(dtype)
    xc = ((corners - campos[b, n].to(dtype)[:, None])[:, :, None, :] * rot[:, None]).sum(-1)  # [P, 3, 3]
    uv = torch.stack((c, r), -1).to(dtype)
    if affine is not None:
        lin, shift = affine[b, n, :, :2].to(dtype), affine[b, n, :, 2].to(dtype)
        uv = torch.linalg.solve(lin, uv - shift)
    ray = torch.cat(((uv - princpt[b, n].to(dtype)) / focal[b, n].to(dtype), torch.ones_like(uv[:, :1])), -1)
    normal = torch.linalg.cross(xc[:, 1] - xc[:, 0], xc[:, 2] - xc[:, 0])
    return (normal * xc[:, 0]).sum(-1) / (normal * ray).sum(-1)


def _covers_a_pixel_centre(u: torch.Tensor, v: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor,
                           r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """Whether triangles ``(u, v) [P, 3]`` (pixel coordinates, float64) contain, up to
    ``_TILE_MARGIN_PX``, one of the pixel centres ``[c0, c1] × [r0, r1]`` (at most
    ``_COVER_TEST_PIXELS`` of them).  ``[P]`` bool."""
    nx = (c1 - c0 + 1).clamp(min=1)
    n = nx * (r1 - r0 + 1)
    k = torch.arange(_COVER_TEST_PIXELS, device=u.device)
    dx = (k % nx[:, None]).to(u.dtype)                                       # [P, k] offsets of
    dy = torch.div(k, nx[:, None], rounding_mode="floor").to(u.dtype)       # the centres from (c0, r0)
    inside = k < n[:, None]
    # A point is inside when it is on the inner side of all three edges; which side that is
    # follows the triangle's orientation.  A degenerate triangle (sign 0) is kept.
    sign = torch.sign((u[:, 1] - u[:, 0]) * (v[:, 2] - v[:, 0]) - (v[:, 1] - v[:, 0]) * (u[:, 2] - u[:, 0]))
    for a, b in ((0, 1), (1, 2), (2, 0)):
        eu, ev = (u[:, b] - u[:, a]) * sign, (v[:, b] - v[:, a]) * sign
        # cross((eu, ev), centre − vertex a) ≥ −margin·|edge|, the centre being (c0 + dx, r0 + dy).
        base = eu * (r0 - v[:, a]) - ev * (c0 - u[:, a]) + _TILE_MARGIN_PX * torch.sqrt(eu * eu + ev * ev)
        cross = torch.mul(dy, eu[:, None]).sub_(torch.mul(dx, ev[:, None])).add_(base[:, None])
        inside &= cross >= 0
    return inside.any(1)


class _TileBatch:
    """The packed face data :func:`rasterize_meshes` reads from a ``Meshes`` (its
    ``verts_packed``, ``faces_packed``, ``mesh_to_faces_packed_first_idx``,
    ``num_faces_per_mesh`` and ``device``), for a batch whose faces have their own three
    vertices each.  Building a ``Meshes`` of thousands of tile meshes costs more than
    rasterising them (it loops over the meshes in Python and packs everything again).
    """

    def __init__(self, face_verts: torch.Tensor, first: torch.Tensor, count: torch.Tensor):
        self._verts = face_verts.reshape(-1, 3)
        self._faces = torch.arange(len(self._verts), device=face_verts.device).reshape(-1, 3)
        self._first = first
        self._count = count
        self.device = face_verts.device
        self._F = int(count.max())

    def verts_packed(self) -> torch.Tensor:
        return self._verts

    def faces_packed(self) -> torch.Tensor:
        return self._faces

    def mesh_to_faces_packed_first_idx(self) -> torch.Tensor:
        return self._first

    def num_faces_per_mesh(self) -> torch.Tensor:
        return self._count
