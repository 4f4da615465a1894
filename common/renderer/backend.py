"""The renderer's backends: which rasteriser runs (``renderer_backend``: ``auto``, ``pytorch3d``,
``native``), PyTorch3D imported on first use (never at import time: the project runs without it),
and PyTorch3D's rasterisation of whole views.

With PyTorch3D (0.7.9), each view's vertices are handed to
:func:`pytorch3d.renderer.mesh.rasterize_meshes` already in its screen space
(:func:`common.renderer.camera.screen_vertices`) rather than through a PyTorch3D camera:

* Screen coordinates are a projective function of camera coordinates (``u' · z_c`` is linear
  in ``x_c``, affine included), so along a planar triangle ``1/z_c`` — not ``z_c`` — is linear
  in screen space.  Linear (screen-space) barycentrics would bias the depth of any tilted
  triangle; with ``perspective_correct=True`` PyTorch3D weights the barycentrics by ``1/z_i``,
  which makes the interpolated ``zbuf`` the exact camera depth of the triangle's plane along
  the pixel's ray.
* Near plane: triangles are clipped against ``z_c = near`` by PyTorch3D's own clipper
  (``z_clip_value=near``).  With ``perspective_correct=True`` it interpolates ``x_ndc·z``
  linearly in ``z``, which is exact here because ``x_ndc·z_c`` is a linear function of the
  camera coordinates.  Triangles entirely behind the plane disappear, those crossing it are cut
  (into one or two triangles) at exactly ``z_c = near``; depth is never below ``near``.
* Back faces are kept (the hand template has an open wrist, through which the inside is
  visible, as in a real depth camera).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from common.errors import OptionError

log = logging.getLogger(__name__)

# The renderer_backend option's values (DepthRenderer's ``backend``).
BACKENDS = ("auto", "pytorch3d", "native")
# The native_rasteriser option's values (DepthRenderer's ``native_rasteriser``): how the native
# backend rasterises.
NATIVE_RASTERISERS = ("auto", "tensor", "triton")

# What to tell a user who asked for PyTorch3D where it does not import.
PYTORCH3D_INSTALL_HINT = ("install the tested stack with `pip install -r requirements.txt` (torch==2.12.1 with "
                          "easypytorch3d==0.7.9.post1, PyTorch3D's binary for that torch), or set "
                          "renderer_backend: native (the project's own rasteriser, any torch)")


class RendererBackendError(OptionError):
    """A renderer backend that cannot run here (unknown name, or PyTorch3D asked for but missing)."""


_PYTORCH3D = {}       # the imported API, or the reason it does not import (filled on first use)
_ANNOUNCED = set()    # backends already named in the log


def pytorch3d_api():
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
        pytorch3d_api()
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
        pytorch3d_api()
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
                 else "the project's own rasteriser (common/renderer/rasterizer.py)", why)
    return chosen


def pytorch3d_raster_settings(faces_per_pixel: int, near: float) -> dict:
    """The keyword arguments of ``rasterize_meshes`` that make it a depth rasteriser with the
    conventions above (no blur, perspective-correct, back faces kept, clipped at ``near`` mm)."""
    return dict(blur_radius=0.0, faces_per_pixel=faces_per_pixel, perspective_correct=True,
                clip_barycentric_coords=False, cull_backfaces=False, z_clip_value=near,
                cull_to_frustum=False)


def rasterize_whole_views(verts: torch.Tensor, faces: torch.Tensor, image_size: Tuple[int, int], near: float,
                          faces_per_pixel: int = 1, bin_size: Optional[int] = None,
                          max_faces_per_bin: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every view as one mesh of one PyTorch3D ``rasterize_meshes`` call.

    Args:
        verts: ``[M, V, 3]`` float32 screen vertices of ``M`` views.
        faces: ``[F, 3]`` int64 vertex indices.
        image_size, near, faces_per_pixel: as :class:`common.renderer.depth_renderer.DepthRenderer`.
        bin_size, max_faces_per_bin: PyTorch3D's binning, on CUDA only (``None``: see
            :class:`~common.renderer.depth_renderer.DepthRenderer`).
    Returns:
        ``face`` (int64, index into ``faces``, −1 for none) and ``zbuf`` (mm, −1 for none),
        both ``[M, H, W, faces_per_pixel]``.
    """
    rasterize_meshes, Meshes = pytorch3d_api()
    M, F = int(verts.shape[0]), int(faces.shape[0])
    meshes = Meshes(verts=verts, faces=faces[None].expand(M, F, 3))
    if verts.is_cuda:
        if max_faces_per_bin is None:
            clips = bool((verts[..., 2] < near).any())
            max_faces_per_bin = 2 * F if clips else F
    else:
        # Binned rasterisation is not implemented on the CPU.
        bin_size, max_faces_per_bin = 0, None
    pix_to_face, zbuf, _, _ = rasterize_meshes(
        meshes, image_size=image_size, bin_size=bin_size, max_faces_per_bin=max_faces_per_bin,
        **pytorch3d_raster_settings(faces_per_pixel, near))
    # Packed face index m·F + f → f.
    face = torch.where(pix_to_face >= 0, pix_to_face % F, pix_to_face)
    return face, zbuf
