"""What a glTF reader that keeps four skinning influences per vertex loses (``bench.py influences``).

The exported ``.glb`` holds every influence (``JOINTS_0/WEIGHTS_0``, ``JOINTS_1/WEIGHTS_1``, …,
strongest first). three.js, and other readers limited to four, use the first set only and
renormalise it to sum to 1 (three.js: ``SkinnedMesh.normalizeSkinWeights``). Here that mesh is
compared with the model's for the presets and random poses within the joint limits, with zero
correctives (the skinning does not depend on them: the loss is the weights').
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict

import numpy as np
import torch

from common.export.gltf import INFLUENCES_PER_SET, strongest_influences
from common.hand.kinematics import pose_hand
from common.hand.pose_io import preset_names
from common.hand.joint_limits import joint_limits_deg
from demo.pose_edit import euler_tensor, pose_degrees, random_pose


def four_influence_error(hand, euler: torch.Tensor, influences: int = INFLUENCES_PER_SET) -> np.ndarray:
    """``[B]`` the largest vertex distance (mm) of each pose ``euler [B, J, 3]`` (radians) between
    the model's skinning and a reader keeping ``influences`` per vertex, renormalised."""
    limited = replace(hand, skinning_weights=strongest_influences(hand.skinning_weights, influences))
    euler = euler.double()
    _, full = pose_hand(hand, euler)
    _, kept = pose_hand(limited, euler)
    return (full - kept).norm(dim=-1).amax(dim=1).numpy()


def measure(hand, random_poses: int, seed: int = 0) -> Dict[str, object]:
    """The figures of one hand: influence counts, the error on each preset and on random poses."""
    counts = (hand.skinning_weights > 0).sum(1)
    presets = preset_names()
    errors = four_influence_error(hand, euler_tensor(np.stack([pose_degrees(hand, p) for p in presets])))
    rng = np.random.default_rng(seed)
    limits = joint_limits_deg(hand)
    random = np.stack([random_pose(hand, limits, rng) for _ in range(random_poses)])
    random_errors = four_influence_error(hand, euler_tensor(random)) if random_poses else np.zeros(0)
    return {"vertices": hand.vertex_num, "over_four": int((counts > INFLUENCES_PER_SET).sum()),
            "max_influences": int(counts.max()), "presets": dict(zip(presets, errors.tolist())),
            "random_max": float(random_errors.max()) if random_poses else float("nan"),
            "random_median": float(np.median(random_errors)) if random_poses else float("nan")}


def run(hands, random_poses: int, seed: int = 0) -> None:
    print(f"four-influence readers (three.js): the largest vertex error (mm) against the model's skinning; "
          f"presets and {random_poses} random poses within the joint limits (seed {seed}), zero correctives")
    print(f"{'hand':<12} {'vertices':>8} {'>4 infl.':>8} {'most':>5} " +
          " ".join(f"{p:>8}" for p in preset_names()) + f" {'random max':>10} {'median':>7}")
    for name, hand in hands:
        m = measure(hand, random_poses, seed)
        print(f"{name:<12} {m['vertices']:>8} {m['over_four']:>8} {m['max_influences']:>5} " +
              " ".join(f"{e:>8.3f}" for e in m["presets"].values()) +
              f" {m['random_max']:>10.3f} {m['random_median']:>7.3f}")
