"""Training losses of DeepHandMesh (docs/design.md, "Losses").

Every loss returns per-element values; the trainer takes ``.mean()`` of each and sums them, as the
original does. All lengths are millimetres. Everything is vectorised over the batch; the index
tables the penetration and Laplacian losses need are built once, at construction, and kept in
non-persistent buffers (they move with ``.to()`` but never enter a state dict, so checkpoints keep
exactly the original's keys, docs/design.md, "Checkpoints").

Corner cases the original leaves undefined (it raises or divides by zero) and what happens here:

* a non-rigid joint with no vertex segmented to it: its (joint, path) pairs contribute 0 and still
  count in the average (no skin to push out of; the limit of a segment that is far away);
* a skeleton with no pair of disjoint bones, or no non-thumb path: that term is 0;
* a point pair at zero distance: the (sub)gradient of the distance is 0 instead of NaN.

The penetration loss's radii are measured on the original's ``mesh_refined_v``: the rest mesh with
correctives skinned by the refined skeleton at zero angles (``Model.skinned_rest_mesh``), so that
it lies on the refined bones the points are placed on.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.hand.hand_model import children_of
from common.utils.shapes import shape_of


def _stack_views(depth, name: str) -> torch.Tensor:
    """A ``[B, N, H, W]`` tensor, a ``[B, H, W]`` tensor (one view) or a sequence of ``N``
    ``[B, H, W]`` tensors (the original's list of views) → ``[B, N, H, W]``."""
    if isinstance(depth, (list, tuple)):
        if len(depth) == 0:
            raise ValueError(f"{name}: expected at least one view, got an empty sequence")
        depth = torch.stack(list(depth), dim=1)
    if not isinstance(depth, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor or a sequence of tensors, got {type(depth).__name__}")
    if depth.dim() == 3:
        depth = depth[:, None]
    if depth.dim() != 4:
        raise ValueError(f"{name}: expected shape [B, N, H, W] (mm), got {shape_of(depth)}")
    return depth


class DepthmapLoss(nn.Module):
    """Smooth-L1 (β = 1 mm) between rendered and captured depth where both are non-zero.

    As the original: the masked per-pixel loss of each view, summed over the views and divided by
    their number. Pixels outside the mask are zeros that stay in the trainer's mean, so the mean
    is over all pixels, not over the masked ones.
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def forward(self, depthmap_out, depthmap_gt) -> torch.Tensor:
        """
        Args:
            depthmap_out: rendered depth ``[B, N, H, W]`` (mm, 0 = no surface), or a list of ``N``
                ``[B, H, W]`` maps.
            depthmap_gt: captured depth, same layout and size (mm, 0 = no depth).
        Returns:
            ``[B, H, W]`` per-pixel loss averaged over the ``N`` views.
        """
        out = _stack_views(depthmap_out, "depthmap_out")
        gt = _stack_views(depthmap_gt, "depthmap_gt").to(out.dtype)
        if out.shape != gt.shape:
            raise ValueError(f"depthmap_out {shape_of(out)} and depthmap_gt {shape_of(gt)} differ in shape")
        both = (out != 0) & (gt != 0)
        loss = F.smooth_l1_loss(out, gt, reduction="none", beta=self.beta)
        # where, not a product: a non-finite value outside the mask must not leak into the loss.
        return torch.where(both, loss, torch.zeros_like(loss)).mean(dim=1)


class JointLoss(nn.Module):
    """L1 distance of joints, zeroed for joints without a ground-truth keypoint."""

    def forward(self, joint_out: torch.Tensor, joint_gt: torch.Tensor, joint_valid: torch.Tensor) -> torch.Tensor:
        """
        Args:
            joint_out: ``[B, J, 3]`` predicted joints (mm).
            joint_gt: ``[B, J, 3]`` ground truth (mm).
            joint_valid: ``[B, J]`` (or ``[B, J, 1]``) 1 for joints the keypoint file has, else 0.
        Returns:
            ``[B, J, 3]`` per-coordinate absolute error (mm), 0 for invalid joints.
        """
        if joint_out.shape != joint_gt.shape:
            raise ValueError(f"joint_out {shape_of(joint_out)} and joint_gt {shape_of(joint_gt)} differ in shape")
        valid = joint_valid.to(joint_out.dtype)
        if valid.dim() == joint_out.dim() - 1:
            valid = valid[..., None]
        return torch.abs(joint_out - joint_gt) * valid


# --------------------------------------------------------------------------- penetration
def _squared_distances(points: torch.Tensor, vertices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``|p − v|²`` for all pairs as one product of augmented coordinates,
    ``[p, |p|², 1] · [−2v, 1, |v|²]``, with no further pass over the ``[..., Q, V]`` result.

    Args:
        points: ``[..., Q, 3]``; vertices: ``[..., V, 3]`` (mm, best centred on the vertices:
            the float error grows with the coordinates' magnitude).
    Returns:
        ``([..., Q, V] squared distances, error)``: ``error`` (a 0-d tensor, mm²) bounds their
        float rounding error, many times over.
    """
    p_sq, v_sq = points.square().sum(-1), vertices.square().sum(-1)
    augmented_points = torch.cat([points, p_sq[..., None], torch.ones_like(p_sq)[..., None]], -1)
    augmented_vertices = torch.cat([-2 * vertices, torch.ones_like(v_sq)[..., None], v_sq[..., None]], -1)
    squared = augmented_points @ augmented_vertices.transpose(-1, -2)
    return squared, 16 * torch.finfo(squared.dtype).eps * (p_sq.amax() + v_sq.amax())


def _coordinate_squared_distances(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """``[..., Q, V]`` ``|p − v|²`` summed from the coordinate differences: a few ulp of relative
    error whatever the coordinates' magnitude (no cancellation, unlike the matrix-product form).

    Args:
        points: ``[..., Q, 3]``; vertices: ``[..., V, 3]`` (mm).
    """
    p = points.movedim(-1, 0).contiguous()  # [3, ..., Q]: each coordinate a contiguous array
    v = vertices.movedim(-1, 0).contiguous()
    squared = (p[0].unsqueeze(-1) - v[0].unsqueeze(-2)).square_()
    for c in (1, 2):
        d = p[c].unsqueeze(-1) - v[c].unsqueeze(-2)
        squared.addcmul_(d, d)
    return squared


def _entries_at_most(values: torch.Tensor, bound: torch.Tensor, block: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(rows [N], columns [N])`` of the entries with ``values[r, c] ≤ bound[r]``, in no set order.

    Found block by block in wide arrays: only the blocks of ``block`` columns whose minimum passes
    are compared entry by entry. The searches here look for the few vertices nearest to each
    point, so that skips nearly all of a full comparison and, above all, the full ``nonzero``,
    the slowest pass over a large array on the CPU.

    Args:
        values: ``[R, C]`` with rows of unit column stride (a row slice of a larger array will do).
        bound: ``[R]``.
    """
    R, C = values.shape
    # Below some sixteen blocks a row, the extra passes cost more than they save (measured).
    whole = C - C % block if C >= 16 * block else 0
    rows, columns = [], []
    if whole:
        blocks = values[:, :whole].unflatten(1, (whole // block, block))  # [R, C / block, block]
        r, b = torch.nonzero(blocks.amin(dim=-1) <= bound[:, None], as_tuple=True)
        hit, offset = torch.nonzero(blocks[r, b] <= bound[r][:, None], as_tuple=True)
        rows.append(r[hit]), columns.append(b[hit] * block + offset)
    if whole < C:
        r, c = torch.nonzero(values[:, whole:] <= bound[:, None], as_tuple=True)
        rows.append(r), columns.append(c + whole)
    if len(rows) == 1:
        return rows[0], columns[0]
    return torch.cat(rows), torch.cat(columns)


# Up to this many point–vertex pairs, the nearest-vertex search measures every distance from
# coordinate differences: faster than the product search's twenty-odd passes at these sizes
# (measured; beyond ~1M pairs the arrays leave the cache and the product search wins).
_EXACT_SEARCH_PAIRS = 1 << 19


@torch.no_grad()
def nearest_vertex(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    """``[B, Q]`` index of each point's nearest vertex, decided on exact distances, the lowest index
    on an exact tie, as ``argmin``.

    Small searches measure every ``|p − v|²`` from coordinate differences. Larger ones run on
    matrix-product squared distances (one batched GEMM), which in float32 are off by ~1e-3 mm² at
    hand coordinates: too coarse to decide a near tie, so every vertex within a bound of that
    error of the best is re-measured exactly (``‖p − v‖``, usually one or two per point) and the
    nearest of those wins.

    Args:
        points: ``[B, Q, 3]`` (mm).
        vertices: ``[B, V, 3]`` (mm), ``V ≥ 1``.
    """
    B, Q, _ = points.shape
    V = vertices.shape[1]
    if B * Q * V <= _EXACT_SEARCH_PAIRS:
        return _coordinate_squared_distances(points, vertices).argmin(dim=-1)
    centre = vertices.mean(dim=1, keepdim=True)
    sq, error = _squared_distances(points - centre, vertices - centre)  # [B, Q, V]
    flat = sq.view(B * Q, V)
    r, k = _entries_at_most(flat, flat.amin(dim=1) + error)
    exact = torch.linalg.vector_norm(points.reshape(B * Q, 3)[r] - vertices[r // Q, k], dim=-1)
    best = exact.new_full((B * Q,), math.inf).scatter_reduce(0, r, exact, "amin")
    winner = torch.where(exact == best[r], k, V)  # V: not a winner (no boolean indexing: no search)
    return k.new_full((B * Q,), V).scatter_reduce(0, r, winner, "amin").view(B, Q)


@torch.no_grad()
def nearest_vertex_per_segment(points: torch.Tensor, vertices: torch.Tensor, bounds: Sequence[int]) -> torch.Tensor:
    """``[B, K, Q]`` index (into ``vertices``) of each point's nearest vertex in each of ``K``
    consecutive vertex segments, as :func:`nearest_vertex` finds it.

    Args:
        points: ``[B, Q, 3]`` (mm).
        vertices: ``[B, V, 3]`` (mm).
        bounds: ``K + 1`` increasing offsets; segment ``k`` is ``vertices[:, bounds[k]:bounds[k + 1]]``,
            none empty.
    """
    return torch.stack([nearest_vertex(points, vertices[:, lo:hi]) + lo for lo, hi in zip(bounds[:-1], bounds[1:])],
                       dim=1)


class _BoneOverlap(torch.autograd.Function):
    """``[B]`` mean over bone pairs of the mean over their point pairs of ``max(0, r₁ + r₂ − ‖p₁ − p₂‖)``,
    with a hand-written backward: autograd's would take some twenty passes over the
    ``[3, B, Q, n, n]`` point-pair arrays, this one five.

    Args of ``apply``: ``coords [3, B, P]`` bone points, coordinates first (mm); ``radius_first``,
    ``radius_second`` ``[B, Q, n]`` radii of the two bones' points (mm, no gradient); ``first``,
    ``second`` ``[Q, n]`` point ids of the two bones of each pair.
    """

    @staticmethod
    def forward(ctx, coords, radius_first, radius_second, first, second):
        # Coordinates first: the squared distance is then elementwise products of contiguous
        # [B, Q, n, n] arrays, half the time of a norm over a trailing axis of 3.
        diff = coords[:, :, first][..., None] - coords[:, :, second][..., None, :]  # [3, B, Q, n, n]
        dist = diff[0].square().addcmul_(diff[1], diff[1]).addcmul_(diff[2], diff[2])
        dist.clamp_min_(torch.finfo(dist.dtype).tiny).sqrt_()  # > 0: no NaN in the backward
        overlap = (radius_first[..., None] - dist).add_(radius_second[:, :, None])
        ctx.save_for_backward(diff, dist, overlap, first, second)
        ctx.point_num = coords.shape[-1]
        Q, n = first.shape
        return overlap.clamp(min=0).sum(dim=(1, 2, 3)).div_(Q * n * n)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        diff, dist, overlap, first, second = ctx.saved_tensors
        Q, n = first.shape
        # d loss_b / d diff = −grad_b / (Q n²) · diff / dist where the pair overlaps (≥ 0, where
        # torch.clamp's backward passes the gradient too). At a zero distance diff is 0, and so is
        # the gradient, as a norm's subgradient.
        weighted = diff * torch.where(overlap >= 0, dist, torch.inf).reciprocal_()  # [3, B, Q, n, n]
        grad_coords = weighted.new_zeros(3, weighted.shape[1], ctx.point_num)
        grad_coords.index_add_(2, first.reshape(-1), weighted.sum(dim=-1).neg_().flatten(2))
        grad_coords.index_add_(2, second.reshape(-1), weighted.sum(dim=-2).flatten(2))
        return grad_coords.mul_(grad.div(Q * n * n)[None, :, None]), None, None, None, None


class PenetLoss(nn.Module):
    """Penetration loss ``rigid_weight · rigid + non_rigid_weight · non_rigid`` (docs/design.md, "Losses").

    Bone sample points are taken, depth first from the root as the original, at
    ``t = 0, step, 2·step, … < 1`` along every parent→child bone, plus one point at each leaf
    joint. Each point's radius is its distance to the nearest vertex of the rest-pose mesh (with
    correctives), per sample; radii are thresholds only (no gradient).

    * rigid: for every pair of bones (edges of the root-to-leaf paths, listed path by path as the
      original, so an edge above a branching below the root would be listed once per path) that
      share no joint — the original skips a pair when start₁ = start₂, start₁ = end₂ or
      end₁ = start₂, which for tree edges is "shares a joint"; the wrist→X1 bones take part —
      the mean over the point pairs of ``max(0, r₁ + r₂ − ‖p₁ − p₂‖)``, averaged over the pairs.
    * non-rigid: for each non-rigid joint, its segmented posed vertices; for each root-to-leaf path
      whose last bone has no joint named ``…thumb…`` (any case), the points of that last bone
      only: ``d`` = distance to the nearest of those vertices; from the first point ``k`` with
      ``d < r`` on, ``|mean(d[k:] − r[k:])|``, and 0 when no point is that close; averaged over
      the (joint, path) pairs.

    The leaf points exist in the point table (as in the original) but neither term uses them: both
    only read the points of bones between two different joints.

    Returns ``[B]`` per-sample losses.
    """

    def __init__(
        self,
        joint_names: Sequence[str],
        parents: Sequence[int],
        segmentation,
        root_index: int,
        non_rigid_joint_indices: Sequence[int],
        bone_step_size: float = 0.1,
        rigid_weight: float = 1.0,
        non_rigid_weight: float = 5.0,
    ):
        """
        Args:
            joint_names: ``J`` joint names (the non-rigid term skips paths whose last bone has a
                joint named ``…thumb…``).
            parents: ``[J]`` parent ids, -1 for the root.
            segmentation: ``[V]`` joint id of each vertex (argmax of its skinning weights).
            root_index: id of the root joint.
            non_rigid_joint_indices: ids of the joints whose skin the fingertips must not enter
                (thumb1 and wrist in the released model).
            bone_step_size: spacing of the sample points along a bone, as a fraction of its length.
            rigid_weight, non_rigid_weight: weights of the two terms (the original's 1 and 5).
        """
        super().__init__()
        parents = [int(p) for p in np.asarray(parents).reshape(-1)]
        J = len(parents)
        if len(joint_names) != J:
            raise ValueError(f"joint_names has {len(joint_names)} names for {J} joints")
        if not 0 <= root_index < J or parents[root_index] >= 0:
            raise ValueError(f"root_index {root_index} is not the root of the skeleton (parent -1)")
        if not 0.0 < bone_step_size <= 1.0:
            raise ValueError(f"bone_step_size must be in (0, 1], got {bone_step_size}")
        seg = torch.as_tensor(np.asarray(segmentation), dtype=torch.long).reshape(-1)
        nr_joints = [int(j) for j in non_rigid_joint_indices]
        bad = [j for j in nr_joints if not 0 <= j < J]
        if bad:
            raise ValueError(f"non_rigid_joint_indices {bad} are not joint ids 0..{J - 1}")

        self.joint_num = J
        self.vertex_num = int(seg.numel())
        self.root_index = int(root_index)
        self.non_rigid_joint_indices = nr_joints
        self.rigid_weight = float(rigid_weight)
        self.non_rigid_weight = float(non_rigid_weight)
        steps = torch.arange(0.0, 1.0, float(bone_step_size), dtype=torch.float64)
        n = int(steps.numel())
        self.points_per_bone = n

        # Point table in the original's order: at each joint its leaf point or, per child, that
        # bone's points followed by the child's whole subtree.
        kids = children_of(parents)
        start, end, tpos = [], [], []
        bone_first_point = {}

        def add_points(j: int) -> None:
            if not kids[j]:
                start.append(j), end.append(j), tpos.append(0.0)
            for c in kids[j]:
                bone_first_point[(j, c)] = len(start)
                start.extend([j] * n), end.extend([c] * n), tpos.extend(steps.tolist())
                add_points(c)

        add_points(self.root_index)

        # Root-to-leaf paths in the same depth-first order, and their edges path by path.
        paths, stack = [], [[self.root_index]]
        while stack:
            path = stack.pop()
            if kids[path[-1]]:
                stack.extend(path + [c] for c in reversed(kids[path[-1]]))
            else:
                paths.append(path)
        self.paths = paths
        edges = [(p[i], p[i + 1]) for p in paths for i in range(len(p) - 1)]
        first, second = [], []
        for a in range(len(edges)):
            for b in range(a + 1, len(edges)):
                (s1, e1), (s2, e2) = edges[a], edges[b]
                if s1 == s2 or s1 == e2 or e1 == s2:
                    continue
                first.append(a), second.append(b)
        self.bone_pairs = [(edges[a], edges[b]) for a, b in zip(first, second)]
        edge_points = torch.tensor([[bone_first_point[e] + k for k in range(n)] for e in edges],
                                   dtype=torch.long).reshape(len(edges), n)

        last_bones = [(p[-2], p[-1]) for p in paths if len(p) >= 2
                      and "thumb" not in joint_names[p[-2]].lower() and "thumb" not in joint_names[p[-1]].lower()]
        self.last_bones = last_bones
        last_points = torch.tensor([[bone_first_point[e] + k for k in range(n)] for e in last_bones],
                                   dtype=torch.long).reshape(len(last_bones), n)

        # Vertices of the non-rigid joints, one joint's after another; a joint without vertices
        # gets no segment.
        nr_vertices = [torch.nonzero(seg == j, as_tuple=True)[0] for j in nr_joints]
        sizes = [int(v.numel()) for v in nr_vertices if v.numel()]
        self.non_rigid_segment_bounds = np.cumsum([0] + sizes).tolist()
        nr_vertices = torch.cat(nr_vertices) if nr_vertices else torch.zeros(0, dtype=torch.long)

        buffers = {
            "segmentation": seg,  # [V] (the original's buffer name; not saved here)
            "steps": torch.tensor(tpos, dtype=torch.float64),  # [P]
            "point_start": torch.tensor(start, dtype=torch.long),  # [P]
            "point_end": torch.tensor(end, dtype=torch.long),  # [P]
            "pair_points_first": edge_points[torch.tensor(first, dtype=torch.long)],  # [Q, n]
            "pair_points_second": edge_points[torch.tensor(second, dtype=torch.long)],  # [Q, n]
            "last_bone_points": last_points,  # [L, n]
            "non_rigid_vertices": nr_vertices,  # [Vs], Vs = sum of the segment sizes
        }
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    @classmethod
    def from_hand_model(cls, hand_model, **kwargs) -> "PenetLoss":
        """Build from a :class:`common.hand.hand_model.HandModel`; ``kwargs`` go to the constructor."""
        return cls(hand_model.joint_names, hand_model.parents, hand_model.segmentation,
                   hand_model.root_index, hand_model.non_rigid_joint_indices, **kwargs)

    @property
    def point_num(self) -> int:
        return int(self.steps.numel())

    def extra_repr(self) -> str:
        return (f"points={self.point_num}, bone_pairs={len(self.bone_pairs)}, "
                f"last_bones={len(self.last_bones)}, non_rigid_joints={self.non_rigid_joint_indices}, "
                f"weights=({self.rigid_weight}, {self.non_rigid_weight})")

    # ---------------------------------------------------------------- pieces
    def _joints(self, joints: torch.Tensor, name: str) -> torch.Tensor:
        """``[..., J, 4, 4]`` global poses or ``[..., J, 3]`` positions → ``[..., J, 3]``."""
        if joints.shape[-2:] == (4, 4) and joints.dim() >= 3 and joints.shape[-3] == self.joint_num:
            joints = joints[..., :3, 3]
        if joints.dim() < 2 or joints.shape[-2:] != (self.joint_num, 3):
            raise ValueError(f"{name}: expected [B, {self.joint_num}, 3] positions or [(B,) {self.joint_num}, 4, 4] "
                             f"poses (mm), got {shape_of(joints)}")
        return joints

    def bone_points(self, joints: torch.Tensor) -> torch.Tensor:
        """Sample points of the skeleton.

        Args:
            joints: ``[..., J, 3]`` joint positions or ``[..., J, 4, 4]`` global poses (mm).
        Returns:
            ``[..., P, 3]`` points ``start + t · (end − start)`` in the point table's order (mm).
        """
        joints = self._joints(joints, "joints")
        a = joints[..., self.point_start, :]
        b = joints[..., self.point_end, :]
        return a + (b - a) * self.steps.to(joints.dtype)[:, None]

    @torch.no_grad()
    def point_radii(self, template_pose: torch.Tensor, rest_mesh: torch.Tensor) -> torch.Tensor:
        """``[B, P]`` distance (mm) of each rest-pose bone point to the nearest rest-mesh vertex.

        Args:
            template_pose: ``[J, 4, 4]`` or ``[B, J, 4, 4]`` global rest poses of the refined
                skeleton (or ``[(B,) J, 3]`` positions), mm.
            rest_mesh: ``[B, V, 3]`` rest-pose vertices with correctives, skinned by the refined
                skeleton at zero angles (mm).
        """
        if rest_mesh.dim() != 3 or rest_mesh.shape[-1] != 3:
            raise ValueError(f"rest_mesh: expected [B, V, 3] (mm), got {shape_of(rest_mesh)}")
        points = self.bone_points(template_pose.to(rest_mesh.dtype))
        B = rest_mesh.shape[0]
        if points.dim() == 2 and B > 1:
            point_ids, vertex_ids = self._nearest_candidates(points, rest_mesh)
            if point_ids.numel() * 4 <= points.shape[0] * rest_mesh.shape[1]:  # else no saving
                dist = torch.linalg.vector_norm(rest_mesh[:, vertex_ids] - points[point_ids], dim=-1)  # [B, N]
                radii = dist.new_full((B, points.shape[0]), math.inf)
                return radii.scatter_reduce(1, point_ids.expand(B, -1), dist, "amin")
        if points.dim() == 2:
            points = points[None]
        return _coordinate_squared_distances(points.expand(B, -1, -1), rest_mesh).amin(dim=2).sqrt()

    @staticmethod
    def _nearest_candidates(points: torch.Tensor, rest_mesh: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(point_ids [N], vertex_ids [N])``: pairs that contain, for every sample, each point's
        nearest vertex.

        The bone points are the same for every sample (one template skeleton) and the samples'
        rest meshes differ only by their pose correctives, a few mm. With ``ref`` the batch's mean
        mesh and ``S`` the largest distance of a vertex from it in any sample,
        ``|d_b(p, v) − d_ref(p, v)| ≤ S``; so vertex ``v`` can be the nearest in some sample only
        if ``d_ref(p, v) ≤ min_u d_ref(p, u) + 2S``. One ``[P, V]`` search on ``ref`` then leaves
        one or a few vertices per point for the exact per-sample distances.

        Args:
            points: ``[P, 3]``; rest_mesh: ``[B, V, 3]`` (mm).
        """
        ref = rest_mesh.mean(dim=0)  # [V, 3]
        spread = (rest_mesh - ref).square().sum(dim=-1).amax().sqrt()
        squared = _coordinate_squared_distances(points, ref)  # [P, V]
        # A margin of 16 ulp over the few ulp of rounding in each squared distance.
        slack = 1 + 16 * torch.finfo(squared.dtype).eps
        reach = (squared.amin(dim=1) * slack).sqrt() + 2 * spread
        return _entries_at_most(squared, reach.square() * slack)

    def rigid_term(self, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        """``[B]`` mean sphere overlap (mm) of the disjoint bone pairs; ``points [B, P, 3]``, ``radii [B, P]``."""
        if self.pair_points_first.shape[0] == 0:
            return points.new_zeros(points.shape[0])
        radii = radii.detach()
        return _BoneOverlap.apply(points.movedim(-1, 0), radii[:, self.pair_points_first],
                                  radii[:, self.pair_points_second], self.pair_points_first, self.pair_points_second)

    def non_rigid_term(self, points: torch.Tensor, radii: torch.Tensor, mesh_out: torch.Tensor) -> torch.Tensor:
        """``[B]`` fingertip-into-skin loss (mm); ``points [B, P, 3]``, ``radii [B, P]``, ``mesh_out [B, V, 3]``."""
        B = points.shape[0]
        L, n = self.last_bone_points.shape
        # Joints without segmented skin count in the average and add 0 (the original crashes).
        pair_num = len(self.non_rigid_joint_indices) * L
        if L == 0 or len(self.non_rigid_segment_bounds) == 1:
            return points.new_zeros(B)
        tips = points[:, self.last_bone_points.reshape(-1)]  # [B, L·n, 3]
        skin = mesh_out[:, self.non_rigid_vertices]  # [B, Vs, 3]
        # Search without autograd, then differentiate only the distance to the nearest vertex:
        # the same gradient as a min over all distances, without a [B, L·n, Vs] backward.
        nearest = nearest_vertex_per_segment(tips.detach(), skin.detach(), self.non_rigid_segment_bounds)
        near = torch.gather(skin, 1, nearest.reshape(B, -1, 1).expand(-1, -1, 3))
        dist = torch.linalg.vector_norm(tips[:, None] - near.view(B, -1, L * n, 3), dim=-1).view(B, -1, L, n)
        reach = radii[:, self.last_bone_points][:, None]  # [B, 1, L, n]
        # Points from the first collision on (a bone runs parent → child, towards the tip).
        tail = (dist < reach).cumsum(dim=-1) > 0
        excess = torch.where(tail, dist - reach, torch.zeros_like(dist)).sum(dim=-1)
        return (excess.abs() / tail.sum(dim=-1).clamp(min=1)).sum(dim=(1, 2)) / pair_num

    def terms(self, template_pose: torch.Tensor, rest_mesh: torch.Tensor, joint_out: torch.Tensor,
              mesh_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The unweighted ``(rigid [B], non_rigid [B])`` terms; arguments as :meth:`forward`."""
        joint_out = self._joints(joint_out, "joint_out")
        if joint_out.dim() != 3:
            raise ValueError(f"joint_out: expected [B, {self.joint_num}, 3] (mm), got {shape_of(joint_out)}")
        B = joint_out.shape[0]
        if mesh_out.dim() != 3 or tuple(mesh_out.shape) != (B, self.vertex_num, 3):
            raise ValueError(f"mesh_out: expected [{B}, {self.vertex_num}, 3] (mm), got {shape_of(mesh_out)}")
        if rest_mesh.shape != mesh_out.shape:
            raise ValueError(f"rest_mesh: expected {shape_of(mesh_out)} like mesh_out, got {shape_of(rest_mesh)}")
        # The decoder's meshes are [B, V, 3] views of [V, 3, B] arrays; the radius search gathers
        # vertices, many times faster from a [B, V, 3] copy.
        radii = self.point_radii(template_pose.detach(), rest_mesh.detach().contiguous()).to(joint_out.dtype)
        points = self.bone_points(joint_out)
        return self.rigid_term(points, radii), self.non_rigid_term(points, radii, mesh_out.to(joint_out.dtype))

    def forward(self, template_pose: torch.Tensor, rest_mesh: torch.Tensor, joint_out: torch.Tensor,
                mesh_out: torch.Tensor) -> torch.Tensor:
        """
        Args (as the original's call ``penet_loss(global_pose_refined.detach(), rest mesh.detach(),
        joint_out, mesh_out_refined)``):
            template_pose: ``[J, 4, 4]`` or ``[B, J, 4, 4]`` global rest poses of the refined
                skeleton (zero angles, template root), mm — ``Model.refined_template_pose()``.
            rest_mesh: ``[B, V, 3]`` rest-pose vertices with pose and identity correctives, skinned
                by the refined skeleton at zero angles (mm) — ``Model.skinned_rest_mesh``.
            joint_out: ``[B, J, 3]`` posed joints (mm).
            mesh_out: ``[B, V, 3]`` posed vertices (mm).
            ``template_pose`` and ``rest_mesh`` only set the radii; no gradient flows into them.
        Returns:
            ``[B]`` per-sample penetration loss (mm).
        """
        rigid, non_rigid = self.terms(template_pose, rest_mesh, joint_out, mesh_out)
        return self.rigid_weight * rigid + self.non_rigid_weight * non_rigid


# --------------------------------------------------------------------------- Laplacian
def uniform_laplacian(faces, vertex_num: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniform mesh Laplacian ``L = I − D⁻¹A`` as a coalesced sparse COO ``[V, V]`` tensor.

    ``A`` is the 0/1 vertex adjacency of the triangles' edges (an edge shared by several faces
    counts once), ``D`` the number of neighbours. Edges of degenerate faces from a vertex to itself
    are ignored; a vertex in no face gets an empty row (as the original, which divides a zero row).
    The original divides by ``degree + 1e-8``; that changes entries by < 1e-8 relatively.

    Args:
        faces: ``[F, 3]`` vertex indices (0-based).
        vertex_num: ``V``.
        dtype: of the values, rounded once from float64.
    """
    f = torch.as_tensor(np.asarray(faces), dtype=torch.long).reshape(-1, 3)
    V = int(vertex_num)
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= V):
        raise ValueError(f"faces refer to vertices outside 0..{V - 1}")
    rows = torch.cat([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    cols = torch.cat([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    keep = rows != cols
    key = torch.unique(rows[keep] * V + cols[keep])
    rows, cols = key // V, key % V
    degree = torch.bincount(rows, minlength=V)
    diag = torch.nonzero(degree > 0, as_tuple=True)[0]
    index = torch.stack([torch.cat([rows, diag]), torch.cat([cols, diag])])
    values = torch.cat([-1.0 / degree[rows].double(), torch.ones(diag.numel(), dtype=torch.float64)])
    # Checked once here (cheap at construction); the context also keeps torch from warning.
    with torch.sparse.check_sparse_tensor_invariants():
        return torch.sparse_coo_tensor(index, values.to(dtype), (V, V)).coalesce()


class LaplacianLoss(nn.Module):
    """Squared norm of the uniform Laplacian of the posed mesh, per vertex (docs/design.md, "Losses").

    The Laplacian is a sparse ``[V, V]`` buffer (``laplacian``, non-persistent): a dense one would be
    V² floats. The trainer multiplies the mean by ``loss_lap_weight`` (5), as the original.

    COO rather than CSR: DataParallel can broadcast sparse COO buffers, and COO × dense has
    autograd on CPU and CUDA.
    """

    def __init__(self, faces, vertex_num: int, dtype: torch.dtype = torch.float32):
        """
        Args:
            faces: ``[F, 3]`` template triangles (0-based vertex indices).
            vertex_num: ``V``.
            dtype: of the matrix. Inputs of another dtype use a converted copy; ``L · v`` is a small
                difference of large coordinates, so float64 work needs a float64 matrix (built
                here from exact degrees, not converted from float32 values).
        """
        super().__init__()
        self.vertex_num = int(vertex_num)
        self.register_buffer("laplacian", uniform_laplacian(faces, vertex_num, dtype), persistent=False)

    @classmethod
    def from_hand_model(cls, hand_model, **kwargs) -> "LaplacianLoss":
        return cls(hand_model.faces, hand_model.vertex_num, **kwargs)

    def extra_repr(self) -> str:
        return f"vertices={self.vertex_num}, nnz={self.laplacian._nnz()}"

    def forward(self, vertices: torch.Tensor) -> torch.Tensor:
        """
        Args:
            vertices: ``[B, V, 3]`` posed mesh (mm).
        Returns:
            ``[B, V]`` ``‖(L · v)_i‖²`` (mm²).
        """
        if vertices.dim() != 3 or vertices.shape[1:] != (self.vertex_num, 3):
            raise ValueError(f"vertices: expected [B, {self.vertex_num}, 3] (mm), got {shape_of(vertices)}")
        B, V, C = vertices.shape
        L = self.laplacian if self.laplacian.dtype == vertices.dtype else self.laplacian.to(vertices.dtype)
        # One sparse product for the whole batch: the samples' coordinates become columns.
        columns = vertices.permute(1, 0, 2).reshape(V, B * C)
        lap = torch.sparse.mm(L, columns).view(V, B, C)
        return lap.square().sum(dim=-1).transpose(0, 1)
