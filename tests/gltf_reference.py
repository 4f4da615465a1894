"""glTF 2.0 read back and skinned with the specification's own formulas, in plain NumPy: the
independent reference of the export tests. Nothing here comes from :mod:`common.export`.

Skinning (glTF 2.0, "Skins" and "Morph Targets"): a vertex is ``base + Σ_t w_t · target_t``, then
``Σ_i weight_i · jointMatrix[joint_i] · v`` over every ``JOINTS_n``/``WEIGHTS_n`` set, with
``jointMatrix_j = globalTransform(joint_j) · inverseBindMatrix_j`` (the skinned mesh node's own
transform is ignored). Animation samplers: LINEAR is a lerp, a slerp for rotations.
"""
from __future__ import annotations

import numpy as np
import pygltflib

DTYPES = {5120: np.int8, 5121: np.uint8, 5122: np.int16, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}


class GltfFile:
    """A ``.glb`` read with pygltflib; accessors as NumPy arrays."""

    def __init__(self, data: bytes):
        self.doc = pygltflib.GLTF2.load_from_bytes(data)
        self.blob = self.doc.binary_blob()

    def array(self, index: int) -> np.ndarray:
        acc = self.doc.accessors[index]
        view = self.doc.bufferViews[acc.bufferView]
        dtype = np.dtype(DTYPES[acc.componentType])
        width = WIDTH[acc.type]
        assert view.byteStride in (None, 0, dtype.itemsize * width), "interleaved views are not read here"
        start = (view.byteOffset or 0) + (acc.byteOffset or 0)
        out = np.frombuffer(self.blob, dtype, acc.count * width, start).reshape(acc.count, width)
        return out.reshape(acc.count) if width == 1 else out

    # ------------------------------------------------------------ nodes and animation
    def node_trs(self):
        """Each node's (translation [3], rotation (x, y, z, w) [4], scale [3]) as written."""
        out = []
        for node in self.doc.nodes:
            assert node.matrix is None, "matrices are not read here"
            out.append((np.array(node.translation or [0.0, 0.0, 0.0], np.float64),
                        np.array(node.rotation or [0.0, 0.0, 0.0, 1.0], np.float64),
                        np.array(node.scale or [1.0, 1.0, 1.0], np.float64)))
        return out

    def sample(self, animation: int, time: float):
        """Node TRS and mesh weights at ``time`` (seconds): ``(trs list, {mesh node: weights})``."""
        trs = [list(t) for t in self.node_trs()]
        weights = {}
        anim = self.doc.animations[animation]
        for channel in anim.channels:
            sampler = anim.samplers[channel.sampler]
            assert sampler.interpolation == "LINEAR"
            times = self.array(sampler.input).astype(np.float64)
            values = self.array(sampler.output).astype(np.float64).reshape(len(times), -1)
            k = int(np.clip(np.searchsorted(times, time, side="right") - 1, 0, len(times) - 1))
            if k == len(times) - 1 or time <= times[0]:
                value = values[k if time > times[0] else 0]
            else:
                t = (time - times[k]) / (times[k + 1] - times[k])
                if channel.target.path == "rotation":
                    value = slerp(values[k], values[k + 1], t)
                else:
                    value = (1 - t) * values[k] + t * values[k + 1]
            node, path = channel.target.node, channel.target.path
            if path == "weights":
                weights[node] = value
            else:
                trs[node][{"translation": 0, "rotation": 1, "scale": 2}[path]] = value
        return trs, weights

    def global_transforms(self, trs) -> np.ndarray:
        """``[N, 4, 4]`` every node's global transform from local ``trs``."""
        n = len(self.doc.nodes)
        local = [trs_matrix(*trs[i]) for i in range(n)]
        parent = [-1] * n
        for i, node in enumerate(self.doc.nodes):
            for c in node.children or []:
                parent[c] = i
        out = [None] * n

        def world(i):
            if out[i] is None:
                out[i] = local[i] if parent[i] < 0 else world(parent[i]) @ local[i]
            return out[i]

        return np.stack([world(i) for i in range(n)])

    # ------------------------------------------------------------ skinning
    def skinned(self, trs, weights=None, mesh_node=None, max_influences=None) -> np.ndarray:
        """``[N, 3]`` skinned vertices (file units) of the skinned mesh node (the first with a skin),
        with morph weights ``weights`` (the mesh's own when None). ``max_influences``: keep only the
        first ``max_influences // 4`` sets, renormalised (a reader limited to that many)."""
        if mesh_node is None:
            mesh_node = next(i for i, nd in enumerate(self.doc.nodes) if nd.skin is not None)
        node = self.doc.nodes[mesh_node]
        mesh = self.doc.meshes[node.mesh]
        (prim,) = mesh.primitives
        v = self.array(prim.attributes.POSITION).astype(np.float64)
        w = np.asarray(mesh.weights if weights is None else weights, np.float64) if prim.targets else []
        for weight, target in zip(w, prim.targets or []):
            position = target["POSITION"] if isinstance(target, dict) else target.POSITION
            v = v + weight * self.array(position).astype(np.float64)
        skin = self.doc.skins[node.skin]
        ibm = self.array(skin.inverseBindMatrices).astype(np.float64).reshape(-1, 4, 4).transpose(0, 2, 1)
        G = self.global_transforms(trs)
        joint_matrices = G[skin.joints] @ ibm
        sets = []
        s = 0
        while getattr(prim.attributes, f"JOINTS_{s}", None) is not None:
            sets.append((self.array(getattr(prim.attributes, f"JOINTS_{s}")).astype(np.int64),
                         self.array(getattr(prim.attributes, f"WEIGHTS_{s}")).astype(np.float64)))
            s += 1
        if max_influences is not None:
            sets = sets[:max_influences // 4]
        total = sum(ws.sum(1) for _, ws in sets)
        homogeneous = np.concatenate([v, np.ones((len(v), 1))], 1)
        out = np.zeros((len(v), 3))
        for joints, ws in sets:
            for i in range(4):
                out += (ws[:, i] / total)[:, None] * np.einsum("nab,nb->na", joint_matrices[joints[:, i]],
                                                              homogeneous)[:, :3]
        return out


def quaternion_matrix(q) -> np.ndarray:
    """(x, y, z, w) → 3x3 rotation (the quaternion normalised first)."""
    x, y, z, w = np.asarray(q, np.float64) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def trs_matrix(t, r, s) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = quaternion_matrix(r) * np.asarray(s)[None, :]
    m[:3, 3] = t
    return m


def slerp(q0, q1, t):
    """glTF's spherical interpolation of (x, y, z, w) quaternions (the shorter arc)."""
    q0, q1 = np.asarray(q0, np.float64), np.asarray(q1, np.float64)
    d = float(q0 @ q1)
    if d < 0:
        q1, d = -q1, -d
    if d > 1 - 1e-12:
        q = (1 - t) * q0 + t * q1
    else:
        a = np.arccos(d)
        q = (np.sin((1 - t) * a) * q0 + np.sin(t * a) * q1) / np.sin(a)
    return q / np.linalg.norm(q)
