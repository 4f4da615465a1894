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

Gradients: PyTorch3D differentiates ``zbuf`` with respect to the covering
face's three vertices (through the barycentrics, perspective correction
included); pixels without a face get none, and there is no silhouette gradient.
For faces cut by the near plane the gradient is finite but not exact:
PyTorch3D 0.7.9's clipper (``clip.py``, ``_find_verts_intersecting_clipping_plane``)
detaches the interpolation weight of one of the two cut points.  A hand that
stays more than ``near`` in front of every camera never meets this.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pytorch3d.renderer.mesh import rasterize_meshes
from pytorch3d.structures import Meshes

__all__ = ["project_points", "DepthRenderer"]

# Camera depth (mm) used instead of z when |z| is below it, only to keep the
# division finite for vertices on the camera plane. Such vertices are always
# behind the near plane (near > 0), so the clipper removes or cuts their faces;
# replacing z by this value moves the cut point by at most ~1e-6 of a pixel.
_Z_GUARD = 1e-6


def _shape(t: torch.Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _check_tensor(name: str, t, expected: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor of shape {expected}, got dtype {t.dtype}")


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

    All ``B·N`` (sample, view) pairs go to PyTorch3D in one rasteriser call,
    as a batch of meshes sharing ``faces``.  Runs on the device of its inputs
    (move the module with ``.to(device)`` so ``faces`` follows).

    Args:
        faces: ``[F, 3]`` integer vertex indices of the triangles.  Kept as a
            non-persistent buffer: it belongs to the hand model, not to a checkpoint.
        image_size: ``(H, W)`` of the rendered maps in pixels (an int for square).
        near: near clipping plane, camera depth in mm (> 0).  Faces are clipped there.
        far: a pixel whose nearest surface is farther than this (mm) reads 0.
        faces_per_pixel: faces kept per pixel by the rasteriser; only the nearest
            is used, so 1 (the default) is all a depth map needs.
        bin_size, max_faces_per_bin: coarse-to-fine binning, used on CUDA only (the
            CPU rasteriser is the naive per-pixel loop, ``bin_size=0``).
            ``bin_size=None`` lets PyTorch3D pick from the image size.
            ``max_faces_per_bin=None`` uses the largest count a bin can ever need:
            a bin belongs to one mesh, so it never holds more than the mesh's
            ``F`` faces (``2F`` when near-plane clipping splits faces, in which
            case that is what is used).  This is usually far below PyTorch3D's
            own default (a fifth of all faces in the batch), and never
            overflows, so no faces are silently dropped.
    """

    def __init__(self, faces: torch.Tensor, image_size: Union[int, Sequence[int]] = (256, 256),
                 near: float = 1.0, far: float = 99999.0, faces_per_pixel: int = 1,
                 bin_size: Optional[int] = None, max_faces_per_bin: Optional[int] = None):
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
        self.near = float(near)
        self.far = float(far)
        self.faces_per_pixel = int(faces_per_pixel)
        self.bin_size = None if bin_size is None else int(bin_size)
        self.max_faces_per_bin = None if max_faces_per_bin is None else int(max_faces_per_bin)
        self.register_buffer("faces", faces.detach().to(torch.int64).clone(), persistent=False)
        self._min_vertex_num = int(faces.max()) + 1

    def extra_repr(self) -> str:
        return (f"faces={self.faces.shape[0]}, image_size={self.image_size}, near={self.near}, "
                f"far={self.far}, faces_per_pixel={self.faces_per_pixel}")

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
        B, N, V = _validate_cameras(vertices, camrot, campos, focal, princpt, affine, "vertices")
        if V < self._min_vertex_num:
            raise ValueError(f"vertices: faces index vertex {self._min_vertex_num - 1}, "
                             f"but vertices has only V={V} ([B, V, 3] = {_shape(vertices)})")
        if self.faces.device != vertices.device:
            raise ValueError(f"vertices: on device {vertices.device}, but the renderer's faces are on "
                             f"{self.faces.device}; move the module with .to(device)")
        H, W = self.image_size
        M, F = B * N, int(self.faces.shape[0])
        if M == 0:
            return vertices.new_zeros((B, N, H, W))

        verts = self.screen_vertices(vertices, camrot, campos, focal, princpt, affine)
        # The PyTorch3D kernels are float32 only.
        verts = verts.reshape(M, V, 3).to(torch.float32)
        meshes = Meshes(verts=verts, faces=self.faces[None].expand(M, F, 3))

        if vertices.is_cuda:
            bin_size = self.bin_size
            max_faces_per_bin = self.max_faces_per_bin
            if max_faces_per_bin is None:
                clips = bool((verts[..., 2] < self.near).any())
                max_faces_per_bin = 2 * F if clips else F
        else:
            # Binned rasterisation is not implemented on the CPU.
            bin_size, max_faces_per_bin = 0, None

        pix_to_face, zbuf, _, _ = rasterize_meshes(
            meshes,
            image_size=(H, W),
            blur_radius=0.0,
            faces_per_pixel=self.faces_per_pixel,
            bin_size=bin_size,
            max_faces_per_bin=max_faces_per_bin,
            perspective_correct=True,
            clip_barycentric_coords=False,
            cull_backfaces=False,
            z_clip_value=self.near,
            cull_to_frustum=False,
        )
        depth = zbuf[..., 0]
        seen = (pix_to_face[..., 0] >= 0) & (depth <= self.far)
        depth = torch.where(seen, depth, torch.zeros_like(depth))
        return depth.reshape(B, N, H, W).to(vertices.dtype)
