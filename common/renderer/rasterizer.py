"""The project's own depth rasteriser, on the CPU and on CUDA, following PyTorch3D's kernel rule for rule.

PyTorch3D's CPU ``rasterize_meshes`` visits every pixel of every mesh and, for each, every face
of that mesh, with bookkeeping on each face of a call: at hand-crop sizes that is most of a CPU
training iteration (BENCHMARKS.md). Here the same decisions are taken for
all (face, pixel) pairs at once with tensor operations, visiting only the pixel centres inside
each face's screen box. Nothing here needs PyTorch3D; the renderer uses this module as its
``native`` backend (and, on the CPU, inside its ``pytorch3d`` backend where the two are equal
bit for bit).

What is reproduced, for ``blur_radius = 0``, ``perspective_correct``, no back-face culling and
no barycentric clipping (the renderer's settings):

* near plane: PyTorch3D's clipper (``z_clip_value = near``). Faces entirely behind the plane
  (every vertex ``z < near``) are dropped; a face with two vertices behind becomes the triangle
  ``(p4, p5, p1)`` of its part in front, a face with one vertex behind becomes the two triangles
  ``(p4, p2, p5)``, ``(p5, p2, p3)`` of its quadrilateral in front, where ``p1`` is the vertex
  alone on its side, ``p2, p3`` the next ones and ``p4, p5`` the cut points on edges
  ``p1p2, p1p3``: ``w = (z1 − near) / (z1 − zk)``, ``z = z1 (1 − w) + zk w`` and, for the
  screen coordinates, ``(xy1 z1 (1 − w) + xyk zk w) / near`` (exact for a perspective camera:
  ``x_ndc · z`` is linear in camera space), in the same float32 operations. The pieces of a cut
  face keep its index (and its plane: the renderer's gradient, ``plane_depth``, is exact there);
* output pixel ``(r, c)`` is sampled at PyTorch3D's float32 NDC point (``PixToNonSquareNdc``
  of the reversed index: +X left, +Y up);
* a triangle is skipped when its screen area ``|e(v0, v1, v2)| ≤ 1e-8`` or its nearest vertex is
  closer than ``1e-8``; a pixel is tested only when its point lies in the triangle's box
  (inclusive);
* the pixel is covered when the perspective-corrected barycentrics ``w`` are all ``> 0`` and the
  depth ``Σ wᵢ zᵢ ≥ 0`` (the kernel's formulas in the kernel's order of float32 operations:
  screen barycentrics ``eᵢ / (e(v2, v0, v1) + 1e-8)``, then ``bᵢ zⱼ zₖ`` normalised);
* of the faces covering a pixel, the nearest wins, the lowest face index on equal depth (the
  kernel keeps the smallest ``(depth, face)`` pairs); with ``faces_per_pixel = K`` the K
  smallest, nearest first, each face at most once (PyTorch3D keeps one of the two pieces of a
  cut face: the one whose edges are farther from the pixel; here the nearer, which differs only
  where both pieces cover the pixel centre, i.e. within rounding of the cut's diagonal).

Memory is bounded by two chunk sizes, whatever the number of views and faces: views are taken
in groups of at most ``chunk_faces`` (view, face) pairs, and within a group the (face, pixel)
pairs in chunks of at most ``chunk_pairs``; each chunk's covered pairs go at once into a
per-pixel running minimum of ``(depth, face)`` packed in one int64 (8 bytes a pixel and layer).
The same code runs on the CPU and on CUDA; only the default chunk sizes differ
(:func:`default_chunks`), and the tests run the CUDA sizes on the CPU.

A compiler may fuse a multiply and an add in PyTorch3D's kernel where these tensor operations
round twice; then depths would differ by a float32 ulp or so and a pixel centre within rounding
of an edge could be covered by one and not the other. With this project's pinned build the
face and depth maps are equal bit for bit (tests/test_renderer.py).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

# PyTorch3D's kEpsilon (a double in its C++: float expressions it is added to are evaluated in
# double and rounded once).
PYTORCH3D_EPS = 1e-8

# Default chunk sizes: (face, pixel) pairs handled at once (~40-60 bytes a pair at the peak) and
# (view, face) pairs of a group of views (~250 bytes each). On the CPU small chunks stay in the
# caches (measured: tools/bench.py renderer); on CUDA larger ones keep the device busy, within a
# few hundred MB.
_CHUNK_PAIRS = {"cpu": 1 << 20, "cuda": 1 << 22}
_CHUNK_FACES = {"cpu": 1 << 21, "cuda": 1 << 22}

# Slack (pixels) when turning a face's box into its range of pixel centres; the exact box test
# in NDC follows, so this only has to exceed float32 rounding (~1e-5 pixel at 256 pixels).
_RANGE_MARGIN_PX = 1e-3

# The empty key: no fragment (larger than any packed (depth, face)).
EMPTY_KEY = torch.iinfo(torch.int64).max


def default_chunks(device: torch.device | str) -> Tuple[int, int]:
    """``(chunk_pairs, chunk_faces)`` used on ``device`` (its type: ``cpu`` or ``cuda``)."""
    kind = torch.device(device).type
    kind = kind if kind in _CHUNK_PAIRS else "cuda"
    return _CHUNK_PAIRS[kind], _CHUNK_FACES[kind]


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


def edge_function(px, py, ax, ay, bx, by):
    """PyTorch3D's ``EdgeFunctionForward(p, a, b)``: ``(p − a) × (b − a)``."""
    return (px - ax) * (by - ay) - (py - ay) * (bx - ax)


def _cut_points(p1: torch.Tensor, pk: torch.Tensor, near: float) -> torch.Tensor:
    """Where edge ``p1 pk`` (``[3, T]`` screen points ``(x_ndc, y_ndc, z)``, float32) meets
    ``z = near``: PyTorch3D's clipper's float32 operations, in its order."""
    w = (p1[2] - near) / (p1[2] - pk[2])
    z = p1[2] * (1 - w) + pk[2] * w
    xy = (p1[:2] * p1[2:3] * (1 - w) + pk[:2] * pk[2:3] * w) / near
    return torch.cat((xy, z[None]))


def clip_near(fv: torch.Tensor, owner: torch.Tensor, near: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The triangles PyTorch3D's clipper makes of faces at ``z = near``.

    Args:
        fv: ``[3 (x, y, z), 3 (corner), T]`` float32 screen vertices of ``T`` faces.
        owner: ``[T]`` int64 id carried over to each face's pieces.
        near: the plane (mm).
    Returns:
        ``(fv', owner')``: the faces entirely in front unchanged, then the pieces of those cut by
        the plane (one triangle for two vertices behind, two for one); faces entirely behind are
        gone.
    """
    behind = fv[2] < near                                               # [3, T]
    if not bool(behind.any()):                                          # the common case: nothing to do
        return fv, owner
    count = behind.sum(0)
    front = count == 0
    pieces, owners = [fv[:, :, front]], [owner[front]]
    for n_behind in (2, 1):
        sel = torch.nonzero(count == n_behind).squeeze(1)
        if len(sel) == 0:
            continue
        lone_side = ~behind[:, sel] if n_behind == 2 else behind[:, sel]  # p1: alone on its side
        i1 = lone_side.int().argmax(0)
        t = torch.arange(len(sel), device=fv.device)
        p1, p2, p3 = (fv[:, (i1 + k) % 3, sel[t]] for k in range(3))         # [3, n] each
        p4, p5 = _cut_points(p1, p2, near), _cut_points(p1, p3, near)
        if n_behind == 2:
            pieces.append(torch.stack((p4, p5, p1), 1))
            owners.append(owner[sel])
        else:
            pieces += [torch.stack((p4, p2, p5), 1), torch.stack((p5, p2, p3), 1)]
            owners += [owner[sel], owner[sel]]
    return torch.cat(pieces, 2), torch.cat(owners)


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


def prepare_faces(fv: torch.Tensor, owner: torch.Tensor, H: int, W: int):
    """Per-triangle data of the kernel's tests, for the triangles that can cover a pixel centre.

    Args:
        fv: ``[3, 3, T]`` float32 screen vertices (in front of the near plane); owner ``[T]``.
    Returns:
        ``(values [14, C], ranges [4, C], owner [C])``: rows ``x0, y0, x1, y1, x2, y2`` (screen
        corners), ``x_lo, x_hi, y_lo, y_hi`` (box), the barycentric denominator (non-zero) and
        ``z0, z1, z2`` (mm); the first row, first column, number of rows and of columns (≥ 1) of
        each triangle's range of pixel centres; the owners kept.
    """
    S = float(min(H, W))
    x, y, z = fv.unbind(0)
    x0, x1, x2 = x.unbind(0)
    y0, y1, y2 = y.unbind(0)
    # The kernel compares its float32 face area and nearest depth with the double kEpsilon; no
    # float32 lies between kEpsilon and its float32 rounding, which is below it.
    eps32 = torch.tensor(PYTORCH3D_EPS, dtype=torch.float32).item()
    area = edge_function(x0, y0, x1, y1, x2, y2)                                 # the kernel's face area
    usable = (area.abs() > eps32) & (z.amin(0) > eps32)
    x_lo, x_hi, y_lo, y_hi = x.amin(0), x.amax(0), y.amin(0), y.amax(0)
    # Pixel centres the box may hold: output column c is sampled near x = (W − 1 − 2c) / S.
    # (Clamped on both sides before becoming integers: a box may lie far off the image.)
    c_lo = torch.ceil((W - 1 - S * x_hi) / 2 - _RANGE_MARGIN_PX).clamp(0, W).long()
    c_hi = torch.floor((W - 1 - S * x_lo) / 2 + _RANGE_MARGIN_PX).clamp(-1, W - 1).long()
    r_lo = torch.ceil((H - 1 - S * y_hi) / 2 - _RANGE_MARGIN_PX).clamp(0, H).long()
    r_hi = torch.floor((H - 1 - S * y_lo) / 2 + _RANGE_MARGIN_PX).clamp(-1, H - 1).long()
    rows, cols = r_hi - r_lo + 1, c_hi - c_lo + 1
    candidates = torch.nonzero(usable & (cols > 0) & (rows > 0)).squeeze(1)
    # The barycentric denominator: e(v2, v0, v1) + kEpsilon, in double, rounded once. (Where it
    # is 0 the kernel's barycentrics are not finite and it covers nothing.)
    values = torch.stack((x0, y0, x1, y1, x2, y2, x_lo, x_hi, y_lo, y_hi, edge_function(x2, y2, x0, y0, x1, y1),
                          z[0], z[1], z[2]))[:, candidates]              # [14, C]
    values[10] = (values[10].double() + PYTORCH3D_EPS).float()
    kept = torch.nonzero(values[10] != 0).squeeze(1)
    candidates, values = candidates[kept], values[:, kept]
    ranges = torch.stack((r_lo, c_lo, rows, cols))[:, candidates]          # [4, C]
    return values, ranges, owner[candidates]


def _prepare(fv: torch.Tensor, owner: torch.Tensor, H: int, W: int):
    """:func:`prepare_faces` and each triangle's ``group``, the power-of-two grid of its pixel box.

    Triangles are handled in groups by the size of their pixel box, as [faces, h, w] grids of
    (face, pixel) pairs (h, w the next powers of two): the face's values then broadcast over its
    pixels instead of being gathered for each pair, and most work is on small arrays."""
    values, ranges, owner = prepare_faces(fv, owner, H, W)
    group = torch.ceil(torch.log2(ranges[2:].float())).long()
    return values, ranges, owner, group[0] * 64 + group[1]


def _fragments(prepared, H: int, W: int, F: int, chunk_pairs: int,
               x_ndc: torch.Tensor, y_ndc: torch.Tensor) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The covered (pixel, key) pairs, chunk by chunk: ``pixel = (m·H + row)·W + col`` within the
    views of ``prepared`` and ``key`` the packed ``(depth, face)`` (see :func:`_pack`)."""
    values, ranges, owner, group = prepared
    for g in torch.unique(group).tolist():
        shape = (1 << (g // 64), 1 << (g % 64))
        members = torch.nonzero(group == g).squeeze(1)
        for chunk in torch.split(members, max(1, chunk_pairs // (shape[0] * shape[1]))):
            local, row, col, depth = _grid_fragments(values[:, chunk], ranges[:, chunk], shape, x_ndc, y_ndc)
            mf = owner[chunk[local]]
            m = torch.div(mf, F, rounding_mode="floor")
            yield (m * H + row) * W + col, _pack(depth, mf - m * F)


def _pack(depth: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """``(depth ≥ 0 float32, face ≥ 0)`` → int64 keys ordered as the pairs: a non-negative float's
    bits, read as an integer, order as the float (``+ 0.0`` turns a −0 into +0)."""
    bits = (depth + 0.0).view(torch.int32).to(torch.int64)
    return (bits << 32) | face


def unpack_keys(key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keys → ``(face int64, depth float32)``, ``(−1, −1.0)`` for the empty key."""
    empty = key == EMPTY_KEY
    face = torch.where(empty, -1, key & 0xFFFFFFFF)
    depth = (key >> 32).to(torch.int32).view(torch.float32)
    return face, torch.where(empty, torch.full_like(depth, -1.0), depth)


@torch.no_grad()
def rasterize_depth(verts: torch.Tensor, faces: torch.Tensor, image_size: Tuple[int, int], near: float,
                    faces_per_pixel: int = 1, chunk_pairs: Optional[int] = None,
                    chunk_faces: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The nearest faces and their depths at every pixel, as PyTorch3D's rasteriser finds them.

    Args:
        verts: ``[M, V, 3]`` float32 screen-space vertices ``(x_ndc, y_ndc, z)`` of ``M`` views
            (PyTorch3D's NDC; ``z`` the camera depth, mm), on the CPU or CUDA.
        faces: ``[F, 3]`` int64 vertex indices (F < 2³¹).
        image_size: ``(H, W)``.
        near: near clipping plane (mm, > 0).
        faces_per_pixel: ``K``, faces kept per pixel.
        chunk_pairs, chunk_faces: memory bounds (module docstring); None: :func:`default_chunks`.
    Returns:
        ``(face [M, H, W, K] int64, zbuf [M, H, W, K] float32)``: the index (into ``faces``) and
        depth (mm) of the k-th nearest covering face, −1 where fewer cover the pixel centre.
    Raises:
        ValueError: a coordinate of a vertex used by a face is not finite (naming view and vertex).
    """
    H, W = int(image_size[0]), int(image_size[1])
    M, F, K = int(verts.shape[0]), int(faces.shape[0]), int(faces_per_pixel)
    device = verts.device
    default_pairs, default_faces = default_chunks(device)
    chunk_pairs = int(chunk_pairs or default_pairs)
    chunk_faces = int(chunk_faces or default_faces)
    check_screen_vertices(verts, faces)
    x_ndc, y_ndc = pixel_ndc(W, H).to(device), pixel_ndc(H, W).to(device)
    keys = torch.full((K, M * H * W), EMPTY_KEY, dtype=torch.int64, device=device)
    views_per_group = max(1, chunk_faces // max(F, 1))
    for m0 in range(0, M, views_per_group):
        m1 = min(M, m0 + views_per_group)
        # [xyz, corner, m·F + f] of the group, each row contiguous; m counted within the group.
        fv = verts[m0:m1][:, faces].permute(3, 2, 0, 1).reshape(3, 3, (m1 - m0) * F).contiguous()
        owner = torch.arange((m1 - m0) * F, device=device)
        fv, owner = clip_near(fv, owner, near)
        prepared = _prepare(fv, owner, H, W)
        del fv, owner
        group_keys = keys[:, m0 * H * W:m1 * H * W]
        # Layer k keeps, at each pixel, the smallest key above layer k − 1's whose face is none of
        # the layers before (the two pieces of a cut face have one face and two depths).
        for k in range(K):
            for pixel, key in _fragments(prepared, H, W, F, chunk_pairs, x_ndc, y_ndc):
                if k > 0:
                    above = key > group_keys[k - 1, pixel]
                    face = key & 0xFFFFFFFF
                    for j in range(k):
                        above &= face != (group_keys[j, pixel] & 0xFFFFFFFF)
                    pixel, key = pixel[above], key[above]
                group_keys[k].scatter_reduce_(0, pixel, key, "amin")
    face, zbuf = unpack_keys(keys)
    return (face.view(K, M, H, W).permute(1, 2, 3, 0).contiguous(),
            zbuf.view(K, M, H, W).permute(1, 2, 3, 0).contiguous())


def check_screen_vertices(verts: torch.Tensor, faces: torch.Tensor) -> None:
    """A clear error unless ``verts [M, V, 3]`` is float32, every vertex a face uses is finite and
    ``faces [F, 3]`` has fewer than 2³¹ faces (the packed keys hold a face in 32 bits)."""
    if verts.dtype != torch.float32:
        raise ValueError(f"verts: expected float32 screen vertices, got {verts.dtype}")
    if faces.shape[0] >= 1 << 31:
        raise ValueError(f"faces: at most 2^31 - 1 faces, got {faces.shape[0]}")
    used = torch.zeros(verts.shape[1], dtype=torch.bool, device=verts.device)
    used[faces.reshape(-1)] = True
    bad = ~torch.isfinite(verts).all(-1) & used                          # [M, V]
    if bool(bad.any()):
        m, v = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"verts: non-finite screen coordinates {verts[m, v].tolist()} at view {m}, vertex {v} "
                         f"({int(bad.sum())} such vertices); expected finite (x_ndc, y_ndc, z)")


def cuts_near_plane(verts: torch.Tensor, faces: torch.Tensor, near: float) -> bool:
    """Whether a face of ``verts [M, V, 3]`` (screen vertices, z in mm) has some but not all of
    its vertices closer than ``near``."""
    behind = (verts[:, :, 2] < near)[:, faces].sum(-1)
    return bool(((behind > 0) & (behind < 3)).any())
