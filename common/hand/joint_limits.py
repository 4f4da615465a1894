"""Joint limits for hand-edited poses: the range of each Euler angle of each joint type, in degrees.

Axes are the hand model's joint frames (docs/design.md, "Joints, angles and degrees of freedom"):
``x`` along the bone (**twist**), ``y`` towards the palm side, so a rotation about it moves the bone
sideways (**spread**, abduction/adduction), ``z = x × y`` (**flexion**: positive curls towards the
palm, negative is hyperextension).

Source: the American Academy of Orthopaedic Surgeons' average ranges of motion (*Joint Motion:
Method of Measuring and Recording*, AAOS 1965; the table reproduced in Norkin & White, *Measurement
of Joint Motion*), for flexion and hyperextension of every finger and thumb joint and for the
thumb's carpometacarpal abduction. The rest are our choices, marked "ours" below: AAOS gives no
figure for them (finger spread, twist, the virtual ``thumb0`` joint), or this model's thumb frame
does not line up with the clinical axes.

=============  ==========  ==============  ==============  ===============================================
joint          name        twist x         spread y        flexion z
=============  ==========  ==============  ==============  ===============================================
finger MCP     ``X1``      −10…10 (ours)   −20…20 (ours)   −45…90: flexion 90, hyperextension 45 (AAOS)
finger PIP     ``X2``      —               —               0…100: flexion 100, no hyperextension (AAOS)
finger DIP     ``X3``      —               —               −10…90: flexion 90, hyperextension 10 (AAOS)
thumb base     ``thumb0``  −10…10 (ours)   −10…10 (ours)   −10…10 (ours)
thumb CMC      ``thumb1``  −15…15 (ours)   −30…40          −20…50
thumb MCP      ``thumb2``  —               —               0…50: flexion 50, no hyperextension (AAOS)
thumb IP       ``thumb3``  —               —               −20…80: flexion 80, hyperextension 20 (AAOS)
=============  ==========  ==============  ==============  ===============================================

Notes. *Twist* is not a voluntary motion at these joints; the passive play of the finger MCP joints
is allowed (ours). *Finger spread*: about 20° each way at the MCP joints is the figure usually
quoted; the index–little spread is not in the AAOS table (ours). ``thumb0`` sits inside the palm
between the wrist and the CMC joint (it has no anatomical counterpart) and gets a small range
(ours). *Thumb CMC spread*: AAOS gives 70° of abduction; in the rest pose of the default hand (and
of the released model's layout) the thumb already points 40° away from the index, and positive ``y``
moves it towards the index, so the 70° become −30 (further away) … +40 (against the index).
*Thumb CMC flexion*: AAOS gives flexion 15, extension 20 in the plane of the palm; this joint's ``z``
axis is turned 45° towards the palm, so its curl across the palm mixes CMC flexion with opposition,
and we allow 50 (the ``fist`` preset uses 30). Every preset in ``demo/poses`` lies within these
limits (the tests check it). The wrist (the root) and the ``_null`` tips have no degree of freedom.

With the limits lifted, every degree of freedom ranges over ±180° (:data:`FREE_RANGE_DEG`).
"""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np

from common.hand.hand_model import HandModel

Range = Tuple[float, float]

# (twist x, spread y, flexion z) ranges in degrees, by joint type; see the module docstring.
JOINT_LIMITS_DEG: Dict[str, Tuple[Range, Range, Range]] = {
    "finger MCP": ((-10, 10), (-20, 20), (-45, 90)),
    "finger PIP": ((0, 0), (0, 0), (0, 100)),
    "finger DIP": ((0, 0), (0, 0), (-10, 90)),
    "thumb base": ((-10, 10), (-10, 10), (-10, 10)),
    "thumb CMC": ((-15, 15), (-30, 40), (-20, 50)),
    "thumb MCP": ((0, 0), (0, 0), (0, 50)),
    "thumb IP": ((0, 0), (0, 0), (-20, 80)),
}
# Joint-name suffix (after ``b_r_``-like prefixes) -> joint type.
JOINT_TYPES = {
    "thumb0": "thumb base", "thumb1": "thumb CMC", "thumb2": "thumb MCP", "thumb3": "thumb IP",
    "1": "finger MCP", "2": "finger PIP", "3": "finger DIP",
}
FREE_RANGE_DEG = 180.0
AXIS_NAMES = ("twist", "spread", "flexion")  # x, y, z


def joint_type(name: str) -> str | None:
    """The limit-table row of a joint name (``'b_r_index2'`` → ``'finger PIP'``); None for joints
    without degrees of freedom (the wrist, the ``_null`` tips)."""
    if name.endswith("null"):
        return None
    for suffix in ("thumb0", "thumb1", "thumb2", "thumb3", "1", "2", "3"):
        if name.endswith(suffix):
            return JOINT_TYPES[suffix]
    return None


def joint_limits_deg(model: HandModel, lifted: bool = False) -> np.ndarray:
    """``[J, 3, 2]`` lower/upper angle (degrees) of every joint's x, y, z; ``[0, 0]`` where the joint
    has no degree of freedom. ``lifted``: ±:data:`FREE_RANGE_DEG` on every degree of freedom."""
    limits = np.zeros((model.joint_num, 3, 2))
    for j, name in enumerate(model.joint_names):
        kind = joint_type(name)
        if kind is not None:
            limits[j] = JOINT_LIMITS_DEG[kind]
    if lifted:
        limits[..., 0], limits[..., 1] = -FREE_RANGE_DEG, FREE_RANGE_DEG
    return limits * model.dof_mask[:, :, None]


def limit_violations(model: HandModel, euler_deg: np.ndarray, limits_deg: np.ndarray) -> list:
    """Human-readable list of the angles of ``euler_deg [J, 3]`` outside ``limits_deg [J, 3, 2]``,
    e.g. ``['b_r_index1 flexion 120° > 90°']``."""
    out = []
    for j, k in zip(*np.nonzero((euler_deg < limits_deg[..., 0]) | (euler_deg > limits_deg[..., 1]))):
        lo, hi = limits_deg[j, k]
        value = euler_deg[j, k]
        bound = f"< {lo:g}°" if value < lo else f"> {hi:g}°"
        out.append(f"{model.joint_names[j]} {AXIS_NAMES[k]} {value:g}° {bound}")
    return out
