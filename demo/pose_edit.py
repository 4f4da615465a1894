"""A hand pose as the editor holds it: Euler angles in degrees, ``[J, 3]``, and what one does to it
(presets, pose files, limits, a random pose, copying a finger), with no user interface.

The decoder's input is made exactly as ``demo.py --pose`` makes it (:func:`euler_tensor` is
:func:`common.hand.pose_io.build_pose`'s conversion), so a pose saved by :func:`pose_yaml` gives
``demo.py`` the same mesh, vertex for vertex.
"""
from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from common.hand.hand_model import HandModel
from common.hand.pose_io import PRESET_DIR, PoseError, apply_pose_file, pose_yaml, preset_names  # noqa: F401 (pose_yaml: importable from here)
from data.make_synthetic import sample_pose

log = logging.getLogger("deephandmesh")
FINGERS = ("thumb", "index", "middle", "ring", "pinky")
# Angles are kept to this many decimals (the sliders' resolution is far coarser): the saved YAML
# then holds short numbers, and what is saved is exactly what was decoded.
DECIMALS = 4


def pose_source(pose: str) -> Path:
    """The file of ``pose``: a path, or the name of a preset in ``demo/poses`` (as ``demo.py --pose``)."""
    path = Path(pose)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{pose}.yaml"
    if not preset.is_file():
        raise PoseError(f"--pose {pose}: no such file, and not a preset name; presets: {', '.join(preset_names())}")
    return preset


def pose_degrees(model: HandModel, pose: str | None) -> np.ndarray:
    """``[J, 3]`` float64 degrees of a pose file or preset (zeros for ``None``), checked as the demo
    does; the file's warnings (a joint given twice, angles that look like radians) are logged."""
    euler_deg = np.zeros((model.joint_num, 3))
    if pose:
        path = pose_source(pose)
        for note in apply_pose_file(model, euler_deg, path):
            log.warning(note)
    return euler_deg


def euler_tensor(euler_deg: np.ndarray) -> torch.Tensor:
    """``[J, 3]`` or ``[N, J, 3]`` degrees → float32 radians ``[1 or N, J, 3]``, the conversion of
    :func:`~common.hand.pose_io.build_pose`."""
    euler = torch.from_numpy(np.radians(np.asarray(euler_deg, np.float64))).float()
    return euler[None] if euler.dim() == 2 else euler


def tidy(euler_deg: np.ndarray, model: HandModel, decimals: int | None = DECIMALS) -> np.ndarray:
    """Round to ``decimals`` (None: keep every digit), zero the axes without a degree of freedom, no ``-0.0``."""
    euler_deg = np.asarray(euler_deg, np.float64)
    if decimals is not None:
        euler_deg = np.round(euler_deg, decimals)
    return euler_deg * model.dof_mask + 0.0


def read_uploaded_pose(model: HandModel, filename: str, content: bytes, notes: list | None = None) -> np.ndarray:
    """``[J, 3]`` degrees of a pose file the user sent (its name and bytes).

    It is read and checked exactly as ``demo.py --pose FILE`` reads it (YAML, or JSON for ``.json``),
    and a bad file raises the :class:`PoseError` the demo prints, naming the file by its own name.
    ``notes``: a list that receives the file's warnings (a joint given twice, radians), likewise named.
    """
    name = Path(filename.replace("\\", "/")).name or "pose.yaml"
    with tempfile.TemporaryDirectory(prefix="pose_upload_") as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            euler_deg = np.zeros((model.joint_num, 3))
            found = apply_pose_file(model, euler_deg, path)
        except PoseError as err:
            raise PoseError(str(err).replace(str(path), name)) from None
    if notes is not None:
        notes.extend(note.replace(str(path), name) for note in found)
    return euler_deg


def clamp(euler_deg: np.ndarray, limits_deg: np.ndarray) -> np.ndarray:
    """``euler_deg [J, 3]`` clipped to ``limits_deg [J, 3, 2]``."""
    return np.clip(euler_deg, limits_deg[..., 0], limits_deg[..., 1])


def random_pose(model: HandModel, limits_deg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[J, 3]`` degrees uniform within the limits, with the synthetic data's shared grip (the fingers
    curl together more often than not), rounded to whole degrees."""
    return tidy(np.round(sample_pose(limits_deg, rng)), model)


def finger_joints(model: HandModel, finger: str) -> List[int]:
    """Ids of the joints of ``finger`` that have a degree of freedom, from the palm outwards."""
    pattern = re.compile(rf"(^|_){finger}\d$")
    ids = [j for j, n in enumerate(model.joint_names) if pattern.search(n) and model.dof_mask[j].any()]
    return sorted(ids, key=lambda j: model.joint_names[j])


def copy_finger(model: HandModel, euler_deg: np.ndarray, finger: str) -> np.ndarray:
    """``euler_deg`` with the angles of ``finger`` (``index``…``pinky``, joint by joint: ``X1`` to
    ``X1``…) copied to the other three long fingers; the thumb, built otherwise, is left alone."""
    long_fingers = FINGERS[1:]
    if finger not in long_fingers:
        raise ValueError(f"copy_finger: expected one of {', '.join(long_fingers)}, got {finger!r}")
    out = np.array(euler_deg, np.float64)
    source = finger_joints(model, finger)
    for other in long_fingers:
        target = finger_joints(model, other)
        if other != finger and len(target) == len(source):
            out[target] = out[source]
    return out


def angle_dofs(model: HandModel) -> Dict[str, List[tuple]]:
    """The sliders: for each finger, ``(joint id, axis)`` of every degree of freedom, palm outwards,
    flexion first (the axis one moves most)."""
    out = {}
    for finger in FINGERS:
        out[finger] = [(j, k) for j in finger_joints(model, finger) for k in (2, 1, 0) if model.dof_mask[j, k]]
    return out
