"""Hand poses as people write them: ``{joint_name: [x, y, z]}`` in degrees (YAML or JSON),
``NAME=X,Y,Z`` overrides, and named presets shipped under ``demo/poses``.

Besides the errors (a :class:`PoseError` naming the file and line, or the argument), reading a pose
warns, without stopping, about what is most likely a slip (:func:`pose_warnings`):

* a joint given twice in one source (a pose file, or the ``--euler`` arguments together): the
  last one counts. ``--euler`` replacing a joint of the ``--pose`` file is what it is for, and
  does not warn;
* angles that look like radians: every non-zero angle of the source lies within ±π (±3.1416)
  and at least one of them is not a whole number (``1.5708``): degrees that small and that precise
  are rare, radians are always like that. Whole small numbers (``--euler thumb0=2,0,0``) do not warn.

(Angles beyond the joint limits are the demo's to warn about: :mod:`common.hand.joint_limits`.)
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import numpy as np
import torch
import yaml

from common.errors import DeepHandMeshError
from common.hand.hand_model import AXES, HandModel, dof_description
from common.io.textio import key_lines_json, read_text, shown, where, yaml_error_message, yaml_mapping

PRESET_DIR = Path(__file__).resolve().parents[2] / "demo" / "poses"
MAX_POSE_BYTES = 2 ** 20
# Larger angles turn into inf in float32 radians; no pose needs more than a few turns.
MAX_ABS_DEGREES = 1e6
log = logging.getLogger("deephandmesh")


class PoseError(DeepHandMeshError, ValueError):
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


def apply_angles(model: HandModel, euler_deg: np.ndarray, values: Mapping, source: str) -> List[int]:
    """Set joints' angles (degrees) in ``euler_deg [J, 3]`` from ``{name: [x, y, z]}``, checking DoF.
    Returns the ids of the joints set, in order."""
    dof = model.dof_mask
    joints = []
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
        joints.append(j)
    return joints


def read_pose_file(path: Path) -> Dict:
    """Read ``{joint_name: [x, y, z]}`` (degrees) from a YAML or JSON file."""
    data, _lines = read_pose_file_lines(path)
    return data


def read_pose_file_lines(path: Path):
    """:func:`read_pose_file` and the line of each joint's entry: ``(data, {name: line})``."""
    data, lines, _repeated = read_pose_entries(path)
    return data, lines


def _json_with_repeats(text: str) -> Tuple[object, Dict[str, List[int]]]:
    """``json.loads(text)`` and the top-level keys given more than once, with their lines (the
    places where the quoted key appears, in order)."""
    objects = []

    def keep_pairs(pairs):
        objects.append(pairs)
        return dict(pairs)

    data = json.loads(text, object_pairs_hook=keep_pairs)
    repeated: Dict[str, List[int]] = {}
    if isinstance(data, dict) and objects:  # the top-level object is completed last
        names = [str(k) for k, _ in objects[-1]]
        for name in {n for n in names if names.count(n) > 1}:
            quoted, found, at = json.dumps(name), [], -1
            while len(found) < names.count(name) and (at := text.find(quoted, at + 1)) >= 0:
                found.append(text.count("\n", 0, at) + 1)
            repeated[name] = found
    return data, repeated


def read_pose_entries(path: Path) -> Tuple[Dict, Dict[str, int], Dict[str, List[int]]]:
    """A pose file's ``{joint_name: [x, y, z]}`` (YAML, or JSON for ``.json``), the line of each
    entry, and the names given more than once with their lines (the last one counts).

    Raises:
        PoseError: unreadable, not valid YAML/JSON (worded with the file, the line and a hint, e.g.
            ``tabs are not allowed in YAML; indent with spaces``), or not a mapping.
    """
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        text = read_text(path, PoseError, f"pose file ({kind})", MAX_POSE_BYTES)
    except OSError as err:
        raise PoseError(f"{path}: cannot read pose file ({err.strerror or err})") from None
    try:
        if kind == "JSON":
            data, repeated = _json_with_repeats(text)
            lines = key_lines_json(text, data)
        else:
            data, lines, repeated = yaml_mapping(text)
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: JSON's, a date 2001-13-45, a 5000-digit int
        raise PoseError(yaml_error_message(path, err, kind)) from None
    if data is None:
        return {}, {}, {}
    if not isinstance(data, dict):
        raise PoseError(f"{path}: expected a mapping joint_name: [x, y, z] (degrees), got {type(data).__name__}")
    return data, lines, repeated


def parse_euler_override(text: str) -> tuple:
    """``'index1=0,0,45'`` → ``('index1', ['0', '0', '45'])`` (checked later against the hand model)."""
    if "=" not in text:
        raise PoseError(f"--euler {text}: expected NAME=X,Y,Z in degrees, e.g. b_r_index1=0,0,45")
    name, values = text.split("=", 1)
    parts = [p.strip() for p in values.split(",")]
    if len(parts) != 3:
        raise PoseError(f"--euler {text}: expected three comma-separated angles X,Y,Z in degrees")
    return name.strip(), parts


def apply_pose_file(model: HandModel, euler_deg: np.ndarray, path: Path) -> List[str]:
    """Set the angles (degrees, ``euler_deg [J, 3]``) a pose file gives, each entry checked and its
    errors naming the file and the entry's line.

    Returns:
        The file's warnings (:func:`pose_warnings`), for the caller to show; nothing is logged here.
    """
    data, lines, repeated = read_pose_entries(path)
    given: List[Tuple[int, str]] = []
    for name, value in data.items():
        source = where(path, lines, name)
        for j in apply_angles(model, euler_deg, {name: value}, source):
            given.append((j, source))
    notes = [f"{path}:{found[-1]}: joint '{shown(name)}' is given {len(found)} times (lines "
             f"{', '.join(map(str, found))}); the last one counts" for name, found in repeated.items()]
    return notes + pose_warnings(model, euler_deg, given, str(path))


def pose_warnings(model: HandModel, euler_deg: np.ndarray, given: Sequence[Tuple[int, str]], source: str) -> List[str]:
    """The warnings of one source's angles (module notes): a joint set twice under two names (the
    same name twice is for the reader to see, :func:`read_pose_entries`), and angles that look
    like radians.

    Args:
        euler_deg: ``[J, 3]`` degrees after the source was applied.
        given: ``(joint id, where)`` of each entry of the source, in order.
        source: the source as the user names it (a file, ``--euler``).
    """
    notes = []
    seen: Dict[int, List[str]] = {}
    for j, place in given:
        seen.setdefault(j, []).append(place)
    for j, places in seen.items():
        if len(places) > 1:
            notes.append(f"{places[-1]}: joint '{model.joint_names[j]}' is given {len(places)} times "
                         f"({', '.join(places)}); the last one counts")
    angles = [float(a) for j in seen for a in euler_deg[j] if a != 0]
    if angles and all(abs(a) <= math.pi for a in angles) and any(a != round(a) for a in angles):
        example = next(a for a in angles if a != round(a))
        notes.append(f"{source}: every angle is within ±π and some are fractions ({example:g}): are these "
                     f"radians? Pose angles are in degrees ({example:g} rad would be "
                     f"{math.degrees(example):.1f}°)")
    return notes


def euler_overrides(model: HandModel, euler_deg: np.ndarray, overrides: Iterable[str]) -> List[str]:
    """Apply ``NAME=X,Y,Z`` strings (degrees; each replaces that joint's angles) to ``euler_deg``;
    returns their warnings (:func:`pose_warnings` over all of them together)."""
    given = []
    overrides = list(overrides)
    for text in overrides:
        name, values = parse_euler_override(text)
        for j in apply_angles(model, euler_deg, {name: values}, f"--euler {text}"):
            given.append((j, f"--euler {text}"))
    if not given:
        return []
    only = np.zeros_like(euler_deg)  # the radians check looks at what --euler gave, not the file's angles
    for j, _ in given:
        only[j] = euler_deg[j]
    return pose_warnings(model, only, given, "--euler")


def build_pose(model: HandModel, pose: str | None, overrides: Iterable[str] = ()) -> torch.Tensor:
    """Euler angles for the demo; the warnings of the file and of the overrides are logged
    (:func:`pose_warnings`).

    Args:
        pose: a YAML/JSON file, or the name of a preset in ``demo/poses`` (None: all zeros).
        overrides: ``NAME=X,Y,Z`` strings (degrees); each replaces that joint's angles.
    Returns:
        ``[1, J, 3]`` float32 radians.
    """
    euler_deg = np.zeros((model.joint_num, 3))
    notes = []
    if pose:
        path = Path(pose)
        if not path.is_file():
            preset = PRESET_DIR / f"{pose}.yaml"
            if not preset.is_file():
                raise PoseError(
                    f"--pose {pose}: no such file, and not a preset name; presets: {', '.join(preset_names())}"
                )
            path = preset
        notes += apply_pose_file(model, euler_deg, path)
    notes += euler_overrides(model, euler_deg, overrides)
    for note in notes:
        log.warning(note)
    return torch.from_numpy(np.radians(euler_deg)).float()[None]


def pose_yaml(model: HandModel, euler_deg: np.ndarray, comment: str = "") -> str:
    """The pose as ``demo.py --pose`` reads it: ``joint: [x, y, z]`` in degrees, every joint that has
    a degree of freedom (full names), with ``comment`` lines on top."""
    lines = [f"# {line}" for line in comment.splitlines()]
    lines.append("# Angles in degrees, [x, y, z]; z is the flexion axis (positive curls towards the palm).")
    for j, name in enumerate(model.joint_names):
        if model.dof_mask[j].any():
            x, y, z = (float(v) + 0.0 for v in euler_deg[j])
            lines.append(f"{name}: [{x!r}, {y!r}, {z!r}]")
    return "\n".join(lines) + "\n"
