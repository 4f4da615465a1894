"""The fitter's input files and the script's bad-input errors: one line naming the file and
what was expected, exit code 2."""
import json

import numpy as np
import pytest

from common.fitting.errors import FitInputError
from common.fitting.keypoints_io import read_keypoints2d, read_keypoints3d
from data.dataset import write_krt
from main import fit as fit_script


def frames(T=2, seed=0):
    return np.random.default_rng(seed).normal(0, 50, (T, 21, 3))


def test_npy_npz_json_read_alike(tmp_path):
    points = frames()
    points[0, 3] = np.nan
    np.save(tmp_path / "k.npy", points)
    conf = np.ones((2, 21))
    conf[1, 5] = 0
    np.savez(tmp_path / "k.npz", keypoints=points, confidence=conf)
    doc = [[None if np.isnan(p).any() else [float(v) for v in p] for p in frame] for frame in points]
    (tmp_path / "k.json").write_text(json.dumps(doc))
    a, ca = read_keypoints3d(tmp_path / "k.npy")
    b, cb = read_keypoints3d(tmp_path / "k.npz")
    c, cc = read_keypoints3d(tmp_path / "k.json")
    assert np.array_equal(a, b, equal_nan=True) and np.array_equal(a, c, equal_nan=True)
    assert ca[0, 3] == 0 and cc[0, 3] == 0 and cb[0, 3] == 0  # NaN / null: missing
    assert cb[1, 5] == 0 and ca[1, 5] == 1  # confidence 0: missing
    # One frame alone: [21, 3] (npy) or a list of 21 points (JSON).
    np.save(tmp_path / "one.npy", points[1])
    (tmp_path / "one.json").write_text(json.dumps(doc[1]))
    assert read_keypoints3d(tmp_path / "one.npy")[0].shape == (1, 21, 3)
    assert np.array_equal(read_keypoints3d(tmp_path / "one.json")[0], points[1:])


@pytest.mark.parametrize("make, expected", [
    (lambda p: np.save(p / "k.npy", np.zeros((2, 20, 3))), "shape [2, 20, 3]; expected one frame [21, 3]"),
    (lambda p: np.save(p / "k.npy", np.where(np.arange(21)[:, None] == 4, np.inf, frames(1)[0])), "infinite"),
    (lambda p: np.save(p / "k.npy", np.concatenate([frames(1), np.full((1, 21, 3), np.nan)])),
     "frame 1 has every keypoint missing"),
    (lambda p: np.save(p / "k.npy", np.array([["a"] * 3] * 21)), "expected numbers"),
    (lambda p: np.save(p / "k.npy", np.array([{"a": 1}], dtype=object)), "not a plain numeric NumPy file"),
    (lambda p: (p / "k.npy").write_bytes(b"not numpy"), "not a readable NumPy file"),
], ids=["shape", "inf", "all-missing", "strings", "pickle", "garbage"])
def test_bad_npy(tmp_path, make, expected):
    make(tmp_path)
    with pytest.raises(FitInputError) as err:
        read_keypoints3d(tmp_path / "k.npy")
    assert str(err.value).startswith(str(tmp_path / "k.npy")) and expected in str(err.value)


@pytest.mark.parametrize("doc, expected", [
    ("[[1, 2, 3]]", "frame 0 is a list of 3; expected a list of 21"),
    (json.dumps([[[1, 2]] * 21]), "frame 0, keypoint 0 is [1, 2]; expected [x, y, z]"),
    (json.dumps([[[1, 2, "x"]] * 21]), "expected [x, y, z] (numbers) or null"),
    (json.dumps([[None] * 21]), "every keypoint missing"),
    ("{\"keypoints\": 1}", "expected a list of frames"),
    ("[[1, 2,", "not valid JSON"),
])
def test_bad_json(tmp_path, doc, expected):
    (tmp_path / "k.json").write_text(doc)
    with pytest.raises(FitInputError, match=None) as err:
        read_keypoints3d(tmp_path / "k.json")
    assert str(err.value).startswith(str(tmp_path / "k.json")) and expected in str(err.value)


def test_npz_needs_keypoints_and_matching_confidence(tmp_path):
    np.savez(tmp_path / "a.npz", points=frames())
    with pytest.raises(FitInputError, match="no 'keypoints' array"):
        read_keypoints3d(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", keypoints=frames(), confidence=np.ones((2, 20)))
    with pytest.raises(FitInputError, match=r"confidence has shape \[2, 20\]; expected \[2, 21\]"):
        read_keypoints3d(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", keypoints=frames(), confidence=-np.ones((2, 21)))
    with pytest.raises(FitInputError, match="confidence must be finite numbers ≥ 0"):
        read_keypoints3d(tmp_path / "c.npz")


def views_file(path, T=1, C=2, names=("400000", "400001")):
    np.savez(path, uv=np.full((T, C, 21, 2), 100.0), confidence=np.ones((T, C, 21)), cameras=np.array(names))


def test_2d_file(tmp_path):
    views_file(tmp_path / "v.npz")
    uv, conf, names = read_keypoints2d(tmp_path / "v.npz")
    assert uv.shape == (1, 2, 21, 2) and conf.shape == (1, 2, 21) and names == ["400000", "400001"]
    np.savez(tmp_path / "w.npz", uv=np.zeros((1, 2, 21, 3)), confidence=np.ones((1, 2, 21)),
             cameras=np.array(["a", "b"]))
    with pytest.raises(FitInputError, match=r"uv has shape \[1, 2, 21, 3\]; expected \[T, C, 21, 2\]"):
        read_keypoints2d(tmp_path / "w.npz")
    np.savez(tmp_path / "x.npz", uv=np.zeros((1, 2, 21, 2)), confidence=np.ones((1, 2, 21)), cameras=np.array([1, 2]))
    with pytest.raises(FitInputError, match="cameras must be 2 names"):
        read_keypoints2d(tmp_path / "x.npz")


def cameras_file(path):
    K = np.array([[800.0, 0, 166.5], [0, 800.0, 255.5], [0, 0, 1]])
    write_krt(path, {"400000": {"K": K, "R": np.eye(3), "t": np.array([0, 0, 600.0])},
                     "400001": {"K": K, "R": np.eye(3), "t": np.array([50, 0, 600.0])}})


def run_script(argv, capsys):
    code = fit_script.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("case", ["shape", "convention", "all-missing", "non-finite", "camera", "weight", "krt"])
def test_script_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    k = tmp_path / "k.npy"
    np.save(k, frames())
    argv = ["--keypoints", str(k), "--out", str(tmp_path / "out")]
    expected = str(k)
    if case == "shape":
        np.save(k, np.zeros((3, 21, 2)))
    elif case == "convention":
        argv += ["--convention", "coco"]
        expected = "--convention coco: unknown keypoint convention"
    elif case == "all-missing":
        bad = frames()
        bad[1] = np.nan
        np.save(k, bad)
    elif case == "non-finite":
        bad = frames()
        bad[0, 0, 0] = np.inf
        np.save(k, bad)
    elif case == "weight":
        argv += ["--weight", "smoothness=3"]
        expected = "--weight smoothness=3: unknown prior"
    elif case in ("camera", "krt"):
        v = tmp_path / "v.npz"
        views_file(v, names=("400000", "999999"))
        krt = tmp_path / "KRT_512"
        cameras_file(krt)
        if case == "krt":
            krt.write_text(krt.read_text().replace("800.0", "nan", 1))
            expected = f"{krt}:2:"
        else:
            expected = f"{v}: camera '999999' is not in {krt}"
        argv = ["--keypoints2d", str(v), "--cameras", str(krt), "--out", str(tmp_path / "out")]
    code, err = run_script(argv, capsys)
    assert code == 2
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "out").exists()


def test_script_option_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit_script.parse_args(["--keypoints2d", "v.npz"])
    assert exit_info.value.code == 2 and "--keypoints2d needs --cameras" in capsys.readouterr().err
