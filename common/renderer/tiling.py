"""CPU tiling around PyTorch3D's rasteriser.

PyTorch3D bins faces into tiles only on CUDA; its
CPU kernel tests every pixel against every face of the pixel's mesh, and spends on each
face of the batch a fixed amount of bookkeeping (about what 2,000 of those pixel tests
cost, :data:`_FACE_COST_PIXELS`; BENCHMARKS.md).  So with ``tile_size`` set (the default, CPU only) the renderer does
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
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from common.renderer.backend import pytorch3d_api, pytorch3d_raster_settings
from common.renderer.rasterizer import PYTORCH3D_EPS, edge_function

# Default tile size of the CPU path (pixels), chosen by measurement (tools/bench.py renderer).
DEFAULT_TILE_SIZE = 16

# Slack (pixels) added around a face's screen box (plus this fraction of the coordinates'
# magnitude) and around the triangle when deciding which pixel centres it may cover.  The
# kernel's coordinates differ from the float64 values used for the decision by float32
# rounding only (~1e-5 pixel at 256 pixels).
_TILE_MARGIN_PX = 1e-2
_TILE_MARGIN_REL = 1e-6

# Faces whose box reaches at most this many pixel centres of a tile are tested for containing
# one of them (see covers_a_pixel_centre).
_COVER_TEST_PIXELS = 4
_COVER_TEST_CHUNK = 1 << 16

# PyTorch3D's CPU kernel spends on each face of its batch, whatever the image size, about as
# long as on this many (pixel, face) bounding-box tests (tools/bench.py renderer).
_FACE_COST_PIXELS = 2048

# The tiled path is used only if the (tile, face) pairs it makes are at most this many times
# the faces of the call (hand crops: 0.3-1.5): bounds its memory, ~150 bytes per pair at the
# peak, the untiled path's ~50 bytes per face plus ~30 bytes per pixel aside.
_MAX_TILE_COPIES = 4


def tile_layout(image_size: Tuple[int, int], tile_size: int) -> Tuple[int, int, int, int]:
    """``(h, w, tiles down, tiles across)`` of the tiling of ``(H, W)`` images into tiles of
    ``tile_size`` pixels (cut to the image where it is smaller)."""
    H, W = image_size
    h, w = min(tile_size, H), min(tile_size, W)
    return h, w, -(-H // h), -(-W // w)


@torch.no_grad()
def tile_pairs(verts: torch.Tensor, faces: torch.Tensor, image_size: Tuple[int, int], tile_size: int,
               near: float, max_pairs: int):
    """Which faces each tile needs, from the views' screen vertices ``verts [M, V, 3]``
    (float32) and the ``[F, 3]`` ``faces``.

    Returns ``(tile, mface)``: for every (tile, face) pair, sorted by tile then face,
    the global tile index ``(m·tiles_down + ty)·tiles_across + tx`` and the face as
    ``m·F + f``; or None when there would be more than ``max_pairs`` pairs.
    """
    H, W = image_size
    h, w, nty, ntx = tile_layout(image_size, tile_size)
    S = float(min(H, W))
    M, V, F = int(verts.shape[0]), int(verts.shape[1]), int(faces.shape[0])
    fv = verts[:, faces]                                           # [M, F, 3, 3]
    x, y, z = fv.unbind(-1)
    # Faces the kernel skips whatever the pixel: entirely behind the near plane (PyTorch3D's
    # clipper culls them) or of zero area (the kernel's float32 expression, same numbers).
    behind = (z < near).sum(-1)                                    # [M, F]
    area = edge_function(x[..., 0], y[..., 0], x[..., 1], y[..., 1], x[..., 2], y[..., 2])
    skip = (behind == 3) | ((area <= PYTORCH3D_EPS) & (area >= -PYTORCH3D_EPS))
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
        tv = verts.reshape(M * V, 3)[torch.div(tm, F, rounding_mode="floor")[:, None] * V + faces[tm % F]]
        keep[chunk] = covers_a_pixel_centre(
            (W - 1 - S * tv[..., 0].double()) / 2, (H - 1 - S * tv[..., 1].double()) / 2,
            cols[0][chunk], cols[1][chunk], rows[0][chunk], rows[1][chunk])
    del cols, rows, test
    mface, ty, tx = mface[keep], ty[keep], tx[keep]
    tile = (torch.div(mface, F, rounding_mode="floor") * nty + ty) * ntx + tx
    # Pairs were made in (m, f) order; a stable sort by tile keeps faces ascending in each.
    tile, order = torch.sort(tile, stable=True)
    return tile, mface[order]


def rasterize_tiled(verts: torch.Tensor, faces: torch.Tensor, image_size: Tuple[int, int], tile_size: int,
                    near: float, faces_per_pixel: int = 1) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """All non-empty tiles of all views in one PyTorch3D ``rasterize_meshes`` call.

    Same arguments and result as :func:`common.renderer.backend.rasterize_whole_views` (``face``,
    ``zbuf`` ``[M, H, W, faces_per_pixel]``), or None when tiling does not pay."""
    H, W = image_size
    h, w, nty, ntx = tile_layout(image_size, tile_size)
    M, V = int(verts.shape[0]), int(verts.shape[1])
    F, K = int(faces.shape[0]), faces_per_pixel
    # The kernel's cost is about (_FACE_COST_PIXELS + pixels) per face of a mesh; tiling is
    # used when it is smaller for the faces' (tile, face) pairs than for the whole views.
    # (Even one tile saves the faces that reach no pixel centre.)
    max_pairs = min(_MAX_TILE_COPIES * M * F,
                    (M * F * (_FACE_COST_PIXELS + H * W)) // (_FACE_COST_PIXELS + h * w))
    pairs = tile_pairs(verts, faces, image_size, tile_size, near, max_pairs)
    if pairs is None:
        return None
    tile, mface = pairs
    empty_face = torch.full((M * nty * ntx, h, w, K), -1, dtype=torch.int64, device=verts.device)
    empty_z = verts.new_full((M * nty * ntx, h, w, K), -1.0)
    if len(tile) == 0:
        # Nothing on screen.  Like the untiled path, keep the output in the graph (with zero
        # gradients): a sum over no element is an exact 0 connected to the vertices.
        return (paste_tiles(empty_face, image_size, tile_size),
                paste_tiles(empty_z + verts[:0].sum(), image_size, tile_size))
    tiles, per_tile = torch.unique_consecutive(tile, return_counts=True)

    # The faces' vertices, moved into their tile's screen space (float64 arithmetic on the
    # float32 inputs, so each tile coordinate is the correctly rounded image of the
    # full-image one; z is untouched).
    S = min(H, W)
    m = torch.div(mface, F, rounding_mode="floor")
    vidx = m[:, None] * V + faces[mface - m * F]                  # [P, 3]
    fv = verts.reshape(M * V, 3)[vidx]                                  # [P, 3, 3]
    ty = torch.div(tile, ntx, rounding_mode="floor") % nty
    tx = tile % ntx
    shift = torch.stack((w - W + 2 * w * tx, h - H + 2 * h * ty), -1).to(torch.float64)   # [P, 2]
    xy = fv[..., :2].double().mul_(S).add_(shift[:, None, :]).div_(min(h, w))
    fv = torch.cat((xy.to(torch.float32), fv[..., 2:]), -1)
    del xy, vidx, shift

    first = torch.cumsum(per_tile, 0) - per_tile
    rasterize_meshes, _ = pytorch3d_api()
    pix_to_face, zbuf, _, _ = rasterize_meshes(
        TileBatch(fv, first, per_tile), image_size=(h, w), bin_size=0, max_faces_per_bin=1,
        **pytorch3d_raster_settings(K, near))
    # Tile-batch face (pair) index → f.
    face = torch.where(pix_to_face >= 0, mface[pix_to_face.clamp(min=0)] % F, pix_to_face)
    face = empty_face.index_copy_(0, tiles, face)
    zbuf = empty_z.index_copy(0, tiles, zbuf)
    return paste_tiles(face, image_size, tile_size), paste_tiles(zbuf, image_size, tile_size)


def paste_tiles(t: torch.Tensor, image_size: Tuple[int, int], tile_size: int) -> torch.Tensor:
    """``[M·tiles, h, w, K]`` tiles in (m, ty, tx) order → ``[M, H, W, K]`` images."""
    H, W = image_size
    h, w, nty, ntx = tile_layout(image_size, tile_size)
    K = t.shape[-1]
    t = t.reshape(-1, nty, ntx, h, w, K).permute(0, 1, 3, 2, 4, 5).reshape(-1, nty * h, ntx * w, K)
    return t[:, :H, :W]


def covers_a_pixel_centre(u: torch.Tensor, v: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor,
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


class TileBatch:
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
