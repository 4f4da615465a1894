"""The native rasteriser's rules as one binned Triton kernel: the CUDA path of the ``native`` backend.

:func:`common.renderer.rasterizer.rasterize_depth` takes PyTorch3D's kernel's decisions for all
(face, pixel) pairs with tensor operations. On a GPU that is dozens of small launches per group
of face sizes, and the time goes to Python and launch overhead, not to the work (a mesh with 16×
the faces rendered faster). Here the same decisions are taken in one kernel:

1. In tensor operations (a fixed, small number of launches whatever the mesh): the screen
   vertices of every (view, face), PyTorch3D's near-plane clipper (:func:`clip_near`) and the
   per-face quantities of the kernel's tests (:func:`prepare_faces`: box, barycentric
   denominator, depths; faces the kernel skips are dropped).
2. Binning: each face goes to every tile of ``TILE_H × TILE_W`` pixels that its range of pixel
   centres reaches; the (tile, face) pairs are sorted by tile.
3. The kernel: one program per tile. It walks its faces, a few at a time, and, for the tile's
   pixels at once, evaluates the box test, the three edge tests, the perspective-corrected
   barycentrics and the depth in exactly the float32 operations of
   :mod:`common.renderer.rasterizer` (no fused multiply-add, IEEE division), keeping per pixel
   the smallest packed ``(depth, face)`` key: the nearest face, the lowest index on equal depth.

So the work grows with pixels × overlapping faces. The kernel runs natively on CUDA tensors and,
with ``TRITON_INTERPRET=1`` set before Python starts, in Triton's interpreter on CPU tensors (the
same kernel source evaluated with NumPy: how the CPU tests and CI check it). In the interpreter
the maps equal the tensor path's bit for bit; compiled for CUDA, the faces are the same and the
depths equal to float32 rounding (tests/test_triton_kernel.py). One face per pixel only: the
renderer's depth maps need no more, and ``faces_per_pixel > 1`` stays on the tensor path.

Triton ships with PyTorch's CUDA wheels; where it does not import, :func:`triton_available` is
False and the renderer uses the tensor path.
"""
from __future__ import annotations

import contextlib
from typing import Tuple

import torch

try:  # Triton ships with PyTorch's CUDA wheels; the project runs without it (the tensor path).
    import triton
    import triton.language as tl
except Exception:  # ImportError, or a broken install
    triton = None

from common.renderer.rasterizer import check_screen_vertices, clip_near, pixel_ndc, prepare_faces, unpack_keys

# One program's tile (pixels) and faces evaluated at once (tools/bench.py kernel; BENCHMARKS.md).
TILE_H = 8
TILE_W = 8
FACES_PER_STEP = 8
_NUM_WARPS = 4

# Per-face values the kernel reads, one row of _FACE_STRIDE float32 per face (padded).
_FACE_STRIDE = 16


def triton_available() -> bool:
    """Whether Triton imports here (it ships with PyTorch's CUDA wheels)."""
    return triton is not None


def interpreting() -> bool:
    """Whether the kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` when Triton was
    imported): then it takes CPU tensors, and only CPU tensors; else it is compiled for CUDA."""
    return triton is not None and type(depth_tile_kernel).__name__ == "InterpretedFunction"


if triton is not None:
    @triton.jit
    def depth_tile_kernel(values_ptr, face_ptr, start_ptr, x_ndc_ptr, y_ndc_ptr, keys_ptr,
                          H, W, tiles_down, tiles_across,
                          TILE_H: tl.constexpr, TILE_W: tl.constexpr, FACES: tl.constexpr, STRIDE: tl.constexpr):
        # One program per tile; ``FACES`` of the tile's faces at a time, for all its pixels at once
        # (a [FACES, TILE_H·TILE_W] block), each pixel keeping its smallest packed key.
        tile = tl.program_id(0)
        per_view = tiles_down * tiles_across
        view = tile // per_view
        ty = (tile % per_view) // tiles_across
        tx = tile % tiles_across
        pixel = tl.arange(0, TILE_H * TILE_W)
        rows = ty * TILE_H + pixel // TILE_W
        cols = tx * TILE_W + pixel % TILE_W
        in_image = (rows < H) & (cols < W)
        py = tl.load(y_ndc_ptr + rows, mask=rows < H, other=0.0)[None, :]       # [1, P]
        px = tl.load(x_ndc_ptr + cols, mask=cols < W, other=0.0)[None, :]
        empty = 0x7FFFFFFFFFFFFFFF
        best = tl.full([TILE_H * TILE_W], empty, tl.int64)
        first = tl.load(start_ptr + tile)
        last = tl.load(start_ptr + tile + 1)
        i = first
        while i < last:  # (not range(first, last, FACES): Triton 3.6's interpreter cannot index with loaded values)
            pair = i + tl.arange(0, FACES)                                       # [F]
            listed = pair < last
            row = values_ptr + pair.to(tl.int64) * STRIDE
            x0 = tl.load(row + 0, mask=listed, other=0.0)[:, None]              # [F, 1]
            y0 = tl.load(row + 1, mask=listed, other=0.0)[:, None]
            x1 = tl.load(row + 2, mask=listed, other=0.0)[:, None]
            y1 = tl.load(row + 3, mask=listed, other=0.0)[:, None]
            x2 = tl.load(row + 4, mask=listed, other=0.0)[:, None]
            y2 = tl.load(row + 5, mask=listed, other=0.0)[:, None]
            x_lo = tl.load(row + 6, mask=listed, other=0.0)[:, None]
            x_hi = tl.load(row + 7, mask=listed, other=0.0)[:, None]
            y_lo = tl.load(row + 8, mask=listed, other=0.0)[:, None]
            y_hi = tl.load(row + 9, mask=listed, other=0.0)[:, None]
            den = tl.load(row + 10, mask=listed, other=1.0)[:, None]
            z0 = tl.load(row + 11, mask=listed, other=1.0)[:, None]
            z1 = tl.load(row + 12, mask=listed, other=1.0)[:, None]
            z2 = tl.load(row + 13, mask=listed, other=1.0)[:, None]
            face = tl.load(face_ptr + pair, mask=listed, other=0).to(tl.int64)[:, None]
            sign = tl.where(den > 0.0, 1.0, -1.0)          # den is never 0 (prepare_faces)
            # Edge functions e(p, a, b) = (px − ax)(by − ay) − (py − ay)(bx − ax) of edges
            # (v1, v2), (v2, v0), (v0, v1), kept as their two products (the tensor path's test).
            f0 = (px - x1) * (y2 - y1)
            s0 = (py - y1) * (x2 - x1)
            f1 = (px - x2) * (y0 - y2)
            s1 = (py - y2) * (x0 - x2)
            f2 = (px - x0) * (y1 - y0)
            s2 = (py - y0) * (x1 - x0)
            inside = (py >= y_lo) & (py <= y_hi) & (px >= x_lo) & (px <= x_hi) & listed[:, None]
            inside = inside & (f0 * sign > s0 * sign) & (f1 * sign > s1 * sign) & (f2 * sign > s2 * sign)
            b0 = tl.math.div_rn(f0 - s0, den)
            b1 = tl.math.div_rn(f1 - s1, den)
            b2 = tl.math.div_rn(f2 - s2, den)
            w0 = b0 * z1 * z2
            w1 = b1 * z0 * z2
            w2 = b2 * z0 * z1
            total = w0 + w1 + w2
            w0 = tl.math.div_rn(w0, total)
            w1 = tl.math.div_rn(w1, total)
            w2 = tl.math.div_rn(w2, total)
            depth = w0 * z0 + w1 * z1 + w2 * z2
            covered = inside & (w0 > 0.0) & (w1 > 0.0) & (w2 > 0.0) & (depth >= 0.0)
            depth = tl.where(depth == 0.0, 0.0, depth)     # −0 → +0: the packed keys order as floats
            key = (depth.to(tl.int32, bitcast=True).to(tl.int64) << 32) | face
            best = tl.minimum(best, tl.min(tl.where(covered, key, empty), axis=0))
            i += FACES
        offsets = (view * H + rows).to(tl.int64) * W + cols
        tl.store(keys_ptr + offsets, best, mask=in_image)



def bin_faces(ranges: torch.Tensor, view: torch.Tensor, image_size: Tuple[int, int], views: int,
              tile: Tuple[int, int] = (TILE_H, TILE_W)) -> Tuple[torch.Tensor, torch.Tensor]:
    """The faces of each tile.

    Args:
        ranges: ``[4, C]`` int64 first row, first column, number of rows and of columns of each
            face's range of pixel centres (:func:`prepare_faces`; both counts ≥ 1).
        view: ``[C]`` int64 view of each face.
        image_size: ``(H, W)``; views: ``M``; tile: ``(h, w)`` pixels.
    Returns:
        ``(start [M·tiles + 1] int32, faces [P] int32)``: the faces of tile ``t`` (numbered
        ``(m·tiles_down + ty)·tiles_across + tx``) are ``faces[start[t]:start[t + 1]]``.
    """
    H, W = image_size
    h, w = tile
    tiles_down, tiles_across = -(-H // h), -(-W // w)
    r0, c0, rows, cols = ranges
    ty0, tx0 = r0 // h, c0 // w
    across = (c0 + cols - 1) // w - tx0 + 1
    count = across * ((r0 + rows - 1) // h - ty0 + 1)                 # tiles of each face
    total = int(count.sum())
    n_tiles = views * tiles_down * tiles_across
    device = ranges.device
    if total == 0:
        return torch.zeros(n_tiles + 1, dtype=torch.int32, device=device), torch.zeros(0, dtype=torch.int32,
                                                                                       device=device)
    face = torch.repeat_interleave(torch.arange(len(count), device=device), count, output_size=total)
    k = torch.arange(total, device=device) - (torch.cumsum(count, 0) - count)[face]
    across = across[face]
    ty = ty0[face] + torch.div(k, across, rounding_mode="floor")
    tx = tx0[face] + torch.remainder(k, across)
    tile_id = (view[face] * tiles_down + ty) * tiles_across + tx
    tile_id, order = torch.sort(tile_id)
    start = torch.zeros(n_tiles + 1, dtype=torch.int64, device=device)
    start[1:] = torch.cumsum(torch.bincount(tile_id, minlength=n_tiles), 0)
    return start.to(torch.int32), face[order].to(torch.int32)


@torch.no_grad()
def rasterize_depth_binned(verts: torch.Tensor, faces: torch.Tensor, image_size: Tuple[int, int],
                           near: float, tile: Tuple[int, int] = (TILE_H, TILE_W),
                           faces_per_step: int = FACES_PER_STEP,
                           num_warps: int = _NUM_WARPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """The nearest face and its depth at every pixel: :func:`common.renderer.rasterizer.rasterize_depth`
    with ``faces_per_pixel = 1``, computed by the binned kernel.

    Args:
        verts: ``[M, V, 3]`` float32 screen vertices ``(x_ndc, y_ndc, z)`` (z in mm), on CUDA
            (compiled kernel) or the CPU (Triton's interpreter: slow, for tests).
        faces: ``[F, 3]`` int64 vertex indices; image_size: ``(H, W)``; near: mm (> 0).
        tile: ``(h, w)`` pixels of one program, faces_per_step: faces it evaluates at once (powers
            of two); num_warps: of one program.
    Returns:
        ``(face [M, H, W, 1] int64, zbuf [M, H, W, 1] float32)``, −1 where no face covers the
        pixel centre.
    Raises:
        ValueError: as :func:`~common.renderer.rasterizer.rasterize_depth`.
    """
    H, W = int(image_size[0]), int(image_size[1])
    M, F = int(verts.shape[0]), int(faces.shape[0])
    device = verts.device
    check_screen_vertices(verts, faces)
    fv = verts[:, faces].permute(3, 2, 0, 1).reshape(3, 3, M * F)       # [xyz, corner, m·F + f]
    fv, owner = clip_near(fv, torch.arange(M * F, device=device), near)
    values, ranges, owner = prepare_faces(fv, owner, H, W)
    del fv
    view = torch.div(owner, F, rounding_mode="floor")
    start, pairs = bin_faces(ranges, view, (H, W), M, tile)
    # The faces' values in the order the tiles read them, each pair's row contiguous: the kernel's
    # loads are then plain strided reads, not an index followed by a dependent gather.
    pair_values = torch.zeros(len(pairs), _FACE_STRIDE, dtype=torch.float32, device=device)
    pair_values[:, :values.shape[0]] = values.t()[pairs.long()]
    pair_faces = (owner - view * F).to(torch.int32)[pairs.long()]
    del values, ranges, owner, view
    keys = torch.empty(M * H * W, dtype=torch.int64, device=device)
    tiles_down, tiles_across = -(-H // tile[0]), -(-W // tile[1])
    if interpreting() == verts.is_cuda:
        where = ("in Triton's interpreter (TRITON_INTERPRET=1): CPU tensors only" if interpreting() else
                 "compiled for CUDA: CUDA tensors only (TRITON_INTERPRET=1 before Python starts runs it on the CPU)")
        raise ValueError(f"verts: on {device}, but the kernel runs {where}")
    with torch.cuda.device(device) if verts.is_cuda else contextlib.nullcontext():
        depth_tile_kernel[(M * tiles_down * tiles_across,)](
            pair_values, pair_faces, start, pixel_ndc(W, H).to(device), pixel_ndc(H, W).to(device), keys,
            H, W, tiles_down, tiles_across, TILE_H=tile[0], TILE_W=tile[1], FACES=faces_per_step,
            STRIDE=_FACE_STRIDE, num_warps=num_warps, enable_fp_fusion=False)
    face, zbuf = unpack_keys(keys)
    return face.view(M, H, W, 1), zbuf.view(M, H, W, 1)
