"""A vectorised CPU depth rasteriser that follows PyTorch3D's CPU kernel rule for rule.

PyTorch3D's CPU ``rasterize_meshes`` visits every pixel of every mesh and, for each, every face
of that mesh, with bookkeeping on each face (~6.5 µs per face of a call): at hand-crop sizes
that is most of a CPU training iteration (BENCHMARKS.md). Here the same decisions are taken for
all (face, pixel) pairs at once with tensor operations, visiting only the pixel centres inside
each face's screen box.

What is reproduced, for ``blur_radius = 0``, ``faces_per_pixel = 1``, ``perspective_correct``,
no back-face culling and no barycentric clipping (the renderer's settings):

* output pixel ``(r, c)`` is sampled at PyTorch3D's float32 NDC point (``PixToNonSquareNdc``
  of the reversed index: +X left, +Y up);
* a face is skipped when its screen area ``|e(v0, v1, v2)| ≤ 1e-8`` or its nearest vertex is
  closer than ``1e-8``; a pixel is tested only when its point lies in the face's box
  (inclusive);
* the pixel is covered when the perspective-corrected barycentrics ``w`` are all ``> 0``; its
  depth is ``Σ wᵢ zᵢ`` (the kernel's formulas in the kernel's order of float32 operations:
  screen barycentrics ``eᵢ / (e(v2, v0, v1) + 1e-8)``, then ``bᵢ zⱼ zₖ`` normalised);
* of the faces covering a pixel, the nearest wins, the lowest face index on equal depth (the
  kernel keeps the smallest ``(depth, face)`` tuple).

Faces cut by the near plane are not handled: PyTorch3D splits them into new triangles (and
resolves the two halves of a cut face by their distance to the pixel); :func:`rasterize_depth`
then returns None and the caller uses PyTorch3D. Faces entirely behind the near plane are
dropped, as PyTorch3D's clipper culls them.

A compiler may fuse a multiply and an add in the kernel where these tensor operations round
twice; then depths would differ by a float32 ulp or so and a pixel centre within rounding of an
edge could be covered by one and not the other. With this project's pinned build the face and
depth maps are equal bit for bit (tests/test_renderer.py, which tolerates the former).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# PyTorch3D's kEpsilon (a double in its C++: float expressions it is added to are evaluated in
# double and rounded once).
_P3D_EPS = 1e-8

# (face, pixel) pairs of a face-size group handled at once; bounds the memory to ~40 bytes a pair.
_CHUNK_PAIRS = 1 << 20

# Slack (pixels) when turning a face's box into its range of pixel centres; the exact box test
# in NDC follows, so this only has to exceed float32 rounding (~1e-5 pixel at 256 pixels).
_RANGE_MARGIN_PX = 1e-3


def pixel_ndc(size: int, other: int) -> torch.Tensor:
    """``[size]`` float32 NDC coordinate at which PyTorch3D samples output index ``0 … size−1``
    along an image side of ``size`` pixels (the other side has ``other``): its
    ``PixToNonSquareNdc(size − 1 − i, size, other)``, evaluated in float32 in the same order."""
    f32 = torch.float32
    extent = torch.tensor(2.0, dtype=f32)
    if size > other:
        extent = (torch.tensor(float(size), dtype=f32) * extent) / torch.tensor(float(other), dtype=f32)
    offset = extent / 2.0
    index = torch.arange(size - 1, -1, -1, dtype=f32)
    return (extent * index + offset) / torch.tensor(float(size), dtype=f32) - offset


def _edge(px, py, ax, ay, bx, by):
    """PyTorch3D's ``EdgeFunctionForward(p, a, b)``: ``(p − a) × (b − a)``."""
    return (px - ax) * (by - ay) - (py - ay) * (bx - ax)


def _grid_fragments(face_values, face_ranges, shape, x_ndc, y_ndc):
    """The covered (face, pixel) pairs of ``n`` faces whose pixel boxes fit in ``shape = (h, w)``.

    Args:
        face_values: ``[14, n]`` float32 rows ``x0, y0, x1, y1, x2, y2`` (screen corners),
            ``x_lo, x_hi, y_lo, y_hi`` (box), the barycentric denominator (non-zero) and
            ``z0, z1, z2`` (mm).
        face_ranges: ``[4, n]`` int64 rows: first row, first column, number of rows and of
            columns of each face's range of pixel centres.
        x_ndc, y_ndc: ``[W]``, ``[H]`` sample points.
    Returns:
        ``(face [P], row [P], col [P], depth [P])`` of the pairs the kernel covers, ``face``
        indexing the ``n`` faces.
    """
    h, w = shape
    x0, y0, x1, y1, x2, y2, x_lo, x_hi, y_lo, y_hi, denominator, z0, z1, z2 = face_values[:, :, None, None]
    first_row, first_col, rows, cols = face_ranges[:, :, None]
    row = first_row + torch.arange(h, device=face_values.device)         # [n, h]
    col = first_col + torch.arange(w, device=face_values.device)         # [n, w]
    py = y_ndc[row.clamp(max=len(y_ndc) - 1)][:, :, None]               # [n, h, 1]
    px = x_ndc[col.clamp(max=len(x_ndc) - 1)][:, None, :]               # [n, 1, w]
    sign = denominator.sign()
    # The kernel's box test, along each axis.
    row_ok = (row < first_row + rows)[:, :, None] & (py >= y_lo) & (py <= y_hi)
    col_ok = (col < first_col + cols)[:, None, :] & (px >= x_lo) & (px <= x_hi)
    # Edge function e(p, a, b) = (px − ax)(by − ay) − (py − ay)(bx − ax): the first product
    # varies along the row, the second down the column. A screen barycentric e / denominator is
    # > 0 exactly when sign · first > sign · second (a float difference is 0 only for equal
    # values and has the sign of the exact one), so the test needs no [n, h, w] arithmetic.
    along, down, inside = [], [], row_ok & col_ok
    for (ax, ay), (bx, by) in (((x1, y1), (x2, y2)), ((x2, y2), (x0, y0)), ((x0, y0), (x1, y1))):
        first, second = (px - ax) * (by - ay), (py - ay) * (bx - ax)
        along.append(first), down.append(second)
        inside &= (first * sign) > (second * sign)
    i, a, b = torch.nonzero(inside, as_tuple=True)
    denominator = denominator[i, 0, 0]
    b0, b1, b2 = ((f[i, 0, b] - d[i, a, 0]) / denominator for f, d in zip(along, down))
    z0, z1, z2 = z0[i, 0, 0], z1[i, 0, 0], z2[i, 0, 0]
    w0, w1, w2 = b0 * z1 * z2, b1 * z0 * z2, b2 * z0 * z1
    total = w0 + w1 + w2
    w0, w1, w2 = w0 / total, w1 / total, w2 / total
    depth = w0 * z0 + w1 * z1 + w2 * z2
    covered = torch.nonzero((w0 > 0) & (w1 > 0) & (w2 > 0) & (depth >= 0)).squeeze(1)
    return i[covered], row[i, a][covered], col[i, b][covered], depth[covered]


@torch.no_grad()
def rasterize_depth(verts: torch.Tensor, faces: torch.Tensor, image_size: Tuple[int, int],
                    near: float) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Nearest face and its depth at every pixel, as PyTorch3D's CPU rasteriser finds them.

    Args:
        verts: ``[M, V, 3]`` float32 screen-space vertices ``(x_ndc, y_ndc, z)`` of ``M`` views
            (PyTorch3D's NDC; ``z`` the camera depth, mm).
        faces: ``[F, 3]`` int64 vertex indices.
        image_size: ``(H, W)``.
        near: near clipping plane (mm).
    Returns:
        ``(face [M, H, W, 1] int64, zbuf [M, H, W, 1] float32)``: the face index (into
        ``faces``) and depth (mm) of the nearest covering face, −1 where none covers the pixel
        centre; or None when a face is cut by the near plane or a used coordinate is not finite
        (PyTorch3D's business).
    """
    H, W = int(image_size[0]), int(image_size[1])
    M, F = int(verts.shape[0]), int(faces.shape[0])
    S = float(min(H, W))
    device = verts.device
    # [xyz, corner, m·F + f], each row contiguous.
    fv = verts[:, faces].permute(3, 2, 0, 1).reshape(3, 3, M * F).contiguous()
    x, y, z = fv.unbind(0)
    x0, x1, x2 = x.unbind(0)
    y0, y1, y2 = y.unbind(0)
    behind = (z < near).sum(0)
    if bool(((behind > 0) & (behind < 3)).any()) or not bool(torch.isfinite(fv).all()):
        return None
    # The kernel compares its float32 face area and nearest depth with the double kEpsilon; no
    # float32 lies between kEpsilon and its float32 rounding, which is below it.
    eps32 = torch.tensor(_P3D_EPS, dtype=torch.float32).item()
    area = _edge(x0, y0, x1, y1, x2, y2)                                 # the kernel's face area
    usable = (behind == 0) & (area.abs() > eps32) & (z.amin(0) > eps32)
    x_lo, x_hi, y_lo, y_hi = x.amin(0), x.amax(0), y.amin(0), y.amax(0)
    # Pixel centres the box may hold: output column c is sampled near x = (W − 1 − 2c) / S.
    # (Clamped on both sides before becoming integers: a box may lie far off the image.)
    c_lo = torch.ceil((W - 1 - S * x_hi) / 2 - _RANGE_MARGIN_PX).clamp(0, W).long()
    c_hi = torch.floor((W - 1 - S * x_lo) / 2 + _RANGE_MARGIN_PX).clamp(-1, W - 1).long()
    r_lo = torch.ceil((H - 1 - S * y_hi) / 2 - _RANGE_MARGIN_PX).clamp(0, H).long()
    r_hi = torch.floor((H - 1 - S * y_lo) / 2 + _RANGE_MARGIN_PX).clamp(-1, H - 1).long()
    rows, cols = r_hi - r_lo + 1, c_hi - c_lo + 1
    candidates = torch.nonzero(usable & (cols > 0) & (rows > 0)).squeeze(1)   # m·F + f, ascending
    # The barycentric denominator: e(v2, v0, v1) + kEpsilon, in double, rounded once. (Where it
    # is 0 the kernel's barycentrics are not finite and it covers nothing.)
    values = torch.stack((x0, y0, x1, y1, x2, y2, x_lo, x_hi, y_lo, y_hi, _edge(x2, y2, x0, y0, x1, y1),
                          z[0], z[1], z[2]))[:, candidates]              # [14, C]
    values[10] = (values[10].double() + _P3D_EPS).float()
    kept = torch.nonzero(values[10] != 0).squeeze(1)
    candidates, values = candidates[kept], values[:, kept]
    ranges = torch.stack((r_lo, c_lo, rows, cols))[:, candidates]          # [4, C]
    x_ndc, y_ndc = pixel_ndc(W, H).to(device), pixel_ndc(H, W).to(device)

    # Faces are handled in groups by the size of their pixel box, as [faces, h, w] grids of
    # (face, pixel) pairs (h, w the next powers of two): the face's values then broadcast over
    # its pixels instead of being gathered for each pair, and most work is on small arrays.
    group = torch.ceil(torch.log2(ranges[2:].float())).long()
    group = group[0] * 64 + group[1]
    pixel_ids, depths, face_ids = [], [], []
    for g in torch.unique(group).tolist():
        shape = (1 << (g // 64), 1 << (g % 64))
        members = torch.nonzero(group == g).squeeze(1)
        for chunk in torch.split(members, max(1, _CHUNK_PAIRS // (shape[0] * shape[1]))):
            local, row, col, depth = _grid_fragments(values[:, chunk], ranges[:, chunk], shape, x_ndc, y_ndc)
            mf = candidates[chunk[local]]
            m = torch.div(mf, F, rounding_mode="floor")
            pixel_ids.append((m * H + row) * W + col)
            depths.append(depth)
            face_ids.append(mf - m * F)

    face = torch.full((M * H * W,), F, dtype=torch.int64, device=device)
    zbuf = torch.full((M * H * W,), -1.0, dtype=torch.float32, device=device)
    if pixel_ids:
        pixel, depth, face_id = torch.cat(pixel_ids), torch.cat(depths), torch.cat(face_ids)
        nearest = torch.full((M * H * W,), torch.inf, device=device).scatter_reduce(0, pixel, depth, "amin")
        # The smallest (depth, face) pair: the lowest face among those at the nearest depth.
        face.scatter_reduce_(0, pixel, torch.where(depth == nearest[pixel], face_id, F), "amin")
        zbuf = torch.where(face < F, nearest, zbuf)
    face = torch.where(face < F, face, -1)
    return face.view(M, H, W, 1), zbuf.view(M, H, W, 1)
