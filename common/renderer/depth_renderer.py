"""Differentiable depth rendering of posed hand meshes: :class:`DepthRenderer` (docs/renderer.md,
"Conventions").

The camera convention (OpenCV-style, millimetres, pixel centres at integer coordinates) and
the screen space the rasterisers read are in :mod:`common.renderer.camera`; a pixel whose nearest
surface lies beyond ``far`` reads 0 (with one depth per pixel this is the same as discarding
every fragment beyond ``far``), and 0 where nothing is seen.

Two backends (``backend=`` / config ``renderer_backend``: ``auto``, ``pytorch3d``, ``native``;
:func:`common.renderer.backend.resolve_backend`).  ``pytorch3d`` is PyTorch3D's rasteriser
(:mod:`common.renderer.backend`, imported on first use, with the CPU tiling of
:mod:`common.renderer.tiling`); ``native`` is the project's own (:mod:`common.renderer.rasterizer`),
which takes PyTorch3D's kernel's decisions (near-plane clipping into one or two triangles,
sample points, box test, zero-area and depth skips, coverage by perspective-corrected
barycentrics > 0, the nearest face with the lowest index on a tie) for all (face, pixel) pairs
at once, in its float32 formulas and order of operations, with memory bounded by chunk sizes,
on the CPU and on CUDA, with no dependency beyond torch: its maps equal PyTorch3D's bit for bit
in the tests.  ``auto`` takes PyTorch3D where it imports.  The ``pytorch3d`` backend uses the
native rasteriser too on the CPU where no face is cut by the near plane and ``faces_per_pixel``
is 1 (where the two are equal), and PyTorch3D for the rest, for CUDA and for
:meth:`DepthRenderer.rasterize` with a gradient.  Non-finite inputs are refused with an error
naming them, with either backend.

Gradients.  :meth:`DepthRenderer.forward` takes its values from the rasteriser and its gradient
from :func:`plane_depth`: the depth of a covered pixel written as a function of its face's
three vertices (where the pixel's ray meets the face's plane), computed for all covered pixels
at once and differentiated by autograd.  For a fixed covering face this is the function
PyTorch3D's perspective-correct ``zbuf`` computes, so the gradient is the same, at a fraction
of the cost of PyTorch3D's CPU backward (BENCHMARKS.md).  It is also exact for faces cut by
the near plane (the cut leaves the plane unchanged), where PyTorch3D 0.7.9's clipper
(``clip.py``, ``_find_verts_intersecting_clipping_plane``) detaches the interpolation weight of
one of the two cut points.  Pixels without a face get no gradient; there is no silhouette
gradient.  With the ``native`` backend this is the gradient everywhere, also with respect to the
cameras (``plane_depth`` is a function of them too) and through :meth:`DepthRenderer.rasterize`;
with ``pytorch3d``, when a camera tensor requires a gradient, or through
:meth:`DepthRenderer.rasterize`, the gradient is PyTorch3D's (equal to float32 rounding where
nothing is clipped; tests/test_renderer.py).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from common.renderer.backend import (BACKENDS, NATIVE_RASTERISERS, RendererBackendError, pytorch3d_available,
                                     rasterize_whole_views, resolve_backend)
from common.renderer.camera import check_all_finite, project_points, screen_vertices, validate_cameras
from common.renderer.rasterizer import cuts_near_plane, rasterize_depth
from common.renderer.triton_rasterizer import interpreting, rasterize_depth_binned, triton_available
from common.renderer.tiling import DEFAULT_TILE_SIZE, rasterize_tiled
from common.utils.shapes import shape_of

__all__ = ["project_points", "DepthRenderer", "DEFAULT_TILE_SIZE", "BACKENDS", "resolve_backend",
           "pytorch3d_available", "RendererBackendError", "plane_depth"]


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
    backend by :func:`common.renderer.rasterizer.rasterize_depth` (PyTorch3D's kernel's
    rules, vectorised, clipping included) on the CPU and on CUDA; with ``pytorch3d``, on
    the CPU by the same function where it equals PyTorch3D bit for bit (no face cut by
    the near plane, one face per pixel) and else by PyTorch3D, on CUDA as a batch of
    ``B·N`` meshes sharing ``faces`` (or with ``tile_size`` off), on the CPU as a batch
    of the non-empty tiles of all views (:mod:`common.renderer.tiling`).  Runs on the
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
            see :func:`common.renderer.backend.resolve_backend`).  ``tile_size``, ``bin_size``,
            ``max_faces_per_bin`` and ``cpu_rasteriser`` are PyTorch3D's; the native
            rasteriser bounds its memory by its own chunk sizes.
        native_rasteriser: how the ``native`` backend rasterises: ``'auto'`` (default): on CUDA
            with one face per pixel the binned Triton kernel
            (:mod:`common.renderer.triton_rasterizer`) where Triton imports, else the tensor
            operations of :mod:`common.renderer.rasterizer`; ``'tensor'``: always the latter;
            ``'triton'``: always the kernel (on the CPU only in Triton's interpreter,
            ``TRITON_INTERPRET=1``: slow, for tests). The faces are the same either way, the depths
            equal to float32 rounding.
    """

    def __init__(self, faces: torch.Tensor, image_size: Union[int, Sequence[int]] = (256, 256),
                 near: float = 1.0, far: float = 99999.0, faces_per_pixel: int = 1,
                 bin_size: Optional[int] = None, max_faces_per_bin: Optional[int] = None,
                 tile_size: Optional[int] = DEFAULT_TILE_SIZE, cpu_rasteriser: str = "vectorised",
                 backend: str = "auto", native_rasteriser: str = "auto"):
        super().__init__()
        if not isinstance(faces, torch.Tensor):
            faces = torch.as_tensor(faces)
        if faces.dim() != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
            raise ValueError(f"faces: expected [F, 3] vertex indices with F > 0, got {shape_of(faces)}")
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
        if native_rasteriser not in NATIVE_RASTERISERS:
            raise ValueError(f"native_rasteriser: expected one of {', '.join(NATIVE_RASTERISERS)}, "
                             f"got {native_rasteriser!r}")
        if native_rasteriser == "triton" and not triton_available():
            raise ValueError("native_rasteriser 'triton': Triton does not import here (it ships with PyTorch's "
                             "CUDA wheels); use 'auto' or 'tensor'")
        self.native_rasteriser = native_rasteriser
        self.backend = resolve_backend(backend)
        self.register_buffer("faces", faces.detach().to(torch.int64).clone(), persistent=False)
        self._min_vertex_num = int(faces.max()) + 1

    def extra_repr(self) -> str:
        return (f"faces={self.faces.shape[0]}, image_size={self.image_size}, near={self.near}, "
                f"far={self.far}, faces_per_pixel={self.faces_per_pixel}, tile_size={self.tile_size}, "
                f"cpu_rasteriser={self.cpu_rasteriser!r}, backend={self.backend!r}, "
                f"native_rasteriser={self.native_rasteriser!r}")

    def screen_vertices(self, vertices: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor,
                        focal: torch.Tensor, princpt: torch.Tensor,
                        affine: Optional[torch.Tensor]) -> torch.Tensor:
        """Vertices in PyTorch3D's screen space for every view: ``[B, N, V, 3]``
        (:func:`common.renderer.camera.screen_vertices` at this renderer's image size)."""
        return screen_vertices(vertices, camrot, campos, focal, princpt, affine, self.image_size)

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
            # function of the covering face's vertices (module docstring).
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
        B, N, V = validate_cameras(vertices, camrot, campos, focal, princpt, affine, "vertices")
        check_all_finite((("vertices", vertices), ("camrot", camrot), ("campos", campos), ("focal", focal),
                          ("princpt", princpt), ("affine", affine)))
        if V < self._min_vertex_num:
            raise ValueError(f"vertices: faces index vertex {self._min_vertex_num - 1}, "
                             f"but vertices has only V={V} ([B, V, 3] = {shape_of(vertices)})")
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
            if self.uses_kernel(verts.device):
                face, zbuf = rasterize_depth_binned(verts.detach(), self.faces, self.image_size, self.near)
            else:
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
                out = self.rasterize_tiled(verts)
        if out is None:
            out = self.rasterize_whole(verts)
        face, zbuf = out
        return face.reshape(B, N, H, W, K), zbuf.reshape(B, N, H, W, K)


    def uses_kernel(self, device: torch.device) -> bool:
        """Whether the native backend rasterises with the binned Triton kernel on ``device``."""
        if self.native_rasteriser == "auto":
            return device.type == "cuda" and self.faces_per_pixel == 1 and triton_available() and not interpreting()
        if self.native_rasteriser == "triton":
            if self.faces_per_pixel != 1:
                raise ValueError(f"native_rasteriser 'triton' keeps one face per pixel; faces_per_pixel is "
                                 f"{self.faces_per_pixel} (use 'auto' or 'tensor')")
            if interpreting() == (device.type == "cuda"):
                raise ValueError(f"native_rasteriser 'triton' on {device.type}: the kernel runs "
                                 + ("in Triton's interpreter (TRITON_INTERPRET=1), on CPU tensors only" if interpreting()
                                    else "on CUDA only (TRITON_INTERPRET=1 set before Python starts runs it on the CPU)"))
            return True
        return False

    def rasterize_whole(self, verts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """PyTorch3D on whole views with this renderer's settings: ``[M, V, 3]`` float32 screen
        vertices (:meth:`screen_vertices`) → ``face``, ``zbuf`` ``[M, H, W, K]``
        (:func:`common.renderer.backend.rasterize_whole_views`)."""
        return rasterize_whole_views(verts, self.faces, self.image_size, self.near, self.faces_per_pixel,
                                     self.bin_size, self.max_faces_per_bin)

    def rasterize_tiled(self, verts: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """PyTorch3D on this renderer's CPU tiles (:func:`common.renderer.tiling.rasterize_tiled`): the
        same result as :meth:`rasterize_whole`, or None when tiling does not pay."""
        return rasterize_tiled(verts, self.faces, self.image_size, self.tile_size, self.near, self.faces_per_pixel)

def plane_depth(vertices: torch.Tensor, faces: torch.Tensor, pixels: Tuple[torch.Tensor, ...],
                pixel_faces: torch.Tensor, camrot: torch.Tensor, campos: torch.Tensor, focal: torch.Tensor,
                princpt: torch.Tensor, affine: Optional[torch.Tensor]) -> torch.Tensor:
    """Camera depth (mm) where each covered pixel's ray meets the plane of its face.

    The ray of crop pixel ``(c, r)`` goes through the camera-pixel ``(u, v) = A⁻¹ (c, r)``, i.e.
    along ``d = ((u − cx)/fx, (v − cy)/fy, 1)`` in camera space; the plane through the face's
    camera-space vertices ``a, b, c`` with normal ``n = (b − a) × (c − a)`` meets it at
    ``z = (n · a) / (n · d)``. This is the depth PyTorch3D's perspective-correct ``zbuf`` holds
    (also for a face cut by the near plane: the cut keeps the plane), as a differentiable
    function of the vertices and the cameras.

    What depends on the view alone is computed once per view: the vertices in each camera's frame
    (``[B, N, V, 3]``, a few MB) and the affine map from crop pixels to ray directions
    (``[B, N, 2, 3]``); each covered pixel then gathers its face's three corners and its view's map.

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
    B, N = camrot.shape[:2]
    rot = camrot.to(dtype)
    camera = torch.einsum("bnij,bnvj->bnvi", rot, vertices[:, None] - campos.to(dtype)[:, :, None])   # [B, N, V, 3]
    corners = camera[b[:, None], n[:, None], faces[pixel_faces]]                                    # [P, 3, 3]
    # Crop pixel (c, r) → ray direction (x, y) = diag(1/f) · (A⁻¹ · ((c, r) − shift) − principal point):
    # one [2, 3] map per view.
    if affine is None:
        to_camera = torch.eye(2, 3, dtype=dtype, device=vertices.device).expand(B, N, 2, 3)
    else:
        lin, shift = affine[..., :2].to(dtype), affine[..., 2:].to(dtype)                         # [B, N, 2, 2|1]
        inverse = torch.stack((torch.stack((lin[..., 1, 1], -lin[..., 0, 1]), -1),
                               torch.stack((-lin[..., 1, 0], lin[..., 0, 0]), -1)), -2)
        inverse = inverse / (lin[..., 0, 0] * lin[..., 1, 1] - lin[..., 0, 1] * lin[..., 1, 0])[..., None, None]
        to_camera = torch.cat((inverse, -inverse @ shift), -1)
    ray_map = torch.cat((to_camera[..., :2], to_camera[..., 2:] - princpt.to(dtype)[..., None]), -1) \
        / focal.to(dtype)[..., None]                                                                 # [B, N, 2, 3]
    view_map = ray_map[b, n]                                                                         # [P, 2, 3]
    ray_xy = view_map[..., 0] * c.to(dtype)[:, None] + view_map[..., 1] * r.to(dtype)[:, None] + view_map[..., 2]
    ray = torch.cat((ray_xy, torch.ones_like(ray_xy[:, :1])), -1)                                   # [P, 3]
    normal = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    return (normal * corners[:, 0]).sum(-1) / (normal * ray).sum(-1)
