"""Reading, writing and validating DeepHandMesh hand-model folders (docs/design.md, "Hand-model files").

A hand-model folder holds six text files::

    hand.obj               template mesh, ``v`` in centimetres, ``vt``, ``f a/at b/bt c/ct``
    skeleton.txt           ``name id parent_id`` per joint, root parent -1
    skinning_weight.txt    ``vertex_idx name w name w ... `` per vertex
    local_pose.txt         ``name m00 ... m33 `` per joint (4x4 row-major, mm)
    global_pose.txt        idem
    global_pose_inv.txt    idem, inverse of the *template* global pose

The numbers are kept in the files' own units and at float64, so that
``save_hand_model(load_hand_model(d))`` writes back exactly the same numbers.
Inside the program everything is millimetres: :attr:`HandModel.vertices` is the
template in mm (the file's centimetres times 10, as the original reader does).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

import numpy as np

from common.errors import FileFormatError
from common.io.atomic import atomic_write_text, make_folder
from common.io.textio import read_text, shown, text_lines

OBJ_FILE = "hand.obj"
SKELETON_FILE = "skeleton.txt"
WEIGHTS_FILE = "skinning_weight.txt"
POSE_FILES = {
    "local_pose": "local_pose.txt",
    "global_pose": "global_pose.txt",
    "global_pose_inv": "global_pose_inv.txt",
}
HAND_MODEL_FILES = (OBJ_FILE, SKELETON_FILE, WEIGHTS_FILE) + tuple(POSE_FILES.values())

# Joints the original code hard-codes by position; we find them by name suffix
# (the released model prefixes every name with ``b_r_``).
ALIGN_JOINT_SUFFIXES = ("index1", "middle1", "ring1", "pinky1", "wrist")
NON_RIGID_JOINT_SUFFIXES = ("thumb1", "wrist")
ROOT_JOINT_SUFFIX = "wrist"

AXES = "xyz"


class HandModelError(FileFormatError):
    """A hand-model folder or file that cannot be used; the message names the file and line."""


def dof_of_joint(name: str) -> np.ndarray:
    """Rotational degrees of freedom of a joint from its name, as the original.

    Returns:
        ``[3]`` float32 mask over the (x, y, z) Euler axes.
    """
    if name.endswith("null"):
        return np.array([0, 0, 0], np.float32)
    if name.endswith("3") or name.endswith("2"):
        return np.array([0, 0, 1], np.float32)
    if name.endswith("1") or name.endswith("thumb0"):
        return np.array([1, 1, 1], np.float32)
    return np.array([0, 0, 0], np.float32)


def children_of(parents: Sequence[int]) -> List[List[int]]:
    """Child ids of every joint of a skeleton given as parent ids (``-1`` for the root), in id order."""
    kids: List[List[int]] = [[] for _ in parents]
    for j, p in enumerate(parents):
        if p >= 0:
            kids[int(p)].append(j)
    return kids


@dataclass
class HandModel:
    """A hand template: mesh, skeleton, skinning weights and rest poses.

    Attributes:
        joint_names: ``J`` names; the position in the list is the joint id.
        parents: ``[J]`` int64 parent id, -1 for the root.
        vertices_cm: ``[V, 3]`` float64 template vertices in centimetres (file units).
        uvs: ``[T, 2]`` float64 texture coordinates.
        faces: ``[F, 3]`` int64 0-based vertex indices of each triangle.
        face_uvs: ``[F, 3]`` int64 0-based uv indices of each triangle.
        skinning_weights: ``[V, J]`` float64.
        local_pose: ``[J, 4, 4]`` float64, translations in mm.
        global_pose: ``[J, 4, 4]`` float64, translations in mm.
        global_pose_inv: ``[J, 4, 4]`` float64, inverse of the template ``global_pose``.
        source: folder it was read from (for messages), or a description.
    """

    joint_names: List[str]
    parents: np.ndarray
    vertices_cm: np.ndarray
    uvs: np.ndarray
    faces: np.ndarray
    face_uvs: np.ndarray
    skinning_weights: np.ndarray
    local_pose: np.ndarray
    global_pose: np.ndarray
    global_pose_inv: np.ndarray
    source: str = "<memory>"

    # ----------------------------------------------------------------- sizes
    @property
    def joint_num(self) -> int:
        return len(self.joint_names)

    @property
    def vertex_num(self) -> int:
        return len(self.vertices_cm)

    @property
    def vertices(self) -> np.ndarray:
        """``[V, 3]`` float64 template vertices in mm."""
        return self.vertices_cm * 10.0

    # --------------------------------------------------------- derived data
    @property
    def dof_mask(self) -> np.ndarray:
        """``[J, 3]`` float32: 1 where a joint rotates about that Euler axis."""
        return np.stack([dof_of_joint(n) for n in self.joint_names])

    @property
    def dof_num(self) -> int:
        return int(self.dof_mask.sum())

    @property
    def segmentation(self) -> np.ndarray:
        """``[V]`` int64: the joint with the largest skinning weight of each vertex."""
        return np.argmax(self.skinning_weights, axis=1)

    @property
    def children(self) -> List[List[int]]:
        """Child ids of every joint, in id order."""
        return children_of(self.parents)

    @property
    def root_index(self) -> int:
        """Id of the skeleton's root (the joint whose parent is -1)."""
        return int(np.flatnonzero(self.parents < 0)[0])

    @property
    def tree_order(self) -> List[int]:
        """Joint ids root first, every parent before its children (breadth first)."""
        order, frontier = [], [self.root_index]
        kids = self.children
        while frontier:
            order.extend(frontier)
            frontier = [c for j in frontier for c in kids[j]]
        return order

    def joint_index(self, suffix: str) -> int:
        """Id of the one joint whose name ends with ``suffix`` (e.g. ``'index1'``)."""
        hits = [i for i, n in enumerate(self.joint_names) if n.endswith(suffix)]
        if len(hits) != 1:
            found = "none" if not hits else ", ".join(self.joint_names[i] for i in hits)
            raise HandModelError(
                f"{self._where(SKELETON_FILE)}: expected exactly one joint whose name ends with "
                f"'{suffix}', found {found}; joints: {', '.join(self.joint_names)}"
            )
        return hits[0]

    @property
    def align_joint_indices(self) -> List[int]:
        """Ids of the rigid-alignment joints (index/middle/ring/pinky ``1`` and the wrist)."""
        return [self.joint_index(s) for s in ALIGN_JOINT_SUFFIXES]

    @property
    def non_rigid_joint_indices(self) -> List[int]:
        """Ids of the joints whose skin the non-rigid penetration loss checks (thumb1, wrist)."""
        return [self.joint_index(s) for s in NON_RIGID_JOINT_SUFFIXES]

    def _where(self, filename: str) -> str:
        if self.source.startswith("<"):
            return f"{self.source}/{filename}"
        return str(Path(self.source) / filename)

    # ------------------------------------------------------------ checking
    def validate(self) -> "HandModel":
        """Check the model's consistency; raises :class:`HandModelError` naming the problem."""
        J, V = self.joint_num, self.vertex_num
        if J == 0:
            raise HandModelError(f"{self._where(SKELETON_FILE)}: no joints")
        if V == 0:
            raise HandModelError(f"{self._where(OBJ_FILE)}: no vertices ('v x y z' lines)")
        if len(self.faces) == 0:
            raise HandModelError(f"{self._where(OBJ_FILE)}: no faces ('f a/at b/bt c/ct' lines)")
        roots = [self.joint_names[j] for j in range(J) if self.parents[j] < 0]
        if len(roots) != 1:
            raise HandModelError(
                f"{self._where(SKELETON_FILE)}: the skeleton must have exactly one root "
                f"(parent -1), found {len(roots)}: {', '.join(roots) or 'none'}"
            )
        for j, p in enumerate(self.parents):
            if p >= J or p == j:
                raise HandModelError(
                    f"{self._where(SKELETON_FILE)}: joint {self.joint_names[j]} has parent id {p}, "
                    f"expected -1 or another joint id in 0..{J - 1}"
                )
        if len(self.tree_order) != J:
            stray = sorted(set(range(J)) - set(self.tree_order))
            raise HandModelError(
                f"{self._where(SKELETON_FILE)}: the skeleton has a cycle; joints not reachable from "
                f"the root {roots[0]}: {', '.join(self.joint_names[j] for j in stray)}"
            )
        for name, plural, uv_ref, count in (("vertex", "vertices", self.faces, V),
                                            ("uv", "uvs", self.face_uvs, len(self.uvs))):
            bad = np.argwhere((uv_ref < 0) | (uv_ref >= count))
            if len(bad):
                f = int(bad[0][0])
                raise HandModelError(
                    f"{self._where(OBJ_FILE)}: face {f + 1} refers to {name} "
                    f"{int(uv_ref[f, bad[0][1]]) + 1}, but the file has {count} {plural} (1-based)"
                )
        if self.skinning_weights.shape != (V, J):
            raise HandModelError(
                f"{self._where(WEIGHTS_FILE)}: weights of shape {self.skinning_weights.shape}, "
                f"expected ({V}, {J}) for {V} vertices and {J} joints"
            )
        weightless = np.flatnonzero(self.skinning_weights.sum(1) <= 0)
        if len(weightless):
            raise HandModelError(
                f"{self._where(WEIGHTS_FILE)}: {len(weightless)} vertices have no skinning weight, "
                f"first vertex {int(weightless[0])}; every vertex needs a positive weight"
            )
        if not np.all(np.isfinite(self.vertices_cm)):
            raise HandModelError(f"{self._where(OBJ_FILE)}: non-finite vertex coordinates")
        for key, fname in POSE_FILES.items():
            pose = getattr(self, key)
            if pose.shape != (J, 4, 4) or not np.all(np.isfinite(pose)):
                raise HandModelError(f"{self._where(fname)}: expected {J} finite 4x4 matrices")
        return self


# ------------------------------------------------------------------ reading
# Limits that keep every number the model computes from a hand model finite in float32: the
# file's numbers are at most MAX_ABS_VALUE in size (cm for vertices, mm for poses: 10 km, 1 km),
# indices fit an int32, and a hand-model file is at most MAX_FILE_BYTES.
MAX_ABS_VALUE = 1e6
MAX_INDEX = 2 ** 31 - 1
MAX_FILE_BYTES = 256 * 2 ** 20


def _lines(path: Path):
    """Yield ``(line_number, text)`` of the non-comment, non-empty lines of a text file."""
    if not path.is_file():
        raise HandModelError(f"{path}: missing hand-model file (a hand-model folder holds "
                             f"{', '.join(HAND_MODEL_FILES)})")
    try:
        text = read_text(path, HandModelError, "hand-model file", MAX_FILE_BYTES)
    except OSError as err:
        raise HandModelError(f"{path}: cannot read the hand-model file ({err.strerror or err})") from None
    for number, line in enumerate(text_lines(text), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield number, line


def _float(token: str, path: Path, number: int, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise HandModelError(f"{path}:{number}: expected a number for {what}, got '{shown(token)}'") from None
    if not math.isfinite(value):
        raise HandModelError(f"{path}:{number}: {what} is not finite ('{shown(token)}')")
    if abs(value) > MAX_ABS_VALUE:
        raise HandModelError(f"{path}:{number}: {what} {shown(token)} is larger than {MAX_ABS_VALUE:g} "
                             "in size, not a plausible hand-model value")
    return value


def _int(token: str, path: Path, number: int, what: str, low: int = -MAX_INDEX) -> int:
    try:
        value = int(token)
    except ValueError:
        raise HandModelError(f"{path}:{number}: expected an integer for {what}, got '{shown(token)}'") from None
    if not low <= value <= MAX_INDEX:
        raise HandModelError(f"{path}:{number}: {what} {shown(token)} is out of range "
                             f"({low}..{MAX_INDEX})")
    return value


def read_obj(path: Path):
    """Read a template ``hand.obj``.

    Returns:
        ``(vertices_cm [V,3] float64, uvs [T,2] float64, faces [F,3] int64, face_uvs [F,3] int64)``,
        indices 0-based.
    """
    verts, uvs, faces, face_uvs = [], [], [], []
    for number, text in _lines(path):
        words = text.split()
        tag = words[0]
        if tag == "v":
            if len(words) < 4:
                raise HandModelError(f"{path}:{number}: expected 'v x y z', got '{shown(text)}'")
            verts.append([_float(w, path, number, "a vertex coordinate") for w in words[1:4]])
        elif tag == "vt":
            if len(words) < 3:
                raise HandModelError(f"{path}:{number}: expected 'vt u v', got '{shown(text)}'")
            uvs.append([_float(w, path, number, "a uv coordinate") for w in words[1:3]])
        elif tag == "f":
            if len(words) != 4:
                raise HandModelError(
                    f"{path}:{number}: expected a triangle 'f a/at b/bt c/ct', got {len(words) - 1} corners"
                )
            vi, ti = [], []
            for corner in words[1:]:
                parts = corner.split("/")
                if len(parts) < 2 or not parts[1]:
                    raise HandModelError(
                        f"{path}:{number}: expected 'vertex/uv' indices in a face corner, got '{shown(corner)}'"
                    )
                vi.append(_int(parts[0], path, number, "a face vertex index", 1) - 1)
                ti.append(_int(parts[1], path, number, "a face uv index", 1) - 1)
            faces.append(vi)
            face_uvs.append(ti)
    return (
        np.asarray(verts, np.float64).reshape(-1, 3),
        np.asarray(uvs, np.float64).reshape(-1, 2),
        np.asarray(faces, np.int64).reshape(-1, 3),
        np.asarray(face_uvs, np.int64).reshape(-1, 3),
    )


def read_skeleton(path: Path):
    """Read ``skeleton.txt``. Returns ``(joint_names, parents [J] int64)`` indexed by joint id."""
    entries = {}
    for number, text in _lines(path):
        words = text.split()
        if len(words) != 3:
            raise HandModelError(f"{path}:{number}: expected 'name id parent_id', got '{shown(text)}'")
        name = words[0]
        jid = _int(words[1], path, number, "the joint id", 0)
        parent = _int(words[2], path, number, "the parent id", -1)
        if jid in entries:
            raise HandModelError(f"{path}:{number}: joint id {jid} is given twice")
        if name in [e[0] for e in entries.values()]:
            raise HandModelError(f"{path}:{number}: joint name {name} is given twice")
        entries[jid] = (name, parent, number)
    J = len(entries)
    if sorted(entries) != list(range(J)):
        stray = sorted(set(entries) - set(range(J)))
        raise HandModelError(f"{path}:{entries[stray[0]][2]}: joint id {stray[0]} out of range: the "
                             f"{J} joints must have the ids 0..{J - 1}")
    names = [entries[j][0] for j in range(J)]
    parents = np.array([entries[j][1] for j in range(J)], np.int64)
    for j in range(J):
        if parents[j] < -1 or parents[j] >= J:
            raise HandModelError(
                f"{path}:{entries[j][2]}: parent id {parents[j]} of {names[j]} is not -1 or a joint id 0..{J - 1}"
            )
    return names, parents


def _joint_lookup(names: Sequence[str], name: str, path: Path, number: int) -> int:
    try:
        return list(names).index(name)
    except ValueError:
        raise HandModelError(
            f"{path}:{number}: unknown joint '{shown(name)}'; the skeleton's joints are: {', '.join(names)}"
        ) from None


def read_skinning_weights(path: Path, joint_names: Sequence[str], vertex_num: int) -> np.ndarray:
    """Read ``skinning_weight.txt``. Returns ``[V, J]`` float64 weights."""
    weights = np.zeros((vertex_num, len(joint_names)), np.float64)
    for number, text in _lines(path):
        words = text.split()
        if len(words) < 3 or len(words) % 2 == 0:
            raise HandModelError(
                f"{path}:{number}: expected 'vertex_idx joint_name weight [joint_name weight ...]', got '{shown(text)}'"
            )
        v = _int(words[0], path, number, "the vertex index", 0)
        if not 0 <= v < vertex_num:
            raise HandModelError(
                f"{path}:{number}: vertex index {v} out of range; hand.obj has {vertex_num} vertices (0-based)"
            )
        for name, w in zip(words[1::2], words[2::2]):
            j = _joint_lookup(joint_names, name, path, number)
            weights[v, j] = _float(w, path, number, f"the weight of {name}")
    return weights


def read_poses(path: Path, joint_names: Sequence[str]) -> np.ndarray:
    """Read a ``*_pose*.txt`` file. Returns ``[J, 4, 4]`` float64 (mm)."""
    poses = np.zeros((len(joint_names), 4, 4), np.float64)
    seen = set()
    for number, text in _lines(path):
        words = text.split()
        if len(words) != 17:
            raise HandModelError(
                f"{path}:{number}: expected a joint name and 16 numbers (4x4 row-major), got {len(words) - 1} numbers"
            )
        j = _joint_lookup(joint_names, words[0], path, number)
        poses[j] = np.array([_float(w, path, number, "a matrix entry") for w in words[1:]]).reshape(4, 4)
        seen.add(j)
    missing = [joint_names[j] for j in range(len(joint_names)) if j not in seen]
    if missing:
        raise HandModelError(f"{path}: no matrix for joints {', '.join(missing)}")
    return poses


def load_hand_model(folder: os.PathLike | str) -> HandModel:
    """Load and validate a hand-model folder (the released DeepHandMesh model drops in unchanged).

    Raises:
        HandModelError: a file is missing or malformed; the message names the file and line.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise HandModelError(f"{folder}: not a folder; a hand-model folder holds {', '.join(HAND_MODEL_FILES)}")
    verts, uvs, faces, face_uvs = read_obj(folder / OBJ_FILE)
    names, parents = read_skeleton(folder / SKELETON_FILE)
    weights = read_skinning_weights(folder / WEIGHTS_FILE, names, len(verts))
    poses = {key: read_poses(folder / fname, names) for key, fname in POSE_FILES.items()}
    model = HandModel(names, parents, verts, uvs, faces, face_uvs, weights, source=str(folder), **poses)
    return model.validate()


def is_hand_model_folder(folder: os.PathLike | str) -> bool:
    """True when ``folder`` holds all six hand-model files."""
    return all((Path(folder) / f).is_file() for f in HAND_MODEL_FILES)


# ------------------------------------------------------------------ writing
def format_number(x: float) -> str:
    """Shortest positional decimal that parses back to exactly ``x`` (float64)."""
    return np.format_float_positional(float(x), unique=True, trim="-")


def save_hand_model(model: HandModel, folder: os.PathLike | str) -> None:
    """Write the six hand-model files into ``folder`` (created if needed).

    Numbers are written in their shortest exact decimal form, so reading the files back
    gives bit-identical float64 arrays, and writing those again gives identical bytes.
    """
    folder = make_folder(folder)
    fmt = format_number
    obj = ["# DeepHandMesh hand model: v in cm, f vertex/uv (1-based)"]
    obj += ["v " + " ".join(fmt(c) for c in v) for v in model.vertices_cm]
    obj += ["vt " + " ".join(fmt(c) for c in t) for t in model.uvs]
    obj += [
        "f " + " ".join(f"{a + 1}/{b + 1}" for a, b in zip(f, ft))
        for f, ft in zip(model.faces, model.face_uvs)
    ]
    atomic_write_text(folder / OBJ_FILE, "\n".join(obj) + "\n")

    skel = ["# joint_name joint_id parent_id"]
    skel += [f"{n} {j} {int(p)}" for j, (n, p) in enumerate(zip(model.joint_names, model.parents))]
    atomic_write_text(folder / SKELETON_FILE, "\n".join(skel) + "\n")

    lines = ["# vertex_idx joint_name weight ..."]
    for v, row in enumerate(model.skinning_weights):
        pairs = "".join(f"{model.joint_names[j]} {fmt(row[j])} " for j in np.flatnonzero(row))
        lines.append(f"{v} {pairs}")
    atomic_write_text(folder / WEIGHTS_FILE, "\n".join(lines) + "\n")

    for key, fname in POSE_FILES.items():
        pose = getattr(model, key)
        lines = ["# joint_name 4x4 row-major (mm)"]
        lines += [n + " " + "".join(fmt(x) + " " for x in pose[j].reshape(-1)) for j, n in enumerate(model.joint_names)]
        atomic_write_text(folder / fname, "\n".join(lines) + "\n")


def save_obj(path: os.PathLike | str, vertices_mm: np.ndarray, model: HandModel) -> None:
    """Write a posed mesh in the original's output layout: ``v`` in mm, the template's ``vt``, ``f v/vt``.

    Args:
        vertices_mm: ``[V, 3]`` vertices in mm.
    """
    vertices_mm = np.asarray(vertices_mm, np.float64)
    if vertices_mm.shape != (model.vertex_num, 3):
        raise ValueError(f"save_obj: expected vertices of shape ({model.vertex_num}, 3), got {vertices_mm.shape}")
    out = [f"v {x!r} {y!r} {z!r}" for x, y, z in vertices_mm.tolist()]
    out += [f"vt {u!r} {v!r}" for u, v in model.uvs.tolist()]
    out += [
        "f " + " ".join(f"{a + 1}/{b + 1}" for a, b in zip(f, ft))
        for f, ft in zip(model.faces.tolist(), model.face_uvs.tolist())
    ]
    atomic_write_text(path, "\n".join(out) + "\n")


def dof_description(model: HandModel, joint: int) -> str:
    """Human-readable axes a joint rotates about, e.g. ``'z'`` or ``'none'``."""
    axes = "".join(a for a, m in zip(AXES, model.dof_mask[joint]) if m)
    return ", ".join(axes) if axes else "none"
