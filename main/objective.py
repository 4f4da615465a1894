"""The training objective: the hand placed on the captured keypoints
(docs/design.md, "Training-mode root"), rendered into the target views, and the original's four
losses (docs/design.md, "Losses").

:class:`TrainingObjective` consumes the model's :class:`main.model.PosedHand`; the tester uses its
:meth:`~TrainingObjective.render` for the depth metric. Its renderer and losses keep their tables in
non-persistent buffers, so a snapshot holds none of them.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from common.nets.loss import DepthmapLoss, JointLoss, LaplacianLoss, PenetLoss
from common.renderer.depth_renderer import DepthRenderer
from common.hand.kinematics import rigid_align

# A rigid transform in 3D is determined by three non-collinear points: a sample with fewer valid
# alignment keypoints cannot be placed (see :func:`align_to_keypoints`).
MIN_ALIGN_JOINTS = 3

# Tensors of a data-set sample that the training objective reads (DataParallel scatters them).
TARGET_KEYS = ("joint_world", "joint_valid", "depthmap")
META_KEYS = ("camrot", "campos", "focal", "princpt", "affine")


def align_to_keypoints(source: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """Rigid (Kabsch) transforms taking ``source`` onto the *valid* points of ``target``.

    Only the valid correspondences count (a weighted Kabsch with 0/1 weights), so a keypoint the
    annotation lacks (its coordinates are 0 in the data set) cannot pull the hand towards the
    origin (docs/differences.md). It is computed by
    :func:`common.hand.kinematics.rigid_align` on the points with every invalid pair replaced by
    the centroids of the valid ones: those pairs then change neither the centroids nor the
    cross-covariance, which makes the result exactly the Kabsch solution of the valid pairs.

    A sample with fewer than :data:`MIN_ALIGN_JOINTS` valid points has no defined rigid transform:
    it gets the identity (``target`` is replaced by ``source`` for it, and no gradient flows through
    its transform), and ``ok`` is False for it so that callers can leave it out.

    Args:
        source: ``[B, K, 3]`` (or ``[K, 3]``, shared by the batch) points, mm.
        target: ``[B, K, 3]`` points, mm.
        valid: ``[B, K]``, non-zero where the target point exists.
    Returns:
        ``(transform [B, 4, 4], ok [B] bool)`` with ``transform · source_k ≈ target_k`` on the valid ``k``.
    """
    if target.dim() != 3 or target.shape[-1] != 3:
        raise ValueError(f"target: expected [B, K, 3] points (mm), got {tuple(target.shape)}")
    B, K = target.shape[:2]
    if valid.shape[:2] != (B, K):
        raise ValueError(f"valid: expected [{B}, {K}], got {tuple(valid.shape)}")
    source = source.to(target.dtype).expand(B, K, 3)
    w = valid.reshape(B, K) > 0
    ok = w.sum(dim=1) >= MIN_ALIGN_JOINTS
    # Unplaceable samples: align the source onto itself (the identity), using every point.
    w = w | ~ok[:, None]
    target = torch.where(ok[:, None, None], target, source)
    source = torch.where(ok[:, None, None], source, source.detach())
    target = torch.where(ok[:, None, None], target, target.detach())
    wf = w.to(target.dtype)[..., None]
    count = wf.sum(dim=1, keepdim=True)
    src_mean = (source * wf).sum(dim=1, keepdim=True) / count
    tgt_mean = (target * wf).sum(dim=1, keepdim=True) / count
    src = torch.where(w[..., None], source, src_mean)
    tgt = torch.where(w[..., None], target, tgt_mean)
    transform = rigid_align(src, tgt)
    transform = torch.where(ok[:, None, None], transform, transform.detach())
    return transform, ok


class TrainingObjective(nn.Module):
    """Root alignment, depth rendering and the losses of the training forward.

    Args:
        hand_model: the :class:`common.hand.hand_model.HandModel` (bones, segmentation, mesh
            connectivity for the penetration and Laplacian losses).
        faces: ``[F, 3]`` the mesh's triangles (the renderer's).
        config: a :class:`main.config.Config` (``rendered_img_shape``, ``depth_min``/``depth_max``
            (mm), ``renderer_backend``, ``bone_step_size``, the loss weights).
    """

    def __init__(self, hand_model, faces: torch.Tensor, config):
        super().__init__()
        self.root_joint_idx = hand_model.root_index
        self.align_joint_idx = hand_model.align_joint_indices
        self.loss_lap_weight = float(config.loss_lap_weight)
        self.renderer = DepthRenderer(faces, tuple(config.rendered_img_shape),
                                      near=float(config.depth_min), far=float(config.depth_max),
                                      backend=config.renderer_backend,
                                      native_rasteriser=config.native_rasteriser)
        self.joint_loss = JointLoss()
        self.depthmap_loss = DepthmapLoss()
        self.penet_loss = PenetLoss.from_hand_model(
            hand_model, bone_step_size=float(config.bone_step_size),
            rigid_weight=float(config.loss_penet_r_weight),
            non_rigid_weight=float(config.loss_penet_nr_weight))
        self.lap_loss = LaplacianLoss.from_hand_model(hand_model)

    def check(self, targets: Optional[Dict[str, torch.Tensor]], meta_info: Optional[Dict[str, torch.Tensor]]) -> None:
        """A clear error when the targets or cameras of :meth:`forward` are missing or do not fit."""
        for name, source in (("targets", targets), ("meta_info", meta_info)):
            keys = TARGET_KEYS if name == "targets" else META_KEYS
            missing = [k for k in keys if source is None or k not in source]
            if missing:
                raise ValueError(f"{name}: the training forward needs {list(keys)}, missing {missing}")
        depth_gt = targets["depthmap"]
        if tuple(depth_gt.shape[-2:]) != tuple(self.renderer.image_size):
            raise ValueError(f"targets['depthmap']: maps of {tuple(depth_gt.shape[-2:])} pixels, but the "
                             f"renderer makes {tuple(self.renderer.image_size)} (rendered_img_shape)")

    def root_alignment(self, template_pose: torch.Tensor, joint_world: torch.Tensor,
                       joint_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The training-mode root: ``[R|t] · G'_root`` (docs/design.md, "Training-mode root").

        ``[R|t]`` is the Kabsch alignment of the refined template's alignment joints
        ``G'[align, :3, 3]`` onto the ground-truth keypoints of the same joints, per sample, over
        the valid ones only (:func:`align_to_keypoints`).

        Args:
            template_pose: ``[J, 4, 4]`` refined template poses (``Model.refined_template_pose``).
            joint_world: ``[B, J, 3]`` ground-truth keypoints (mm).
            joint_valid: ``[B, J]`` 1 where a keypoint exists.
        Returns:
            ``(root_transform [B, 4, 4], ok [B] bool)``; where ``ok`` is False (fewer than
            :data:`MIN_ALIGN_JOINTS` valid alignment keypoints) the root is the template's.
        """
        align = self.align_joint_idx
        transform, ok = align_to_keypoints(template_pose[align, :3, 3], joint_world[:, align],
                                           joint_valid[:, align])
        return transform @ template_pose[self.root_joint_idx], ok

    def render(self, mesh: torch.Tensor, meta_info: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, V, 3]`` world mm → ``[B, N, Hr, Wr]`` depth maps (mm, 0 where nothing is seen) in
        the N target views of ``meta_info`` (``camrot``, ``campos``, ``focal``, ``princpt``, ``affine``)."""
        return self.renderer(mesh, meta_info["camrot"], meta_info["campos"], meta_info["focal"],
                             meta_info["princpt"], meta_info["affine"])

    def forward(self, hand, reference_surface: torch.Tensor, targets: Dict[str, torch.Tensor],
                meta_info: Dict[str, torch.Tensor], placed: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The four per-element losses of a posed batch.

        Args:
            hand: a :class:`main.model.PosedHand` placed by :meth:`root_alignment`'s root.
            reference_surface: ``[B, V, 3]`` the corrected rest mesh skinned by the refined
                skeleton at zero angles (``Model.skinned_rest_mesh``; the bone radii's surface), mm.
            targets: ``joint_world [B, J, 3]`` keypoints (mm), ``joint_valid [B, J]``,
                ``depthmap [B, N, Hr, Wr]`` captured depth (mm, 0 = none), ``(Hr, Wr)`` =
                ``rendered_img_shape``.
            meta_info: the N target cameras per sample: ``camrot [B, N, 3, 3]``, ``campos [B, N, 3]``,
                ``focal [B, N, 2]``, ``princpt [B, N, 2]``, ``affine [B, N, 2, 3]`` (as
                :class:`data.dataset.DeepHandMeshDataset` gives them).
            placed: ``[B]`` bool, :meth:`root_alignment`'s ``ok``.
        Returns:
            Per-element losses (the trainer takes ``.mean()`` of each and sums them): ``joint
            [B, J, 3]`` (mm), ``depthmap [B, Hr, Wr]`` (mm), ``penet [B]`` (rigid and non-rigid,
            weighted), ``lap [B, V]`` (× ``loss_lap_weight``). A sample that cannot be placed
            (``placed`` False) has joint and depth-map losses 0; the penetration and Laplacian
            ones do not depend on where the hand is and still apply.
        """
        dtype = hand.joints.dtype
        joint = self.joint_loss(hand.joints, targets["joint_world"].to(dtype), targets["joint_valid"].to(dtype))
        depthmap = self.depthmap_loss(self.render(hand.mesh, meta_info), targets["depthmap"])
        joint = torch.where(placed[:, None, None], joint, torch.zeros_like(joint))
        depthmap = torch.where(placed[:, None, None], depthmap, torch.zeros_like(depthmap))
        return {
            "joint": joint,
            "depthmap": depthmap,
            "penet": self.penet_loss(hand.template_pose.detach(), reference_surface, hand.joints, hand.mesh),
            "lap": self.lap_loss(hand.mesh) * self.loss_lap_weight,
        }
