"""Pose input that is probably a slip is decoded with a warning (radians, beyond the joint
limits, a joint given twice in one source); YAML errors are worded with the file, line and a hint."""
import json
import logging
import math

import pytest

from common.hand.pose_io import PoseError, build_pose
from demo import demo
from demo.pose_edit import read_uploaded_pose


@pytest.fixture
def warnings(caplog):
    caplog.set_level(logging.WARNING, logger="deephandmesh")

    def collected():
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    return collected


def test_presets_and_plain_poses_give_no_warning(default_hand, warnings, tmp_path):
    for preset in ("original", "open", "fist", "point", "ok"):
        build_pose(default_hand, preset)
    build_pose(default_hand, "fist", ["thumb0=2,0,0", "index1=0,0,-3"])  # small whole degrees: not radians
    (tmp_path / "p.yaml").write_text("index1: [0, 0, 45.5]\nmiddle1: [0, 0, 2.5]\n")  # one angle beyond π
    build_pose(default_hand, str(tmp_path / "p.yaml"))
    assert warnings() == []


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_angles_that_look_like_radians_warn(default_hand, warnings, tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    values = {"index1": [0, 0, 1.5708], "middle1": [0, 0, 0.5]}
    path.write_text(json.dumps(values) if suffix == ".json" else "index1: [0, 0, 1.5708]\nmiddle1: [0, 0, 0.5]\n")
    euler = build_pose(default_hand, str(path))
    assert math.isclose(float(euler[0, default_hand.joint_index("index1"), 2]), math.radians(1.5708), rel_tol=1e-6)
    assert warnings() == [f"{path}: every angle is within ±π and some are fractions (1.5708): are these radians? "
                          "Pose angles are in degrees (1.5708 rad would be 90.0°)"]


def test_euler_angles_that_look_like_radians_warn(default_hand, warnings):
    build_pose(default_hand, "fist", ["index1=0,0,1.2", "middle1=0,0,0.8"])  # the fist's degrees do not count
    assert len(warnings()) == 1 and warnings()[0].startswith("--euler: every angle is within ±π")


def test_a_joint_given_twice_in_one_file_warns_and_the_last_counts(default_hand, warnings, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("index1: [0, 0, 10]\nmiddle1: [0, 0, 5]\nindex1: [0, 0, 20]\n")
    euler = build_pose(default_hand, str(path))
    assert math.isclose(float(euler[0, default_hand.joint_index("index1"), 2]), math.radians(20), rel_tol=1e-6)
    assert warnings() == [f"{path}:3: joint 'index1' is given 2 times (lines 1, 3); the last one counts"]


def test_a_joint_given_twice_in_json_or_under_two_names_warns(default_hand, warnings, tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"index1": [0, 0, 10],\n "middle1": [0, 0, 5],\n "index1": [0, 0, 30]}')
    build_pose(default_hand, str(path))
    assert warnings() == [f"{path}:3: joint 'index1' is given 2 times (lines 1, 3); the last one counts"]
    path = tmp_path / "q.yaml"
    path.write_text("index1: [0, 0, 10]\nb_r_index1: [0, 0, 30]\n")
    build_pose(default_hand, str(path))
    assert warnings()[1] == (f"{path}:2: joint 'b_r_index1' is given 2 times ({path}:1, {path}:2); "
                             "the last one counts")


def test_euler_replacing_the_pose_files_joint_is_no_duplicate(default_hand, warnings):
    euler = build_pose(default_hand, "fist", ["index1=0,0,30"])
    assert math.isclose(float(euler[0, default_hand.joint_index("index1"), 2]), math.radians(30), rel_tol=1e-6)
    assert warnings() == []
    build_pose(default_hand, "fist", ["index1=0,0,30", "b_r_index1=0,0,40"])
    assert warnings() == ["--euler b_r_index1=0,0,40: joint 'b_r_index1' is given 2 times (--euler index1=0,0,30, "
                          "--euler b_r_index1=0,0,40); the last one counts"]


def test_the_demo_warns_beyond_the_joint_limits_and_decodes(tmp_path, capsys, warnings):
    assert demo.main(["--pose", "open", "--euler", "index1=0,0,120", "--euler", "thumb3=0,0,-30",
                      "--out", str(tmp_path)]) == 0
    assert (tmp_path / "mesh.obj").is_file()
    assert warnings() == ["the pose: beyond the joint limits of common/hand/joint_limits.py (decoded as given): "
                          "b_r_thumb3 flexion -30° < -20°; b_r_index1 flexion 120° > 90°"]


def test_the_demo_prints_warnings_as_warnings(tmp_path):
    from tests.test_demo import run_cli

    result = run_cli("--euler", "index1=0,0,1.57", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "warning: --euler: every angle is within ±π and some are fractions (1.57): are these radians?" in result.stderr


@pytest.mark.parametrize("content, needle", [
    ("index1: [0, 0, 30]\n\tmiddle1: [0, 0, 1]\n",
     "p.yaml: not valid YAML: line 2, column 1: a tab; tabs are not allowed in YAML: indent with spaces"),
    ("index1: [0, 0, 30]\n  middle1: [0, 0, 1]\n",
     "p.yaml: not valid YAML: line 2, column 3: this line is indented differently from the entries above it"),
    ("index1: [0, 0, 30\nmiddle1: [0, 0, 1]\n",
     "p.yaml: not valid YAML: line 2, column 8: expected ',' or ']' in the '[' opened at line 1, column 9"),
    ("index1: [0, 0, 30\n", "p.yaml: not valid YAML: line 1, column 9: this '[' is never closed with ']'"),
    ("index1: [0, 0, 30]\nmiddle1 [0, 0, 1]\nring1: [0, 0, 1]\n",
     "p.yaml: not valid YAML: line 2: expected 'name: value': is the ':' (or the space after it) missing?"),
    ("index1: [0, 0, 30]\nmiddle1:[0, 0, 1]\n",
     "p.yaml: not valid YAML: line 2: expected 'name: value': is the ':' (or the space after it) missing?"),
])
def test_yaml_errors_in_the_projects_words(default_hand, tmp_path, capsys, content, needle):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(PoseError) as err:
        build_pose(default_hand, str(path))
    assert str(err.value).startswith(f"{tmp_path}/{needle}"), str(err.value)
    assert demo.main(["--pose", str(path), "--out", str(tmp_path / "o")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path}/{needle}")


def test_uploaded_file_warnings_name_the_uploaded_file(default_hand):
    notes = []
    read_uploaded_pose(default_hand, "my pose.yaml", b"index1: [0, 0, 10]\nindex1: [0, 0, 12]\n", notes)
    assert notes == ["my pose.yaml:2: joint 'index1' is given 2 times (lines 1, 2); the last one counts"]
