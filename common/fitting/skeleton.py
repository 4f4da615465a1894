"""Joints-only forward kinematics with closed-form Jacobians, for the fitter.

Fitting needs the joints (and points fixed to them), not the mesh, thousands of times: this is the
decoder's forward kinematics (``G_child = G_parent · L'_child · R_child``, ``R = Rz·Ry·Rx``, the
root's transform given; :func:`common.hand.kinematics.forward_kinematics`) written with 3×3
rotations and translations, one product per tree depth for the whole batch, and the derivatives
of the points with respect to every parameter in closed form:

* Euler angle ``θ_a`` of joint ``j`` turns everything below ``j`` about the world axis ``a_j``
  through the joint's position ``o_j``: ``∂q/∂θ = a_j × (q − o_j)``, with ``a_x = R_j e_x``,
  ``a_y = R_j (0, cos θx, −sin θx)``, ``a_z = R_j (−sin θy, sin θx cos θy, cos θx cos θy)`` (the
  axes of ``Rz``, ``Ry``, ``Rx`` in the frames they act in, expressed through ``R_j``);
* the root's rotation, perturbed on the left (``R ← exp([δω]×) R``): ``∂q/∂δω = −[q − t]×``; its
  translation: the identity;
* a bone's length (``L'_j`` translation ``+ δ·u_j``, ``u_j`` the rest bone direction in the parent's
  frame): ``∂q/∂δ = R_parent u_j`` for every point below ``j``; a global scale ``s`` of the local
  translations: ``∂q/∂s = Σ R_parent(j) t_j`` over the bones above the point.

Tests check all of them against autograd and the positions against the model's own decoder.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from common.hand.kinematics import KinematicTree, euler_to_matrix


def skew(v: torch.Tensor) -> torch.Tensor:
    """``[..., 3]`` → ``[..., 3, 3]`` cross-product matrices ``[v]×``."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape, 3)


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rodrigues: ``[..., 3]`` rotation vectors (radians) → ``[..., 3, 3]``; exact, and
    differentiable, at zero."""
    angle_sq = v.square().sum(-1)[..., None, None]
    small = angle_sq < 1e-12
    safe_sq = torch.where(small, torch.ones_like(angle_sq), angle_sq)  # no 0 under the square root
    angle = safe_sq.sqrt()
    a = torch.where(small, 1 - angle_sq / 6, torch.sin(angle) / angle)
    b = torch.where(small, 0.5 - angle_sq / 24, (1 - torch.cos(angle)) / safe_sq)
    K = skew(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def matrix_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` rotations → ``[..., 3]`` rotation vectors (radians, angle in [0, π])."""
    trace = R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2]
    cos = ((trace - 1) / 2).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    vee = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    sin = torch.sin(angle)
    # Away from π: v = angle / (2 sin) · vee (→ vee / 2 as the angle → 0).
    scale = torch.where(angle < 1e-6, 0.5 + angle.square() / 12, angle / (2 * sin.clamp(min=1e-12)))
    out = vee * scale[..., None]
    # Near π the vee part vanishes: the axis is the column of R + I with the largest norm.
    near_pi = angle > np.pi - 1e-3
    if bool(near_pi.any()):
        sym = (R + torch.eye(3, dtype=R.dtype, device=R.device)) / 2
        col = sym.norm(dim=-2).argmax(-1)
        axis = torch.gather(sym, -1, col[..., None, None].expand(*col.shape, 3, 1))[..., 0]
        axis = axis / axis.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        sign = torch.where((axis * vee).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(R.dtype)
        out = torch.where(near_pi[..., None], axis * sign * angle[..., None], out)
    return out


class FitSkeleton:
    """A hand model's skeleton for fitting: rest local poses, degrees of freedom, and the points
    (keypoints) fixed to joints.

    Args:
        parents: ``J`` parent ids (-1 for the root).
        local_pose: ``[J, 4, 4]`` local rest poses ``L'`` (mm; with the skeleton corrective).
        dof_mask: ``[J, 3]`` 1 where a joint turns about that axis.
        point_joint: ``[K]`` the joint each point is fixed to.
        point_offset: ``[K]`` mm along that joint's ``x`` axis.
        dtype, device: of every tensor here.
    """

    def __init__(self, parents: Sequence[int], local_pose: torch.Tensor, dof_mask, point_joint, point_offset,
                 dtype=torch.float64, device=None):
        self.parents = [int(p) for p in parents]
        self.joint_num = J = len(self.parents)
        self.tree = KinematicTree.from_parents(self.parents)
        self.root = self.tree.root_index
        self.dtype, self.device = dtype, torch.device(device) if device is not None else local_pose.device
        local_pose = torch.as_tensor(local_pose).to(self.device, dtype)
        self.local_rotation = local_pose[:, :3, :3].contiguous()  # [J, 3, 3]
        self.local_translation = local_pose[:, :3, 3].contiguous()  # [J, 3] mm
        mask = torch.as_tensor(np.asarray(dof_mask), dtype=torch.bool).reshape(J, 3)
        flat = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        self.dof_flat = flat.to(self.device)  # [D] index into J·3 (joint-major, as the pose network fills them)
        self.dof_joint = (flat // 3).tolist()
        self.dof_axis = (flat % 3).tolist()
        self.dof_num = len(self.dof_joint)
        # ancestor_or_self[k, j]: joint j is k or above k.
        anc = np.zeros((J, J), bool)
        for k in range(J):
            j = k
            while j >= 0:
                anc[k, j] = True
                j = self.parents[j]
        self.ancestor_or_self = torch.as_tensor(anc, device=self.device)
        self.set_points(point_joint, point_offset)
        # Bones: every non-root joint's local translation (direction in the parent's frame).
        self.bone_joints = [j for j in range(J) if self.parents[j] >= 0]

    def set_points(self, point_joint, point_offset) -> None:
        """Fix ``K`` points to joints: ``point_joint [K]``, ``point_offset [K]`` mm along the joint's ``x``."""
        self.point_joint = torch.as_tensor(np.asarray(point_joint), dtype=torch.long, device=self.device)
        self.point_offset = torch.as_tensor(np.asarray(point_offset), dtype=self.dtype, device=self.device)
        self.point_num = int(self.point_joint.numel())
        dof_joint = torch.as_tensor(self.dof_joint, dtype=torch.long, device=self.device)
        # [K, D]: the degree of freedom moves the point (its joint is at or above the point's joint).
        self.point_dof_mask = self.ancestor_or_self[self.point_joint][:, dof_joint].to(self.dtype)
        point, dof = torch.nonzero(self.point_dof_mask > 0, as_tuple=True)
        self._pair_point, self._pair_dof, self._pair_joint = point, dof, dof_joint[dof]
        self._pair_slot = point * (6 + self.dof_num) + 6 + dof  # row of [K·P] for each pair

    # ------------------------------------------------------------------ angles
    def euler_from_dofs(self, theta: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` radians → ``[B, J, 3]`` Euler angles (0 where a joint has no degree of freedom)."""
        out = theta.new_zeros(theta.shape[0], self.joint_num * 3)
        return out.index_copy(1, self.dof_flat, theta).view(-1, self.joint_num, 3)

    def dofs_from_euler(self, euler: torch.Tensor) -> torch.Tensor:
        """``[B, J, 3]`` → ``[B, D]``."""
        return euler.reshape(euler.shape[0], -1)[:, self.dof_flat]

    # -------------------------------------------------------------- kinematics
    def forward(self, root_rotation: torch.Tensor, root_translation: torch.Tensor, euler: torch.Tensor,
                local_translation: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global joint rotations and positions.

        Args:
            root_rotation: ``[B, 3, 3]``; root_translation: ``[B, 3]`` (mm): the root's world transform.
            euler: ``[B, J, 3]`` radians (the root's entry is not used, as in the decoder).
            local_translation: ``[J, 3]`` local rest translations (mm); the skeleton's own when None.
        Returns:
            ``(rotation [B, J, 3, 3], position [B, J, 3])``.
        """
        B = euler.shape[0]
        local_t = self.local_translation if local_translation is None else local_translation
        local = self.local_rotation @ euler_to_matrix(euler)  # [B, J, 3, 3]
        rotations = [root_rotation[:, None]]
        positions = [root_translation[:, None]]
        for joints, parents in self.tree.steps:
            parent_r, parent_t = rotations[-1][:, parents], positions[-1][:, parents]
            positions.append(parent_t + (parent_r @ local_t[joints][..., None]).squeeze(-1).expand(B, -1, -1))
            rotations.append(parent_r @ local[:, joints])
        rotation = torch.cat(rotations, 1)[:, self.tree.inverse]
        position = torch.cat(positions, 1)[:, self.tree.inverse]
        return rotation, position

    def points(self, rotation: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """``[B, K, 3]`` the fixed points (mm) of a posed skeleton."""
        x_axis = rotation[:, self.point_joint, :, 0]
        return position[:, self.point_joint] + x_axis * self.point_offset[:, None]

    def dof_axes(self, rotation: torch.Tensor, euler: torch.Tensor) -> torch.Tensor:
        """``[B, D, 3]`` world axis of every degree of freedom (see the module notes)."""
        joints = torch.as_tensor(self.dof_joint, dtype=torch.long, device=self.device)
        axes = torch.as_tensor(self.dof_axis, dtype=torch.long, device=self.device)
        R = rotation[:, joints]  # [B, D, 3, 3]
        tx, ty = euler[:, joints, 0], euler[:, joints, 1]
        zero = torch.zeros_like(tx)
        local_axis = torch.stack([
            torch.stack([torch.ones_like(tx), zero, zero], -1),
            torch.stack([zero, torch.cos(tx), -torch.sin(tx)], -1),
            torch.stack([-torch.sin(ty), torch.sin(tx) * torch.cos(ty), torch.cos(tx) * torch.cos(ty)], -1),
        ], -2)  # [B, D, 3 (which axis), 3]
        chosen = local_axis.gather(2, axes.view(1, -1, 1, 1).expand(local_axis.shape[0], -1, 1, 3))[:, :, 0]
        return (R @ chosen[..., None]).squeeze(-1)

    def point_jacobian(self, rotation: torch.Tensor, position: torch.Tensor, euler: torch.Tensor,
                       points: torch.Tensor) -> torch.Tensor:
        """``[B, K, 3, 6 + D]``: derivatives of the points with respect to the root's rotation
        (left perturbation, 3), its translation (3) and the ``D`` angles.

        Args: the output of :meth:`forward`, the angles, and :meth:`points` of it.
        """
        B, K = points.shape[:2]
        P = 6 + self.dof_num
        axes = self.dof_axes(rotation, euler)  # [B, D, 3]
        # Only the (point, degree of freedom) pairs where the joint is above the point: a few per point.
        lever = points[:, self._pair_point] - position[:, self._pair_joint]  # [B, N, 3]
        moved = torch.linalg.cross(axes[:, self._pair_dof], lever, dim=-1)
        out = points.new_zeros(B, K * P, 3)
        out.index_copy_(1, self._pair_slot, moved)
        out = out.view(B, K, P, 3)
        out[:, :, 0:3] = -skew(points - position[:, self.root, None]).transpose(-1, -2)
        out[:, :, 3:6] = torch.eye(3, dtype=points.dtype, device=points.device)
        return out.transpose(2, 3)

    def bone_directions(self, local_translation: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[J, 3]`` unit rest direction of every bone in its parent's frame (0 for the root)."""
        t = self.local_translation if local_translation is None else local_translation
        norm = t.norm(dim=-1, keepdim=True)
        out = torch.where(norm > 1e-9, t / norm.clamp(min=1e-12), torch.zeros_like(t))
        out[self.root] = 0
        return out

    def skeleton_jacobian(self, rotation: torch.Tensor, base_translation: torch.Tensor,
                          directions: torch.Tensor) -> torch.Tensor:
        """``[B, K, 3, 1 + J]``: derivatives of the points with respect to a global scale of the
        local translations ``base_translation [J, 3]`` and to each bone's length along
        ``directions [J, 3]`` (the root's column is 0)."""
        parents = torch.as_tensor([max(p, 0) for p in self.parents], dtype=torch.long, device=self.device)
        parent_rotation = rotation[:, parents]  # [B, J, 3, 3]
        along = (parent_rotation @ directions[None, :, :, None]).squeeze(-1)  # [B, J, 3]
        scale = (parent_rotation @ base_translation[None, :, :, None]).squeeze(-1)
        along = along.clone()
        along[:, self.root] = 0
        scale[:, self.root] = 0
        mask = self.ancestor_or_self[self.point_joint].to(rotation.dtype)  # [K, J]
        bones = mask[None, :, None, :] * along.transpose(1, 2)[:, None]  # [B, K, 3, J]
        total = (mask[None] @ scale)  # [B, K, 3]
        return torch.cat([total[..., None], bones], dim=-1)
