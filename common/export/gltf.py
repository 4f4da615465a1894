"""A DeepHandMesh hand as a rigged glTF 2.0 file: skeleton, skin, pose correctives, animation.

The model poses a hand (:func:`common.hand.kinematics.pose_mesh`) as

    v' = Σ_j w_vj · G_j · B_j · [v; 1],   G = FK over L'_j · R_j(θ_j),   v = v_bind + c(θ)

with ``L'`` the local rest poses with the skeleton corrective added to their translations, ``B`` the
*template's* inverse global poses (fixed even when the skeleton corrective moves the joints),
``R_j = Rz·Ry·Rx`` and ``c(θ)`` the pose corrective. glTF skins a mesh as
``v' = Σ_j w_vj · N_j · IBM_j · (base + Σ_t m_t · target_t)`` with ``N_j`` a joint node's global
transform. The file therefore holds, in metres (×0.001):

- the joints as nodes named as in ``skeleton.txt``, each child's local transform ``L'_j · R_j``
  (translation: the refined bone; rotation: the local pose's rotation times the Euler rotation);
  the root's is the root transform (identity as in ``Model.decode``, the wrist's world transform
  for a fitted sequence);
- inverse bind matrices ``B_j``: the template's, not the inverse of the refined skeleton's rest
  poses. With them the glTF formula is the model's for every pose; the price is that the file's
  bind pose is the template skeleton, and its rest pose (the nodes at zero angles) the refined one;
- the base (bind) mesh ``template + identity corrective + pose corrective at zero angles``: the
  model's own rest mesh of this identity, before skinning;
- per keyframe, the pose corrective's change from zero angles ``c(θ_k) − c(0)`` as a morph target,
  at weight 1 at its keyframe (the mesh the file shows at a keyframe is the decoded one);
- every skinning influence: as many ``JOINTS_n``/``WEIGHTS_n`` sets of four as the most influenced
  vertex needs, strongest first, so that a reader limited to four (three.js) keeps the four largest.

Vertices with several uv coordinates (seams of ``hand.obj``) are split, as glTF holds one uv per
vertex: the first ``V`` vertices of the file are the model's, in order; the mesh's ``extras`` give
the model vertex of each further one (``seam_vertex_source``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pygltflib as gl
import torch

from common.hand.hand_model import HandModel
from common.io.atomic import atomic_write_bytes
from common.hand.kinematics import euler_to_matrix
from common.errors import DeepHandMeshError

M_PER_MM = 1e-3  # glTF's unit is the metre; the model's the millimetre
INFLUENCES_PER_SET = 4
SKIN_RGB = (215, 170, 135)  # the editor's skin colour (sRGB)
# How far from a rotation a local pose or root transform may be (largest entry of R·Rᵀ − I) and
# still be written as a glTF rotation; text files with 6 digits are ~1e-6 off.
RIGID_TOLERANCE = 1e-4
GENERATOR = "DeepHandMesh export (pygltflib)"


class ExportError(DeepHandMeshError, ValueError):
    """Input that cannot be written as a rigged file; the message names it and what was expected."""


# ------------------------------------------------------------------ what the file holds
@dataclass(frozen=True)
class Rig:
    """The pose-independent content of a hand's file (mm, float64).

    Attributes:
        hand: the hand model (names, parents, faces, uvs).
        bind_vertices: ``[V, 3]`` template + identity corrective + pose corrective at zero angles.
        local_pose: ``[J, 4, 4]`` local rest poses with the skeleton corrective.
        inverse_bind: ``[J, 4, 4]`` the template's inverse global poses (``global_pose_inv``).
        weights: ``[V, J]`` skinning weights.
    """

    hand: HandModel
    bind_vertices: np.ndarray
    local_pose: np.ndarray
    inverse_bind: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class Keyframes:
    """Poses to show: one static pose (``times`` None) or an animation's keyframes.

    Attributes:
        euler: ``[K, J, 3]`` Euler angles (radians).
        root: ``[K, 4, 4]`` the root joint's global transform (mm); identity in decode mode.
        correctives: ``[K, V, 3]`` pose corrective at each keyframe minus that at zero angles (mm).
        times: ``[K]`` seconds, increasing; None for one static pose.
        names: ``K`` labels (the morph targets' names).
    """

    euler: np.ndarray
    root: np.ndarray
    correctives: np.ndarray
    times: Optional[np.ndarray]
    names: List[str]


@torch.no_grad()
def rig_and_keyframes(model, euler: torch.Tensor, root: Optional[torch.Tensor] = None,
                      times: Optional[Sequence[float]] = None,
                      names: Optional[Sequence[str]] = None) -> Tuple[Rig, Keyframes]:
    """What a file of ``model``'s hand in the poses ``euler`` holds.

    Args:
        model: a :class:`main.model.Model` (its checkpoint loaded, or correctives zeroed).
        euler: ``[K, J, 3]`` radians, as given to ``Model.decode``.
        root: ``[K, 4, 4]`` root transforms (mm), None for the identity (decode mode).
        times: ``K`` increasing times (s) for an animation; None for one static pose (K = 1).
        names: ``K`` labels of the poses (default ``pose 0``, ``pose 1``, …).
    """
    J, V = model.joint_num, model.vertex_num
    if euler.dim() != 3 or euler.shape[1:] != (J, 3) or euler.shape[0] < 1:
        raise ExportError(f"poses: expected Euler angles [K, {J}, 3] (radians), got {tuple(euler.shape)}")
    K = euler.shape[0]
    if times is None and K != 1:
        raise ExportError(f"a static file holds one pose, got {K}: give times for an animation")
    ref = model.template_vertices
    identity = model.identity()
    bind = model.rest_vertices(torch.zeros(1, J, 3, dtype=ref.dtype, device=ref.device), identity)[0]
    rest = model.rest_vertices(euler.to(ref.device, ref.dtype), identity)
    correctives = (rest - bind).cpu().double().numpy()
    if root is None:
        root_np = np.broadcast_to(np.eye(4), (K, 4, 4)).copy()
    else:
        root_np = torch.as_tensor(root).cpu().double().numpy()
        if root_np.shape != (K, 4, 4):
            raise ExportError(f"root transforms: expected [{K}, 4, 4] (mm), got {root_np.shape}")
    times_np = None
    if times is not None:
        times_np = np.asarray(times, np.float64)
        if times_np.shape != (K,) or not np.all(np.isfinite(times_np)) or np.any(np.diff(times_np) <= 0):
            raise ExportError(f"keyframe times: expected {K} increasing finite times, got {times_np.tolist()}")
    names = list(names) if names is not None else [f"pose {k}" for k in range(K)]
    if len(names) != K:
        raise ExportError(f"keyframe names: expected {K}, got {len(names)}")
    rig = Rig(model.hand_model, bind.cpu().double().numpy().reshape(V, 3),
              identity.local_pose.cpu().double().numpy(), model.global_pose_inv.cpu().double().numpy(),
              model.skinning_weight.cpu().double().numpy())
    return rig, Keyframes(euler.detach().cpu().double().numpy(), root_np, correctives, times_np, names)


# ------------------------------------------------------------------ geometry helpers
def split_seams(hand: HandModel) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One glTF vertex per distinct (vertex, uv) corner of ``hand.obj``.

    Returns:
        ``(source [N], uv_index [N], faces [F, 3])``: vertex ``i < V`` is model vertex ``i`` with
        the uv of its first corner (uv 0 when no face uses it); vertices ``≥ V`` are the further uvs
        of seam vertices, ``source`` naming their model vertex; ``faces`` index the N vertices.
    """
    V = hand.vertex_num
    source, uv_index = list(range(V)), [0] * V
    first = [-1] * V
    slot: Dict[Tuple[int, int], int] = {}
    faces = np.empty_like(hand.faces)
    for f, (corner_v, corner_t) in enumerate(zip(hand.faces.tolist(), hand.face_uvs.tolist())):
        for c, (v, t) in enumerate(zip(corner_v, corner_t)):
            key = (v, t)
            if key not in slot:
                if first[v] < 0:
                    first[v], uv_index[v] = t, t
                    slot[key] = v
                else:
                    slot[key] = len(source)
                    source.append(v)
                    uv_index.append(t)
            faces[f, c] = slot[key]
    return np.asarray(source, np.int64), np.asarray(uv_index, np.int64), faces


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``[V, 3]`` unit normals, the area-weighted mean of the faces around each vertex (a vertex
    without faces gets +z)."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    face_normals = np.cross(b - a, c - a)  # length: twice the area
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    return np.where(length > 0, normals / np.where(length > 0, length, 1), np.array([0.0, 0.0, 1.0]))


def influence_sets(weights: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The skinning weights as glTF's sets of four, strongest first, normalised to sum to 1.

    Args:
        weights: ``[V, J]`` (non-negative, each row with a positive sum).
    Returns:
        ``[(joints [V, 4] int, weights [V, 4] float32), …]``, as many sets as the most influenced
        vertex needs; empty slots are joint 0 with weight 0.
    """
    weights = np.asarray(weights, np.float64)
    if np.any(weights < 0) or np.any(weights.sum(1) <= 0):
        raise ExportError("skinning weights: glTF needs non-negative weights with a positive sum per vertex")
    weights = weights / weights.sum(1, keepdims=True)
    count = int((weights > 0).sum(1).max())
    sets = max(1, -(-count // INFLUENCES_PER_SET))
    order = np.argsort(-weights, axis=1, kind="stable")[:, :sets * INFLUENCES_PER_SET]
    chosen = np.take_along_axis(weights, order, 1)
    order = np.where(chosen > 0, order, 0)
    out = []
    for s in range(sets):
        cols = slice(s * INFLUENCES_PER_SET, (s + 1) * INFLUENCES_PER_SET)
        out.append((order[:, cols], chosen[:, cols].astype(np.float32)))
    return out


def strongest_influences(weights: np.ndarray, count: int = INFLUENCES_PER_SET) -> np.ndarray:
    """``[V, J]`` weights as a reader limited to ``count`` influences uses them: the ``count`` largest
    of each vertex, renormalised to sum to 1 (three.js's ``normalizeSkinWeights``), the rest 0."""
    weights = np.asarray(weights, np.float64)
    order = np.argsort(-weights, axis=1, kind="stable")[:, :count]
    kept = np.zeros_like(weights)
    np.put_along_axis(kept, order, np.take_along_axis(weights, order, 1), 1)
    return kept / kept.sum(1, keepdims=True)


def check_rigid(transforms: np.ndarray, what: Sequence[str]) -> None:
    """Refuse ``[N, 4, 4]`` transforms that are not a rotation and a translation (glTF nodes hold a
    rotation quaternion); ``what[i]`` names transform ``i`` in the message."""
    R = transforms[:, :3, :3]
    off = np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
    bottom = np.abs(transforms[:, 3] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=1)
    bad = np.flatnonzero((off > RIGID_TOLERANCE) | (np.linalg.det(R) <= 0) | (bottom > RIGID_TOLERANCE)
                         | ~np.all(np.isfinite(transforms), axis=(1, 2)))
    if len(bad):
        i = int(bad[0])
        raise ExportError(f"{what[i]}: not a rotation and a translation (a glTF node holds a rotation; "
                          f"R·Rᵀ differs from I by {off[i]:.3g}, det {np.linalg.det(R[i]):.3g})")


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """``[..., 3, 3]`` rotation matrices → ``[..., 4]`` unit quaternions in glTF's order (x, y, z, w).
    Each is computed from the largest of ``w, x, y, z`` (stable for every rotation)."""
    R = np.asarray(R, np.float64)
    m = R.reshape(-1, 3, 3)
    trace = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    # 4·q_i² for i = w, x, y, z
    sq = np.stack([1 + trace, 1 + 2 * m[:, 0, 0] - trace, 1 + 2 * m[:, 1, 1] - trace, 1 + 2 * m[:, 2, 2] - trace], 1)
    pick = np.argmax(sq, axis=1)
    q = np.empty((len(m), 4))  # w, x, y, z
    for i in range(len(m)):
        r, k = m[i], pick[i]
        s = 2.0 * np.sqrt(max(sq[i, k], 1e-300))
        if k == 0:
            q[i] = [s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
        elif k == 1:
            q[i] = [(r[2, 1] - r[1, 2]) / s, s / 4, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
        elif k == 2:
            q[i] = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, s / 4, (r[1, 2] + r[2, 1]) / s]
        else:
            q[i] = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, s / 4]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q[:, [1, 2, 3, 0]].reshape(*R.shape[:-2], 4)


def continuous(quaternions: np.ndarray) -> np.ndarray:
    """``[K, ..., 4]`` with each quaternion's sign chosen nearest the previous keyframe's (q and −q
    are one rotation; interpolating from one to the other would turn the long way round)."""
    out = np.array(quaternions, np.float64)
    for k in range(1, len(out)):
        flip = (out[k] * out[k - 1]).sum(-1, keepdims=True) < 0
        out[k] = np.where(flip, -out[k], out[k])
    return out


def joint_rotations(rig: Rig, euler: np.ndarray) -> np.ndarray:
    """``[K, J, 4]`` (x, y, z, w) local rotations of the joint nodes: ``L'_j[:3, :3] · Rz·Ry·Rx``."""
    R = euler_to_matrix(torch.from_numpy(np.asarray(euler, np.float64))).numpy()
    return continuous(matrix_to_quaternion(rig.local_pose[None, :, :3, :3] @ R))


# ------------------------------------------------------------------ the binary buffer
_COMPONENT = {np.dtype(np.float32): gl.FLOAT, np.dtype(np.uint8): gl.UNSIGNED_BYTE,
              np.dtype(np.uint16): gl.UNSIGNED_SHORT, np.dtype(np.uint32): gl.UNSIGNED_INT}
_TYPE = {1: gl.SCALAR, 2: gl.VEC2, 3: gl.VEC3, 4: gl.VEC4, 16: gl.MAT4}


class _Buffer:
    """The GLB's binary chunk: one buffer view per accessor, each 4-byte aligned."""

    def __init__(self, doc: gl.GLTF2):
        self.doc, self.data = doc, bytearray()

    def accessor(self, array: np.ndarray, target: Optional[int] = None, bounds: bool = False,
                 name: Optional[str] = None) -> int:
        """Add ``array`` (``[N]`` or ``[N, C]``, C in 2, 3, 4, 16; float32, uint8/16/32) and return
        its accessor's index; ``bounds``: write ``min``/``max`` (required for positions and times)."""
        array = np.ascontiguousarray(array)
        columns = 1 if array.ndim == 1 else array.shape[1]
        self.data.extend(b"\0" * (-len(self.data) % 4))
        view = gl.BufferView(buffer=0, byteOffset=len(self.data), byteLength=array.nbytes, target=target)
        self.data.extend(array.tobytes())
        self.doc.bufferViews.append(view)
        acc = gl.Accessor(bufferView=len(self.doc.bufferViews) - 1, componentType=_COMPONENT[array.dtype],
                          count=len(array), type=_TYPE[columns], name=name)
        if bounds:
            flat = array.reshape(len(array), columns)
            acc.min = [float(x) for x in flat.min(0)]
            acc.max = [float(x) for x in flat.max(0)]
        self.doc.accessors.append(acc)
        return len(self.doc.accessors) - 1

    def finish(self) -> None:
        self.data.extend(b"\0" * (-len(self.data) % 4))
        self.doc.buffers = [gl.Buffer(byteLength=len(self.data))]
        self.doc.set_binary_blob(bytes(self.data))


def _srgb_to_linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


# ------------------------------------------------------------------ the document
def build_gltf(rig: Rig, keys: Keyframes, extras: Optional[dict] = None) -> gl.GLTF2:
    """The glTF document of ``rig`` in the pose(s) ``keys`` (module notes); ``extras`` go into the
    asset's ``extras`` (e.g. the hand model and checkpoint it was made from)."""
    hand = rig.hand
    J = hand.joint_num
    check_rigid(rig.local_pose, [f"{hand.source}: local pose of joint {n}" for n in hand.joint_names])
    check_rigid(keys.root, [f"root transform of keyframe {k} ({n})" for k, n in enumerate(keys.names)])
    doc = gl.GLTF2(asset=gl.Asset(version="2.0", generator=GENERATOR, extras=extras or {}))
    buf = _Buffer(doc)
    float32 = lambda a: np.asarray(a, np.float32)  # noqa: E731

    # Mesh: the bind mesh in metres, split at uv seams.
    source, uv_index, faces = split_seams(hand)
    normals = vertex_normals(rig.bind_vertices, hand.faces)[source]
    attributes = gl.Attributes(
        POSITION=buf.accessor(float32(rig.bind_vertices[source] * M_PER_MM), gl.ARRAY_BUFFER, bounds=True),
        NORMAL=buf.accessor(float32(normals), gl.ARRAY_BUFFER),
        TEXCOORD_0=buf.accessor(float32(np.stack([hand.uvs[uv_index, 0], 1.0 - hand.uvs[uv_index, 1]], 1)),
                                gl.ARRAY_BUFFER))
    joint_type = np.uint8 if J <= 256 else np.uint16
    for s, (joints, weights) in enumerate(influence_sets(rig.weights)):
        setattr(attributes, f"JOINTS_{s}", buf.accessor(joints[source].astype(joint_type), gl.ARRAY_BUFFER))
        setattr(attributes, f"WEIGHTS_{s}", buf.accessor(weights[source], gl.ARRAY_BUFFER))
    index_type = np.uint16 if len(source) < 65535 else np.uint32
    primitive = gl.Primitive(attributes=attributes, mode=gl.TRIANGLES, material=0,
                             indices=buf.accessor(faces.reshape(-1).astype(index_type), gl.ELEMENT_ARRAY_BUFFER))
    # Morph targets: the pose corrective's change at each keyframe (none when it is zero everywhere).
    morphing = bool(np.any(keys.correctives != 0))
    target_names = []
    if morphing:
        for name, corrective in zip(keys.names, keys.correctives):
            delta = buf.accessor(float32(corrective[source] * M_PER_MM), gl.ARRAY_BUFFER, bounds=True)
            primitive.targets.append(gl.Attributes(POSITION=delta))
            target_names.append(f"pose corrective: {name}")
    mesh_extras = {"model_vertex_count": hand.vertex_num,
                   "seam_vertex_source": [int(v) for v in source[hand.vertex_num:]]}
    if target_names:
        mesh_extras["targetNames"] = target_names
    mesh = gl.Mesh(name="hand", primitives=[primitive], extras=mesh_extras)
    if morphing:
        mesh.weights = [1.0] + [0.0] * (len(target_names) - 1)
    doc.meshes.append(mesh)
    linear = [_srgb_to_linear(c / 255) for c in SKIN_RGB]
    doc.materials.append(gl.Material(name="skin", doubleSided=True, pbrMetallicRoughness=gl.PbrMetallicRoughness(
        baseColorFactor=linear + [1.0], metallicFactor=0.0, roughnessFactor=0.6)))

    # Skeleton: node j is joint j; the first keyframe's pose is the nodes' own.
    rotations = joint_rotations(rig, keys.euler)  # [K, J, 4]
    root_rotations = continuous(matrix_to_quaternion(keys.root[:, :3, :3]))
    root_translations = keys.root[:, :3, 3] * M_PER_MM
    children = hand.children
    for j, name in enumerate(hand.joint_names):
        if j == hand.root_index:
            rotation, translation = root_rotations[0], root_translations[0]
        else:
            rotation, translation = rotations[0, j], rig.local_pose[j, :3, 3] * M_PER_MM
        doc.nodes.append(gl.Node(name=name, rotation=[float(x) for x in float32(rotation)],
                                 translation=[float(x) for x in float32(translation)], children=list(children[j])))
    mesh_node = len(doc.nodes)
    doc.nodes.append(gl.Node(name="hand", mesh=0, skin=0))
    ibm = float32(np.swapaxes(rig.inverse_bind, 1, 2).reshape(J, 16) * _IBM_SCALE)  # column-major, metres
    doc.skins.append(gl.Skin(name="skeleton", joints=list(range(J)), skeleton=hand.root_index,
                             inverseBindMatrices=buf.accessor(ibm)))
    doc.scenes.append(gl.Scene(name="DeepHandMesh hand", nodes=[hand.root_index, mesh_node]))
    doc.scene = 0

    if keys.times is not None:
        _add_animation(doc, buf, hand, keys, rotations, root_rotations, root_translations, mesh_node, morphing)
    buf.finish()
    return doc


# The inverse bind matrices in metres: S·B·S⁻¹ with S = diag(0.001, 0.001, 0.001, 1) scales only
# the translation column (entries 12..14 of the column-major layout).
_IBM_SCALE = np.ones(16)
_IBM_SCALE[12:15] = M_PER_MM


def _add_animation(doc, buf, hand, keys, rotations, root_rotations, root_translations, mesh_node, morphing) -> None:
    """One animation: joint rotations (LINEAR: glTF slerps them), the root's transform where it
    moves, and the morph targets' weights, one-hot at each keyframe (LINEAR between keyframes)."""
    float32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    anim = gl.Animation(name="keyframes")
    times = buf.accessor(float32(keys.times), bounds=True, name="times (s)")

    def channel(node: int, path: str, values: np.ndarray) -> None:
        anim.samplers.append(gl.AnimationSampler(input=times, output=buf.accessor(float32(values)),
                                                 interpolation=gl.ANIM_LINEAR))
        anim.channels.append(gl.AnimationChannel(sampler=len(anim.samplers) - 1,
                                                 target=gl.AnimationChannelTarget(node=node, path=path)))

    moving = hand.dof_mask.any(1) | np.any(np.abs(rotations - rotations[:1]) > 0, axis=(0, 2))
    for j in range(hand.joint_num):
        if j != hand.root_index and moving[j]:
            channel(j, "rotation", rotations[:, j])
    if np.any(keys.root != keys.root[:1]):
        channel(hand.root_index, "rotation", root_rotations)
        channel(hand.root_index, "translation", root_translations)
    if morphing:
        channel(mesh_node, "weights", np.eye(len(keys.times)).reshape(-1))
    doc.animations.append(anim)


def glb_bytes(doc: gl.GLTF2) -> bytes:
    """The binary glTF (``.glb``) of a document."""
    data = doc.save_to_bytes()
    return b"".join(data) if isinstance(data, (list, tuple)) else bytes(data)


def write_glb(doc: gl.GLTF2, path) -> None:
    """Write ``doc`` as a ``.glb`` file atomically."""
    atomic_write_bytes(path, glb_bytes(doc))


def export_glb(model, euler: torch.Tensor, path=None, root: Optional[torch.Tensor] = None,
               times: Optional[Sequence[float]] = None, names: Optional[Sequence[str]] = None,
               extras: Optional[dict] = None) -> bytes:
    """The ``.glb`` of ``model``'s hand in the pose(s) ``euler`` (:func:`rig_and_keyframes`'s
    arguments); written to ``path`` when given. Returns the file's bytes."""
    rig, keys = rig_and_keyframes(model, euler, root, times, names)
    data = glb_bytes(build_gltf(rig, keys, extras))
    if path is not None:
        atomic_write_bytes(path, data)
    return data
