"""The exported .glb in Blender: imported with Blender's own glTF importer, the armature played to
each keyframe, the evaluated (armature-deformed, shape-keyed) mesh equals Model.decode; the FBX
written through Blender opens again with the skeleton, the shape keys and the animation.

Needs Blender's Python module ``bpy``: in this Python, or in another one named by the environment
variable ``DEEPHANDMESH_BPY_PYTHON`` (``bpy`` wheels exist for Python 3.11 and are several hundred MB,
so CI does not install them); skips with the reason otherwise."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.hand.pose_io import build_pose
from tests.test_export import TOLERANCE_MM, decoded, export, model_vertices, personalised  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
KEYFRAMES = ("open", "fist", "ok")


def bpy_python():
    if importlib.util.find_spec("bpy") is not None:
        return sys.executable
    other = os.environ.get("DEEPHANDMESH_BPY_PYTHON")
    if other:
        return other
    pytest.skip("Blender's Python module bpy is not installed (pip install bpy, Python 3.11; or name a Python "
                "that has it in DEEPHANDMESH_BPY_PYTHON)")


def test_blender_imports_the_glb_as_decoded_and_the_fbx_opens_again(personalised, tmp_path):
    python = bpy_python()
    folder, hand, model, ckpt = personalised
    f = export(tmp_path, "--hand_model", folder, "--ckpt", ckpt, "--poses", *KEYFRAMES, name="keyframes.glb")
    result = subprocess.run([python, str(REPO / "tests" / "blender_check.py"), str(tmp_path / "keyframes.glb"),
                             str(tmp_path / "blender.npz"), str(tmp_path / "keyframes.fbx"), "0", "1", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "blender.npz")
    expected = decoded(model, torch.cat([build_pose(hand, p) for p in KEYFRAMES]))[:, model_vertices(f, hand)]
    positions = out["positions"] * 1e3
    assert positions.shape == expected.shape, "Blender's importer changed the vertices"
    # Blender's armature deform keeps every influence (no limit of four): the decode, exactly.
    assert np.abs(positions - expected).max() < TOLERANCE_MM
    assert sorted(out["bones"].tolist()) == sorted(hand.joint_names)
    # The FBX opens again: the skeleton, the mesh, the shape keys (basis + one per keyframe), the animation.
    assert sorted(out["fbx_bones"].tolist()) == sorted(hand.joint_names)
    assert int(out["fbx_vertices"]) >= hand.vertex_num
    assert int(out["fbx_shape_keys"]) == 1 + len(KEYFRAMES)
    assert int(out["fbx_actions"]) >= 1
