"""Evaluation metrics as pure functions (no data loader, no model): what ``test.py`` reports.

All distances are in mm. The tester (:class:`main.tester.Tester`) places the test-mode output in
the world, then calls these on tensors; the tests call them on hand-made inputs with known answers.

* :func:`joint_distances`: Euclidean distance per keypoint, with the validity mask;
* :func:`depth_differences`: ``|rendered − captured|`` where both depths exist;
* :func:`vertex_error`: mean per-vertex Euclidean distance between two meshes of one topology;
* :func:`point_surface_distance`: exact distance from points to a triangle surface (the closest
  point on any triangle, interior, edge or corner), vectorised over point-triangle pairs in chunks
  of bounded size; :func:`surface_distances` applies it both ways between two meshes and
  :func:`summarise_surface` reduces to mean and 90th percentile;
* :func:`pearson`, :func:`rms`: agreement of a learned corrective with the true one.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

# Point-triangle pairs evaluated at once by point_surface_distance: with ~30 float64 temporaries
# per pair this bounds its working memory to about 2^21 * 30 * 8 B = 0.5 GB at most, and the
# pruning below usually keeps far fewer pairs.
MAX_PAIRS = 1 << 21


# ------------------------------------------------------------------------------ keypoints, depth
def joint_distances(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-keypoint Euclidean error.

    Args:
        pred: ``[B, J, 3]`` predicted keypoints (mm), already in the ground truth's frame.
        gt: ``[B, J, 3]`` ground-truth keypoints (mm).
        valid: ``[B, J]``, non-zero where the ground-truth keypoint exists.
    Returns:
        ``(distance [B, J] mm, valid [B, J] bool)``; distances of invalid keypoints are 0.
    """
    if pred.shape != gt.shape or pred.shape[-1] != 3:
        raise ValueError(f"joint_distances: pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must both be [B, J, 3]")
    mask = valid.reshape(pred.shape[:-1]) > 0
    dist = torch.linalg.vector_norm(pred - gt, dim=-1)
    return torch.where(mask, dist, torch.zeros_like(dist)), mask


def depth_differences(rendered: torch.Tensor, captured: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``|rendered − captured|`` on the pixels where both depths exist (> 0), 0 elsewhere.

    Args:
        rendered, captured: depth maps of one shape (e.g. ``[B, N, H, W]``), mm, 0 = no surface.
    Returns:
        ``(absolute difference, both [bool])`` of that shape; the depth error is
        ``difference.sum() / both.sum()``.
    """
    if rendered.shape != captured.shape:
        raise ValueError(f"depth_differences: rendered {tuple(rendered.shape)} and captured "
                         f"{tuple(captured.shape)} depth maps differ in shape")
    both = (rendered > 0) & (captured > 0)
    diff = (rendered - captured).abs()
    return torch.where(both, diff, torch.zeros_like(diff)), both


def vertex_error(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Mean per-vertex Euclidean distance (mm) of ``[..., V, 3]`` meshes; shape ``[...]``."""
    if pred.shape != gt.shape or pred.shape[-1] != 3:
        raise ValueError(f"vertex_error: meshes {tuple(pred.shape)} and {tuple(gt.shape)} must have one [..., V, 3] shape")
    return torch.linalg.vector_norm(pred - gt, dim=-1).mean(dim=-1)


# ------------------------------------------------------------------------------ surfaces
def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(-1)


def _segment_sq(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distance from ``p [N, 3]`` to the segments ``a``–``b`` ``[N, 3]``."""
    ab = b - a
    length2 = _dot(ab, ab)
    t = (_dot(p - a, ab) / torch.where(length2 > 0, length2, torch.ones_like(length2))).clamp(0, 1)
    d = p - (a + t[:, None] * ab)
    return _dot(d, d)


def point_triangle_sq(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Exact squared distance from each point to its triangle, ``[N]`` (mm²).

    The closest point by Voronoi regions of the corners, edges and face (Ericson, *Real-Time
    Collision Detection*, 5.1.5), branch-free: every region's candidate is computed and the first
    region that holds is kept. A degenerate (zero-area) triangle has no face region; its distance
    is that to the nearest of its three edges.

    Args:
        p, a, b, c: ``[N, 3]`` points and triangle corners.
    """
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    bp = p - b
    d3, d4 = _dot(ab, bp), _dot(ac, bp)
    cp = p - c
    d5, d6 = _dot(ab, cp), _dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2

    def safe(num, den):
        return num / torch.where(den != 0, den, torch.ones_like(den))

    denom = va + vb + vc
    v, w = safe(vb, denom), safe(vc, denom)
    closest = a + v[:, None] * ab + w[:, None] * ac  # inside the face
    # The regions from the lowest priority to the highest, so the last assignment wins.
    e_bc = d4 - d3, d5 - d6
    regions = (
        ((va <= 0) & (e_bc[0] >= 0) & (e_bc[1] >= 0), b + safe(e_bc[0], e_bc[0] + e_bc[1])[:, None] * (c - b)),
        ((vb <= 0) & (d2 >= 0) & (d6 <= 0), a + safe(d2, d2 - d6)[:, None] * ac),
        ((d6 >= 0) & (d5 <= d6), c),
        ((vc <= 0) & (d1 >= 0) & (d3 <= 0), a + safe(d1, d1 - d3)[:, None] * ab),
        ((d3 >= 0) & (d4 <= d3), b),
        ((d1 <= 0) & (d2 <= 0), a),
    )
    for mask, point in regions:
        closest = torch.where(mask[:, None], point, closest)
    diff = p - closest
    dist2 = _dot(diff, diff)
    area2 = torch.linalg.vector_norm(torch.linalg.cross(ab, ac), dim=-1)
    scale2 = torch.maximum(_dot(ab, ab), _dot(ac, ac))
    degenerate = area2 <= 1e-12 * scale2
    if bool(degenerate.any()):
        edges = torch.stack([_segment_sq(p, a, b), _segment_sq(p, b, c), _segment_sq(p, c, a)]).amin(0)
        dist2 = torch.where(degenerate, edges, dist2)
    return dist2


# Faces per block of the coarse pruning stage of point_surface_distance.
FACE_BLOCK = 16


def _face_blocks(centres: torch.Tensor, block: int) -> torch.Tensor:
    """Faces grouped into spatially compact blocks, ``[K, block]`` face indices.

    A k-d split of the face centres: the faces, repeated cyclically up to ``block · 2^L`` entries,
    are halved ``L`` times, each group at the median of its widest axis. Repeated faces only add
    work, never change a distance.

    Args:
        centres: ``[F, 3]`` face centroids.
    """
    face_num = centres.shape[0]
    levels = max(0, (-(-face_num // block) - 1).bit_length())
    groups = (torch.arange(block << levels, device=centres.device) % face_num)[None]
    for _ in range(levels):
        c = centres[groups]  # [G, n, 3]
        axis = (c.amax(1) - c.amin(1)).argmax(1)
        key = c.gather(2, axis[:, None, None].expand(-1, c.shape[1], 1)).squeeze(2)
        groups = groups.gather(1, key.argsort(1)).reshape(2 * groups.shape[0], -1)
    return groups


def point_surface_distance(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
                           max_pairs: int = MAX_PAIRS) -> torch.Tensor:
    """Exact distance from every point to the surface of a triangle mesh, ``[P]`` (mm): the first
    output of :func:`nearest_surface_faces`, without finding the triangles."""
    return _surface_search(points, vertices, faces, max_pairs, find_faces=False)[0]


def nearest_surface_faces(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
                          max_pairs: int = MAX_PAIRS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact distance from every point to the surface of a triangle mesh, ``[P]`` (mm), and the
    triangle that holds the closest surface point, ``[P]`` (an index into ``faces``; the lowest
    index where several are equally near).

    Only triangles that can hold a point's closest surface point are evaluated, found in two
    stages by bounding spheres. The faces are grouped into compact blocks of :data:`FACE_BLOCK`
    (:func:`_face_blocks`), each with a sphere holding its faces. A point's distance to one
    surface point of each block (a triangle's centroid) bounds its surface distance from above;
    the blocks whose sphere lies farther than that bound are dropped. Within the remaining blocks
    the nearest centroid gives a tighter bound, and a face whose own sphere (centroid, farthest
    corner) lies farther than it is dropped. The exact point-triangle distance
    (:func:`point_triangle_sq`) is computed for the pairs left. Points are processed in chunks so
    that no more than ``max_pairs`` point-triangle pairs are held at once, whatever the sizes.
    Computed in float64.

    Args:
        points: ``[P, 3]`` mm.
        vertices: ``[V, 3]`` mm; faces: ``[F, 3]`` vertex indices.
        max_pairs: the memory bound, in pairs.
    """
    return _surface_search(points, vertices, faces, max_pairs, find_faces=True)


def _surface_search(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor, max_pairs: int,
                    find_faces: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`nearest_surface_faces`' search; the triangles (second output) only when ``find_faces``."""
    if points.dim() != 2 or points.shape[-1] != 3 or vertices.dim() != 2 or vertices.shape[-1] != 3:
        raise ValueError(f"point_surface_distance: points {tuple(points.shape)} and vertices "
                         f"{tuple(vertices.shape)} must be [N, 3]")
    if faces.dim() != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"point_surface_distance: faces must be a non-empty [F, 3], got {tuple(faces.shape)}")
    faces = faces.to(device=vertices.device, dtype=torch.long)
    if int(faces.min()) < 0 or int(faces.max()) >= vertices.shape[0]:
        raise ValueError(f"point_surface_distance: face indices must lie in [0, {vertices.shape[0]})")
    points, vertices = points.to(torch.float64), vertices.to(torch.float64)
    tri = vertices[faces]  # [F, 3, 3]
    centre = tri.mean(1)
    radius = torch.linalg.vector_norm(tri - centre[:, None], dim=-1).amax(1)

    order = _face_blocks(centre, FACE_BLOCK)  # [K, B]
    block_centre = centre[order].mean(1)  # [K, 3]
    from_block_centre = torch.linalg.vector_norm(centre[order] - block_centre[:, None], dim=-1)  # [K, B]
    block_radius = (from_block_centre + radius[order]).amax(1)
    # A point of each block's surface: the centroid (on its triangle) nearest the block's centre.
    nearest = from_block_centre.argmin(1)
    block_point = centre[order.gather(1, nearest[:, None]).squeeze(1)]  # [K, 3]

    def min_per_point(values: torch.Tensor, point: torch.Tensor, n: int) -> torch.Tensor:
        """``[n]`` minimum of ``values`` over the entries of each point (``inf`` where none)."""
        return torch.full((n,), math.inf, dtype=values.dtype, device=values.device).scatter_reduce(
            0, point, values, reduce="amin")

    def within(lower: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        # The margin covers the rounding of the distances (float64: ~1e-10 mm here); a larger
        # margin only keeps more pairs.
        return lower <= bound * (1 + 1e-9) + 1e-6

    chunk = max(1, int(max_pairs) // order.numel())  # at most every (padded) face survives
    out, nearest = [], []
    for start in range(0, points.shape[0], chunk):
        p = points[start:start + chunk]
        n = p.shape[0]
        bound = torch.cdist(p, block_point).amin(1)  # [n]
        pi, bi = torch.nonzero(within(torch.cdist(p, block_centre) - block_radius, bound[:, None]),
                               as_tuple=True)
        pi = pi.repeat_interleave(order.shape[1])
        fi = order[bi].reshape(-1)
        to_centroid = torch.linalg.vector_norm(p[pi] - centre[fi], dim=-1)
        keep = within(to_centroid - radius[fi], min_per_point(to_centroid, pi, n)[pi])
        pi, fi = pi[keep], fi[keep]
        d2 = point_triangle_sq(p[pi], tri[fi, 0], tri[fi, 1], tri[fi, 2])
        best = min_per_point(d2, pi, n)
        out.append(best.sqrt())
        if not find_faces:
            continue
        # The nearest triangle: the lowest face index among the pairs at the minimum.
        winner = torch.where(d2 == best[pi], fi, torch.full_like(fi, faces.shape[0]))
        nearest.append(torch.full((n,), faces.shape[0], dtype=fi.dtype, device=fi.device).scatter_reduce(
            0, pi, winner, reduce="amin"))
    return torch.cat(out), torch.cat(nearest) if find_faces else None


def surface_distances(pred: torch.Tensor, gt: torch.Tensor, faces: torch.Tensor,
                      gt_faces: Optional[torch.Tensor] = None,
                      max_pairs: int = MAX_PAIRS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Point-to-surface distances both ways between two meshes, mm.

    Args:
        pred: ``[V, 3]`` output mesh; gt: ``[V', 3]`` ground-truth mesh.
        faces: ``[F, 3]`` of ``pred``; gt_faces: of ``gt`` (``faces`` when None: one topology).
    Returns:
        ``(pred_to_gt [V], gt_to_pred [V'])``: each vertex's distance to the other surface.
    """
    gt_faces = faces if gt_faces is None else gt_faces
    return (point_surface_distance(pred, gt, gt_faces, max_pairs),
            point_surface_distance(gt, pred, faces, max_pairs))


def summarise_surface(pred_to_gt: np.ndarray, gt_to_pred: np.ndarray, prefix: str = "surface") -> Dict[str, float]:
    """Mean and 90th percentile (linear interpolation) of pooled point-to-surface distances, mm.

    ``<prefix>_error_mm`` is the symmetric mean: the average of the two directions' means.
    """
    a = np.asarray(pred_to_gt, dtype=np.float64).reshape(-1)
    b = np.asarray(gt_to_pred, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("summarise_surface: no distances")
    return {
        f"{prefix}_error_mm": float(0.5 * (a.mean() + b.mean())),
        f"{prefix}_out_to_gt_mean_mm": float(a.mean()),
        f"{prefix}_out_to_gt_p90_mm": float(np.percentile(a, 90)),
        f"{prefix}_gt_to_out_mean_mm": float(b.mean()),
        f"{prefix}_gt_to_out_p90_mm": float(np.percentile(b, 90)),
    }


# ------------------------------------------------------------------------------ correctives
def pearson(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Pearson correlation of all entries of two arrays of one size; None when either is constant."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size != b.size:
        raise ValueError(f"pearson: {a.size} and {b.size} entries")
    a, b = a - a.mean(), b - b.mean()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    if not denominator > 0:
        return None
    return finite_or_none(float(a @ b / denominator))


def finite_or_none(x: float) -> Optional[float]:
    """``x`` as a float, or None where it is NaN or infinite (JSON has no such numbers)."""
    return float(x) if math.isfinite(x) else None


def rms(x: np.ndarray) -> float:
    """Root mean square of all entries (mm for a corrective)."""
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))
