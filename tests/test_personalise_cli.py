"""``python main/personalise.py`` as a user runs it: a synthetic person never trained on, from depth
maps; posed scans of another hand; the snapshot it writes opened by the demo and test.py; bad input
named in one line with exit code 2."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common import metrics
from common.hand.pose_io import read_pose_file
from common.io.checkpoint import load_decoder_checkpoint
from main.model import get_decoder
from main.personalise import main as personalise_main

ROOT = Path(__file__).resolve().parents[1]


def rest_surface_error(hand, snapshot, truth_dir) -> float:
    """Mean surface distance both ways (mm) of a snapshot's zero-pose rest surface (template + the
    correctives at the zero pose) to the synthetic person's (template + identity corrective), as
    test.py's ``rest_surface_error_mm``; None as snapshot: the template."""
    template = np.asarray(hand.vertices, np.float64)
    rest = template.copy()
    if snapshot is not None:
        model = get_decoder(hand)
        load_decoder_checkpoint(model, snapshot)
        with torch.no_grad():
            zero = model.id_code.new_zeros(1, hand.joint_num, 3)
            rest += (model.skin_refine_net.fc_id(model.id_code).reshape(-1, 3)
                     + model.skin_refine_net(zero, model.id_code)[0][0]).double().numpy()
    truth = template + np.load(Path(truth_dir) / "gt" / "identity.npz")["id_corrective"]
    there, back = metrics.surface_distances(torch.from_numpy(rest), torch.from_numpy(truth),
                                            torch.as_tensor(hand.faces, dtype=torch.long))
    return 0.5 * float(there.mean() + back.mean())


@pytest.fixture(scope="module")
def person(tmp_path_factory, default_hand):
    """A synthetic person (seed 21, identity corrective up to 8 mm): 2 sequences x 3 frames x 4 cameras."""
    from data.make_synthetic import generate

    out = tmp_path_factory.mktemp("person")
    generate(out, default_hand, seed=21, sequences=2, frames=3, cameras=4, image_hw=(32, 21), depth_hw=(256, 167),
             progress=False, drop_keypoints=0.0, identity_mm=8.0)
    return out


@pytest.fixture(scope="module")
def personalised(person, tmp_path_factory):
    out = tmp_path_factory.mktemp("personalised")
    code = personalise_main(["--data_dir", str(person), "--sequences", "0000_RT_synthetic", "--render_size", "32x32",
                             "--iterations", "120", "--quiet", "--out", str(out)])
    assert code == 0
    return out


def test_depth_maps_teach_the_persons_rest_surface(person, personalised, default_hand):
    snapshot = personalised / "model_dump" / "subject_4" / "snapshot_0.pth.tar"
    template_error = rest_surface_error(default_hand, None, person)
    learned_error = rest_surface_error(default_hand, snapshot, person)
    assert learned_error < 0.5 * template_error, (learned_error, template_error)
    report = json.loads((personalised / "report.json").read_text())
    assert report["kind"] == "depth" and len(report["frames"]) == 3
    assert report["residual_after_mm"]["mean"] < 0.6 * report["residual_before_mm"]["mean"]
    assert report["rest_change"]["vertex_displacement_mm"]["mean"] > 0.3


def test_outputs_read_back(person, personalised, default_hand):
    fit = np.load(personalised / "fit.npz")
    T, J = 3, default_hand.joint_num
    assert fit["euler"].shape == (T, J, 3) and fit["root"].shape == (T, 4, 4) and fit["joints"].shape == (T, J, 3)
    assert np.isfinite(fit["residual"]).all() and fit["residual"].shape == (T,)
    # The fitted poses are near the true ones (the joints within a few mm).
    gt = np.load(person / "gt" / "frames.npz")
    assert np.abs(fit["joints"] - gt["joints"][:3]).max() < 6.0
    # One pose file per frame, read back by the demo's reader to the same angles.
    for t in range(T):
        pose = read_pose_file(personalised / "poses" / f"frame_{t:05d}.yaml")
        for j, name in enumerate(default_hand.joint_names):
            if name in pose:
                np.testing.assert_allclose(np.radians(pose[name]), fit["euler"][t, j], atol=1e-5)
    picture = cv2.imread(str(personalised / "personalise.png"))
    assert picture is not None and picture.shape[0] > 300 and picture.std() > 10


def test_the_demo_and_test_py_open_the_snapshot(person, personalised, tmp_path):
    snapshot = personalised / "model_dump" / "subject_4" / "snapshot_0.pth.tar"
    demo = subprocess.run([sys.executable, "demo/demo.py", "--ckpt", str(snapshot), "--pose",
                           str(personalised / "poses" / "frame_00000.yaml"), "--out", str(tmp_path / "demo")],
                          cwd=ROOT, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr
    assert (tmp_path / "demo" / "mesh.obj").is_file()
    test = subprocess.run([sys.executable, "main/test.py", "--test_epoch", "0", "--cfg", "main/configs/cpu_small.yaml",
                           "--data_dir", str(person), "--set", f"output_dir={personalised}", "--set", "pose_source=gt",
                           "--set", "holdout_sequences=[0001_RT_synthetic]"], cwd=ROOT, capture_output=True,
                          text=True)
    assert test.returncode == 0, test.stderr
    result = json.loads((personalised / "result" / "subject_4" / "metrics.json").read_text())
    assert result["identity"]["rest_surface_error_mm"] == pytest.approx(
        rest_surface_error(get_decoder_hand(), snapshot, person), rel=1e-6)


def get_decoder_hand():
    from common.hand.default_hand import make_default_hand
    return make_default_hand()


@pytest.mark.parametrize("which", ["default", "makehuman"])
def test_scans_of_another_hand_personalise_the_default_hand(which, tmp_path, request, default_hand):
    """Scans posed by their own skeleton: MakeHuman's hand as meshes (another topology, another
    person), or a synthetic person of the default hand as point clouds (every third vertex, binary
    PLY in metres). The mean surface distance both ways falls to under a third of that of the
    starting hand at the keypoint fit."""
    from common.io.mesh_io import read_mesh, write_ply
    from tools.make_scans import make_scans

    if which == "makehuman":
        hand = request.getfixturevalue("makehuman")
    else:
        # Another person of the default hand's shape: a smooth identity corrective of up to 6 mm.
        from data.make_synthetic import make_identity
        _, corrective = make_identity(default_hand, np.random.default_rng(4), 3.0, 6.0)
        hand = dataclasses.replace(default_hand, vertices_cm=(np.asarray(default_hand.vertices) + corrective) / 10)
    units = "m" if which == "default" else "mm"
    paths = make_scans(hand, tmp_path / "scans", count=2, seed=3, units=units)
    extra = []
    if which == "default":
        clouds = []
        for path in paths:
            points, _ = read_mesh(path)
            clouds.append(path.with_suffix(".ply"))
            write_ply(clouds[-1], points[::3])
        paths, extra = clouds, ["--point_cloud", "--units", "m"]
    out = tmp_path / "out"
    code = personalise_main(["--scan", *map(str, paths), "--scan_keypoints", str(tmp_path / "scans" / "keypoints.json"),
                             "--iterations", "100", "--quiet", "--out", str(out), *extra])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["residual_after_mm"]["mean"] < report["residual_before_mm"]["mean"] / 3, report["residual_after_mm"]
    assert cv2.imread(str(out / "personalise.png")) is not None


@pytest.mark.parametrize("case,expected", [
    ("no_faces", "no faces"),
    ("nan", "non-finite coordinate"),
    ("metres_as_mm", "wrong --units?"),
    ("keypoints_count", "--scan_keypoints"),
    ("no_frames", "no depth maps for frame(s) [99]"),
    ("no_keypoints", "keypoint file not found"),
    ("bad_option", "unknown option 'nope'"),
])
def test_bad_input_is_one_line_and_exit_code_2(case, expected, tmp_path, person, default_hand, capsys):
    from common.io.mesh_io import write_obj

    vertices = np.asarray(default_hand.vertices, np.float64)
    scan = tmp_path / "scan.obj"
    if case == "no_faces":
        write_obj(scan, vertices)
        argv = ["--scan", str(scan)]
    elif case == "nan":
        bad = vertices.copy()
        bad[7, 1] = np.nan
        write_obj(scan, bad, default_hand.faces)
        argv = ["--scan", str(scan)]
    elif case == "metres_as_mm":
        write_obj(scan, vertices, default_hand.faces)
        argv = ["--scan", str(scan), "--units", "m"]
    elif case == "keypoints_count":
        write_obj(scan, vertices, default_hand.faces)
        keypoints = tmp_path / "k.npy"
        np.save(keypoints, np.zeros((3, 21, 3)))
        argv = ["--scan", str(scan), "--scan_keypoints", str(keypoints)]
    elif case == "no_frames":
        argv = ["--data_dir", str(person), "--frames", "99"]
    elif case == "no_keypoints":
        import shutil
        data = tmp_path / "data"
        shutil.copytree(person, data)
        (data / "annotations" / "keypoints" / "subject_4" / "keypoints0001.pts").unlink()
        argv = ["--data_dir", str(data), "--frames", "0-2"]
    else:
        argv = ["--data_dir", str(person), "--option", "nope=1"]
    code = personalise_main(argv + ["--quiet", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and expected in err[0], err
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_personalises_as_the_cpu(person, tmp_path):
    """The same command with --gpu 0: the same residuals and rest surface, to float tolerance over
    a few iterations (the renderer and the searches run on the GPU)."""
    reports = {}
    for name, extra in (("cpu", []), ("cuda", ["--gpu", "0"])):
        out = tmp_path / name
        argv = ["--data_dir", str(person), "--frames", "0-1", "--render_size", "32x32", "--iterations", "8",
                "--option", "pose_iterations=2", "--quiet", "--out", str(out), *extra]
        assert personalise_main(argv) == 0
        reports[name] = json.loads((out / "report.json").read_text())
    for key in ("residual_before_mm", "residual_after_mm"):
        assert reports["cuda"][key]["mean"] == pytest.approx(reports["cpu"][key]["mean"], rel=2e-2, abs=0.02)
    change = [r["rest_change"]["vertex_displacement_mm"]["mean"] for r in (reports["cpu"], reports["cuda"])]
    assert change[1] == pytest.approx(change[0], rel=5e-2, abs=0.02)


def test_ctrl_c_writes_what_it_reached(person, tmp_path, monkeypatch):
    import common.personalise.objectives as objectives

    calls = {"n": 0}
    render = objectives.DepthObjective.render

    def interrupted_render(self, *args):
        calls["n"] += 1
        if calls["n"] == 6:  # two renders measure the start, then one per iteration: Ctrl-C in the fourth
            raise KeyboardInterrupt
        return render(self, *args)

    monkeypatch.setattr(objectives.DepthObjective, "render", interrupted_render)
    out = tmp_path / "out"
    code = personalise_main(["--data_dir", str(person), "--frames", "0-1", "--render_size", "32x32", "--quiet",
                             "--out", str(out)])
    monkeypatch.undo()
    from main.personalise import INTERRUPTED_EXIT_CODE
    assert code == INTERRUPTED_EXIT_CODE
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True and report["iterations"] == 3
    assert (out / "model_dump" / "subject_4" / "snapshot_0.pth.tar").is_file()


def test_scan_without_keypoints_is_placed_by_its_shape(tmp_path, default_hand):
    """An open hand scanned without keypoints: the rest pose placed by principal axes and rigid ICP
    lands on it (the scan is the default hand itself, turned and moved at random)."""
    from tools.make_scans import make_scans

    paths = make_scans(default_hand, tmp_path / "scans", count=3, seed=9, bend=0.0)
    code = personalise_main(["--scan", *map(str, paths), "--iterations", "0", "--quiet", "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["residual_before_mm"]["max"] < 0.05
