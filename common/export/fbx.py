"""FBX through Blender's Python module (``bpy``): the ``.glb`` imported into an empty Blender scene
and exported as FBX, armature, skin, shape keys and animation baked.

Needs only ``bpy`` (no torch), so that it also runs in a Python that has Blender's module and not
the project's stack::

    python common/export/fbx.py hand.glb hand.fbx
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root on the path, for common.errors
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from common.errors import DeepHandMeshError  # noqa: E402 (torch-free)

INSTALL_HINT = ("--format fbx needs Blender's Python module bpy, which is not installed: pip install bpy "
                "(a Python 3.11 wheel of several hundred MB), or open the .glb in Blender and use "
                "File > Export > FBX")


class FbxUnavailable(DeepHandMeshError, ValueError):
    """``bpy`` cannot be imported here; the message says how to install it."""


def import_bpy():
    """Blender's module, or :class:`FbxUnavailable` with the one line saying how to get it."""
    try:
        import bpy  # noqa: F401
    except ImportError:
        raise FbxUnavailable(INSTALL_HINT) from None
    return bpy


def import_glb(bpy, glb_path) -> None:
    """An empty scene holding the ``.glb`` (Blender's own glTF importer)."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=str(glb_path))


def glb_to_fbx(glb_path, fbx_path) -> None:
    """Write ``fbx_path`` (atomically) from the ``.glb`` at ``glb_path``."""
    bpy = import_bpy()
    import_glb(bpy, glb_path)
    fbx_path = Path(fbx_path)
    fbx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fbx_path.with_name(f".{fbx_path.stem}.tmp.fbx")  # Blender's exporter wants the .fbx suffix
    try:
        # Leaf bones off: the skeleton's tips (…_null) are joints of their own already.
        bpy.ops.export_scene.fbx(filepath=str(tmp), add_leaf_bones=False, bake_anim=True,
                                 bake_anim_use_all_actions=False, bake_anim_use_nla_strips=False,
                                 object_types={"ARMATURE", "MESH"}, use_mesh_modifiers=False)
        os.replace(tmp, fbx_path)
    finally:
        if tmp.exists():
            tmp.unlink()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python common/export/fbx.py IN.glb OUT.fbx", file=sys.stderr)
        sys.exit(2)
    glb_to_fbx(sys.argv[1], sys.argv[2])
