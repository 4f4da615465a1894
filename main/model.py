"""The DeepHandMesh model: encoder, pose decoder, identity/pose correctives, FK and LBS.

Entry points (DESIGN §10): ``get_model(mode, hand_model)`` and ``model.decode(euler)``; the
training forward (``model(inputs, targets, meta_info, 'train')``) returns the per-element losses.
The template, the renderer's faces and the losses' tables live in non-persistent buffers, so a
state dict holds exactly the original's keys
(``id_code``, ``backbone_net.*``, ``pose_net.*``, ``skeleton_refine_net.*``, ``skin_refine_net.*``).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from common.nets.loss import DepthmapLoss, JointLoss, LaplacianLoss, PenetLoss
from common.nets.module import BackboneNet, PoseNet, SkeletonRefineNet, SkinRefineNet
from common.nets.renderer import DepthRenderer
from common.utils.hand_model import HandModel
from common.utils.kinematics import (
    KinematicTree,
    add_translation,
    euler_to_transform,
    forward_kinematics,
    linear_blend_skinning,
    rigid_align,
)
from main.config import cfg as default_cfg

# A rigid transform in 3D is determined by three non-collinear points: a sample with fewer valid
# alignment keypoints cannot be placed (see :func:`align_to_keypoints`).
MIN_ALIGN_JOINTS = 3

# Tensors of a data-set sample that the training forward reads (DataParallel scatters them).
INPUT_KEYS = ("img",)
TARGET_KEYS = ("joint_world", "joint_valid", "depthmap")
META_KEYS = ("camrot", "campos", "focal", "princpt", "affine")


def align_to_keypoints(source: torch.Tensor, target: torch.Tensor, valid: torch.Tensor):
    """Rigid (Kabsch) transforms taking ``source`` onto the *valid* points of ``target``.

    Only the valid correspondences count (a weighted Kabsch with 0/1 weights), so a keypoint the
    annotation lacks (its coordinates are 0 in the data set) cannot pull the hand towards the
    origin, as it would in the original, which ignores validity here. It is computed by
    :func:`common.utils.kinematics.rigid_align` on the points with every invalid pair replaced by
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


class Model(nn.Module):
    def __init__(
        self,
        backbone_net: BackboneNet,
        pose_net: PoseNet,
        skeleton_refine_net: SkeletonRefineNet,
        skin_refine_net: SkinRefineNet,
        hand_model: HandModel,
        id_code_dim: int = 32,
        config=None,
    ):
        super().__init__()
        config = config or default_cfg
        self.hand_model = hand_model
        self.joint_num = hand_model.joint_num
        self.vertex_num = hand_model.vertex_num
        self.root_joint_idx = hand_model.root_index
        self.align_joint_idx = hand_model.align_joint_indices
        self.non_rigid_joint_idx = hand_model.non_rigid_joint_indices
        self.kinematic_tree = KinematicTree.from_parents(hand_model.parents)

        # The subject's identity: a fixed random code, saved with the weights but never trained.
        self.register_buffer("id_code", torch.randn(id_code_dim))

        self.backbone_net = backbone_net
        self.pose_net = pose_net
        self.skeleton_refine_net = skeleton_refine_net
        self.skin_refine_net = skin_refine_net

        f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
        self._identity_cache = None
        for name, value in (
            ("template_vertices", f32(hand_model.vertices)),  # [V, 3] mm
            ("skinning_weight", f32(hand_model.skinning_weights)),  # [V, J]
            ("local_pose", f32(hand_model.local_pose)),  # [J, 4, 4]
            ("global_pose", f32(hand_model.global_pose)),  # [J, 4, 4]
            ("global_pose_inv", f32(hand_model.global_pose_inv)),  # [J, 4, 4]
            ("faces", torch.as_tensor(hand_model.faces, dtype=torch.long)),  # [F, 3]
            ("segmentation", torch.as_tensor(hand_model.segmentation, dtype=torch.long)),  # [V]
        ):
            self.register_buffer(name, value, persistent=False)

        # Training: the depth renderer and the losses, as submodules so that ``.to(device)`` and
        # DataParallel's replication carry their tables. Their buffers are non-persistent: the
        # state dict keeps exactly the original's keys (DESIGN §8).
        self.loss_lap_weight = float(config.loss_lap_weight)
        self.renderer = DepthRenderer(self.faces, tuple(config.rendered_img_shape),
                                      near=float(config.depth_min), far=float(config.depth_max),
                                      backend=config.renderer_backend)
        self.joint_loss = JointLoss()
        self.depthmap_loss = DepthmapLoss()
        self.penet_loss = PenetLoss.from_hand_model(
            hand_model, bone_step_size=float(config.bone_step_size),
            rigid_weight=float(config.loss_penet_r_weight),
            non_rigid_weight=float(config.loss_penet_nr_weight))
        self.lap_loss = LaplacianLoss.from_hand_model(hand_model)

    # ---------------------------------------------------------------- pieces
    def refined_local_pose(self) -> torch.Tensor:
        """``[J, 4, 4]`` local poses with the identity's skeleton corrective (mm) added to the translations."""
        return add_translation(self.local_pose, self.skeleton_refine_net(self.id_code))

    def refined_template_pose(self, local_refined: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[J, 4, 4]`` global rest poses of the refined skeleton (no rotation, template root)."""
        if local_refined is None:
            local_refined = self.refined_local_pose()
        root = self.global_pose[self.root_joint_idx]
        return forward_kinematics(local_refined[None], root, self.kinematic_tree)[0]

    def identity_terms(self):
        """``(local_pose_refined [J, 4, 4], identity_offset [3V])``: everything that depends on the
        identity code but not on the pose.

        Without gradients (inference) they are computed once and reused until a parameter or
        buffer they depend on changes (an optimizer step, a checkpoint load, ``.to()``): at batch 1
        the decoder is memory-bound, and this halves the weight traffic of a call.
        """
        sources = [self.id_code, self.local_pose, self.template_vertices]
        sources += list(self.skeleton_refine_net.parameters()) + list(self.skin_refine_net.fc_id.parameters())
        sources.append(self.skin_refine_net.fc_pose[-1].bias)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in sources)
        if not needs_grad and self._identity_cache is not None and self._identity_cache[0] == key:
            return self._identity_cache[1]
        terms = (self.refined_local_pose(),
                 self.skin_refine_net.identity_offset(self.template_vertices, self.id_code))
        self._identity_cache = None if needs_grad else (key, tuple(t.detach() for t in terms))
        return terms

    def rest_vertices(self, joint_euler: torch.Tensor, identity_offset: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, V, 3]`` template + pose corrective + identity corrective (mm), in the rest pose."""
        if identity_offset is None:
            identity_offset = self.identity_terms()[1]
        return self.skin_refine_net.corrected_vertices(joint_euler.detach(), identity_offset)

    def pose(self, joint_euler: torch.Tensor, root_transform: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Forward kinematics and skinning.

        Args:
            joint_euler: ``[B, J, 3]`` Euler angles (radians).
            root_transform: ``[B, 4, 4]`` or ``[4, 4]`` global transform of the root joint.
        Returns:
            ``joint_out [B, J, 3]`` and ``mesh_out_refined [B, V, 3]`` (mm), plus
            ``local_pose_refined [J, 4, 4]`` and ``rest_mesh [B, V, 3]``.
        """
        if joint_euler.dim() != 3 or joint_euler.shape[1:] != (self.joint_num, 3):
            raise ValueError(
                f"joint_euler: expected shape [B, {self.joint_num}, 3] (radians), got {tuple(joint_euler.shape)}"
            )
        return self._pose(joint_euler, root_transform, *self.identity_terms())

    def _pose(self, joint_euler: torch.Tensor, root_transform: torch.Tensor, local_refined: torch.Tensor,
              identity_offset: torch.Tensor) -> Dict[str, torch.Tensor]:
        """:meth:`pose` with the identity terms given (the training forward computes them once)."""
        rotation = euler_to_transform(joint_euler)
        G = forward_kinematics(local_refined @ rotation, root_transform, self.kinematic_tree)
        rest_mesh = self.rest_vertices(joint_euler, identity_offset)
        mesh = linear_blend_skinning(rest_mesh, self.skinning_weight, G @ self.global_pose_inv)
        return {
            "joint_out": G[..., :3, 3],
            "mesh_out_refined": mesh,
            "local_pose_refined": local_refined,
            "rest_mesh": rest_mesh,
        }

    @torch.no_grad()
    def skinned_rest_mesh(self, rest_mesh: torch.Tensor, template_pose: torch.Tensor) -> torch.Tensor:
        """The penetration loss's reference surface (the original's ``mesh_refined_v``, detached).

        The corrected rest mesh skinned by the refined skeleton at zero angles,
        ``T_j = G'_j · global_pose_inv_j``: it sits on the bones the radii are measured from, which
        the un-skinned mesh does not when the skeleton corrective moves joints.

        Args:
            rest_mesh: ``[B, V, 3]`` template + pose + identity correctives (mm).
            template_pose: ``[J, 4, 4]`` refined template poses ``G'`` (template root).
        Returns:
            ``[B, V, 3]`` (mm), without gradient.
        """
        transforms = (template_pose @ self.global_pose_inv)[None]
        return linear_blend_skinning(rest_mesh, self.skinning_weight, transforms).contiguous()

    @torch.no_grad()
    def zero_correctives(self) -> None:
        """Make the skeleton and skin correctives exactly zero (the template as it is), by zeroing
        the last layer of each corrective network."""
        for seq in (self.skeleton_refine_net.fc_skeleton, self.skin_refine_net.fc_pose, self.skin_refine_net.fc_id):
            seq[-1].weight.zero_()
            seq[-1].bias.zero_()

    def corrective_layers(self) -> Dict[str, nn.Sequential]:
        """The three corrective networks by the names of ``cfg.correctives``."""
        return {"skeleton": self.skeleton_refine_net.fc_skeleton, "identity": self.skin_refine_net.fc_id,
                "pose": self.skin_refine_net.fc_pose}

    @torch.no_grad()
    def hold_at_zero(self, names) -> None:
        """Hold the named correctives (``'skeleton'``, ``'identity'``, ``'pose'``) at exactly zero:
        their last layer is zeroed and their parameters stop learning (``requires_grad`` off)."""
        layers = self.corrective_layers()
        unknown = sorted(set(names) - set(layers))
        if unknown:
            raise ValueError(f"correctives: unknown {unknown}; expected some of {sorted(layers)}")
        for name in names:
            layers[name][-1].weight.zero_()
            layers[name][-1].bias.zero_()
            layers[name].requires_grad_(False)

    # ------------------------------------------------------------ interfaces
    def decode(self, joint_euler: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Angles → mesh with the root at identity (the output lives in the wrist's frame).

        Args:
            joint_euler: ``[B, J, 3]`` Euler angles in radians.
        Returns:
            ``{'joint_out': [B, J, 3], 'mesh_out_refined': [B, V, 3]}`` in mm.
        """
        identity = torch.eye(4, dtype=joint_euler.dtype, device=joint_euler.device)
        out = self.pose(joint_euler, identity)
        return {"joint_out": out["joint_out"], "mesh_out_refined": out["mesh_out_refined"]}

    def root_alignment(self, template_pose: torch.Tensor, joint_world: torch.Tensor,
                       joint_valid: torch.Tensor):
        """The training-mode root: ``[R|t] · G'_root`` (DESIGN §3).

        ``[R|t]`` is the Kabsch alignment of the refined template's alignment joints
        ``G'[align, :3, 3]`` onto the ground-truth keypoints of the same joints, per sample, over
        the valid ones only (:func:`align_to_keypoints`).

        Args:
            template_pose: ``[J, 4, 4]`` refined template poses (:meth:`refined_template_pose`).
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

    def forward(self, inputs: Dict[str, torch.Tensor], targets: Optional[Dict[str, torch.Tensor]] = None,
                meta_info: Optional[Dict[str, torch.Tensor]] = None, mode: str = "test"):
        """Image → angles → mesh; in ``'train'`` mode also depth maps and the losses.

        Args:
            inputs: ``{'img': [B, 3, H, W]}``, the crop with values in [0, 1]; or, decoder-only,
                ``{'joint_euler': [B, J, 3]}`` angles (radians) used instead of the encoder's.
            targets: (``'train'``) ``joint_world [B, J, 3]`` keypoints (mm), ``joint_valid [B, J]``,
                ``depthmap [B, N, Hr, Wr]`` captured depth (mm, 0 = none), ``(Hr, Wr)`` =
                ``rendered_img_shape``.
            meta_info: (``'train'``) the N target cameras per sample: ``camrot [B, N, 3, 3]``,
                ``campos [B, N, 3]``, ``focal [B, N, 2]``, ``princpt [B, N, 2]``, ``affine [B, N, 2, 3]``
                (as :class:`data.dataset.DeepHandMeshDataset` gives them).
            mode: ``'train'`` or ``'test'``.
        Returns:
            ``'test'``: the root at identity, as :meth:`decode`: ``joint_out [B, J, 3]``,
            ``mesh_out_refined [B, V, 3]`` (mm) and ``joint_euler [B, J, 3]``.
            ``'train'``: per-element losses (the trainer takes ``.mean()`` of each and sums them):
            ``joint [B, J, 3]`` (mm), ``depthmap [B, Hr, Wr]`` (mm), ``penet [B]`` (rigid and
            non-rigid, weighted), ``lap [B, V]`` (× ``loss_lap_weight``). A sample with fewer than
            :data:`MIN_ALIGN_JOINTS` valid alignment keypoints cannot be placed in the world: its
            joint and depth-map losses are 0 (the penetration and Laplacian ones do not depend on
            where the hand is and still apply).
        """
        if mode not in ("train", "test"):
            raise ValueError(f"mode: expected 'train' or 'test', got {mode!r}")
        # Decoder-only (cfg.pose_source='gt'): given angles bypass the encoder.
        joint_euler = inputs.get("joint_euler")
        if joint_euler is None:
            joint_euler = self.pose_net(self.backbone_net(inputs["img"]))
        if mode == "test":
            out = self.decode(joint_euler)
            out["joint_euler"] = joint_euler
            return out

        for name, source in (("targets", targets), ("meta_info", meta_info)):
            keys = TARGET_KEYS if name == "targets" else META_KEYS
            missing = [k for k in keys if source is None or k not in source]
            if missing:
                raise ValueError(f"{name}: the training forward needs {list(keys)}, missing {missing}")
        joint_gt = targets["joint_world"].to(joint_euler.dtype)
        joint_valid = targets["joint_valid"].to(joint_euler.dtype)
        depth_gt = targets["depthmap"]
        if tuple(depth_gt.shape[-2:]) != tuple(self.renderer.image_size):
            raise ValueError(f"targets['depthmap']: maps of {tuple(depth_gt.shape[-2:])} pixels, but the "
                             f"renderer makes {tuple(self.renderer.image_size)} (rendered_img_shape)")

        local_refined, identity_offset = self.identity_terms()
        template_pose = self.refined_template_pose(local_refined)
        root, placed = self.root_alignment(template_pose, joint_gt, joint_valid)
        out = self._pose(joint_euler, root, local_refined, identity_offset)
        joint_out, mesh_out = out["joint_out"], out["mesh_out_refined"]

        depth_out = self.renderer(mesh_out, meta_info["camrot"], meta_info["campos"], meta_info["focal"],
                                  meta_info["princpt"], meta_info["affine"])

        joint = self.joint_loss(joint_out, joint_gt, joint_valid)
        depthmap = self.depthmap_loss(depth_out, depth_gt)
        joint = torch.where(placed[:, None, None], joint, torch.zeros_like(joint))
        depthmap = torch.where(placed[:, None, None], depthmap, torch.zeros_like(depthmap))
        return {
            "joint": joint,
            "depthmap": depthmap,
            "penet": self.penet_loss(template_pose.detach(), self.skinned_rest_mesh(out["rest_mesh"], template_pose),
                                     joint_out, mesh_out),
            "lap": self.lap_loss(mesh_out) * self.loss_lap_weight,
        }


def init_weights(m: nn.Module) -> None:
    """The original's initialisation of the decoder layers."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, std=0.001)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.01)
        nn.init.constant_(m.bias, 0)


def get_model(mode: str, hand_model: HandModel, config=None) -> Model:
    """Build the model for a hand template.

    Args:
        mode: ``'train'`` (decoder layers initialised as the original; backbone from
            ``config.pretrained_backbone`` when given) or ``'test'``.
        hand_model: a loaded :class:`HandModel` (see :func:`common.utils.hand_model.load_hand_model`).
        config: a :class:`main.config.Config`; the global ``cfg`` when None.
    """
    if mode not in ("train", "test"):
        raise ValueError(f"get_model: mode must be 'train' or 'test', got {mode!r}")
    config = config or default_cfg
    backbone_net = BackboneNet(config.resnet_type, config.backbone_img_feat_dim)
    pose_net = PoseNet(torch.from_numpy(hand_model.dof_mask), config.backbone_img_feat_dim)
    skeleton_refine_net = SkeletonRefineNet(hand_model.joint_num, config.id_code_dim)
    skin_refine_net = SkinRefineNet(hand_model.joint_num, hand_model.vertex_num, config.id_code_dim)
    if mode == "train":
        backbone_net.init_weights(config.pretrained_backbone)
        for net in (pose_net, skeleton_refine_net, skin_refine_net):
            net.apply(init_weights)
    return Model(backbone_net, pose_net, skeleton_refine_net, skin_refine_net, hand_model, config.id_code_dim,
                 config)
