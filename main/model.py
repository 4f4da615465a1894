"""The DeepHandMesh model: encoder, pose decoder, identity/pose correctives, FK and LBS.

Entry points (DESIGN §10): ``get_model(mode, hand_model)`` and ``model.decode(euler)``.
The template lives in non-persistent buffers, so a state dict holds exactly the original's keys
(``id_code``, ``backbone_net.*``, ``pose_net.*``, ``skeleton_refine_net.*``, ``skin_refine_net.*``).
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn as nn

from common.nets.module import BackboneNet, PoseNet, SkeletonRefineNet, SkinRefineNet
from common.utils.hand_model import HandModel
from common.utils.kinematics import (
    add_translation,
    euler_to_matrix,
    forward_kinematics,
    linear_blend_skinning,
    to_homogeneous,
    tree_levels,
)
from main.config import cfg as default_cfg


class Model(nn.Module):
    def __init__(
        self,
        backbone_net: BackboneNet,
        pose_net: PoseNet,
        skeleton_refine_net: SkeletonRefineNet,
        skin_refine_net: SkinRefineNet,
        hand_model: HandModel,
        id_code_dim: int = 32,
    ):
        super().__init__()
        self.hand_model = hand_model
        self.joint_num = hand_model.joint_num
        self.vertex_num = hand_model.vertex_num
        self.root_joint_idx = hand_model.root_index
        self.align_joint_idx = hand_model.align_joint_indices
        self.non_rigid_joint_idx = hand_model.non_rigid_joint_indices
        self.levels = tree_levels(hand_model.parents)

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

    # ---------------------------------------------------------------- pieces
    def refined_local_pose(self) -> torch.Tensor:
        """``[J, 4, 4]`` local poses with the identity's skeleton corrective (mm) added to the translations."""
        return add_translation(self.local_pose, self.skeleton_refine_net(self.id_code))

    def refined_template_pose(self, local_refined: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[J, 4, 4]`` global rest poses of the refined skeleton (no rotation, template root)."""
        if local_refined is None:
            local_refined = self.refined_local_pose()
        root = self.global_pose[self.root_joint_idx]
        return forward_kinematics(local_refined[None], root, self.levels, self.root_joint_idx)[0]

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
        local_refined, identity_offset = self.identity_terms()
        rotation = to_homogeneous(euler_to_matrix(joint_euler))
        G = forward_kinematics(local_refined @ rotation, root_transform, self.levels, self.root_joint_idx)
        rest_mesh = self.rest_vertices(joint_euler, identity_offset)
        mesh = linear_blend_skinning(rest_mesh, self.skinning_weight, G @ self.global_pose_inv)
        return {
            "joint_out": G[..., :3, 3],
            "mesh_out_refined": mesh,
            "local_pose_refined": local_refined,
            "rest_mesh": rest_mesh,
        }

    @torch.no_grad()
    def zero_correctives(self) -> None:
        """Make the skeleton and skin correctives exactly zero (the template as it is), by zeroing
        the last layer of each corrective network."""
        for seq in (self.skeleton_refine_net.fc_skeleton, self.skin_refine_net.fc_pose, self.skin_refine_net.fc_id):
            seq[-1].weight.zero_()
            seq[-1].bias.zero_()

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

    def forward(self, inputs: Dict[str, torch.Tensor], targets=None, meta_info=None, mode: str = "test"):
        """Image → angles → mesh. ``inputs['img']``: ``[B, 3, H, W]`` crop with values in [0, 1].

        In ``'test'`` mode the root is at identity and the result is as :meth:`decode`, plus
        ``joint_euler [B, J, 3]``.
        """
        if mode != "test":
            raise ValueError(f"mode: this model supports 'test' here, got {mode!r}")
        joint_euler = self.pose_net(self.backbone_net(inputs["img"]))
        out = self.decode(joint_euler)
        out["joint_euler"] = joint_euler
        return out


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
    return Model(backbone_net, pose_net, skeleton_refine_net, skin_refine_net, hand_model, config.id_code_dim)
