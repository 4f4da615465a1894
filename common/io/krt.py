"""KRT camera files (the released data's ``annotations/KRT_512``): per camera a name line, three
lines of the intrinsics ``K``, one line of distortion, three lines of ``[R | t]``, a blank line."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import numpy as np

from common.errors import DataFormatError, MissingFileError
from common.io.atomic import atomic_write_text
from common.io.textio import read_text, shown, text_lines

# Larger numbers are no plausible camera (and would overflow the projections).
MAX_ABS_VALUE = 1e9
MAX_KRT_BYTES = 16 * 2 ** 20


def read_krt(path: os.PathLike | str) -> Dict[str, Dict[str, np.ndarray]]:
    """Read a ``KRT`` camera file.

    Per camera: a name line, three lines of ``K``, one line of distortion, three lines of
    ``[R | t]``, then a blank line (blank lines between blocks are optional here).

    Returns:
        ``{name: {'K' [3,3], 'dist' [n], 'R' [3,3], 't' [3], 'campos' [3] = -R^T t,
        'camrot' [3,3] = R, 'focal' [2] = (K00, K11), 'princpt' [2] = (K02, K12)}}``, float64,
        in file order.
    """
    path = Path(path)
    try:
        lines = text_lines(read_text(path, DataFormatError, "camera file", MAX_KRT_BYTES))
    except FileNotFoundError:
        raise MissingFileError(f"{path}: camera file not found") from None

    cams: Dict[str, Dict[str, np.ndarray]] = {}
    i, n = 0, len(lines)
    while True:
        while i < n and not lines[i].strip():
            i += 1
        if i >= n:
            break
        name, name_line = lines[i].strip(), i + 1
        if name in cams:
            raise DataFormatError(f"{path}:{name_line}: camera '{shown(name)}' appears twice")
        i += 1

        def row(count: Optional[int], what: str) -> List[float]:
            nonlocal i
            if i >= n:
                raise DataFormatError(f"{path}:{n}: camera '{name}' (line {name_line}) ends "
                                      f"early: {what} is missing")
            tokens = lines[i].split()
            try:
                values = [float(t) for t in tokens]
            except ValueError:
                raise DataFormatError(f"{path}:{i + 1}: camera '{shown(name)}': {what} must be "
                                      f"numbers, found '{shown(lines[i].strip())}'") from None
            if count is not None and len(values) != count:
                raise DataFormatError(f"{path}:{i + 1}: camera '{shown(name)}': {what} needs {count} "
                                      f"numbers, found {len(values)}")
            if not all(math.isfinite(v) for v in values):
                raise DataFormatError(f"{path}:{i + 1}: camera '{shown(name)}': {what} is not finite")
            if not all(abs(v) <= MAX_ABS_VALUE for v in values):
                raise DataFormatError(f"{path}:{i + 1}: camera '{shown(name)}': {what} has a number "
                                      f"larger than {MAX_ABS_VALUE:g} in size (not a plausible camera)")
            i += 1
            return values

        K = np.array([row(3, f"row {r + 1} of K") for r in range(3)])
        dist = np.array(row(None, "the distortion line"))
        Rt = np.array([row(4, f"row {r + 1} of [R|t]") for r in range(3)])
        R, t = Rt[:, :3], Rt[:, 3]
        cams[name] = {
            "K": K, "dist": dist, "R": R, "t": t,
            "campos": -R.T @ t, "camrot": R.copy(),
            "focal": np.array([K[0, 0], K[1, 1]]), "princpt": np.array([K[0, 2], K[1, 2]]),
        }
    if not cams:
        raise DataFormatError(f"{path}: no camera in the file")
    return cams


def write_krt(path: os.PathLike | str, cams: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Write cameras (each with ``'K'``, ``'R'``, ``'t'`` and optional ``'dist'``) as a KRT file.

    Numbers are written with Python's shortest round-trip repr: reading back gives them exactly.
    """
    out = []
    for name, cam in cams.items():
        name = str(name)
        if not name.strip() or "\n" in name or name != name.strip():
            raise ValueError(f"camera name {name!r} cannot be written to a KRT file")
        K = np.asarray(cam["K"], np.float64).reshape(3, 3)
        R = np.asarray(cam["R"], np.float64).reshape(3, 3)
        t = np.asarray(cam["t"], np.float64).reshape(3)
        dist = np.asarray(cam.get("dist", np.zeros(5)), np.float64).reshape(-1)
        out.append(name)
        out.extend(format_numbers(r) for r in K)
        out.append(format_numbers(dist))
        out.extend(format_numbers(np.append(R[r], t[r])) for r in range(3))
        out.append("")
    atomic_write_text(path, "\n".join(out) + "\n")


def format_numbers(values: Iterable[float]) -> str:
    """Numbers in Python's shortest round-trip repr, space-separated (read back exactly)."""
    return " ".join(repr(float(v)) for v in values)
