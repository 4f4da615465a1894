"""Corrupt and hostile files (issue 17): every reader names the file and line, refuses non-finite
values, never damages numpy, and one bad file costs one sample, not a training run."""
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from common.io.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from common.hand.hand_model import HandModelError, load_hand_model, save_hand_model
from common.hand.pose_io import PoseError, build_pose
from common.io.safe_pickle import DepthmapError, load_depthmap
from data.dataset import (DataFormatError, DeepHandMeshDataset, SampleError, SkipReport, message_path,
                          read_krt, read_pts_raw)
from main.config import Config, ConfigError
from tests.conftest import REPO


def replace_line(path: Path, number: int, text: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = text
    path.write_bytes(b"\n".join(lines))


def first_line_starting(path: Path, start: str) -> int:
    lines = path.read_text(encoding="utf-8").split("\n")
    return next(i for i, line in enumerate(lines, 1) if line.startswith(start))


# ------------------------------------------------------------------------------ text readers
@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory, default_hand):
    folder = tmp_path_factory.mktemp("hand") / "hand_model"
    save_hand_model(default_hand, folder)
    return folder


@pytest.mark.parametrize("name, start, line, needle", [
    ("skeleton.txt", "b_r_index1", b"b_r_ind\xcaex1 5 4", r"skeleton.txt:{n}: byte 0xca at column 8 is not UTF-8"),
    ("hand.obj", "v ", b"v 1.0 nan 2.0", r"hand.obj:{n}: a vertex coordinate is not finite \('nan'\)"),
    ("hand.obj", "v ", b"v 1.0 1e400 2.0", r"hand.obj:{n}: a vertex coordinate is not finite"),
    ("hand.obj", "v ", b"v 1.0 1e7 2.0", r"hand.obj:{n}: a vertex coordinate 1e7 is larger than 1e\+06"),
    ("hand.obj", "f ", b"f 1/1 2.5/2 3/3", r"hand.obj:{n}: expected an integer for a face vertex index, got '2.5'"),
    ("hand.obj", "f ", b"f 1/1 0/2 3/3", r"hand.obj:{n}: a face vertex index 0 is out of range \(1\.\."),
    ("hand.obj", "f ", b"f 1/1 99999999999999999999/2 3/3", r"hand.obj:{n}: a face vertex index 9+ is out of range"),
    ("skeleton.txt", "b_r_index1", b"b_r_index1 5 inf", r"skeleton.txt:{n}: expected an integer for the parent id, got 'inf'"),
    ("skeleton.txt", "b_r_index1", b"b_r_index1 500 4", r"skeleton.txt:{n}: joint id 500 out of range"),
    ("skinning_weight.txt", "7 ", b"7 b_r_wrist -inf", r"skinning_weight.txt:{n}: the weight of b_r_wrist is not finite"),
    ("skinning_weight.txt", "7 ", b"-7 b_r_wrist 1", r"skinning_weight.txt:{n}: the vertex index -7 is out of range"),
    ("local_pose.txt", "b_r_wrist", b"b_r_wrist" + b" 1" * 15 + b" NaN", r"local_pose.txt:{n}: a matrix entry is not finite"),
    ("global_pose.txt", "b_r_wrist", b"1" * 70000, r"global_pose.txt:{n}: line of 70000 characters"),
])
def test_hand_model_files_name_file_and_line(hand_dir, tmp_path, name, start, line, needle):
    folder = tmp_path / "hand_model"
    shutil.copytree(hand_dir, folder)
    number = first_line_starting(folder / name, start)
    replace_line(folder / name, number, line)
    with pytest.raises(HandModelError, match=needle.format(n=number)) as err:
        load_hand_model(folder)
    assert str(err.value).startswith(str(folder / name))


@pytest.fixture(scope="module")
def data_set(tmp_path_factory, default_hand):
    """1 sequence x 4 frames x 3 cameras (64x42 images, 32x21 depth maps)."""
    from data.make_synthetic import generate

    out = tmp_path_factory.mktemp("corrupt_set")
    generate(out, default_hand, seed=3, sequences=1, frames=4, cameras=3, image_hw=(64, 42),
             depth_hw=(32, 21), progress=False, drop_keypoints=0.0)
    return out


@pytest.mark.parametrize("line, needle", [
    (b"1 nan 2 3 1 1", r"pts:1: '1 nan 2 3 1 1' has a non-finite number"),
    (b"nan 1 2 3 1 1", r"pts:1: 'nan 1 2 3 1 1' has a non-finite number"),
    (b"inf 1 2 3 1 1", r"pts:1: 'inf 1 2 3 1 1' has a non-finite number"),
    (b"1e400 1 2 3 1 1", r"pts:1: .* non-finite"),
    (b"3.5 1 2 3 1 1", r"pts:1: joint index must be an integer 0\.\.\.41 .* found 3\.5"),
    (b"42 1 2 3 1 1", r"pts:1: joint index must be an integer .* found 42"),
    (b"1 1 2 3 nan 1", r"pts:1: .* non-finite"),
    (b"1 1e10 2 3 1 1", r"pts:1: a coordinate is larger than 1e\+09 mm"),
    (b"1 1 2\xff 3 1 1", r"pts:1: byte 0xff at column 6 is not UTF-8"),
])
def test_keypoint_file_errors_name_file_and_line(tmp_path, line, needle):
    path = tmp_path / "k.pts"
    path.write_bytes(line + b"\n2 1 2 3 1 1\n")
    with pytest.raises(DataFormatError, match=needle) as err:
        read_pts_raw(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("row, text, needle", [
    (2, b"1 0 nan", r"KRT:2: camera '400000': row 1 of K is not finite"),
    (3, b"0 1e400 0", r"KRT:3: camera '400000': row 2 of K is not finite"),
    (6, b"1 0 0 1e12\xe9", r"KRT:6: byte 0xe9 at column 11 is not UTF-8"),
    (7, b"0 1 0 1e12", r"KRT:7: camera '400000': row 2 of \[R\|t\] has a number larger than 1e\+09"),
])
def test_camera_file_errors_name_file_and_line(tmp_path, row, text, needle):
    path = tmp_path / "KRT"
    lines = [b"400000", b"1 0 0", b"0 1 0", b"0 0 1", b"0 0 0 0 0", b"1 0 0 0", b"0 1 0 0", b"0 0 1 0", b""]
    lines[row - 1] = text
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataFormatError, match=needle):
        read_krt(path)


@pytest.mark.parametrize("suffix, content, needle", [
    (".yaml", b"index1: [0, 0, 30]\nmiddle1: [0, 0, .inf]\n", r"p.yaml:2: joint 'middle1': angle z is not finite"),
    (".yaml", b"index1: [0, 0, 30]\nmid\xcadle1: [0, 0, 1]\n", r"p.yaml:2: byte 0xca at column 4 is not UTF-8"),
    (".yaml", b"index1: [0, 0, 1" + b"0" * 400 + b"]\n", r"p.yaml:1: joint 'index1': angle z is too large"),
    (".yaml", b"index1: [0, 0, 1e7]\n", r"p.yaml:1: joint 'index1': angle z of 1e\+07\xb0 is larger"),
    (".yaml", b"\n\nindex1: [0, 0, 2001-13-45]\n", r"p.yaml: not valid YAML: "),
    (".json", b'{"index1": [0, 0, 30],\n "middle1": [0, 0, 1e999]}', r"p.json:2: joint 'middle1': angle z is not finite"),
    (".json", b'{"index1": [0, 0, 30],\n "middle1": [0, 0, ' + b"9" * 5000 + b"]}", r"p.json: not valid JSON"),
    (".json", b'{"index1": [0, 0, \xff30]}', r"p.json:1: byte 0xff at column 19"),
])
def test_pose_file_errors_name_file_and_line(default_hand, tmp_path, suffix, content, needle):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(content)
    with pytest.raises(PoseError, match=needle) as err:
        build_pose(default_hand, str(path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content, needle", [
    (b"resnet_type: 18\nlr: .nan\n", r"c.yaml:2: option 'lr' expects a number \(finite\), got nan"),
    (b"end_epoch: .inf\n", r"c.yaml:1: option 'end_epoch' expects an integer, got inf"),
    (b"lr: " + b"9" * 400 + b"\n", r"c.yaml:1: option 'lr' expects a number \(finite\)"),
    (b"resnet_type: 18\nsubject: 2001-13-45\n", r"c.yaml: not valid YAML: "),
    (b"resnet_type: 1\xc08\n", r"c.yaml:1: byte 0xc0 at column 15 is not UTF-8"),
    (b"on_error: maybe\n", r"c.yaml:1: option 'on_error' expects one of skip, stop"),
])
def test_config_file_errors_name_file_and_line(tmp_path, content, needle):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=needle) as err:
        Config().update_from_yaml(path)
    assert "\n" not in str(err.value)


def test_files_over_the_size_limit_are_refused_unread(tmp_path, default_hand):
    path = tmp_path / "keypoints0000.pts"
    path.write_bytes(b"1 1 2 3 1 1\n" * 200_000)  # 2.4 MB, the limit is 1 MiB
    with pytest.raises(DataFormatError, match=r"keypoints0000.pts: larger than 1048576 bytes"):
        read_pts_raw(path)
    path = tmp_path / "big.yaml"
    path.write_bytes(b"# comment\n" * 200_000)
    with pytest.raises(PoseError, match="big.yaml: larger than"):
        build_pose(default_hand, str(path))


# ------------------------------------------------------------------------------ depth maps
def test_byte_order_flip_is_refused_with_the_pixel_count(tmp_path):
    depth = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 600.0]], np.float32)
    data = pickle.dumps(depth, protocol=2)
    assert data.count(b"<") == 1
    path = tmp_path / "depthmap400000.pkl"
    path.write_bytes(data.replace(b"<", b">"))
    # what a plain unpickler makes of it: garbage, no complaint
    flipped = pickle.loads(path.read_bytes())
    assert 0 < flipped[0, 1] < 1e-40
    with pytest.raises(DepthmapError, match=r"depthmap400000.pkl: depth map has 3 pixel\(s\) with a "
                                            r"depth between 0 and depth_min = 1 mm"):
        load_depthmap(path)


@pytest.mark.parametrize("values, needle", [
    ([[0.0, -3.0, -1.0]], r"2 negative pixel\(s\)"),
    ([[np.nan, 5.0, np.inf]], r"2 non-finite pixel\(s\)"),
    ([[0.0, 0.5, 5.0]], r"1 pixel\(s\) with a depth between 0 and depth_min = 1 mm"),
])
def test_impossible_depths_are_refused_with_the_pixel_count(tmp_path, values, needle):
    path = tmp_path / "depthmap400001.pkl"
    path.write_bytes(pickle.dumps(np.array(values, np.float32)))
    with pytest.raises(DepthmapError, match=needle) as err:
        load_depthmap(path)
    assert str(err.value).startswith(str(path))
    np.testing.assert_array_equal(load_depthmap(path, depth_min=0.0), values) if needle.startswith("1 ") else None


def test_pickled_dtype_state_is_validated_never_applied(tmp_path):
    depth = np.arange(6, dtype=np.float32).reshape(2, 3) + 1
    data = pickle.dumps(depth, protocol=2)
    path = tmp_path / "d.pkl"
    # a dtype state with fields, another element size, an unknown byte order, a wrong byte count
    for old, new, needle in [
        (b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t", b"NNNJ\x08\x00\x00\x00J\xff\xff\xff\xffK\x00t",
         "fields, a subarray or flags"),
        (b"X\x01\x00\x00\x00<", b"X\x01\x00\x00\x00!", "byte order '!'"),
        (b"X\x02\x00\x00\x00f4", b"X\x02\x00\x00\x00f8", "the array data has 24 bytes, but its shape"),
        (b"X\x02\x00\x00\x00f4", b"X\x02\x00\x00\x00O8", "found an array of dtype object"),
    ]:
        assert old in data, old
        path.write_bytes(data.replace(old, new, 1))
        with pytest.raises(DepthmapError, match=needle):
            load_depthmap(path)


NUMPY_CHECK = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np, pickle
    from tools.fuzz import m_byte_order, m_flip_bytes, m_insert_bytes, m_overwrite_run, m_truncate, numpy_fingerprint
    from common.io.safe_pickle import DepthmapError, loads_numeric_array
    before = numpy_fingerprint()
    rng = np.random.default_rng(0)
    depth = (np.arange(12 * 9, dtype=np.float32).reshape(12, 9) % 7) * 100
    bases = [pickle.dumps(depth.astype(t), protocol=p) for t in (np.float32, np.float64, np.uint16) for p in (0, 2, 4, 5)]
    mutations = [m_byte_order, m_flip_bytes, m_insert_bytes, m_overwrite_run, m_truncate]
    counts = {"loaded": 0, "refused": 0}
    for case in range(4000):
        data = bases[case % len(bases)]
        for _ in range(1 + case % 3):
            data = mutations[int(rng.integers(len(mutations)))](data, rng)
        try:
            loads_numeric_array(data, "case")
            counts["loaded"] += 1
        except DepthmapError:
            counts["refused"] += 1
        del data
    import gc; gc.collect()
    after = numpy_fingerprint()
    x = np.linspace(0, 1, 10001, dtype=np.float32)
    print(counts["loaded"], counts["refused"], before == after, float(x.sum()), np.dtype("float32").str)
""")


def test_thousands_of_corrupt_pickles_leave_numpy_intact():
    """Run in a subprocess: damage to numpy's shared state would otherwise hit the test process."""
    result = subprocess.run([sys.executable, "-c", NUMPY_CHECK, str(REPO)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # no "SystemError: deallocated bytearray ..." from the unpickler either
    loaded, refused, same, total, f4 = result.stdout.split()
    assert int(loaded) + int(refused) == 4000 and int(refused) > 2000 and int(loaded) > 0
    assert same == "True" and f4 == "<f4"
    assert float(total) == pytest.approx(5000.5, rel=1e-6)


# ------------------------------------------------------------------------------ training survives
def corrupt_one_of_each(root: Path, default_hand):
    """One bad keypoint file (frame 1), image (camera 0, frame 2) and depth map (camera 1, frame 3).
    Returns ``{path: 'kind'}`` and the indices of the samples they break (every view is a target)."""
    ds = DeepHandMeshDataset(root, joint_names=default_hand.joint_names, render_view_num=3)
    pts = ds.keypoint_path(1)
    replace_line(pts, 1, b"nan " + pts.read_bytes().split(b"\n")[0].split(b" ", 1)[1])
    image = next(ds.image_path(i) for i, (_s, c, f) in enumerate(ds.samples) if c == ds.cameras[0] and f == 2)
    image.write_bytes(b"\xff\xd8\xff\xe0 truncated download")
    depth = ds.depthmap_path(3, ds.cameras[1])
    depth.write_bytes(depth.read_bytes().replace(b"<", b">", 1))
    bad = {}
    for i, (_s, c, f) in enumerate(ds.samples):
        if f == 1:
            bad[i] = pts
        elif f == 2 and c == ds.cameras[0]:
            bad[i] = image
        elif f == 3:
            bad[i] = depth
    return {pts: "pts", image: "image", depth: "depthmap"}, bad, len(ds)


def expected_skips(bad, n):
    """Per file, the failed attempts of one epoch: visiting i tries i, i+1, ... until one loads."""
    counts = {}
    for start in range(n):
        j = start
        while j % n in bad:
            counts[bad[j % n]] = counts.get(bad[j % n], 0) + 1
            j += 1
    return counts


@pytest.fixture
def corrupt_set(data_set, tmp_path, default_hand):
    root = tmp_path / "data"
    shutil.copytree(data_set, root)
    files, bad, n = corrupt_one_of_each(root, default_hand)
    return root, files, bad, n


@pytest.mark.parametrize("workers", [0, 2])
def test_one_corrupt_file_of_each_kind_costs_only_its_samples(corrupt_set, tmp_path, workers, caplog):
    """One epoch with three corrupt files: only their samples are skipped, and the epoch's log
    names every file with its count (one line per epoch, whatever the workers)."""
    from main.trainer import Trainer
    from tests.test_train import tiny_config

    root, files, bad, n = corrupt_set
    config = tiny_config(root)
    config.update_from_strings(["render_view_num=3", f"num_thread={workers}", f"output_dir={tmp_path / 'out'}"])
    trainer = Trainer(config, seed=0)
    trainer.make_batch_generator()
    trainer.make_model()
    caplog.clear()
    with caplog.at_level("WARNING", logger="deephandmesh"):
        means = trainer.train_epoch(0)
    assert all(np.isfinite(v) for v in means.values())
    report = trainer.skip_report
    expected = expected_skips(bad, n)
    # The end-of-epoch summary: the total, then each file with its count (the dataset's own
    # warning names only the first failure, and only in the process that met it).
    (summary,) = [r.getMessage() for r in caplog.records
                  if r.name == "deephandmesh" and r.getMessage().startswith("epoch 0: ")]
    assert f"{sum(expected.values())} sample(s) skipped, {len(files)} file(s): " in summary, summary
    for path, count in expected.items():
        assert f"{report.files[str(path)][1]} ({count}x)" in summary, (path, count, summary)
    assert {Path(p): count for p, (count, _msg) in report.files.items()} == expected
    assert set(expected) == set(files) and report.count == sum(expected.values())
    for path, (_count, message) in report.files.items():
        assert message.startswith(path) and "\n" not in message
    assert "non-finite" in report.files[str(next(p for p, k in files.items() if k == "pts"))][1]
    # a float32 map read with the other byte order: impossible depths (negative, tiny or huge)
    assert "pixel(s)" in report.files[str(next(p for p, k in files.items() if k == "depthmap"))][1]
    assert trainer.dataset.skipped == report.count  # the shared counter agrees, workers or not


@pytest.mark.parametrize("workers", [0, 2])
def test_on_error_stop_ends_the_run_with_the_same_one_line_message(corrupt_set, tmp_path, workers):
    from tests.test_train import run_script, tiny_args

    root, files, bad, n = corrupt_set
    out = tmp_path / "out"
    result = run_script("train.py", "--end_epoch", "1", *tiny_args(root, out), "--set", "render_view_num=3",
                        "--set", f"num_thread={workers}", "--set", "on_error=stop")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if " error: " in line]  # after the log's time
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    message = errors[0].split(" error: ", 1)[1]
    path = Path(message_path(message))
    assert path in files and message.startswith(str(path)), errors
    assert message.startswith(f"{path}:1: ") and "non-finite" in message  # the keypoint file's first line


def test_sample_error_from_a_worker_is_one_line_again():
    text = ("Caught SampleError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise err\ndata.dataset.SampleError: /a/b.pts:3: bad value\n')
    err = SampleError(text)
    assert str(err) == "/a/b.pts:3: bad value"
    report = SkipReport()
    report.add({"skipped": ["/no/such/folder/x.pkl: bad\n", "", "/no/such/folder/x.pkl: bad"]})
    assert report.count == 2 and report.summary().startswith("2 sample(s) skipped, 1 file(s)")


# ------------------------------------------------------------------------------ snapshots
def tensor_offset(path: Path, values: torch.Tensor) -> int:
    raw = values.numpy().tobytes()
    data = path.read_bytes()
    at = data.find(raw)
    assert at > 0
    return at + len(raw) // 2


def test_corrupted_snapshot_is_refused_and_original_layout_loads_as_before(tmp_path):
    weights = torch.arange(1000, dtype=torch.float32) / 7
    state = {"epoch": 4, "network": {"module.w": weights.clone()}, "optimizer": {"state": {}, "param_groups": []}}
    ours, theirs = tmp_path / "ours.pth.tar", tmp_path / "theirs.pth.tar"
    save_checkpoint(state, ours)
    torch.save(state, theirs)  # the original's trainer: no digest
    assert "tensor_digest" in torch.load(ours, weights_only=True)
    assert torch.equal(read_checkpoint(ours)["network"]["module.w"], weights)
    assert "tensor_digest" not in read_checkpoint(ours)
    for path in (ours, theirs):
        data = bytearray(path.read_bytes())
        data[tensor_offset(path, weights)] ^= 0x10  # one bit of one weight
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"ours.pth.tar: the snapshot's contents do not match the digest"):
        read_checkpoint(ours)
    # without a digest, as today: it loads (with the changed weight - what the digest is for)
    loaded = read_checkpoint(theirs)["network"]["module.w"]
    assert (loaded != weights).sum() == 1


def test_digest_covers_every_entry(tmp_path):
    from common.io.checkpoint import snapshot_digest

    base = {"epoch": 1, "network": {"a": torch.zeros(3)}, "optimizer": {"param_groups": [{"lr": 1e-4}]}}
    digests = {snapshot_digest(base)}
    for changed in ({"epoch": 2}, {"network": {"a": torch.zeros(3, dtype=torch.float64)}},
                    {"network": {"a": torch.zeros(1, 3)}}, {"network": {"b": torch.zeros(3)}},
                    {"optimizer": {"param_groups": [{"lr": 1e-3}]}}):
        digests.add(snapshot_digest({**base, **changed}))
    assert len(digests) == 6


# ------------------------------------------------------------------------------ the fuzzer
def test_fuzzer_classifies_outcomes(tmp_path):
    from tools.fuzz import Kind, classify

    path = tmp_path / "f.txt"
    kind = Kind("pose", [path], read=None, check=lambda v: None if np.isfinite(v) else "non-finite",
                errors=(PoseError,), expected_prefix=str)

    def raise_(err):
        raise err

    assert classify(kind, path, lambda: 1.0) == ("loaded", "")
    assert classify(kind, path, lambda: float("nan")) == ("accepted", "non-finite")
    assert classify(kind, path, lambda: raise_(PoseError(f"{path}:3: bad"))) == ("refused", f"{path}:3: bad")
    assert classify(kind, path, lambda: raise_(PoseError("bad")))[0] == "unclear"  # no file named
    assert classify(kind, path, lambda: raise_(PoseError(f"{path}: a\nb")))[0] == "unclear"
    assert classify(kind, path, lambda: raise_(UnicodeDecodeError("utf-8", b"\xca", 0, 1, "x")))[0] == "unclear"


def test_fuzzer_run_finds_no_unclear_failure(tmp_path):
    """250 seeded cases of every kind through the scripts' readers (BENCHMARKS.md has a 10,000-case run)."""
    out = tmp_path / "fuzz.json"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "fuzz.py"), "--cases", "2000", "--seed", "17",
                             "--hand_vertices", "300", "--json", str(out), "--keep", str(tmp_path / "kept")],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["numpy_state_unchanged"] and report["failures"] == []
    for name, tally in report["kinds"].items():
        assert tally["cases"] == 250 and tally["unclear"] == tally["accepted"] == 0, (name, tally)
        assert tally["refused"] > 20, (name, tally)  # the mutations do break files
    assert sum(t["loaded"] for t in report["kinds"].values()) > 100  # and some stay readable


# ------------------------------------------------------------------------------ the scripts
def one_error_line(stderr: str) -> str:
    """The scripts' message: exactly one line with 'error: ' (after the log's time, if any)."""
    lines = [line for line in stderr.splitlines() if "error: " in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0].split("error: ", 1)[1]


def test_demo_turns_corrupt_files_into_one_line_and_exit_2(tmp_path, hand_dir):
    from tests.test_demo import run_cli

    pose = tmp_path / "pose.yaml"
    pose.write_bytes(b"index1: [0, 0, 30]\nmid\xcadle1: [0, 0, 1]\n")
    result = run_cli("--pose", str(pose), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith(f"{pose}:2: byte 0xca")
    folder = tmp_path / "hand_model"
    shutil.copytree(hand_dir, folder)
    number = first_line_starting(folder / "hand.obj", "v ")
    replace_line(folder / "hand.obj", number, b"v 1 2 -inf")
    result = run_cli("--hand_model", str(folder), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert one_error_line(result.stderr).startswith(f"{folder / 'hand.obj'}:{number}: a vertex coordinate is not finite")


def test_train_script_turns_corrupt_files_into_one_line_and_exit_2(data_set, tmp_path, capsys):
    from main import train as train_script
    from tests.test_train import tiny_args

    config = tmp_path / "bad.yaml"
    config.write_bytes(b"resnet_type: 18\nlr: .inf\n")
    assert train_script.main(["--cfg", str(config), *tiny_args(data_set, tmp_path / "out")]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"{config}:2: option 'lr' expects a number")

    root = tmp_path / "data"
    shutil.copytree(data_set, root)
    krt = root / "annotations" / "KRT_512"
    replace_line(krt, 3, b"0 nan 0")
    assert train_script.main(["--end_epoch", "1", *tiny_args(root, tmp_path / "out")]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"{krt}:3: camera ")
    shutil.copyfile(data_set / "annotations" / "KRT_512", krt)
    weights = root / "hand_model" / "skinning_weight.txt"
    replace_line(weights, 5, b"3 b_r_wrist 1 b_r_wrist\xff 0")
    assert train_script.main(["--end_epoch", "1", *tiny_args(root, tmp_path / "out")]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"{weights}:5: byte 0xff at column 24")


def test_any_exception_of_a_reader_is_skipped_with_its_path(data_set, default_hand, monkeypatch):
    import data.dataset as dataset_module

    ds = DeepHandMeshDataset(data_set, joint_names=default_hand.joint_names, render_view_num=3, on_error="skip",
                             seed=0)
    broken = ds.depthmap_path(0, ds.cameras[2])
    real = dataset_module.load_depthmap

    def flaky(path, depth_min):
        if Path(path) == broken:
            raise ZeroDivisionError("a reader's own bug")
        return real(path, depth_min)

    monkeypatch.setattr(dataset_module, "load_depthmap", flaky)
    first = ds[0]  # sample 0 is frame 0: replaced by sample 1 (frame 1)
    assert first["index"] == 1 and first["frame"] == 1
    report = SkipReport()
    report.add(first)
    assert report.files == {str(broken): (1, f"{broken}: ZeroDivisionError: a reader's own bug")}
    stop = DeepHandMeshDataset(data_set, joint_names=default_hand.joint_names, render_view_num=3, seed=0)
    with pytest.raises(SampleError, match="ZeroDivisionError") as err:
        stop[0]
    assert err.value.path == str(broken)
