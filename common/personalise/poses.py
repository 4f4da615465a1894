"""Per-frame poses as optimisation variables: the joint angles of the degrees of freedom and the
wrist's placement, as changes from a starting pose (the keypoint fit's)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from common.fitting.skeleton import axis_angle_to_matrix


class FramePoses(nn.Module):
    """``T`` poses: Euler angles on the hand model's degrees of freedom and the root's world transform.

    The root is ``[exp(ω) R₀ | p₀ + δ]``: a rotation vector ``ω`` (radians) applied to the starting
    rotation ``R₀`` about the wrist, and a shift ``δ`` (mm) of its starting position ``p₀``; both 0 at
    the start, so the variables are changes of similar size whatever the start.

    Args:
        euler: ``[T, J, 3]`` starting angles (radians).
        root: ``[T, 4, 4]`` starting root transforms (mm).
        dof_mask: ``[J, 3]`` 1 on the degrees of freedom (the other angles stay 0).
    """

    def __init__(self, euler: torch.Tensor, root: torch.Tensor, dof_mask):
        super().__init__()
        mask = torch.as_tensor(np.asarray(dof_mask), dtype=torch.bool, device=euler.device)
        self.register_buffer("slots", torch.nonzero(mask.reshape(-1), as_tuple=True)[0], persistent=False)
        self.joint_num = mask.shape[0]
        T = euler.shape[0]
        self.angles = nn.Parameter(euler.detach().reshape(T, -1)[:, self.slots].clone())
        self.rotation = nn.Parameter(torch.zeros(T, 3, dtype=euler.dtype, device=euler.device))
        self.shift = nn.Parameter(torch.zeros(T, 3, dtype=euler.dtype, device=euler.device))
        self.register_buffer("start_rotation", root.detach()[:, :3, :3].to(euler.dtype).clone(), persistent=False)
        self.register_buffer("start_position", root.detach()[:, :3, 3].to(euler.dtype).clone(), persistent=False)

    @property
    def frame_num(self) -> int:
        return self.angles.shape[0]

    def euler(self) -> torch.Tensor:
        """``[T, J, 3]`` radians, 0 off the degrees of freedom."""
        T = self.angles.shape[0]
        flat = self.angles.new_zeros(T, self.joint_num * 3).index_copy(1, self.slots, self.angles)
        return flat.view(T, self.joint_num, 3)

    def root(self) -> torch.Tensor:
        """``[T, 4, 4]`` the root's world transforms (mm)."""
        R = axis_angle_to_matrix(self.rotation) @ self.start_rotation
        T = R.shape[0]
        bottom = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=R.dtype, device=R.device).expand(T, 1, 4)
        return torch.cat([torch.cat([R, (self.start_position + self.shift)[:, :, None]], 2), bottom], 1)
