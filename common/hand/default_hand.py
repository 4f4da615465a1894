"""The project's own default right hand: a generated template in the released hand-model format.

:func:`make_default_hand` builds, deterministically (no randomness) and in a fraction of a second,
a plausible adult right hand (not any particular person) with the released model's 22 joints (same
names, ids and parents as its ``skeleton.txt``; ``b_r_wrist``, id 21, is the root), a closed
triangle mesh (4,932 vertices, 9,860 triangles), smooth skinning weights and the three pose files.
``python -m common.hand.default_hand --out DIR`` writes the six files with
:func:`~common.hand.hand_model.save_hand_model`.

World frame (mm; the mesh is stored in cm as the format wants), rest pose a flat open hand with
the fingers slightly spread:

* origin at the wrist joint (the wrist crease),
* ``+y`` from the wrist towards the middle finger's knuckle (the fingers point up ``+y``),
* ``+z`` the palm normal (out of the palm; the back of the hand faces ``-z``),
* ``+x`` the radial side (towards the thumb); ``x, y, z`` is right-handed.

Looking at the palm (from ``+z``) with the fingers up, the thumb is on the viewer's right, as for
any right hand seen palm-on (from the back it is on the left).

Joint frames (docs/design.md, "Joints, angles and degrees of freedom"): ``x`` along the bone towards
the child, ``y`` towards the palm side (the side a digit curls to), ``z = x × y`` the flexion axis,
so a positive ``z`` angle at ``X1/X2/X3`` curls a finger towards the palm and at the thumb joints
curls the thumb across it; a ``_null`` tip keeps its parent's orientation. The wrist's ``x`` points
at the middle knuckle (world ``+y``), its ``y`` out of the palm (``+z``) and its ``z`` to the thumb
(``+x``): positive ``z`` flexes the hand palm-wards. These are the conventions of the released model
(and of ``makehuman_right``). Thumb joints: ``thumb0`` inside the palm between the wrist and the CMC
joint, ``thumb1`` the CMC joint, ``thumb2`` the MCP joint, ``thumb3`` the IP joint, ``thumb_null``
the tip.

Proportions (approximate adult figures from anthropometric studies of the hand's bones): wrist
crease to middle fingertip 187 mm; wrist to middle knuckle 95 mm; breadth across the index-little
knuckles 80 mm; knuckles on an arc (index 92, middle 95, ring 91.5, little 83 mm from the wrist);
phalanges (proximal / middle / distal) index 40/23/18, middle 45/27/19, ring 42/26/19, little
33/18/17 mm, thumb metacarpal 45, proximal 32, distal 27 mm; fingers 17-19.5 mm wide at the base
tapering to 13.5-15 mm at the tip; the thumb's CMC joint on the radial side a third of the way from
the wrist to the index knuckle, the thumb pointing 40° away from the index and rotated 45° towards
the palm.

Mesh: one closed, consistently outward-oriented, genus-0 triangle surface built from quad grids: a
palm tube whose top rim is split into the four finger tubes (neighbouring fingers share a short
web edge), a thumb tube grown out of a hole on the palm's radial side through a thenar mound,
rounded fingertips and a closed wrist cap. Each part has its own uv chart (cylindrical unwrap,
seams duplicated).

Skinning: a vertex between joint ``X1`` and ``X2`` belongs to ``X1`` (the bone from a joint to its
child moves with that joint). Weights pass smoothly (smoothstep along the bone) from a parent to a
child joint over ±8 mm on the back of a digit and wider on the palm side, where the skin folds as
the digit flexes, so that a fist neither tears nor collapses. The palm goes to the wrist, the
thenar region to ``b_r_thumb0``/``b_r_thumb1``; tips (``_null``) carry no weight. Weights have six
decimals, as in the released files.
"""
from __future__ import annotations

import argparse
import sys
from collections import deque
from typing import Dict, List, Sequence, Tuple

import numpy as np

from common.errors import exit_code
from common.hand.hand_model import HandModel, save_hand_model

DEFAULT_HAND_NAME = "deephandmesh_default_right"

JOINT_NAMES = [
    "b_r_thumb_null", "b_r_thumb3", "b_r_thumb2", "b_r_thumb1", "b_r_thumb0",
    "b_r_index_null", "b_r_index3", "b_r_index2", "b_r_index1",
    "b_r_middle_null", "b_r_middle3", "b_r_middle2", "b_r_middle1",
    "b_r_ring_null", "b_r_ring3", "b_r_ring2", "b_r_ring1",
    "b_r_pinky_null", "b_r_pinky3", "b_r_pinky2", "b_r_pinky1",
    "b_r_wrist",
]
PARENTS = [1, 2, 3, 4, 21, 6, 7, 8, 21, 10, 11, 12, 21, 14, 15, 16, 21, 18, 19, 20, 21, -1]
_J = {name[4:]: j for j, name in enumerate(JOINT_NAMES)}  # "index1" -> 8

# name, knuckle (MCP) position, splay (deg, + = radial), phalanges, width at base / tip (mm)
_FINGERS = (
    ("index", (20.0, 92.0, 0.0), 6.0, (40.0, 23.0, 18.0), 19.0, 14.5),
    ("middle", (0.0, 95.0, 0.0), 0.0, (45.0, 27.0, 19.0), 19.5, 15.0),
    ("ring", (-19.5, 91.5, 0.0), -5.0, (42.0, 26.0, 19.0), 18.5, 14.5),
    ("pinky", (-38.5, 83.0, 0.0), -11.0, (33.0, 18.0, 17.0), 17.0, 13.5),
)
_THUMB0 = np.array([9.0, 13.0, 4.0])
_THUMB_CMC = np.array([17.0, 30.0, 8.0])
_THUMB_LENGTHS = (45.0, 32.0, 27.0)  # metacarpal, proximal, distal
_THUMB_SPREAD, _THUMB_PALMAR_TILT, _THUMB_PAD_TILT = 40.0, 45.0, 50.0  # degrees

_HOLE_PHI = (-35.0, 75.0)  # where the thumb leaves the palm: outline angle (deg, 0 radial, 90 palmar)
_HOLE_Y = (8.0, 58.0)      # ... and height (mm)
_THUMB_FREE = 40.0         # the thumb tube is round from here (mm from the CMC joint along the thumb)
_THENAR = 7.0              # bulge of the thenar mound (mm)
_RING = 20          # vertices around a finger
_WRIST_Y = -12.0    # the wrist cap (a short stub of forearm below the wrist crease)
_PALM_LEVELS = 30   # palm vertex rows from the wrist cap to the finger rim
_STEP = 3.0         # target ring spacing along the digits (mm)
_TIP_OVERHANG = 1.0  # skin beyond the tip joint (mm)
_BLEND_BACK, _BLEND_PALM = 8.0, 1.05  # skinning blend half-width: mm + factor x palmar depth
_THUMB_CORE, _THUMB_FADE = 14.0, 30.0  # the thumb joints move what lies within 14 mm of the thumb's
# bones (the thumb and the thenar mound), fading to nothing 30 mm further out


# ----------------------------------------------------------------------------- small helpers
def _unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _smoothstep(t) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _frame(x_axis, palm_dir) -> np.ndarray:
    """3x3 rotation with columns x (bone), y (towards the palm, made orthogonal), z = x × y."""
    x = _unit(x_axis)
    y = _unit(palm_dir - np.dot(palm_dir, x) * x)
    return np.stack([x, y, np.cross(x, y)], axis=1)


def _pose(rotation, translation) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rotation, translation
    return m


def _superellipse(phi, power=3.0):
    c, s = np.cos(phi), np.sin(phi)
    return np.sign(c) * np.abs(c) ** (2 / power), np.sign(s) * np.abs(s) ** (2 / power)


# ----------------------------------------------------------------------------- skeleton
def _finger_geometry():
    """Per finger: dict with knuckle, direction, lengths, frame and joint positions."""
    out = []
    for name, mcp, splay, lengths, w_base, w_tip in _FINGERS:
        a = np.radians(splay)
        u = np.array([np.sin(a), np.cos(a), 0.0])
        stations = np.concatenate([[0.0], np.cumsum(lengths)])
        out.append(dict(name=name, mcp=np.array(mcp), u=u, lengths=lengths, stations=stations,
                        frame=_frame(u, np.array([0.0, 0.0, 1.0])), w_base=w_base, w_tip=w_tip,
                        joints=np.array(mcp) + stations[:, None] * u))
    return out


def _thumb_geometry():
    # 40° from the index direction, the spread turned 45° out of the hand plane towards the palm.
    u_index = _finger_geometry()[0]["u"]
    radial = np.array([u_index[1], -u_index[0], 0.0])
    t, p = np.radians(_THUMB_SPREAD), np.radians(_THUMB_PALMAR_TILT)
    d = np.cos(t) * u_index + np.sin(t) * (np.cos(p) * radial + np.sin(p) * np.array([0.0, 0.0, 1.0]))
    q = np.radians(_THUMB_PAD_TILT)
    pad = np.array([-np.cos(q), 0.0, np.sin(q)])  # the thumb pad faces the palm and the fingers
    stations = np.concatenate([[0.0], np.cumsum(_THUMB_LENGTHS)])
    return dict(d=d, frame=_frame(d, pad), stations=stations, joints=_THUMB_CMC + stations[:, None] * d)


def _skeleton():
    """Global poses ``[22, 4, 4]`` (mm) of the default hand."""
    G = np.zeros((len(JOINT_NAMES), 4, 4))
    G[_J["wrist"]] = _pose(_frame([0.0, 1.0, 0.0], np.array([0.0, 0.0, 1.0])), np.zeros(3))
    for f in _finger_geometry():
        for k, suffix in enumerate(("1", "2", "3", "_null")):
            G[_J[f["name"] + suffix]] = _pose(f["frame"], f["joints"][k])
    th = _thumb_geometry()
    # thumb0: inside the palm, its bone pointing at the CMC joint; same palm-side convention.
    G[_J["thumb0"]] = _pose(_frame(_THUMB_CMC - _THUMB0, th["frame"][:, 1]), _THUMB0)
    for k, suffix in enumerate(("1", "2", "3", "_null")):
        G[_J["thumb" + suffix]] = _pose(th["frame"], th["joints"][k])
    return G


# ----------------------------------------------------------------------------- surface pieces
def _finger_radii(f, s):
    """Half-width (lateral), palmar and dorsal half-thickness of finger ``f`` at ``s`` mm from the knuckle."""
    length = f["stations"][-1]
    t = np.clip(s / length, 0.0, 1.0)
    a = 0.5 * (f["w_base"] + (f["w_tip"] - f["w_base"]) * t)
    for knuckle in f["stations"][1:3]:  # slightly thicker joints
        a = a + 0.35 * np.exp(-(((s - knuckle) / 4.0) ** 2))
    palmar = a * (0.9 + 0.06 * t)        # fuller pad towards the tip
    dorsal = a * (0.76 - 0.12 * t)       # flatter nail side towards the tip
    return a, palmar, dorsal


def _finger_point(f, s, theta):
    """Surface point of finger ``f`` at ``s`` along the bone, angle ``theta`` from radial to palmar."""
    a, pal, dor = _finger_radii(f, s)
    s, theta = np.broadcast_arrays(s, theta)
    c, n = np.cos(theta), np.sin(theta)
    lateral, palm = f["frame"][:, 2], f["frame"][:, 1]
    b = np.where(n > 0, pal, dor)
    return (f["mcp"] + s[..., None] * f["u"] + (a * c)[..., None] * lateral + (b * n)[..., None] * palm)


def _finger_base_s(f, theta):
    """Where the finger tube starts: at the web on the palm side and between fingers, over the knuckle on the back."""
    web = 0.45 * f["lengths"][0]
    back = 4.0
    return web - (web - back) * np.maximum(0.0, -np.sin(theta)) ** 0.8


def _palm_outline(y):
    """Radial x, ulnar x, dorsal z, palmar z of the palm cross-section at height ``y``."""
    radial = np.interp(y, [-12, 0, 30, 60, 80, 110], [27.0, 27.5, 30.0, 31.5, 31.0, 30.0])
    ulnar = np.interp(y, [-12, 0, 30, 55, 75, 110], [-28.5, -29.5, -38.0, -45.5, -48.5, -49.0])
    dorsal = np.interp(y, [-12, 0, 30, 60, 90], [-17.0, -16.0, -13.0, -11.5, -10.5])
    palmar = np.interp(y, [-12, 0, 30, 60, 85, 105], [18.0, 18.0, 17.5, 16.5, 15.0, 11.0])
    return radial, ulnar, dorsal, palmar


def _palm_point(phi, y):
    radial, ulnar, dorsal, palmar = _palm_outline(y)
    c, s = _superellipse(phi)
    x = 0.5 * (radial + ulnar) + 0.5 * (radial - ulnar) * c
    z = np.where(s > 0, palmar, -dorsal) * s
    # palm hollow between the thenar and hypothenar pads
    hollow = np.exp(-(((x + 6.0) / 16.0) ** 2) - (((y - 55.0) / 28.0) ** 2))
    z = np.where(s > 0, z * (1.0 - 0.13 * hollow), z)
    return np.stack([x, np.broadcast_to(y, np.shape(x)), z], axis=-1)


def _palm_phi(rim_xz, y):
    """Outline parameters for the palm columns: the same fraction of the way round the palm outline
    at height ``y`` as each rim vertex is round the rim (both from the radial-most point), so the
    columns keep their order and spacing all the way down."""
    closed = np.vstack([rim_xz, rim_xz[:1]])
    along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(closed, axis=0), axis=1))])
    start = int(np.argmax(rim_xz[:, 0] - 4.0 * np.abs(rim_xz[:, 1])))
    frac = ((along[:-1] - along[start]) / along[-1]) % 1.0
    grid = np.linspace(0.0, 2 * np.pi, 2001)
    outline = _palm_point(grid, np.full_like(grid, y))[:, [0, 2]]
    o_along = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(outline, axis=0), axis=1))])
    return np.interp(frac, o_along / o_along[-1], grid)


# ----------------------------------------------------------------------------- mesh assembly
class _Builder:
    """Collects vertices (with a part label), uv coordinates, quads and triangles."""

    def __init__(self):
        self.points: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        self.rim_dist: List[np.ndarray] = []
        self.uvs: List[np.ndarray] = []
        self.n = self.n_uv = 0
        self.polys: List[Tuple[Tuple[int, ...], Tuple[int, ...]]] = []

    def add(self, pts, label: int, rim_dist=np.inf) -> np.ndarray:
        """Add vertices of one part; ``rim_dist``: how far up a finger tube from the palm (mm)."""
        pts = np.asarray(pts, np.float64).reshape(-1, 3)
        ids = np.arange(self.n, self.n + len(pts))
        self.points.append(pts)
        self.labels.append(np.full(len(pts), label))
        self.rim_dist.append(np.broadcast_to(np.asarray(rim_dist, np.float64), (len(pts),)))
        self.n += len(pts)
        return ids

    def add_uv(self, uv) -> np.ndarray:
        uv = np.asarray(uv, np.float64).reshape(-1, 2)
        ids = np.arange(self.n_uv, self.n_uv + len(uv))
        self.uvs.append(uv)
        self.n_uv += len(uv)
        return ids

    def strip(self, ring_a, ring_b, uv_a, uv_b):
        """Quads between two closed rings of equal length (uv rings carry one extra seam entry)."""
        m = len(ring_a)
        for k in range(m):
            k1 = (k + 1) % m
            self.polys.append(((ring_a[k], ring_a[k1], ring_b[k1], ring_b[k]),
                               (uv_a[k], uv_a[k + 1], uv_b[k + 1], uv_b[k])))

    def fan(self, ring, centre, uv_ring, uv_centre):
        m = len(ring)
        for k in range(m):
            self.polys.append(((ring[k], ring[(k + 1) % m], centre), (uv_ring[k], uv_ring[k + 1], uv_centre)))

    def halving(self, ring_a, ring_b, uv_a, uv_b):
        """Triangles between a ring of 2n vertices and a ring of n (same rotational sense)."""
        n = len(ring_b)
        for i in range(n):
            a0, a1, a2 = ring_a[2 * i], ring_a[2 * i + 1], ring_a[(2 * i + 2) % (2 * n)]
            b0, b1 = ring_b[i], ring_b[(i + 1) % n]
            ta0, ta1, ta2, tb0, tb1 = uv_a[2 * i], uv_a[2 * i + 1], uv_a[2 * i + 2], uv_b[i], uv_b[i + 1]
            self.polys += [((a0, a1, b0), (ta0, ta1, tb0)), ((a1, a2, b1), (ta1, ta2, tb1)),
                           ((b0, a1, b1), (tb0, ta1, tb1))]

    def triangles(self):
        verts = np.concatenate(self.points)
        faces, face_uvs = [], []
        for v, t in self.polys:
            if len(v) == 3:
                faces.append(v)
                face_uvs.append(t)
                continue
            # split a quad along its shorter diagonal
            if np.linalg.norm(verts[v[0]] - verts[v[2]]) <= np.linalg.norm(verts[v[1]] - verts[v[3]]):
                order = ((0, 1, 2), (0, 2, 3))
            else:
                order = ((0, 1, 3), (1, 2, 3))
            for o in order:
                faces.append(tuple(v[i] for i in o))
                face_uvs.append(tuple(t[i] for i in o))
        return (verts, np.concatenate(self.labels), np.concatenate(self.rim_dist), np.concatenate(self.uvs),
                np.asarray(faces, np.int64), np.asarray(face_uvs, np.int64))


def _ring_uv(m: int, v: float, chart) -> np.ndarray:
    """uv of one ring (m + 1 entries, the last closing the seam) inside chart (u0, v0, du, dv)."""
    u0, v0, du, dv = chart
    return np.stack([u0 + du * np.arange(m + 1) / m, np.full(m + 1, v0 + dv * v)], axis=1)


# Part labels of vertices (used by the skinning weights): 0 palm and wrist cap, 1..4 fingers, 5 thumb.
_PALM, _THUMB = 0, 5


def _fix_orientation(faces: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Orient all faces consistently (breadth first over shared edges), outward (positive volume).

    Returns:
        ``(faces, flipped)``: the oriented faces and a mask of the faces whose order was reversed.
    """
    faces = faces.copy()
    flipped = np.zeros(len(faces), bool)
    edge_faces: Dict[Tuple[int, int], List[int]] = {}
    for f, tri in enumerate(faces):
        for a, b in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0])):
            edge_faces.setdefault((min(a, b), max(a, b)), []).append(f)
    seen = np.zeros(len(faces), bool)
    for start in range(len(faces)):
        if seen[start]:
            continue
        seen[start] = True
        queue = deque([start])
        while queue:
            f = queue.popleft()
            tri = faces[f]
            for a, b in ((tri[0], tri[1]), (tri[1], tri[2]), (tri[2], tri[0])):
                for g in edge_faces[(min(a, b), max(a, b))]:
                    if seen[g]:
                        continue
                    other = faces[g]
                    same_dir = any((other[i], other[(i + 1) % 3]) == (a, b) for i in range(3))
                    if same_dir:  # a neighbour must traverse the shared edge the other way
                        faces[g] = other[::-1]
                        flipped[g] = True
                    seen[g] = True
                    queue.append(g)
    v = verts[faces]
    volume = np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6.0
    if volume > 0:
        return faces, flipped
    return faces[:, ::-1].copy(), ~flipped


def _build_mesh():
    """The template surface.

    Returns:
        ``(vertices [V, 3] mm, part labels [V], distance up a finger tube from the palm [V] (mm, inf
        elsewhere), uvs [T, 2], faces [F, 3], face_uvs [F, 3])``, faces oriented outward.
    """
    fingers = _finger_geometry()
    thumb = _thumb_geometry()
    B = _Builder()
    theta = np.radians(9.0 + 18.0 * np.arange(_RING))  # ring angle, radial -> palmar -> ulnar -> dorsal

    # --- the rim: where each finger tube starts; neighbours share 4 vertices (2 on the web edge).
    canon = {(f, k): (f, k) for f in range(4) for k in range(_RING)}
    for f in range(3):
        for k_f, k_g in ((8, 1), (9, 0), (10, 19), (11, 18)):
            canon[(f + 1, k_g)] = (f, k_f)
    rim_pts: Dict[Tuple[int, int], List[np.ndarray]] = {}
    for f, fg in enumerate(fingers):
        base = _finger_point(fg, _finger_base_s(fg, theta), theta)
        for k in range(_RING):
            rim_pts.setdefault(canon[(f, k)], []).append(base[k])
    rim = {key: np.mean(p, axis=0) for key, p in rim_pts.items()}

    loop = ([(0, k) for k in range(0, 9)] + [(1, k) for k in range(2, 9)] + [(2, k) for k in range(2, 9)]
            + [(3, k) for k in range(2, 19)] + [(2, k) for k in range(12, 19)]
            + [(1, k) for k in range(12, 19)] + [(0, k) for k in range(12, 20)])
    loop = [canon[key] for key in loop]
    start = loop.index((3, 10))  # palm uv seam on the ulnar side, away from the thumb
    loop = loop[start:] + loop[:start]
    n_cols = len(loop)

    # --- the palm: one column of vertices per rim vertex, from the wrist cap up to the rim.
    rim_xyz = np.array([rim[key] for key in loop])
    phi = _palm_phi(rim_xyz[:, [0, 2]], 85.0)
    t = np.arange(_PALM_LEVELS + 1) / _PALM_LEVELS
    y = _WRIST_Y + t[:, None] * (rim_xyz[None, :, 1] - _WRIST_Y)            # [levels, cols]
    palm = _palm_point(phi[None, :], y)
    blend = _smoothstep((y - (rim_xyz[None, :, 1] - 32.0)) / 32.0)[..., None]
    palm = (1 - blend) * palm + blend * rim_xyz[None]
    palm[..., 1] = y
    palm_ids = B.add(palm.reshape(-1, 3), _PALM).reshape(palm.shape[:2])
    vid = {key: palm_ids[-1, c] for c, key in enumerate(loop)}
    for key, p in rim.items():
        if key not in vid:  # the web vertices between fingers
            vid[key] = B.add(p, _PALM)[0]

    # --- the thumb hole: a patch of palm quads on the radial side and the radial third of the palm.
    col_phi = (np.degrees(phi) + 180.0) % 360.0 - 180.0
    cols = [c for c in range(n_cols) if _HOLE_PHI[0] <= col_phi[c] <= _HOLE_PHI[1]]
    c0, c1 = min(cols), max(cols)
    if cols != list(range(c0, c1 + 1)):
        raise RuntimeError("default hand: the thumb's hole in the palm is not one patch")
    y_mid = y[:, c0:c1 + 1].mean(axis=1)
    k0, k1 = (int(np.argmin(np.abs(y_mid - h))) for h in _HOLE_Y)
    n_around = 2 * ((c1 - c0) + (k1 - k0))

    palm_chart = (0.0, 0.0, 0.5, 0.5)
    palm_uv = [B.add_uv(_ring_uv(n_cols, k / _PALM_LEVELS, palm_chart)) for k in range(_PALM_LEVELS + 1)]
    for k in range(_PALM_LEVELS):
        for c in range(n_cols):
            if c0 <= c < c1 and k0 <= k < k1:
                continue
            c_next = (c + 1) % n_cols
            B.polys.append(((palm_ids[k, c], palm_ids[k, c_next], palm_ids[k + 1, c_next], palm_ids[k + 1, c]),
                            (palm_uv[k][c], palm_uv[k][c + 1], palm_uv[k + 1][c + 1], palm_uv[k + 1][c])))

    # --- the wrist cap: rings shrinking to a centre, halving the vertex count once.
    bottom = palm[0]
    centre = bottom.mean(axis=0)
    cap_chart = (0.5, 0.0, 0.25, 0.25)

    def cap_uv(p):
        q = (p[:, [0, 2]] - centre[[0, 2]]) / 110.0 + 0.5
        return np.column_stack([cap_chart[0] + cap_chart[2] * q[:, 0], cap_chart[1] + cap_chart[3] * q[:, 1]])

    def cap_ring(scale, n):
        pts = centre + scale * (bottom[::n_cols // n][:n] - centre)
        pts[:, 1] = _WRIST_Y - 3.0 * (1 - scale ** 2)
        ids = B.add(pts, _PALM)
        return ids, B.add_uv(cap_uv(np.concatenate([pts, pts[:1]])))

    ring_prev, uv_prev = palm_ids[0], B.add_uv(cap_uv(np.concatenate([bottom, bottom[:1]])))
    ring1 = cap_ring(0.8, n_cols)
    B.strip(ring_prev, ring1[0], uv_prev, ring1[1])
    ring2 = cap_ring(0.57, n_cols // 2)
    B.halving(ring1[0], ring2[0], ring1[1], ring2[1])
    ring3 = cap_ring(0.3, n_cols // 2)
    B.strip(ring2[0], ring3[0], ring2[1], ring3[1])
    c_pt = centre.copy()
    c_pt[1] = _WRIST_Y - 3.0
    B.fan(ring3[0], B.add(c_pt, _PALM)[0], ring3[1], B.add_uv(cap_uv(c_pt[None]))[0])

    # --- the finger tubes: from the rim to a rounded tip.
    for f, fg in enumerate(fingers):
        chart = (0.5 + 0.125 * f, 0.5, 0.125, 0.5)
        length = fg["stations"][-1]
        a_tip = _finger_radii(fg, length)[0]
        cap_len = 0.95 * a_tip
        s_end = length + _TIP_OVERHANG - cap_len
        s_base = _finger_base_s(fg, theta)
        n_rings = int(round((s_end - s_base.mean()) / _STEP))
        total = n_rings + 4
        prev = np.array([vid[canon[(f, k)]] for k in range(_RING)])
        prev_uv = B.add_uv(_ring_uv(_RING, 0.0, chart))
        for j in range(1, n_rings + 1):
            s = s_base + (s_end - s_base) * j / n_rings
            ids = B.add(_finger_point(fg, s, theta), 1 + f, s - s_base)
            uv = B.add_uv(_ring_uv(_RING, j / total, chart))
            B.strip(prev, ids, prev_uv, uv)
            prev, prev_uv = ids, uv
        a, pal, dor = _finger_radii(fg, s_end)
        lateral, palm_dir = fg["frame"][:, 2], fg["frame"][:, 1]
        for i, ang in enumerate(np.radians([22.5, 45.0, 67.5])):
            shrink = np.cos(ang)
            off = ((a * np.cos(theta))[:, None] * lateral
                   + (np.where(np.sin(theta) > 0, pal, dor) * np.sin(theta))[:, None] * palm_dir)
            pts = fg["mcp"] + (s_end + cap_len * np.sin(ang)) * fg["u"] + shrink * off
            ids = B.add(pts, 1 + f)
            uv = B.add_uv(_ring_uv(_RING, (n_rings + 1 + i) / total, chart))
            B.strip(prev, ids, prev_uv, uv)
            prev, prev_uv = ids, uv
        tip = B.add(fg["mcp"] + (s_end + cap_len) * fg["u"] + 0.15 * pal * palm_dir, 1 + f)[0]
        B.fan(prev, tip, prev_uv, B.add_uv([[chart[0] + 0.5 * chart[2], chart[1] + chart[3]]])[0])

    # --- the thumb tube, grown out of the hole.
    # The hole's boundary, and the palm's outward normal at each boundary vertex: the thumb tube
    # leaves the hole tangentially to the palm, so the join is smooth.
    hole_cells = ([(k0, c) for c in range(c0, c1)] + [(k, c1) for k in range(k0, k1)]
                  + [(k1, c) for c in range(c1, c0, -1)] + [(k, c0) for k in range(k1, k0, -1)])
    hole = [palm_ids[k, c] for k, c in hole_cells]
    d_col = np.gradient(palm, axis=0)
    d_row = np.roll(palm, -1, axis=1) - np.roll(palm, 1, axis=1)
    normal = _unit(np.cross(d_row, d_col))
    normal = np.array([normal[k, c] for k, c in hole_cells])
    hole_pts = np.concatenate(B.points)[hole]
    d, frame = thumb["d"], thumb["frame"]
    e1, e2 = frame[:, 2], frame[:, 1]
    rel = hole_pts - _THUMB_CMC
    rel = rel - (rel @ d)[:, None] * d
    ang = np.unwrap(np.arctan2(rel @ e2, rel @ e1))
    if ang[-1] < ang[0]:  # walk the hole in the sense of increasing ring angle
        hole, hole_pts, ang, normal = hole[::-1], hole_pts[::-1], ang[::-1], normal[::-1]
    uniform = 2 * np.pi * np.arange(n_around) / n_around
    uniform = uniform + np.mean(ang - uniform)

    length = thumb["stations"][-1]
    stations_t = [_THUMB_FREE, 45.0, 77.0, length]
    radii = dict(a=[12.0, 11.5, 10.3, 9.2], pal=[10.5, 10.0, 8.7, 8.0], dor=[8.2, 7.6, 6.6, 5.6])

    def thumb_radius(tau, angle, scale=1.0):
        a, pal, dor = (np.interp(tau, stations_t, radii[k]) for k in ("a", "pal", "dor"))
        b = np.where(np.sin(angle) > 0, pal, dor)
        return scale / np.hypot(np.cos(angle) / a, np.sin(angle) / b)

    def thumb_point(tau, angle, rho):
        return (_THUMB_CMC + np.asarray(tau)[..., None] * d + (rho * np.cos(angle))[:, None] * e1
                + (rho * np.sin(angle))[:, None] * e2)

    cap_len = 8.0
    tau_end = length + _TIP_OVERHANG - cap_len
    n_trans = 11
    taus = np.arange(_THUMB_FREE, tau_end, _STEP)
    taus = np.append(taus[:-1] if tau_end - taus[-1] < 0.5 * _STEP else taus, tau_end)
    total = n_trans + len(taus) + 3
    ring_free = thumb_point(np.full(n_around, _THUMB_FREE), uniform, thumb_radius(_THUMB_FREE, uniform))
    reach = np.linalg.norm(ring_free - hole_pts, axis=1)[:, None]
    if np.mean(np.sum(normal * (hole_pts - _THUMB_CMC), axis=1)) < 0:
        normal = -normal  # outward
    towards = ring_free - hole_pts
    start_dir = _unit(towards - np.sum(towards * normal, axis=1, keepdims=True) * normal)
    radial_dir = np.cos(uniform)[:, None] * e1 + np.sin(uniform)[:, None] * e2
    out = np.clip(radial_dir @ np.array([0.0, 0.0, 1.0]), 0.0, None)
    chart = (0.0, 0.5, 0.5, 0.5)
    n_half, half = n_around // 2, uniform[::2]
    prev, prev_uv = hole, B.add_uv(_ring_uv(n_around, 0.0, chart))
    for j in range(1, n_trans + len(taus)):
        if j < n_trans:   # the thenar mound: a Hermite sweep from the hole to the first round ring
            g = j / n_trans
            pts = (2 * g ** 3 - 3 * g ** 2 + 1) * hole_pts + (-2 * g ** 3 + 3 * g ** 2) * ring_free
            pts += (g ** 3 - 2 * g ** 2 + g) * reach * start_dir * 1.3 + (g ** 3 - g ** 2) * reach * d[None] * 0.6
            pts += (_THENAR * np.sin(np.pi * g) ** 2 * out)[:, None] * radial_dir
            ids = B.add(pts, _THUMB)
            uv = B.add_uv(_ring_uv(n_around, j / total, chart))
            B.strip(prev, ids, prev_uv, uv)
        else:  # the round thumb, with half as many vertices around as the hole
            tau = np.full(n_half, taus[j - n_trans])
            ids = B.add(thumb_point(tau, half, thumb_radius(tau, half)), _THUMB)
            uv = B.add_uv(_ring_uv(n_half, j / total, chart))
            (B.halving if j == n_trans else B.strip)(prev, ids, prev_uv, uv)
        prev, prev_uv = ids, uv
    for i, a in enumerate(np.radians([22.5, 45.0, 67.5])):
        pts = thumb_point(tau_end + cap_len * np.sin(a), half, thumb_radius(tau_end, half, np.cos(a)))
        ids = B.add(pts, _THUMB)
        uv = B.add_uv(_ring_uv(n_half, (n_trans + len(taus) + i) / total, chart))
        B.strip(prev, ids, prev_uv, uv)
        prev, prev_uv = ids, uv
    tip = B.add(_THUMB_CMC + (tau_end + cap_len) * d + 1.0 * e2, _THUMB)[0]
    B.fan(prev, tip, prev_uv, B.add_uv([[chart[0] + 0.5 * chart[2], chart[1] + chart[3]]])[0])

    verts, labels, rim_dist, uvs, faces, face_uvs = B.triangles()
    # drop the palm vertices inside the thumb hole (no face uses them)
    used = np.zeros(len(verts), bool)
    used[faces.ravel()] = True
    remap = np.cumsum(used) - 1
    verts, labels, rim_dist, faces = verts[used], labels[used], rim_dist[used], remap[faces]
    faces, flipped = _fix_orientation(faces, verts)
    face_uvs[flipped] = face_uvs[flipped, ::-1]
    return verts, labels, rim_dist, uvs, faces, face_uvs


# ----------------------------------------------------------------------------- skinning
def _chain_weights(s, stations, half_width):
    """Smooth partition of unity over the bones of a chain.

    Args:
        s: ``[V]`` coordinate along the chain; stations: ``[n]`` joint coordinates;
        half_width: ``[V, n]`` blend half-widths.
    Returns:
        ``[V, n + 1]``: the parent of the first joint, then the bone of each joint.
    """
    sig = _smoothstep((s[:, None] - stations[None, :] + half_width) / (2 * half_width))
    cum = np.cumprod(sig, axis=1)
    w = np.empty((len(s), len(stations) + 1))
    w[:, 0] = 1 - sig[:, 0]
    w[:, 1:-1] = cum[:, :-1] * (1 - sig[:, 1:])
    w[:, -1] = cum[:, -1]
    return w


def _half_widths(verts, joints, palm_dir):
    """Blend half-width per vertex and joint: narrow on the back, wider the deeper on the palm side."""
    depth = np.maximum(0.0, (verts[:, None, :] - joints[None]) @ palm_dir)
    return _BLEND_BACK + _BLEND_PALM * depth


def _skinning_weights(verts, labels, rim_dist):
    """``[V, 22]`` skinning weights: non-negative, each row summing to 1, none on the ``_null`` tips."""
    V = len(verts)
    W = np.zeros((V, len(JOINT_NAMES)))
    fingers = _finger_geometry()
    thumb = _thumb_geometry()

    # finger affinity: on the palm a soft assignment by distance to each finger's axis line (in the
    # hand plane), half and half on the web between two fingers; a finger's own tube from ~10 mm
    # beyond the web.
    dist = []
    for f in fingers:
        rel = verts - f["mcp"]
        perp = rel - (rel @ f["u"])[:, None] * f["u"]
        dist.append(np.hypot(perp[:, 0], perp[:, 1]))
    dist = np.stack(dist, axis=1)
    affinity = np.exp(-((dist - dist.min(axis=1, keepdims=True)) / 6.0) ** 2)
    affinity /= affinity.sum(axis=1, keepdims=True)
    tube = (labels >= 1) & (labels <= 4)
    own = _smoothstep(rim_dist[tube] / 10.0)[:, None]
    affinity[tube] = (1 - own) * affinity[tube] + own * np.eye(4)[labels[tube] - 1]

    W_fingers = np.zeros_like(W)
    for i, f in enumerate(fingers):
        s = (verts - f["mcp"]) @ f["u"]
        joints = f["joints"][:3]
        w = _chain_weights(s, f["stations"][:3], _half_widths(verts, joints, f["frame"][:, 1]))
        ids = [_J["wrist"], _J[f["name"] + "1"], _J[f["name"] + "2"], _J[f["name"] + "3"]]
        W_fingers[:, ids] += affinity[:, i:i + 1] * w

    # thumb affinity: by distance from the thumb's bones (thumb0 to the tip)
    a, b = _THUMB0, thumb["joints"][-1]
    t = np.clip((verts - a) @ (b - a) / np.dot(b - a, b - a), 0.0, 1.0)
    d_axis = np.linalg.norm(verts - (a + t[:, None] * (b - a)), axis=1)
    a_thumb = 1.0 - _smoothstep((d_axis - _THUMB_CORE) / _THUMB_FADE)
    a_thumb[tube] = 0.0
    s = (verts - _THUMB_CMC) @ thumb["d"]
    stations = np.array([(_THUMB0 - _THUMB_CMC) @ thumb["d"], 0.0, thumb["stations"][1], thumb["stations"][2]])
    joints = np.array([_THUMB0, _THUMB_CMC, thumb["joints"][1], thumb["joints"][2]])
    w = _chain_weights(s, stations, _half_widths(verts, joints, thumb["frame"][:, 1]))
    W_thumb = np.zeros_like(W)
    W_thumb[:, [_J["wrist"], _J["thumb0"], _J["thumb1"], _J["thumb2"], _J["thumb3"]]] = w

    W = a_thumb[:, None] * W_thumb + (1 - a_thumb[:, None]) * W_fingers
    # six decimals as in the released files; the largest weight absorbs the rounding
    W = np.round(np.where(W < 1e-3, 0.0, W) / W.sum(axis=1, keepdims=True), 6)
    W[np.arange(V), W.argmax(axis=1)] += 1.0 - W.sum(axis=1)
    return W


# ----------------------------------------------------------------------------- the model
def make_default_hand() -> HandModel:
    """The project's default right hand (deterministic), in the released hand-model format.

    Returns:
        A validated :class:`HandModel`; vertices in cm as the files hold them, poses in mm.
    """
    verts, labels, rim_dist, uvs, faces, face_uvs = _build_mesh()
    G = _skeleton()
    parents = np.array(PARENTS, np.int64)
    G_inv = np.linalg.inv(G)
    local = np.array([G[j] if p < 0 else G_inv[p] @ G[j] for j, p in enumerate(parents)])
    weights = _skinning_weights(verts, labels, rim_dist)
    model = HandModel(
        joint_names=list(JOINT_NAMES), parents=parents, vertices_cm=np.round(verts / 10.0, 6), uvs=np.round(uvs, 6),
        faces=faces, face_uvs=face_uvs, skinning_weights=weights, local_pose=local,
        global_pose=G, global_pose_inv=G_inv, source=f"<{DEFAULT_HAND_NAME}>",
    )
    return model.validate()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the project's default right hand as a hand-model folder.")
    parser.add_argument("--out", required=True, help="folder to write the six hand-model files into")
    args = parser.parse_args(argv)

    def write() -> None:
        model = make_default_hand()
        save_hand_model(model, args.out)
        print(f"{DEFAULT_HAND_NAME}: {model.vertex_num} vertices, {len(model.faces)} triangles, "
              f"{model.joint_num} joints -> {args.out}")

    return exit_code(write)  # an --out that cannot be written: one line, exit code 2


if __name__ == "__main__":
    sys.exit(main())
