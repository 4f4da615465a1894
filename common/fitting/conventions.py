"""21-keypoint orders ("conventions") and where each of their points sits on the hand model.

Every convention lists 21 points; each point names the hand-model joint it is (by the name's
suffix, without the side prefix: ``thumb1``, ``index_null``, ``wrist``) and says whether it is a
fingertip *on the skin*. Sources, all checked against their public documentation:

``dhm``
    The released DeepHandMesh keypoint files (``.pts``, right hand 0-20): the list
    ``db_joint_name`` in the original's ``data/dataset.py`` (facebookresearch/DeepHandMesh), which
    this project reads as ``data.dataset.PTS_JOINT_NAMES``. The model was trained with these
    points on its joints (the original's joint loss compares them with the joints, ``…_null``
    included), so every point is its joint.
``interhand``
    InterHand2.6M's per-hand order: ``annotations/skeleton.txt`` of the data set
    (facebookresearch/InterHand2.6M; ``r_thumb4 0 1`` … ``r_wrist 20 -1``, the left hand
    ``l_…`` 21-41 in the same order; ``root_joint_idx = {'right': 20, 'left': 41}`` in its
    ``data/InterHand2.6M/dataset.py``). Digit joints are numbered from the tip (4) to the base (1),
    ``thumb1`` being the thumb's carpometacarpal joint: the same order as ``dhm``, and fingertips
    annotated the same way, so every point is its joint here too.
``mediapipe``
    MediaPipe Hands' 21 hand landmarks (the Hand Landmarker model card and the ``HandLandmark``
    enum of ``mediapipe.tasks.python.vision``): 0 WRIST, 1 THUMB_CMC, 2 THUMB_MCP, 3 THUMB_IP,
    4 THUMB_TIP, 5-8 INDEX_FINGER_MCP, _PIP, _DIP, _TIP, 9-12 MIDDLE_FINGER_…, 13-16 RING_FINGER_…,
    17-20 PINKY_MCP, _PIP, _DIP, _TIP. Its ``…_TIP`` landmarks are the end of the fingertip.
``openpose``
    OpenPose's hand keypoints ("Hand Output Format" in ``doc/02_output.md`` of
    CMU-Perceptual-Computing-Lab/openpose; the chains ``0-1-2-3-4``, ``0-5-6-7-8``, … of
    ``HAND_PAIRS_RENDER`` in ``include/openpose/hand/handParameters.hpp``): 0 wrist, 1-4 thumb from
    the base (CMC) to the tip, 5-8 index, 9-12 middle, 13-16 ring, 17-20 little finger, each from
    the knuckle (MCP) to the tip. As MediaPipe's, its tips are the end of the fingertip.

Fingertips. A ``…_null`` joint of the model is a bone end near the fingertip's skin (measured:
0.8 mm under the skin on the project's default hand; on the MakeHuman hand from 1.4 mm outside it,
the middle finger, to 1.3 mm inside, the thumb). Where a convention's tip is the end of the finger
on the skin (``surface_tip``), the point is placed on the ``…_null`` joint's bone (its ``x`` axis)
at the distance where that line leaves the model's surface in the rest pose,
:func:`measure_tip_offsets`; the offset moves with the bone, so joints-only forward kinematics
gives it without the mesh.

Left hands: the model is a right hand; the fitter mirrors left-hand keypoints (``x → −x``) before
fitting and says so in its output (:mod:`common.fitting.solver`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from common.fitting.errors import FitInputError

FINGERS = ("thumb", "index", "middle", "ring", "pinky")
KEYPOINT_COUNT = 21


@dataclass(frozen=True)
class Keypoint:
    """One point of a convention: its own name, the model joint (name suffix) and whether it is a
    fingertip on the skin rather than the joint itself."""

    name: str
    joint: str
    surface_tip: bool = False


@dataclass(frozen=True)
class Convention:
    name: str
    description: str
    keypoints: Tuple[Keypoint, ...]

    @property
    def names(self) -> List[str]:
        return [k.name for k in self.keypoints]


def _tip_first(prefix: str, finger_names: Dict[str, str], tip_suffix: str = "4") -> List[Keypoint]:
    """Thumb, index, middle, ring, pinky, each from the tip to the base (joint numbers 4…1), then
    the wrist: the ``.pts`` / InterHand2.6M order."""
    out = []
    for finger in FINGERS:
        label = finger_names[finger]
        out.append(Keypoint(f"{prefix}{label}{tip_suffix}", f"{finger}_null"))
        for number in (3, 2, 1):
            out.append(Keypoint(f"{prefix}{label}{number}", f"{finger}{number}"))
    out.append(Keypoint(f"{prefix}wrist", "wrist"))
    return out


def _wrist_first(names: Sequence[Tuple[str, str, str, str]], wrist: str) -> List[Keypoint]:
    """The wrist, then each digit from its base to its tip (the MediaPipe / OpenPose order).
    ``names``: per digit (thumb…pinky) the names of its four points, base first."""
    out = [Keypoint(wrist, "wrist")]
    for finger, points in zip(FINGERS, names):
        for number, name in zip((1, 2, 3), points[:3]):
            out.append(Keypoint(name, f"{finger}{number}"))
        out.append(Keypoint(points[3], f"{finger}_null", surface_tip=True))
    return out


_DHM = [Keypoint(name, name) for name in (
    "thumb_null", "thumb3", "thumb2", "thumb1", "index_null", "index3", "index2", "index1",
    "middle_null", "middle3", "middle2", "middle1", "ring_null", "ring3", "ring2", "ring1",
    "pinky_null", "pinky3", "pinky2", "pinky1", "wrist")]

_MEDIAPIPE = _wrist_first([
    ("THUMB_CMC", "THUMB_MCP", "THUMB_IP", "THUMB_TIP"),
    ("INDEX_FINGER_MCP", "INDEX_FINGER_PIP", "INDEX_FINGER_DIP", "INDEX_FINGER_TIP"),
    ("MIDDLE_FINGER_MCP", "MIDDLE_FINGER_PIP", "MIDDLE_FINGER_DIP", "MIDDLE_FINGER_TIP"),
    ("RING_FINGER_MCP", "RING_FINGER_PIP", "RING_FINGER_DIP", "RING_FINGER_TIP"),
    ("PINKY_MCP", "PINKY_PIP", "PINKY_DIP", "PINKY_TIP"),
], "WRIST")

_OPENPOSE = _wrist_first([tuple(f"{digit}_{part}" for part in parts) for digit, parts in (
    ("thumb", ("cmc", "mcp", "ip", "tip")),
    ("index", ("mcp", "pip", "dip", "tip")),
    ("middle", ("mcp", "pip", "dip", "tip")),
    ("ring", ("mcp", "pip", "dip", "tip")),
    ("little", ("mcp", "pip", "dip", "tip")),
)], "wrist")

_INTERHAND = _tip_first("r_", {f: f for f in FINGERS})

CONVENTIONS: Dict[str, Convention] = {
    "dhm": Convention("dhm", "DeepHandMesh .pts files, right hand (indices 0-20)", tuple(_DHM)),
    "mediapipe": Convention("mediapipe", "MediaPipe Hands' 21 hand landmarks", tuple(_MEDIAPIPE)),
    "openpose": Convention("openpose", "OpenPose's 21 hand keypoints", tuple(_OPENPOSE)),
    "interhand": Convention("interhand", "InterHand2.6M, one hand (0-20 right, 21-41 left: the same order)",
                            tuple(_INTERHAND)),
}


def get_convention(name: str) -> Convention:
    """The convention called ``name``; an unknown name raises :class:`FitInputError` listing the known ones."""
    if not isinstance(name, str) or name.lower() not in CONVENTIONS:
        raise FitInputError(f"--convention {name}: unknown keypoint convention; expected one of "
                            f"{', '.join(CONVENTIONS)}")
    return CONVENTIONS[name.lower()]


@dataclass(frozen=True)
class KeypointMap:
    """Where a convention's 21 points are on a particular hand model.

    Attributes:
        convention: the convention.
        joint_index: ``[21]`` model joint of each point.
        offset_mm: ``[21]`` distance (mm) from that joint along its ``x`` axis (the bone's direction):
            0 for points on joints, the measured tip offset for fingertips on the skin.
    """

    convention: Convention
    joint_index: np.ndarray
    offset_mm: np.ndarray


def keypoint_map(hand_model, convention: Convention, tip_offsets: Dict[str, float] | None = None) -> KeypointMap:
    """The model joints (and fingertip offsets) of ``convention``'s points on ``hand_model``.

    Args:
        hand_model: a :class:`common.hand.hand_model.HandModel` (joints found by name suffix).
        tip_offsets: ``{finger: mm}`` from :func:`measure_tip_offsets`; needed when the convention
            has fingertips on the skin.
    """
    joints, offsets = [], []
    for point in convention.keypoints:
        joints.append(hand_model.joint_index(point.joint))
        if point.surface_tip:
            if tip_offsets is None:
                raise ValueError(f"keypoint_map: the {convention.name} convention's tips lie on the skin; "
                                 "give tip_offsets (measure_tip_offsets)")
            offsets.append(float(tip_offsets[point.joint[:-len("_null")]]))
        else:
            offsets.append(0.0)
    return KeypointMap(convention, np.asarray(joints, np.int64), np.asarray(offsets, np.float64))


def ray_surface_hits(origin: np.ndarray, direction: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Signed distances ``t`` at which the line ``origin + t·direction`` crosses the triangles
    (Möller–Trumbore on every face at once; ``direction`` a unit vector, mm)."""
    a, b, c = (vertices[faces[:, i]] for i in range(3))
    e1, e2 = b - a, c - a
    p = np.cross(direction, e2)
    det = (e1 * p).sum(-1)
    ok = np.abs(det) > 1e-12
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = origin - a
    u = (s * p).sum(-1) * inv
    q = np.cross(s, e1)
    v = (direction * q).sum(-1) * inv
    t = (e2 * q).sum(-1) * inv
    hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1)
    return t[hit]


def measure_tip_offsets(joint_names: Sequence[str], parents: Sequence[int], rest_pose: np.ndarray,
                        rest_vertices: np.ndarray, faces: np.ndarray) -> Dict[str, float]:
    """Per digit, where the fingertip's skin is along the last bone: the largest distance (mm)
    from the ``…_null`` joint along its ``x`` axis at which that line crosses the surface, looking
    at most one last-bone length either way (negative: the joint lies outside the skin).

    Args:
        joint_names, parents: the skeleton.
        rest_pose: ``[J, 4, 4]`` global rest poses (mm), e.g. the refined template poses ``G'``.
        rest_vertices: ``[V, 3]`` the rest-pose surface in the same frame (mm).
        faces: ``[F, 3]``.
    Returns:
        ``{finger: offset_mm}`` for thumb…pinky.
    Raises:
        ValueError: a digit's line never meets the surface (the mesh does not close over the tip).
    """
    names = list(joint_names)
    out = {}
    for finger in FINGERS:
        hits = [j for j, n in enumerate(names) if n.endswith(f"{finger}_null")]
        if len(hits) != 1:
            raise ValueError(f"measure_tip_offsets: expected one joint named '…{finger}_null', found {len(hits)}")
        tip = hits[0]
        base = int(parents[tip])
        origin = rest_pose[tip, :3, 3]
        axis = rest_pose[tip, :3, 0] / np.linalg.norm(rest_pose[tip, :3, 0])
        length = float(np.linalg.norm(origin - rest_pose[base, :3, 3]))
        t = ray_surface_hits(origin, axis, np.asarray(rest_vertices, np.float64), np.asarray(faces))
        t = t[np.abs(t) <= length]
        if t.size == 0:
            raise ValueError(f"measure_tip_offsets: the line of {names[tip]}'s bone does not meet the mesh "
                             f"within {length:.1f} mm of the joint")
        out[finger] = float(t.max())
    return out
