"""The networks of DeepHandMesh (docs/design.md, "Networks"). Attribute names fix the state-dict keys
(docs/design.md, "Checkpoints")."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from common.nets.layer import make_linear_layers
from common.nets.resnet import ResNetBackbone


class BackboneNet(nn.Module):
    """Image encoder: ``[B, 3, H, W]`` crop → ``[B, feat_dim]`` float32 feature.

    Two ways of running the ResNet that are standard on GPUs, both off by default (the original
    runs neither); neither changes the weights' names or values:

    * ``channels_last``: the ResNet's weights and its input in NHWC memory order, which cuDNN's
      fastest convolutions (tensor cores) read without a transposition;
    * ``bf16``: the ResNet and its last layer under ``torch.autocast`` in bfloat16 (autocast decides,
      operation by operation, which run in bfloat16); the feature is returned in float32, so the
      pose network, the decoder, the renderer and the losses run in float32 as without it.
    """

    def __init__(self, resnet_type: int = 50, feat_dim: int = 512, channels_last: bool = False, bf16: bool = False):
        super().__init__()
        self.resnet = ResNetBackbone(resnet_type)
        self.fc = make_linear_layers([self.resnet.out_channels, feat_dim])
        self.channels_last = bool(channels_last)
        self.bf16 = bool(bf16)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def init_weights(self, weights_path=None) -> bool:
        return self.resnet.init_weights(weights_path)  # load_state_dict copies into the weights' layout

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            img = img.contiguous(memory_format=torch.channels_last)
        precision = (torch.autocast(img.device.type, dtype=torch.bfloat16) if self.bf16
                     else contextlib.nullcontext())
        with precision:
            feat = self.resnet(img).mean(dim=(2, 3))  # global average pooling
            feat = self.fc(feat)
        return feat.float()


class PoseNet(nn.Module):
    """Feature ``[B, feat_dim]`` → per-joint Euler angles ``[B, J, 3]`` in radians, in (−π, π).

    The ``D`` network outputs fill the joints' degree-of-freedom slots in row-major
    (joint, axis) order; the other slots are 0.
    """

    def __init__(self, dof_mask: torch.Tensor, feat_dim: int = 512):
        super().__init__()
        self.register_buffer("DoF", torch.as_tensor(dof_mask, dtype=torch.float32).clone())
        self.joint_num = self.DoF.shape[0]
        self.dof_num = int(self.DoF.sum())
        self.fc = make_linear_layers([feat_dim, 512, self.dof_num], relu_final=False)
        # The slots of DoF, found once (and again when a state dict is loaded), not at every
        # forward: finding them on a GPU makes the host wait for the device.
        self.register_buffer("dof_slots", self._slots(), persistent=False)

    def _slots(self) -> torch.Tensor:
        return torch.nonzero(self.DoF.reshape(-1), as_tuple=True)[0]

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.dof_slots = self._slots()

    def output_to_euler_angle(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` raw outputs → ``[B, J, 3]`` angles."""
        angles = torch.tanh(x) * math.pi
        euler = x.new_zeros(x.shape[0], self.joint_num * 3)
        return euler.index_copy(1, self.dof_slots, angles).view(-1, self.joint_num, 3)

    def forward(self, img_feat: torch.Tensor) -> torch.Tensor:
        return self.output_to_euler_angle(self.fc(img_feat))


class SkeletonRefineNet(nn.Module):
    """Identity code ``[C]`` → skeleton corrective ``[J, 3]`` (mm), added to the local translations."""

    def __init__(self, joint_num: int, id_code_dim: int = 32):
        super().__init__()
        self.joint_num = joint_num
        self.fc_skeleton = make_linear_layers([id_code_dim, 64, joint_num * 3], relu_final=False)

    def forward(self, id_code: torch.Tensor) -> torch.Tensor:
        return self.fc_skeleton(id_code).view(self.joint_num, 3)


class SkinRefineNet(nn.Module):
    """Per-vertex correctives in the rest pose (mm).

    ``forward(euler [B, J, 3], id_code [B', C])`` → ``(pose_corrective [B, V, 3], id_corrective [B', V, 3])``;
    pass a single identity code (``B' = 1``) and let it broadcast, since it does not vary over the batch.
    """

    def __init__(self, joint_num: int, vertex_num: int, id_code_dim: int = 32):
        super().__init__()
        self.joint_num = joint_num
        self.vertex_num = vertex_num
        self.fc_pose = make_linear_layers([joint_num * 3, 256, vertex_num * 3], relu_final=False)
        self.fc_id = make_linear_layers([id_code_dim, 256, vertex_num * 3], relu_final=False)

    def forward(self, joint_euler: torch.Tensor, id_code: torch.Tensor):
        pose_corrective = self.fc_pose(joint_euler.reshape(-1, self.joint_num * 3)).view(-1, self.vertex_num, 3)
        id_corrective = self.fc_id(id_code).view(-1, self.vertex_num, 3)
        return pose_corrective, id_corrective

    def pose_independent_rest(self, template: torch.Tensor, id_code: torch.Tensor) -> torch.Tensor:
        """``[3V]`` the part of the corrected rest mesh that does not depend on the pose (mm):
        template + identity corrective + the pose layer's output bias. ``template``: ``[V, 3]``;
        ``id_code``: ``[C]``."""
        return template.reshape(-1) + self.fc_id(id_code) + self.fc_pose[-1].bias

    def corrected_vertices(self, joint_euler: torch.Tensor, pose_independent_rest: torch.Tensor) -> torch.Tensor:
        """``template + pose_corrective + id_corrective`` in one fused product.

        Args:
            joint_euler: ``[B, J, 3]`` (radians).
            pose_independent_rest: ``[3V]`` from :meth:`pose_independent_rest`.
        Returns:
            ``[B, V, 3]`` rest-pose vertices with correctives (mm).
        """
        hidden = self.fc_pose[1](self.fc_pose[0](joint_euler.reshape(-1, self.joint_num * 3)))
        # The transposed product W · hiddenᵀ ([3V, B]) runs markedly faster in MKL for these shapes,
        # and its [V, 3, B] layout is the one linear_blend_skinning works in; callers see a
        # [B, V, 3] view of it.
        flat = torch.addmm(pose_independent_rest[:, None], self.fc_pose[-1].weight, hidden.t())
        return flat.view(self.vertex_num, 3, -1).permute(2, 0, 1)
