"""The ground truth of a synthetic set (``gt/`` of ``data/make_synthetic.py``'s output): the angles
of every frame (``frames.npz``: ``frame`` [T], ``euler`` [T, J, 3] radians, ``vertices`` [T, V, 3]
mm) and the subject's correctives (``identity.npz``: ``id_corrective`` [V, 3], ``skeleton_offset``
[J, 3] mm), for decoder-only training (``pose_source='gt'``) and the tester's mesh metrics.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from common.errors import ConfigError, FileFormatError

log = logging.getLogger("deephandmesh")


def read_arrays(path: Path, names: Tuple[str, ...]) -> Tuple[np.ndarray, ...]:
    """The named arrays of an ``.npz`` file (no pickles); a :class:`FileFormatError` naming the file
    when it cannot be read or lacks one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return tuple(np.asarray(data[name]) for name in names)
    except Exception as err:  # noqa: BLE001 - a damaged file raises BadZipFile, KeyError, ValueError, OSError...
        text = " ".join(str(err).split())[:300]
        raise FileFormatError(f"{path}: expected an .npz file with arrays {', '.join(names)} "
                              f"({type(err).__name__}: {text})") from None


def load_gt_poses(data_dir, joint_num: int) -> Dict[int, np.ndarray]:
    """Frame id → ``[J, 3]`` ground-truth Euler angles (radians) from a synthetic set's
    ``gt/frames.npz`` (written by ``data/make_synthetic.py``), for ``pose_source='gt'``."""
    path = Path(data_dir) / "gt" / "frames.npz"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; pose_source=gt (decoder-only) needs the ground-truth angles "
                          f"of a synthetic set (data/make_synthetic.py writes gt/frames.npz)")
    try:
        with np.load(path, allow_pickle=False) as data:
            frames, euler = np.asarray(data["frame"]), np.asarray(data["euler"], dtype=np.float32)
    except (KeyError, ValueError, OSError) as err:
        raise ConfigError(f"{path}: expected arrays 'frame' [T] and 'euler' [T, J, 3] ({err})") from None
    if euler.ndim != 3 or euler.shape[1:] != (joint_num, 3) or len(frames) != len(euler):
        raise ConfigError(f"{path}: 'euler' has shape {euler.shape}; expected [{len(frames)}, {joint_num}, 3] "
                          f"for this hand model")
    return {int(f): e for f, e in zip(frames, euler)}


def attach_gt_pose(inputs: Dict[str, torch.Tensor], frames, poses: Optional[Dict[int, np.ndarray]],
                   device: torch.device) -> None:
    """Decoder-only: put the ground-truth angles of the batch's ``frames`` into ``inputs['joint_euler']``
    (``[B, J, 3]`` radians), which the model uses instead of its encoder. A no-op when ``poses`` is None."""
    if poses is None:
        return
    missing = [int(f) for f in frames if int(f) not in poses]
    if missing:
        raise ConfigError(f"pose_source=gt: frames {missing} have no ground-truth angles in gt/frames.npz")
    euler = np.stack([poses[int(f)] for f in frames])
    inputs["joint_euler"] = torch.from_numpy(euler).to(device)


def load_gt_meshes(data_dir, vertex_num: int) -> Optional[Dict[int, np.ndarray]]:
    """Frame id → ``[V, 3]`` ground-truth mesh (mm, world frame) from ``gt/frames.npz``; None when
    the set has none, or (with a warning) when its meshes are not of ``vertex_num`` vertices."""
    path = Path(data_dir) / "gt" / "frames.npz"
    if not path.is_file():
        return None
    frames, verts = read_arrays(path, ("frame", "vertices"))
    if verts.ndim != 3 or verts.shape[1] != vertex_num:
        log.warning("%s: ground-truth meshes of %s vertices do not match the hand model's %d; "
                    "no mesh error", path, verts.shape[1:2], vertex_num)
        return None
    log.info("ground-truth meshes: %s (%d frames)", path, len(frames))
    return {int(f): v for f, v in zip(frames, verts)}


def load_gt_identity(data_dir, vertex_num: int, joint_num: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """``(id_corrective [V, 3], skeleton_offset [J, 3])`` in mm from ``gt/identity.npz``; None when the
    set has none, or (with a warning) when the shapes do not fit the hand model."""
    path = Path(data_dir) / "gt" / "identity.npz"
    if not path.is_file():
        return None
    gt_id, gt_skeleton = read_arrays(path, ("id_corrective", "skeleton_offset"))
    if gt_id.shape != (vertex_num, 3) or gt_skeleton.shape != (joint_num, 3):
        log.warning("%s: shapes %s, %s do not match the hand model; no identity metrics",
                    path, gt_id.shape, gt_skeleton.shape)
        return None
    return gt_id, gt_skeleton
