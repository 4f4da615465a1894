"""Reading a fitted sequence for export: ``fit.npz`` as the fitting script writes it.

Keys: ``euler`` ``[T, J, 3]`` Euler angles (radians), ``root`` ``[T, 4, 4]`` the wrist's world
transform (mm), and optionally ``fps`` (a number: frames per second). The file is data: it is read
with ``allow_pickle=False`` (an object array is refused, never unpickled).
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from common.export.gltf import ExportError, check_rigid

# A fitted sequence larger than this is not a hand's (a 10-minute 60 fps fit is ~70 MB of float64).
MAX_FIT_BYTES = 2 ** 30


class FittedSequence(NamedTuple):
    euler: np.ndarray          # [T, J, 3] radians, float64
    root: np.ndarray           # [T, 4, 4] mm, float64
    fps: Optional[float]       # frames per second when the file says


def read_fit(path, joint_num: int) -> FittedSequence:
    """Read and check a ``fit.npz`` for a hand of ``joint_num`` joints.

    Raises:
        ExportError: missing or unreadable file, a key missing, wrong shapes, non-finite numbers,
            a bad ``fps``; the message names the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file (a fitted sequence .npz with 'euler' and 'root')")
    if path.stat().st_size > MAX_FIT_BYTES:
        raise ExportError(f"{path}: larger than {MAX_FIT_BYTES // 2 ** 20} MB, not a fitted hand sequence")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("euler", "root", "fps") if key in npz.files}
            files = list(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ExportError(f"{path}: not a readable .npz of numeric arrays ({' '.join(str(err).split())[:200]})") \
            from None
    for key in ("euler", "root"):
        if key not in arrays:
            raise ExportError(f"{path}: no '{key}' array (found {', '.join(files) or 'none'}); a fitted sequence "
                              "holds euler [T, J, 3] (radians) and root [T, 4, 4] (mm)")
        if arrays[key].dtype.kind not in "fiu":
            raise ExportError(f"{path}: '{key}' holds {arrays[key].dtype} values, expected numbers")
    euler, root = arrays["euler"].astype(np.float64), arrays["root"].astype(np.float64)
    if euler.ndim != 3 or euler.shape[1:] != (joint_num, 3) or euler.shape[0] < 1:
        raise ExportError(f"{path}: 'euler' has shape {list(euler.shape)}, expected [T, {joint_num}, 3] "
                          f"(radians) for this hand's {joint_num} joints")
    if root.shape != (len(euler), 4, 4):
        raise ExportError(f"{path}: 'root' has shape {list(root.shape)}, expected [{len(euler)}, 4, 4] "
                          "(one transform per frame of 'euler', mm)")
    for key, value in (("euler", euler), ("root", root)):
        bad = np.argwhere(~np.isfinite(value))
        if len(bad):
            raise ExportError(f"{path}: '{key}' has a non-finite value at frame {int(bad[0][0])}")
    check_rigid(root, [f"{path}: 'root' of frame {t}" for t in range(len(root))])
    fps = None
    if "fps" in arrays:
        value = arrays["fps"]
        if value.size != 1 or value.dtype.kind not in "fiu" or not math.isfinite(float(value.reshape(-1)[0])) \
                or float(value.reshape(-1)[0]) <= 0:
            raise ExportError(f"{path}: 'fps' must be one positive number, got {value.reshape(-1)[:3].tolist()}")
        fps = float(value.reshape(-1)[0])
    return FittedSequence(euler, root, fps)
