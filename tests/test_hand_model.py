"""Hand-model files: exact round trip, derived data, and a clear error for every kind of bad file."""
import re
import shutil

import numpy as np
import pytest

from common.hand.hand_model import (
    HAND_MODEL_FILES,
    HandModelError,
    load_hand_model,
    save_hand_model,
)

ARRAYS = ["vertices_cm", "uvs", "faces", "face_uvs", "skinning_weights", "local_pose", "global_pose",
          "global_pose_inv", "parents"]


def assert_same_model(a, b):
    assert a.joint_names == b.joint_names
    for key in ARRAYS:
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and np.array_equal(x, y), key


def test_round_trip_of_real_files_exact(any_hand_dir, tmp_path):
    original = load_hand_model(any_hand_dir)
    save_hand_model(original, tmp_path / "a")
    again = load_hand_model(tmp_path / "a")
    assert_same_model(original, again)
    # Written numbers are a fixed point: writing what was read gives identical bytes.
    save_hand_model(again, tmp_path / "b")
    for name in HAND_MODEL_FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_round_trip_default_exact(default_hand, tmp_path):
    save_hand_model(default_hand, tmp_path)
    assert_same_model(default_hand, load_hand_model(tmp_path))


def test_values_as_in_files(any_hand_dir):
    """Counts and a spot check against the text of the files: cm -> mm, a weight line by name."""
    hand = load_hand_model(any_hand_dir)
    lines = (any_hand_dir / "hand.obj").read_text().splitlines()
    v_lines = [l.split() for l in lines if l.startswith("v ")]
    assert hand.vertex_num == len(v_lines) and len(hand.faces) == sum(l.startswith("f ") for l in lines)
    assert len(hand.uvs) == sum(l.startswith("vt ") for l in lines)
    assert np.allclose(hand.vertices[-1], [float(x) * 10 for x in v_lines[-1][1:4]])
    weights = [l.split() for l in (any_hand_dir / "skinning_weight.txt").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    index, pairs = int(weights[-1][0]), weights[-1][1:]
    for name, w in zip(pairs[::2], pairs[1::2]):
        assert hand.skinning_weights[index, hand.joint_names.index(name)] == float(w)


def test_makehuman_values_as_in_files(makehuman_dir, makehuman):
    # Spot-check against the text: first vertex line (cm → mm) and a weight line.
    first_v = next(l for l in (makehuman_dir / "hand.obj").read_text().splitlines() if l.startswith("v "))
    assert np.allclose(makehuman.vertices[0], [float(x) * 10 for x in first_v.split()[1:4]])
    assert makehuman.skinning_weights[1, makehuman.joint_names.index("b_r_index3")] == 0.144
    assert makehuman.vertex_num == 1622 and len(makehuman.faces) == 3218 and len(makehuman.uvs) == 1845


def test_derived_data(any_hand):
    # The indices the original hard-codes for the released model, found here by name.
    assert any_hand.root_index == 21
    assert any_hand.align_joint_indices == [8, 12, 16, 20, 21]
    assert any_hand.non_rigid_joint_indices == [3, 21]
    assert any_hand.dof_num == 28
    dof = any_hand.dof_mask
    assert dof.shape == (22, 3) and dof.dtype == np.float32
    for j, name in enumerate(any_hand.joint_names):
        expected = {"null": [0, 0, 0], "3": [0, 0, 1], "2": [0, 0, 1], "1": [1, 1, 1], "0": [1, 1, 1],
                    "t": [0, 0, 0]}[("null" if name.endswith("null") else name[-1])]
        assert dof[j].tolist() == expected, name
    seg = any_hand.segmentation
    assert seg.shape == (any_hand.vertex_num,)
    assert np.array_equal(seg, np.array([np.argmax(r) for r in any_hand.skinning_weights]))
    order = any_hand.tree_order
    assert order[0] == 21 and sorted(order) == list(range(22))
    assert all(order.index(int(any_hand.parents[j])) < order.index(j) for j in order[1:])
    assert any_hand.children[21] == [4, 8, 12, 16, 20]
    # global_pose_inv is the inverse of the template global pose.
    assert np.allclose(np.linalg.inv(any_hand.global_pose), any_hand.global_pose_inv, atol=1e-5)


# ------------------------------------------------------------------ bad files
@pytest.fixture
def hand_dir(default_hand, tmp_path):
    folder = tmp_path / "hand"
    save_hand_model(default_hand, folder)
    return folder


def edit(path, old, new, count=1):
    text = path.read_text()
    assert old in text, f"test setup: {old!r} not in {path.name}"
    path.write_text(text.replace(old, new, count))


def line_of(path, needle):
    return next(i for i, l in enumerate(path.read_text().splitlines(), 1) if needle in l)


def expect_error(folder, *patterns):
    with pytest.raises(HandModelError) as info:
        load_hand_model(folder)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    return message


@pytest.mark.parametrize("name", HAND_MODEL_FILES)
def test_missing_file(hand_dir, name):
    (hand_dir / name).unlink()
    expect_error(hand_dir, re.escape(name), "missing hand-model file")


def test_not_a_folder(tmp_path):
    expect_error(tmp_path / "nope", "not a folder")


def test_unknown_joint_in_weights(hand_dir):
    path = hand_dir / "skinning_weight.txt"
    number = line_of(path, "b_r_wrist ")
    edit(path, "b_r_wrist ", "b_r_elbow ")
    expect_error(hand_dir, rf"skinning_weight.txt:{number}:", "unknown joint 'b_r_elbow'", "b_r_index1")


@pytest.mark.parametrize("name", ["local_pose.txt", "global_pose.txt", "global_pose_inv.txt"])
def test_unknown_joint_in_poses(hand_dir, name):
    path = hand_dir / name
    number = line_of(path, "b_r_ring2 ")
    edit(path, "b_r_ring2 ", "b_r_ring9 ")
    expect_error(hand_dir, rf"{name}:{number}:", "unknown joint 'b_r_ring9'")


def test_pose_missing_joint(hand_dir):
    path = hand_dir / "global_pose.txt"
    lines = [l for l in path.read_text().splitlines() if not l.startswith("b_r_pinky3 ")]
    path.write_text("\n".join(lines) + "\n")
    expect_error(hand_dir, "global_pose.txt", "no matrix for joints b_r_pinky3")


@pytest.mark.parametrize("name,old,new,pattern", [
    ("hand.obj", "\nv ", "\nv 1.0 oops ", "expected a number for a vertex coordinate, got 'oops'"),
    ("hand.obj", "\nvt ", "\nvt 0.5\nvt ", "expected 'vt u v'"),
    ("hand.obj", "\nf ", "\nf 1/1 2/2\nf ", "expected a triangle"),
    ("hand.obj", "\nf ", "\nf 1 2 3\nf ", "expected 'vertex/uv' indices"),
    ("hand.obj", "\nv ", "\nv nan 0 0\nv ", "not finite"),
    ("skeleton.txt", "b_r_wrist 21 -1", "b_r_wrist 21", "expected 'name id parent_id'"),
    ("skeleton.txt", "b_r_wrist 21 -1", "b_r_wrist x -1", "expected an integer for the joint id"),
    ("skinning_weight.txt", "\n5 ", "\n5 b_r_wrist\n5 ", "expected 'vertex_idx joint_name weight"),
    ("skinning_weight.txt", "\n5 ", "\n5 b_r_wrist heavy \n5 ", "expected a number for the weight of b_r_wrist"),
    ("local_pose.txt", "b_r_index1 ", "b_r_index1 1 2 ", "16 numbers"),
])
def test_malformed_line(hand_dir, name, old, new, pattern):
    path = hand_dir / name
    edit(path, old, new)
    message = expect_error(hand_dir, re.escape(name), re.escape(pattern))
    assert re.search(rf"{re.escape(name)}:\d+:", message), message


def test_malformed_line_names_the_line(hand_dir):
    path = hand_dir / "hand.obj"
    lines = path.read_text().splitlines()
    k = next(i for i, l in enumerate(lines) if l.startswith("v "))
    lines[k + 3] = "v 1 2 three"
    path.write_text("\n".join(lines) + "\n")
    expect_error(hand_dir, rf"hand.obj:{k + 4}: expected a number .* 'three'")


def test_face_index_out_of_range(hand_dir, default_hand):
    path = hand_dir / "hand.obj"
    V = default_hand.vertex_num
    lines = path.read_text().splitlines()
    k = next(i for i, l in enumerate(lines) if l.startswith("f "))
    lines[k] = f"f 1/1 2/2 {V + 5}/3"
    path.write_text("\n".join(lines) + "\n")
    expect_error(hand_dir, "hand.obj", f"face 1 refers to vertex {V + 5}", f"has {V} vertices ")


def test_face_uv_index_out_of_range(hand_dir, default_hand):
    path = hand_dir / "hand.obj"
    T = len(default_hand.uvs)
    lines = path.read_text().splitlines()
    k = next(i for i, l in enumerate(lines) if l.startswith("f "))
    lines[k] = f"f 1/1 2/{T + 1} 3/3"
    path.write_text("\n".join(lines) + "\n")
    expect_error(hand_dir, "hand.obj", f"refers to uv {T + 1}", f"has {T} uvs ")


def test_weight_vertex_out_of_range(hand_dir, default_hand):
    with open(hand_dir / "skinning_weight.txt", "a") as fp:
        fp.write(f"{default_hand.vertex_num} b_r_wrist 1 \n")
    expect_error(hand_dir, "skinning_weight.txt:\\d+: vertex index", f"has {default_hand.vertex_num} vertices")


def test_two_roots(hand_dir):
    edit(hand_dir / "skeleton.txt", "b_r_thumb0 4 21", "b_r_thumb0 4 -1")
    expect_error(hand_dir, "skeleton.txt", "exactly one root", "found 2", "b_r_thumb0", "b_r_wrist")


def test_no_root_cycle(hand_dir):
    edit(hand_dir / "skeleton.txt", "b_r_wrist 21 -1", "b_r_wrist 21 8")
    expect_error(hand_dir, "skeleton.txt", "exactly one root", "found 0")


def test_cycle(hand_dir):
    # index1 → index2 → index1: a loop beside a valid root.
    edit(hand_dir / "skeleton.txt", "b_r_index1 8 21", "b_r_index1 8 7")
    expect_error(hand_dir, "skeleton.txt", "cycle", "b_r_index1", "b_r_index2")


def test_duplicate_joint(hand_dir):
    edit(hand_dir / "skeleton.txt", "b_r_ring1 16 21", "b_r_middle1 16 21")
    expect_error(hand_dir, r"skeleton.txt:\d+: joint name b_r_middle1 is given twice")


def test_vertex_without_weight(hand_dir):
    path = hand_dir / "skinning_weight.txt"
    lines = [l for l in path.read_text().splitlines() if not l.startswith("7 ")]
    path.write_text("\n".join(lines) + "\n")
    expect_error(hand_dir, "skinning_weight.txt", "no skinning weight", "first vertex 7")


def test_missing_named_joint(hand_dir):
    # Renaming a joint consistently in every file keeps the files valid, but the alignment
    # joints are found by name, and that lookup must say what is missing.
    for name in ["skeleton.txt", "skinning_weight.txt", "local_pose.txt", "global_pose.txt", "global_pose_inv.txt"]:
        path = hand_dir / name
        path.write_text(path.read_text().replace("b_r_pinky1 ", "b_r_little1 "))
    model = load_hand_model(hand_dir)
    with pytest.raises(HandModelError, match="ends with 'pinky1', found none"):
        model.align_joint_indices
    assert model.non_rigid_joint_indices == [3, 21]


def test_comments_and_blank_lines_ignored(hand_dir, default_hand):
    for name in HAND_MODEL_FILES:
        path = hand_dir / name
        path.write_text("# a comment\n\n" + path.read_text() + "\n# trailing\n")
    assert_same_model(default_hand, load_hand_model(hand_dir))


def test_copy_of_a_hand_model_loads_from_other_place(any_hand_dir, tmp_path):
    shutil.copytree(any_hand_dir, tmp_path / "m")
    assert_same_model(load_hand_model(tmp_path / "m"), load_hand_model(any_hand_dir))
