"""Euler angles, forward kinematics, linear blend skinning and rigid alignment (docs/design.md, "Decoding").

Small pure functions, vectorised over the batch. Units: angles in radians, lengths in mm.
Transforms are 4x4 homogeneous matrices acting on column vectors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np
import torch


def _euler_entries(theta: torch.Tensor) -> List[torch.Tensor]:
    """The nine entries of ``Rz(θz) · Ry(θy) · Rx(θx)`` in row-major order, each ``[...]``."""
    if theta.shape[-1] != 3:
        raise ValueError(f"euler_to_matrix: expected angles of shape [..., 3], got {tuple(theta.shape)}")
    cx, cy, cz = torch.cos(theta).unbind(-1)
    sx, sy, sz = torch.sin(theta).unbind(-1)
    return [
        cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx,
        sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx,
        -sy, cy * sx, cy * cx,
    ]


def euler_to_matrix(theta: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``R = Rz(θz) · Ry(θy) · Rx(θx)``.

    Args:
        theta: ``[..., 3]`` Euler angles (x, y, z) in radians.
    Returns:
        ``[..., 3, 3]`` rotation matrices.
    """
    return torch.stack(_euler_entries(theta), dim=-1).reshape(*theta.shape[:-1], 3, 3)


def euler_to_transform(theta: torch.Tensor) -> torch.Tensor:
    """``to_homogeneous(euler_to_matrix(theta))`` in one stack: ``[..., 3]`` radians → ``[..., 4, 4]``."""
    r = _euler_entries(theta)
    zero, one = torch.zeros_like(r[0]), torch.ones_like(r[0])
    rows = r[0:3] + [zero] + r[3:6] + [zero] + r[6:9] + [zero, zero, zero, zero, one]
    return torch.stack(rows, dim=-1).reshape(*theta.shape[:-1], 4, 4)


def to_homogeneous(rotation: torch.Tensor, translation: torch.Tensor | None = None) -> torch.Tensor:
    """Build ``[..., 4, 4]`` transforms from ``rotation [..., 3, 3]`` and ``translation [..., 3]`` (mm)."""
    out = torch.zeros(*rotation.shape[:-2], 4, 4, dtype=rotation.dtype, device=rotation.device)
    out[..., :3, :3] = rotation
    if translation is not None:
        out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def add_translation(transforms: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``transforms [..., 4, 4]`` with ``offset [..., 3]`` (mm) added to their translations (out of place)."""
    pad = torch.zeros_like(transforms)
    pad[..., :3, 3] = offset
    return transforms + pad


def tree_levels(parents: Sequence[int]) -> List[Tuple[List[int], List[int]]]:
    """Group the non-root joints by depth in the tree.

    Args:
        parents: ``J`` parent ids, -1 for the root.
    Returns:
        One ``(joint_ids, parent_ids)`` pair per depth 1, 2, …; every parent is in an earlier level.
    """
    parents = [int(p) for p in parents]
    depth = [-1] * len(parents)
    for start in range(len(parents)):
        chain, j = [], start
        while j >= 0 and depth[j] < 0:
            chain.append(j)
            j = parents[j]
            if len(chain) > len(parents):
                raise ValueError("tree_levels: the skeleton has a cycle")
        base = -1 if j < 0 else depth[j]
        for k, joint in enumerate(reversed(chain)):
            depth[joint] = base + 1 + k
    levels = []
    for d in range(1, max(depth) + 1):
        ids = [j for j in range(len(parents)) if depth[j] == d]
        levels.append((ids, [parents[j] for j in ids]))
    return levels


Index = Union[slice, torch.Tensor]


def _compact_index(ids: Sequence[int], broadcast: bool = False) -> Index:
    """A list of ids as a slice where it is evenly spaced (a view instead of a gather), else a
    ``LongTensor``. With ``broadcast``, one id repeated becomes a length-1 slice."""
    ids = [int(i) for i in ids]
    if broadcast and len(set(ids)) == 1:
        return slice(ids[0], ids[0] + 1)
    step = ids[1] - ids[0] if len(ids) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(ids, ids[1:])):
        return slice(ids[0], ids[-1] + 1, step)
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class KinematicTree:
    """A skeleton prepared for :func:`forward_kinematics`: one step per tree depth.

    ``steps[d] = (joints, parents)``: the joints of depth ``d + 1`` (an index into ``J``) and the
    positions of their parents among the joints of depth ``d`` (an index into that step's output;
    the root is depth 0). ``inverse`` maps the depth-ordered stack back to joint order.
    """

    root_index: int
    steps: Tuple[Tuple[Index, Index], ...]
    inverse: Index

    @classmethod
    def from_parents(cls, parents: Sequence[int]) -> "KinematicTree":
        """``parents``: ``J`` parent ids, -1 for the (single) root."""
        parents = [int(p) for p in parents]
        roots = [j for j, p in enumerate(parents) if p < 0]
        if len(roots) != 1:
            raise ValueError(f"KinematicTree: expected exactly one root (parent -1), got joints {roots}")
        previous, order, steps = roots, list(roots), []
        for ids, parent_ids in tree_levels(parents):
            steps.append((_compact_index(ids), _compact_index([previous.index(p) for p in parent_ids], True)))
            previous = ids
            order += ids
        inverse = _compact_index([order.index(j) for j in range(len(parents))])
        return cls(roots[0], tuple(steps), inverse)


def forward_kinematics(
    local_transforms: torch.Tensor,
    root_transform: torch.Tensor,
    tree: KinematicTree,
) -> torch.Tensor:
    """Global joint transforms ``G_child = G_parent · local_child``, root first.

    Args:
        local_transforms: ``[B, J, 4, 4]`` (for the decoder: ``L'_j · R_j``); the root's entry is unused.
        root_transform: ``[B, 4, 4]`` or ``[4, 4]`` global transform of the root.
        tree: the skeleton, :meth:`KinematicTree.from_parents`.
    Returns:
        ``[B, J, 4, 4]`` global transforms (mm).
    """
    B = local_transforms.shape[0]
    # One batched product per tree depth; each depth's parents are all in the previous depth, so
    # its transforms are read from the previous product (mostly views, a hand has evenly spaced ids).
    current = root_transform.expand(B, 4, 4)[:, None]
    depths = [current]
    for joints, parents in tree.steps:
        current = current[:, parents] @ local_transforms[:, joints]
        depths.append(current)
    return torch.cat(depths, dim=1)[:, tree.inverse]


# Above this size the blended matrices of a call leave the last-level cache and every pass over
# them goes to DRAM: the default hand's at batch 1024 would be 242 MB. Larger batches are skinned
# in slices whose blended matrices take about _BLEND_SLICE_BYTES: they stay in the cache, and the
# temporary is bounded (BENCHMARKS.md).
_BLEND_MAX_BYTES = 32 * 2**20
_BLEND_SLICE_BYTES = 8 * 2**20


def linear_blend_skinning(
    vertices: torch.Tensor, skinning_weights: torch.Tensor, transforms: torch.Tensor
) -> torch.Tensor:
    """``v'_i = Σ_j w_ij · (T_j · [v_i; 1])[:3]``, computed as ``(Σ_j w_ij T_j) · [v_i; 1]``.

    Args:
        vertices: ``[B, V, 3]`` rest-pose vertices (mm), or ``[1, V, 3]`` shared by the batch.
        skinning_weights: ``[V, J]`` weights (not required to sum to 1, as in the original).
        transforms: ``[B, J, 4, 4]`` skinning transforms ``G_j · G_template_j⁻¹``.
    Returns:
        ``[B, V, 3]`` posed vertices (mm).
    """
    B = transforms.shape[0]
    per_sample = skinning_weights.shape[0] * 12 * transforms.element_size()
    if B * per_sample <= _BLEND_MAX_BYTES:
        return _blend_and_skin(vertices, skinning_weights, transforms)
    step = max(1, _BLEND_SLICE_BYTES // per_sample)
    vertices = vertices.expand(B, -1, -1)
    return torch.cat([_blend_and_skin(vertices[b:b + step], skinning_weights, transforms[b:b + step])
                      for b in range(0, B, step)])


def _blend_and_skin(vertices: torch.Tensor, skinning_weights: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """:func:`linear_blend_skinning` of one batch in one pass; same arguments and result."""
    B, J = transforms.shape[:2]
    V = skinning_weights.shape[0]
    # At batch 64 the blended 3x4 matrices are megabytes: lay them out [V, 3, 4, B] so that one
    # [V, J] x [J, 12·B] product makes them and every later pass runs over contiguous batch rows.
    flat = transforms[:, :, :3, :].permute(1, 2, 3, 0).reshape(J, 12 * B)
    blended = (skinning_weights @ flat).view(V, 3, 4, B)
    verts = vertices.permute(1, 2, 0).contiguous()  # [V, 3, B]; free when given in that layout
    x, y, z = verts[:, 0:1], verts[:, 1:2], verts[:, 2:3]
    out = torch.addcmul(blended[:, :, 3], blended[:, :, 0], x)
    out = out.addcmul(blended[:, :, 1], y).addcmul(blended[:, :, 2], z)  # [V, 3, B]
    return out.permute(2, 0, 1)


def rigid_align(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares rigid transform (Kabsch, with reflection fix) taking ``source`` onto ``target``.

    Args:
        source: ``[B, K, 3]`` points (mm).
        target: ``[B, K, 3]`` points (mm).
    Returns:
        ``[B, 4, 4]`` transforms ``[R | t]`` with ``R · source_k + t ≈ target_k``.
    """
    src_mean = source.mean(dim=1, keepdim=True)
    tgt_mean = target.mean(dim=1, keepdim=True)
    H = (source - src_mean).transpose(1, 2) @ (target - tgt_mean)
    U, _, Vh = torch.linalg.svd(H)
    V = Vh.transpose(1, 2)
    # Flip the last singular direction where V·Uᵀ would be a reflection (the original's fix).
    sign = torch.sign(torch.det(V @ U.transpose(1, 2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    D = torch.ones_like(src_mean.squeeze(1))
    D = torch.cat([D[:, :2], sign[:, None]], dim=1)
    R = (V * D[:, None, :]) @ U.transpose(1, 2)
    t = tgt_mean.squeeze(1) - (R @ src_mean.transpose(1, 2)).squeeze(-1)
    return to_homogeneous(R, t)


def pose_mesh(euler: torch.Tensor, local_pose: torch.Tensor, root_transform: torch.Tensor,
              rest_vertices: torch.Tensor, skinning_weights: torch.Tensor, global_pose_inv: torch.Tensor,
              tree: KinematicTree) -> Tuple[torch.Tensor, torch.Tensor]:
    """Angles → forward kinematics → inverse bind → linear blend skinning: the one posing pipeline.

    Args:
        euler: ``[B, J, 3]`` Euler angles (radians).
        local_pose: ``[J, 4, 4]`` local rest poses (mm), with any skeleton corrective applied.
        root_transform: ``[B, 4, 4]`` or ``[4, 4]`` global transform of the root joint.
        rest_vertices: ``[B, V, 3]`` rest-pose vertices with any correctives (mm).
        skinning_weights: ``[V, J]``.
        global_pose_inv: ``[J, 4, 4]`` inverse bind poses of the template.
        tree: the skeleton's :class:`KinematicTree`.
    Returns:
        ``(G [B, J, 4, 4] global joint transforms, vertices [B, V, 3] mm)``; the joints are
        ``G[..., :3, 3]``.
    """
    G = forward_kinematics(local_pose @ euler_to_transform(euler), root_transform, tree)
    return G, linear_blend_skinning(rest_vertices, skinning_weights, G @ global_pose_inv)


def pose_hand(
    hand_model,
    euler: torch.Tensor,
    root_transform: torch.Tensor | None = None,
    skeleton_offset: torch.Tensor | None = None,
    rest_vertices: torch.Tensor | None = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pose a hand template with explicit (or no) correctives.

    Args:
        hand_model: a :class:`common.hand.hand_model.HandModel`.
        euler: ``[B, J, 3]`` Euler angles in radians.
        root_transform: ``[B, 4, 4]`` or ``[4, 4]`` global transform of the root; identity (the
            decode mode, output in the wrist's frame) when None.
        skeleton_offset: ``[J, 3]`` mm added to the local translations, or None.
        rest_vertices: ``[B, V, 3]`` or ``[V, 3]`` rest-pose vertices with correctives (mm);
            the template when None.
    Returns:
        ``(joints [B, J, 3], vertices [B, V, 3])`` in mm.
    """
    dtype, device = euler.dtype, euler.device
    as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
    local = as_t(hand_model.local_pose)
    if skeleton_offset is not None:
        local = add_translation(local, skeleton_offset)
    root = torch.eye(4, dtype=dtype, device=device) if root_transform is None else root_transform
    verts = as_t(hand_model.vertices) if rest_vertices is None else rest_vertices
    G, posed = pose_mesh(euler, local, root, verts.expand(euler.shape[0], -1, -1), as_t(hand_model.skinning_weights),
                         as_t(hand_model.global_pose_inv), KinematicTree.from_parents(hand_model.parents))
    return G[..., :3, 3], posed
