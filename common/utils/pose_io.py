"""Hand poses as people write them: ``{joint_name: [x, y, z]}`` in degrees (YAML or JSON),
``NAME=X,Y,Z`` overrides, and named presets shipped under ``demo/poses``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Mapping

import numpy as np
import torch
import yaml

from common.utils.hand_model import AXES, HandModel, dof_description
from common.utils.textio import key_lines_json, key_lines_yaml, read_text, shown, where

PRESET_DIR = Path(__file__).resolve().parents[2] / "demo" / "poses"
MAX_POSE_BYTES = 2 ** 20
# Larger angles turn into inf in float32 radians; no pose needs more than a few turns.
MAX_ABS_DEGREES = 1e6


class PoseError(ValueError):
    """A pose that cannot be applied; the message names the file or argument and the joint."""


def preset_names() -> List[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_joint(model: HandModel, name: str, source: str) -> int:
    """Joint id of ``name``: the full name (``b_r_index1``) or the part after the side prefix (``index1``)."""
    if name in model.joint_names:
        return model.joint_names.index(name)
    hits = [i for i, n in enumerate(model.joint_names) if n.endswith("_" + name)]
    if len(hits) == 1:
        return hits[0]
    raise PoseError(f"{source}: unknown joint '{shown(name)}'; valid joints: {', '.join(model.joint_names)}")


def _angles(value, source: str, joint: str) -> np.ndarray:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise PoseError(f"{source}: joint '{joint}': expected three angles [x, y, z] in degrees, "
                        f"got {shown(repr(value))}")
    items = list(value)
    if len(items) != 3:
        raise PoseError(f"{source}: joint '{joint}': expected three angles [x, y, z] in degrees, got {len(items)}")
    out = []
    for axis, item in zip(AXES, items):
        if isinstance(item, bool):
            raise PoseError(f"{source}: joint '{joint}': angle {axis} is not a number ({item!r})")
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise PoseError(f"{source}: joint '{joint}': angle {axis} is not a number "
                            f"({shown(repr(item))})") from None
        except OverflowError:  # an integer beyond float range
            raise PoseError(f"{source}: joint '{joint}': angle {axis} is too large "
                            f"({shown(repr(item))})") from None
        if not math.isfinite(number):
            raise PoseError(f"{source}: joint '{joint}': angle {axis} is not finite ({shown(repr(item))})")
        if abs(number) > MAX_ABS_DEGREES:
            raise PoseError(f"{source}: joint '{joint}': angle {axis} of {number:g}° is larger than "
                            f"{MAX_ABS_DEGREES:g}° in size")
        out.append(number)
    return np.array(out)


def apply_angles(model: HandModel, euler_deg: np.ndarray, values: Mapping, source: str) -> None:
    """Set joints' angles (degrees) in ``euler_deg [J, 3]`` from ``{name: [x, y, z]}``, checking DoF."""
    dof = model.dof_mask
    for name, value in values.items():
        j = resolve_joint(model, str(name), source)
        angles = _angles(value, source, shown(str(name)))
        for k, axis in enumerate(AXES):
            if angles[k] != 0 and not dof[j, k]:
                raise PoseError(
                    f"{source}: joint '{model.joint_names[j]}' has no degree of freedom about {axis} "
                    f"(its axes: {dof_description(model, j)}); got {angles[k]:g}°"
                )
        euler_deg[j] = angles


def read_pose_file(path: Path) -> Dict:
    """Read ``{joint_name: [x, y, z]}`` (degrees) from a YAML or JSON file."""
    data, _lines = read_pose_file_lines(path)
    return data


def read_pose_file_lines(path: Path):
    """:func:`read_pose_file` and the line of each joint's entry: ``(data, {name: line})``."""
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        text = read_text(path, PoseError, f"pose file ({kind})", MAX_POSE_BYTES)
    except OSError as err:
        raise PoseError(f"{path}: cannot read pose file ({err.strerror or err})") from None
    try:
        if kind == "JSON":
            data = json.loads(text)
            lines = key_lines_json(text, data)
        else:
            data, lines = key_lines_yaml(text)
    except (yaml.YAMLError, ValueError) as err:  # ValueError: JSON errors, a date 2001-13-45, a 5000-digit int
        raise PoseError(f"{path}: not valid {kind}: {' '.join(str(err).split())}") from None
    except RecursionError:
        raise PoseError(f"{path}: not valid {kind}: nested too deeply") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise PoseError(f"{path}: expected a mapping joint_name: [x, y, z] (degrees), got {type(data).__name__}")
    return data, lines


def parse_euler_override(text: str) -> tuple:
    """``'index1=0,0,45'`` → ``('index1', ['0', '0', '45'])`` (checked later against the hand model)."""
    if "=" not in text:
        raise PoseError(f"--euler {text}: expected NAME=X,Y,Z in degrees, e.g. b_r_index1=0,0,45")
    name, values = text.split("=", 1)
    parts = [p.strip() for p in values.split(",")]
    if len(parts) != 3:
        raise PoseError(f"--euler {text}: expected three comma-separated angles X,Y,Z in degrees")
    return name.strip(), parts


def apply_pose_file(model: HandModel, euler_deg: np.ndarray, path: Path) -> None:
    """Set the angles (degrees, ``euler_deg [J, 3]``) a pose file gives, each entry checked and its
    errors naming the file and the entry's line."""
    data, lines = read_pose_file_lines(path)
    for name, value in data.items():
        apply_angles(model, euler_deg, {name: value}, where(path, lines, name))


def build_pose(model: HandModel, pose: str | None, overrides: Iterable[str] = ()) -> torch.Tensor:
    """Euler angles for the demo.

    Args:
        pose: a YAML/JSON file, or the name of a preset in ``demo/poses`` (None: all zeros).
        overrides: ``NAME=X,Y,Z`` strings (degrees); each replaces that joint's angles.
    Returns:
        ``[1, J, 3]`` float32 radians.
    """
    euler_deg = np.zeros((model.joint_num, 3))
    if pose:
        path = Path(pose)
        if not path.is_file():
            preset = PRESET_DIR / f"{pose}.yaml"
            if not preset.is_file():
                raise PoseError(
                    f"--pose {pose}: no such file, and not a preset name; presets: {', '.join(preset_names())}"
                )
            path = preset
        apply_pose_file(model, euler_deg, path)
    for text in overrides:
        name, values = parse_euler_override(text)
        apply_angles(model, euler_deg, {name: values}, f"--euler {text}")
    return torch.from_numpy(np.radians(euler_deg)).float()[None]
