"""The pose editor without a browser: its pose state gives demo.py's mesh, its YAML round-trips, the
joint limits and the errors (the same one-line messages as demo.py). The page itself is tested in a
real browser in tests/test_editor_browser.py."""
import socket

import numpy as np
import pytest
import torch

from common.hand.pose_io import PoseError, build_pose, preset_names
from demo import demo, editor
from main import model_options
from common.hand.joint_limits import FREE_RANGE_DEG, JOINT_LIMITS_DEG, joint_limits_deg, joint_type, limit_violations
from demo.pose_edit import (angle_dofs, clamp, copy_finger, euler_tensor, finger_joints, pose_degrees, pose_yaml,
                            random_pose, read_uploaded_pose, tidy)
from tests.test_demo import read_obj


def random_degrees(hand, seed):
    rng = np.random.default_rng(seed)
    return tidy(rng.uniform(-60, 60, (hand.joint_num, 3)), hand)


@pytest.mark.parametrize("preset", ["original", "open", "fist", "point", "ok"])
def test_preset_state_is_the_demos_input(preset, any_hand):
    # The editor's decoder input for a preset is build_pose's tensor, bit for bit.
    assert torch.equal(euler_tensor(pose_degrees(any_hand, preset)), build_pose(any_hand, preset))


def test_saved_yaml_reproduces_the_mesh_in_demo(tmp_path, any_hand, monkeypatch):
    """State → YAML → demo.py --pose: the same decoder input and the same mesh, vertex for vertex."""
    deg = random_degrees(any_hand, 3)
    path = tmp_path / "pose.yaml"
    path.write_text(pose_yaml(any_hand, deg, comment="a test\nsecond line"))
    assert torch.equal(build_pose(any_hand, str(path)), euler_tensor(deg))
    # the editor's decode (Editor.decode is decode_pose of euler_tensor) against demo.py's mesh.obj
    monkeypatch.setattr(model_options, "resolve_hand_model", lambda folder: any_hand)
    model = demo.get_model("test", any_hand)
    model.zero_correctives()
    _, verts = demo.decode_pose(model.eval(), euler_tensor(deg), torch.device("cpu"))
    assert demo.main(["--pose", str(path), "--out", str(tmp_path / "out")]) == 0
    v, _, _ = read_obj(tmp_path / "out" / "mesh.obj")
    assert np.array_equal(v, verts[0])


def test_yaml_round_trip_and_upload(any_hand):
    deg = random_degrees(any_hand, 4)
    text = pose_yaml(any_hand, deg)
    back = read_uploaded_pose(any_hand, "mine.yaml", text.encode())
    assert np.array_equal(back, deg)
    # every joint with a degree of freedom is written, full names, nothing else
    names = [line.split(":")[0] for line in text.splitlines() if not line.startswith("#")]
    assert names == [n for j, n in enumerate(any_hand.joint_names) if any_hand.dof_mask[j].any()]
    # JSON too, as demo.py reads it
    json_text = "{" + ", ".join(f'"{n}": [{x}, {y}, {z}]' for n, (x, y, z) in
                                zip(any_hand.joint_names, deg.tolist())) + "}"
    assert np.array_equal(read_uploaded_pose(any_hand, "p.json", json_text.encode()), deg)


@pytest.mark.parametrize("name,content", [
    ("bad.yaml", b"index1: [0, 0\n"),
    ("unknown.yaml", b"b_r_index7: [0, 0, 10]\n"),
    ("axis.yaml", b"index2: [10, 0, 0]\n"),
    ("two.json", b'{"index1": [1, 2]}'),
    ("list.yaml", b"- 1\n- 2\n"),
    ("nan.yaml", b"index1: [0, 0, .nan]\n"),
])
def test_upload_errors_are_the_demos_messages(name, content, tmp_path, monkeypatch, capsys, default_hand):
    """A bad uploaded file gives exactly the line demo.py prints for the same file."""
    (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--pose", name, "--out", str(tmp_path / "o")]) == 2
    demo_line = capsys.readouterr().err.strip()
    with pytest.raises(PoseError) as err:
        read_uploaded_pose(default_hand, "C:\\Users\\me\\" + name, content)  # a browser may send a full path
    assert f"error: {err.value}" == demo_line


# ---------------------------------------------------------------- limits
def test_limit_table_rows_and_values(any_hand):
    limits = joint_limits_deg(any_hand)
    assert limits.shape == (any_hand.joint_num, 3, 2)
    assert np.all(limits[..., 0] <= limits[..., 1])
    assert np.all(limits[any_hand.dof_mask == 0] == 0)  # nothing where the joint cannot turn
    # AAOS figures: finger MCP 90 flexion / 45 hyperextension, PIP 100 / 0, DIP 90 / 10, thumb IP 80 / 20
    for suffix, (lo, hi) in (("index1", (-45, 90)), ("pinky2", (0, 100)), ("ring3", (-10, 90)),
                             ("thumb3", (-20, 80)), ("thumb2", (0, 50))):
        assert tuple(limits[any_hand.joint_index(suffix), 2]) == (lo, hi), suffix
    assert joint_type("b_r_wrist") is None and joint_type("b_r_index_null") is None
    assert joint_type("b_r_thumb1") == "thumb CMC" and set(JOINT_LIMITS_DEG) >= {"finger MCP", "thumb IP"}
    lifted = joint_limits_deg(any_hand, lifted=True)
    assert np.all(lifted[any_hand.dof_mask == 1] == [-FREE_RANGE_DEG, FREE_RANGE_DEG])
    assert np.all(lifted[any_hand.dof_mask == 0] == 0)


@pytest.mark.parametrize("preset", preset_names())
def test_presets_lie_within_the_limits(preset, any_hand):
    assert limit_violations(any_hand, pose_degrees(any_hand, preset), joint_limits_deg(any_hand)) == []


def test_clamp_and_violations(default_hand):
    limits = joint_limits_deg(default_hand)
    deg = np.zeros((default_hand.joint_num, 3))
    i1, i2 = default_hand.joint_index("index1"), default_hand.joint_index("index2")
    deg[i1, 2], deg[i2, 2] = 120.0, -5.0
    assert sorted(limit_violations(default_hand, deg, limits)) == ["b_r_index1 flexion 120° > 90°",
                                                                   "b_r_index2 flexion -5° < 0°"]
    clamped = clamp(deg, limits)
    assert clamped[i1, 2] == 90 and clamped[i2, 2] == 0 and limit_violations(default_hand, clamped, limits) == []


def test_random_pose_within_limits(any_hand):
    limits = joint_limits_deg(any_hand)
    poses = [random_pose(any_hand, limits, np.random.default_rng(s)) for s in range(20)]
    for deg in poses:
        assert limit_violations(any_hand, deg, limits) == []
        assert np.all(deg[any_hand.dof_mask == 0] == 0)
    assert np.array_equal(poses[0], random_pose(any_hand, limits, np.random.default_rng(0)))  # seeded
    assert np.std([p[any_hand.joint_index("index1"), 2] for p in poses]) > 5  # it does vary


def test_copy_finger(any_hand):
    deg = random_degrees(any_hand, 5)
    out = copy_finger(any_hand, deg, "middle")
    src = finger_joints(any_hand, "middle")
    for finger in ("index", "ring", "pinky"):
        assert np.array_equal(out[finger_joints(any_hand, finger)], deg[src])
    thumb = finger_joints(any_hand, "thumb")
    assert np.array_equal(out[thumb], deg[thumb]) and np.array_equal(out[src], deg[src])
    with pytest.raises(ValueError, match="expected one of index"):
        copy_finger(any_hand, deg, "thumb")


def test_one_slider_per_degree_of_freedom(any_hand):
    dofs = angle_dofs(any_hand)
    assert list(dofs) == ["thumb", "index", "middle", "ring", "pinky"]
    flat = [d for group in dofs.values() for d in group]
    assert sorted(flat) == sorted(zip(*np.nonzero(any_hand.dof_mask)))  # each DoF once, the wrist has none
    assert [editor.dof_label(any_hand, j, k) for j, k in dofs["index"][:2]] == ["index1 flexion", "index1 spread"]


# ---------------------------------------------------------------- start-up errors
def test_port_taken_is_a_clear_error(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert editor.main(["--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: 127.0.0.1:{port} is taken" in err and "give another port" in err
    assert "Traceback" not in err


def test_bad_start_pose_and_host(capsys):
    assert editor.main(["--pose", "fistt", "--port", "0"]) == 2
    assert "not a preset name" in capsys.readouterr().err
    assert editor.main(["--host", "no-such-host.invalid", "--port", "0"]) == 2
    assert "--host no-such-host.invalid: not an address of this machine" in capsys.readouterr().err
