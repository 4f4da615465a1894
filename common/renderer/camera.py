"""Cameras: world points into each view's pixels, and into the screen space the rasterisers read.

Convention (everything OpenCV-style, millimetres, pixels)::

    x_c      = camrot · (x − campos)                 world mm → camera mm
    (u, v)   = (fx·x_c/z_c + cx,  fy·y_c/z_c + cy)    u right, v down
    (u', v') = A · [u, v, 1]                          2×3 crop affine
    depth    = z_c (mm) of the nearest surface,       0 where nothing is seen

Pixel centres sit at **integer** coordinates: the pixel in row ``r``, column
``c`` of the output covers ``[c − ½, c + ½] × [r − ½, r + ½]`` and is sampled at
``(u', v') = (c, r)``.  This is what ``cv2.projectPoints`` and ``cv2.warpAffine``
assume, so the crop affine built for the images applies unchanged to the mesh.

Screen space.  :func:`screen_vertices` gives every view's vertices as ``(x_ndc, y_ndc, z_c)``:
PyTorch3D samples output pixel ``(r, c)`` at ``x_ndc = (W − 1 − 2c) / S``,
``y_ndc = (H − 1 − 2r) / S`` with ``S = min(H, W)`` (+X left, +Y up, the shorter side spans
[−1, 1], the longer one proportionally more).  Setting ``x_ndc = (W − 1 − 2u') / S`` and
``y_ndc = (H − 1 − 2v') / S`` therefore puts the point ``(u', v')`` exactly where the pixel
centre ``(c, r) = (u', v')`` is sampled, for square and non-square images alike.  The third
coordinate is the camera depth ``z_c`` itself, so depth buffers come out in mm.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from common.utils.shapes import shape_of

# Camera depth (mm) used instead of z when |z| is below it, only to keep the
# division finite for vertices on the camera plane. Such vertices are always
# behind the near plane (near > 0), so the clipper removes or cuts their faces;
# replacing z by this value moves the cut point by at most ~1e-6 of a pixel.
Z_GUARD = 1e-6


def check_float_tensor(name: str, t, expected: str) -> None:
    """A clear error unless ``t`` is a floating-point tensor (``expected`` describes its shape)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor of shape {expected}, got dtype {t.dtype}")


def check_finite(name: str, t: Optional[torch.Tensor]) -> None:
    """A clear error naming ``name`` and the first index of a NaN or infinity in ``t``."""
    if t is None:
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{name}: non-finite value {float(t[index])} at index {index} of {shape_of(t)} "
                         f"({int(bad.sum())} such values); expected finite numbers")


def check_all_finite(named: Sequence[Tuple[str, Optional[torch.Tensor]]]) -> None:
    """:func:`check_finite` for each ``(name, tensor)`` (None skipped), with one wait for the device
    instead of one per tensor when they all live on one: the error is the same."""
    present = [(name, t) for name, t in named if t is not None]
    if len({t.device for _, t in present}) == 1:
        if bool(torch.stack([torch.isfinite(t).all() for _, t in present]).all()):
            return
    for name, t in present:
        check_finite(name, t)


def validate_cameras(points: torch.Tensor, camrot, campos, focal, princpt, affine,
                     points_name: str = "points") -> Tuple[int, int, int]:
    """Check the shapes of the projection inputs; returns ``(B, N, V)``."""
    check_float_tensor(points_name, points, "[B, V, 3]")
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"{points_name}: expected [B, V, 3] (mm), got {shape_of(points)}")
    B, V = int(points.shape[0]), int(points.shape[1])
    check_float_tensor("camrot", camrot, "[B, N, 3, 3]")
    if camrot.dim() != 4 or camrot.shape[0] != B or camrot.shape[-2:] != (3, 3):
        raise ValueError(
            f"camrot: expected [B, N, 3, 3] matching {points_name}' batch B={B}, got {shape_of(camrot)}")
    N = int(camrot.shape[1])
    for name, t, tail in (("campos", campos, (3,)), ("focal", focal, (2,)), ("princpt", princpt, (2,))):
        spec = f"[B, N, {tail[0]}]"
        check_float_tensor(name, t, spec)
        if shape_of(t) != (B, N) + tail:
            raise ValueError(f"{name}: expected {spec} with B={B}, N={N} (from {points_name} and camrot), "
                             f"got {shape_of(t)}")
    if affine is not None:
        check_float_tensor("affine", affine, "[B, N, 2, 3]")
        if shape_of(affine) != (B, N, 2, 3):
            raise ValueError(f"affine: expected [B, N, 2, 3] with B={B}, N={N} (from {points_name} and camrot), "
                             f"got {shape_of(affine)}")
    for name, t in (("camrot", camrot), ("campos", campos), ("focal", focal), ("princpt", princpt),
                    ("affine", affine)):
        if t is not None and t.device != points.device:
            raise ValueError(f"{name}: on device {t.device}, but {points_name} is on {points.device}")
    return B, N, V


def to_camera(points: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor) -> torch.Tensor:
    """``[B, V, 3]`` world mm → ``[B, N, V, 3]`` camera mm."""
    d = points[:, None, :, :] - campos[:, :, None, :]                      # [B, N, V, 3]
    # Written as a broadcast product and sum rather than a (batched) matmul so
    # that a view's numbers do not depend on how many views share the call.
    return (camrot[:, :, None, :, :] * d[:, :, :, None, :]).sum(-1)


def camera_to_pixels(xc: torch.Tensor, z: torch.Tensor, focal, princpt, affine) -> torch.Tensor:
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
    validate_cameras(points, camrot, campos, focal, princpt, affine)
    xc = to_camera(points, camrot, campos)
    z = xc[..., 2]
    return torch.cat((camera_to_pixels(xc, z, focal, princpt, affine), z[..., None]), dim=-1)


def screen_vertices(vertices: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor, focal: torch.Tensor,
                    princpt: torch.Tensor, affine: Optional[torch.Tensor], image_size: Tuple[int, int]) -> torch.Tensor:
    """Vertices in PyTorch3D's screen space for every view (module docstring): ``[B, N, V, 3]``
    ``(x_ndc, y_ndc, z_c)``, the camera depth in mm kept away from 0 by :data:`Z_GUARD`.

    Args: ``vertices [B, V, 3]`` world mm, the cameras as :func:`project_points`, ``image_size``
    ``(H, W)`` of the rendered maps in pixels.
    """
    xc = to_camera(vertices, camrot, campos)
    z = xc[..., 2]
    z = torch.where(z.abs() < Z_GUARD, torch.full_like(z, Z_GUARD), z)
    uv = camera_to_pixels(xc, z, focal, princpt, affine)
    H, W = image_size
    s = float(min(H, W))
    x_ndc = (W - 1 - 2 * uv[..., 0]) / s
    y_ndc = (H - 1 - 2 * uv[..., 1]) / s
    return torch.stack((x_ndc, y_ndc, z), dim=-1)
