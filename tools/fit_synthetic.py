"""Synthetic keypoints for the fitter's tests, made by the project's own decoder (``Model.pose``'s
forward kinematics), independently of the fitter's kinematics.

Poses are drawn within the joint limits as the synthetic data set draws them
(``data.make_synthetic.sample_pose``: uniform within the editor's limits, the fingers' flexion
sharing a grip), roots are random rotations about the origin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from common.fitting.conventions import get_convention, keypoint_map
from common.fitting.solver import tip_offsets
from common.hand.kinematics import euler_to_transform, forward_kinematics, to_homogeneous
from data.make_synthetic import random_rotation, sample_pose
from common.hand.joint_limits import joint_limits_deg
from main.model import get_model


def decoder(hand):
    """``get_model('test', hand)`` with the correctives zeroed (the template as it is)."""
    model = get_model("test", hand).eval()
    model.zero_correctives()
    return model


@dataclass
class Sequence:
    euler: torch.Tensor      # [T, J, 3] radians
    root: torch.Tensor       # [T, 4, 4]
    keypoints: np.ndarray    # [T, 21, 3] mm, noise-free
    joints: np.ndarray       # [T, J, 3] mm


def random_poses(hand, count: int, rng: np.random.Generator) -> torch.Tensor:
    """``[count, J, 3]`` radians within the editor's joint limits."""
    limits = np.radians(joint_limits_deg(hand))
    return torch.tensor(np.stack([sample_pose(limits, rng) for _ in range(count)]), dtype=torch.float32)


def random_roots(count: int, rng: np.random.Generator, spread_mm: float = 200.0) -> torch.Tensor:
    R = torch.tensor(np.stack([random_rotation(rng) for _ in range(count)]), dtype=torch.float32)
    t = torch.tensor(rng.uniform(-spread_mm, spread_mm, (count, 3)), dtype=torch.float32)
    return to_homogeneous(R, t)


def keypoints_of(model, convention: str, euler: torch.Tensor, root: torch.Tensor,
                 local_pose: Optional[torch.Tensor] = None) -> Sequence:
    """The convention's keypoints of posed hands: joints from the decoder's forward kinematics,
    fingertips on the skin along the last bone by the measured offsets."""
    with torch.no_grad():
        identity = model.identity()
        local = identity.local_pose if local_pose is None else local_pose
        G = forward_kinematics(local.double() @ euler_to_transform(euler.double()), root.double(),
                               model.kinematic_tree)
    kmap = keypoint_map(model.hand_model, get_convention(convention), tip_offsets(model))
    j = torch.as_tensor(kmap.joint_index)
    offset = torch.as_tensor(kmap.offset_mm, dtype=torch.float64)
    points = G[:, j, :3, 3] + G[:, j, :3, 0] * offset[:, None]
    return Sequence(euler, root, points.numpy(), G[..., :3, 3].numpy())


def project(points: np.ndarray, cameras: dict) -> np.ndarray:
    """``[T, C, 21, 2]`` pixels of ``points [T, 21, 3]`` (mm) in each camera of ``cameras``
    (``data.make_synthetic.dome_cameras``' ``{name: {'K', 'R', 't'}}``), in the dict's order."""
    uv = []
    for cam in cameras.values():
        x = (points @ cam["R"].T + cam["t"]) @ cam["K"].T
        uv.append(x[..., :2] / x[..., 2:])
    return np.stack(uv, 1)


def corrupt(points: np.ndarray, rng: np.random.Generator, noise_mm: float = 2.0, missing: float = 0.1,
            outliers: float = 0.05, outlier_mm: float = 30.0):
    """Gaussian noise per axis, a fraction of points missing (NaN) and a fraction moved by
    ``outlier_mm`` in a random direction. Returns ``(keypoints, missing [T, 21], moved [T, 21])``."""
    noisy = points + rng.normal(0.0, noise_mm, points.shape)
    gone = rng.uniform(size=points.shape[:2]) < missing
    moved = (rng.uniform(size=points.shape[:2]) < outliers) & ~gone
    direction = rng.normal(size=points.shape)
    direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
    noisy = np.where(moved[..., None], noisy + outlier_mm * direction, noisy)
    noisy[gone] = np.nan
    return noisy, gone, moved
