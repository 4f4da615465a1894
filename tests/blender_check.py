"""Run by a Python that has Blender's module (``bpy``), for tests/test_export_blender.py::

    python tests/blender_check.py FILE.glb OUT.npz FILE.fbx TIME [TIME ...]

Imports the .glb with Blender's glTF importer, plays its animation to each TIME (seconds) and
writes the evaluated (armature-deformed, shape-keyed) mesh's world positions in glTF's axes
(Blender is z-up, glTF y-up) to OUT.npz as ``positions [T, N, 3]`` (metres), with ``bones`` (the
armature's bone names); then exports FBX with common/export/fbx.py, opens that FBX in an empty scene
and records what it holds (``fbx_bones``, ``fbx_vertices``, ``fbx_shape_keys``, ``fbx_actions``).
Needs nothing of the project but common/export/fbx.py (no torch).
"""
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bpy  # noqa: E402

from common.export.fbx import glb_to_fbx, import_glb  # noqa: E402


def evaluated_positions(obj) -> np.ndarray:
    """``[N, 3]`` world positions of the evaluated mesh, in glTF's axes."""
    depsgraph = bpy.context.evaluated_depsgraph_get()
    evaluated = obj.evaluated_get(depsgraph)
    mesh = evaluated.to_mesh()
    co = np.empty(len(mesh.vertices) * 3)
    mesh.vertices.foreach_get("co", co)
    evaluated.to_mesh_clear()
    co = co.reshape(-1, 3)
    world = np.asarray(obj.matrix_world)
    co = co @ world[:3, :3].T + world[:3, 3]
    return np.stack([co[:, 0], co[:, 2], -co[:, 1]], 1)  # Blender (x, y, z) = glTF (x, -z, y)


def main() -> None:
    glb, out, fbx = sys.argv[1:4]
    times = [float(t) for t in sys.argv[4:]]
    import_glb(bpy, glb)
    scene = bpy.context.scene
    mesh = next(o for o in scene.objects if o.type == "MESH")
    armature = next(o for o in scene.objects if o.type == "ARMATURE")
    fps = scene.render.fps / scene.render.fps_base
    positions = []
    for t in times:
        frame = t * fps
        scene.frame_set(int(np.floor(frame)), subframe=float(frame - np.floor(frame)))
        positions.append(evaluated_positions(mesh))
    result = {"positions": np.stack(positions), "bones": np.array([b.name for b in armature.data.bones]),
              "fps": np.float64(fps), "frame_start": np.int64(scene.frame_start)}

    glb_to_fbx(glb, fbx)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.fbx(filepath=fbx)
    objects = bpy.context.scene.objects
    meshes = [o for o in objects if o.type == "MESH"]
    armatures = [o for o in objects if o.type == "ARMATURE"]
    result["fbx_bones"] = np.array([b.name for a in armatures for b in a.data.bones])
    result["fbx_vertices"] = np.int64(sum(len(m.data.vertices) for m in meshes))
    keys = [m.data.shape_keys for m in meshes if m.data.shape_keys]
    result["fbx_shape_keys"] = np.int64(sum(len(k.key_blocks) for k in keys))
    result["fbx_actions"] = np.int64(len(bpy.data.actions))
    np.savez(out, **result)


if __name__ == "__main__":
    main()
