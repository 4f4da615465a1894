"""``main/fit.py`` end to end: its files, the pose files and snapshot the demo reads back, left
hands, multi-view 2D input, Ctrl-C, and CUDA where there is one."""
import json

import numpy as np
import pytest
import torch

from common.fitting import fit_keypoints
from common.hand.hand_model import save_hand_model
from common.hand.pose_io import build_pose
from data.make_synthetic import dome_cameras
from data.dataset import write_krt
from demo import demo
from demo.pose_edit import euler_tensor, pose_degrees
from main import fit as fit_script
from tools.fit_synthetic import decoder, keypoints_of, project, random_poses, random_roots


def read_obj_vertices(path):
    return np.array([[float(v) for v in line.split()[1:4]] for line in open(path) if line.startswith("v ")])


def read_obj_faces(path):
    return [line.split()[1:] for line in open(path) if line.startswith("f ")]


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory, default_hand):
    folder = tmp_path_factory.mktemp("hand")
    save_hand_model(default_hand, folder)
    return folder


@pytest.fixture(scope="module")
def sequence(default_hand):
    model = decoder(default_hand)
    rng = np.random.default_rng(80)
    return model, keypoints_of(model, "mediapipe", random_poses(default_hand, 4, rng), random_roots(4, rng))


def test_outputs_and_the_demo_reads_them(tmp_path, hand_dir, sequence, capsys):
    model, truth = sequence
    np.save(tmp_path / "hand.npy", truth.keypoints / 1000.0)  # metres
    out = tmp_path / "out"
    code = fit_script.main(["--keypoints", str(tmp_path / "hand.npy"), "--convention", "mediapipe", "--units", "m",
                            "--hand_model", str(hand_dir), "--out", str(out), "--meshes", "--independent",
                            "--glb", "--fps", "10"])
    assert code == 0, capsys.readouterr().err
    fit = np.load(out / "fit.npz")
    T, J = 4, model.joint_num
    assert fit["euler"].shape == (T, J, 3) and fit["euler"].dtype == np.float32
    assert fit["root"].shape == (T, 4, 4) and fit["joints"].shape == (T, J, 3)
    assert fit["keypoints_fitted"].shape == (T, 21, 3) and fit["residual"].shape == (T, 21)
    # Fitted keypoints in the input's units (m) and convention.
    assert np.abs(fit["keypoints_fitted"] - truth.keypoints / 1000).max() < 5e-4
    assert np.nanmean(fit["residual"]) < 5e-4 and fit["frame_ok"].all()
    report = json.loads((out / "report.json").read_text())
    assert report["units"] == "m" and report["convention"] == "mediapipe" and report["interrupted"] is False
    assert report["failed"] == [] and len(report["frame_residuals"]) == T
    assert report["residual"]["mean"] == pytest.approx(np.nanmean(fit["residual"]))
    assert {"mean", "median", "p90"} <= set(report["frame_residuals"][2])
    assert report["options"]["convention"] == "mediapipe" and report["seconds"] > 0
    # The pose file gives demo.py the same decoder input, and the demo's mesh (wrist frame) placed
    # by the root is the OBJ written here (world frame).
    for t in (0, 3):
        pose = out / "poses" / f"frame_{t:05d}.yaml"
        assert torch.equal(build_pose(model.hand_model, str(pose))[0], torch.from_numpy(fit["euler"][t]))
        # The editor reads it the same way.
        editor = euler_tensor(pose_degrees(model.hand_model, str(pose)))[0]
        assert torch.equal(editor, torch.from_numpy(fit["euler"][t]))
        demo_out = tmp_path / f"demo{t}"
        assert demo.main(["--pose", str(pose), "--hand_model", str(hand_dir), "--out", str(demo_out)]) == 0
        local = read_obj_vertices(demo_out / "mesh.obj")
        root = fit["root"][t].astype(np.float64)
        world = read_obj_vertices(out / "meshes" / f"frame_{t:05d}.obj")
        assert np.abs(local @ root[:3, :3].T + root[:3, 3] - world).max() < 1e-3
    # --glb: the fitted sequence as a rigged animation, 10 frames a second, each keyframe the
    # fitted mesh placed by its root (read back with glTF's own skinning formula).
    from tests.test_export import decoded, keyframe_meshes, model_vertices
    from tests.gltf_reference import GltfFile
    glb = GltfFile((out / "fit.glb").read_bytes())
    times = glb.array(glb.doc.animations[0].samplers[0].input)
    assert np.allclose(times, np.arange(T) / 10.0)
    expected = decoded(model, torch.from_numpy(fit["euler"]), torch.from_numpy(fit["root"]))
    got = keyframe_meshes(glb, times.astype(np.float64))
    assert np.abs(got - expected[:, model_vertices(glb, model.hand_model)]).max() < 1e-3
    assert report["outputs"]["glb"].startswith(str(out / "fit.glb"))


def test_left_hand_is_mirrored_and_back(tmp_path, hand_dir, sequence, capsys):
    model, truth = sequence
    left = truth.keypoints * np.array([-1.0, 1.0, 1.0])
    np.save(tmp_path / "left.npy", left)
    out = tmp_path / "out"
    assert fit_script.main(["--keypoints", str(tmp_path / "left.npy"), "--convention", "mediapipe", "--hand", "left",
                            "--hand_model", str(hand_dir), "--out", str(out), "--meshes", "--independent"]) == 0
    fit = np.load(out / "fit.npz")
    assert np.abs(fit["keypoints_fitted"] - left).max() < 0.5
    # The model side lives in the mirrored (right-hand) world: its joints are the right hand's.
    assert np.abs(fit["joints"] - truth.joints).max() < 0.5
    report = json.loads((out / "report.json").read_text())
    assert "mirrored" in report["mirrored"] and report["hand"] == "left"
    # Meshes back in the input's frame, faces turned so that they still face outwards.
    right = fit_keypoints(model, truth.keypoints, "mediapipe", weights=fit_script.fit_weights([], independent=True))
    with torch.no_grad():
        right_mesh = model.pose(right.euler, right.root).mesh[1].double().numpy()
    left_mesh = read_obj_vertices(out / "meshes" / "frame_00001.obj")
    assert np.abs(left_mesh - right_mesh * np.array([-1.0, 1.0, 1.0])).max() < 0.5
    assert read_obj_faces(out / "meshes" / "frame_00001.obj")[0] == list(reversed(
        [f"{a + 1}/{b + 1}" for a, b in zip(model.hand_model.faces[0], model.hand_model.face_uvs[0])]))


def test_personalised_snapshot_loads_in_the_demo(tmp_path, hand_dir, default_hand, capsys):
    model = decoder(default_hand)
    rng = np.random.default_rng(90)
    with torch.no_grad():
        local = model.identity().local_pose.double().clone()
    local[:, :3, 3] *= 1.08  # a hand 8 % larger
    truth = keypoints_of(model, "dhm", random_poses(default_hand, 12, rng), random_roots(12, rng), local)
    np.save(tmp_path / "big.npy", truth.keypoints)
    out = tmp_path / "out"
    assert fit_script.main(["--keypoints", str(tmp_path / "big.npy"), "--hand_model", str(hand_dir), "--out",
                            str(out), "--personalise", "skeleton", "--independent"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["personalised"]["scale"] == pytest.approx(1.08, abs=0.01)
    assert report["residual"]["mean"] < 0.5
    snapshot = out / "personalised.pth.tar"
    pose = out / "poses" / "frame_00002.yaml"
    assert demo.main(["--ckpt", str(snapshot), "--pose", str(pose), "--hand_model", str(hand_dir),
                      "--out", str(tmp_path / "demo")]) == 0
    joints = np.array([[float(v) for v in line.split()[1:]] for line in open(tmp_path / "demo" / "joints.txt")])
    fit = np.load(out / "fit.npz")
    root = fit["root"][2].astype(np.float64)
    assert np.abs(joints @ root[:3, :3].T + root[:3, 3] - truth.joints[2]).max() < 0.5
    assert "the checkpoint holds no backbone_net" in capsys.readouterr().out
    # The whole hand is 8 % larger, not only its bones: the rest pose's mesh (wrist frame) too.
    (tmp_path / "rest.yaml").write_text("# the rest pose\n")
    for ckpt, folder in ((["--ckpt", str(snapshot)], "big"), ([], "template")):
        assert demo.main(ckpt + ["--pose", str(tmp_path / "rest.yaml"), "--hand_model", str(hand_dir),
                                 "--out", str(tmp_path / folder)]) == 0
    big, template = (read_obj_vertices(tmp_path / f / "mesh.obj") for f in ("big", "template"))
    assert np.abs(big - report["personalised"]["scale"] * template).max() < 0.5


def test_multi_view_2d_input(tmp_path, hand_dir, default_hand, capsys):
    model = decoder(default_hand)
    rng = np.random.default_rng(100)
    truth = keypoints_of(model, "openpose", random_poses(default_hand, 3, rng), random_roots(3, rng, spread_mm=40))
    cameras = dome_cameras(4, (512, 334), rng)
    names = list(cameras)
    uv = project(truth.keypoints, cameras)
    # Images stored at twice the cameras' resolution: pixel centres move by the centre-aligned rule.
    uv_big = (uv + 0.5) * 2 - 0.5
    conf = np.ones(uv.shape[:3])
    conf[0, 1, 5] = 0
    np.savez(tmp_path / "views.npz", uv=uv_big, confidence=conf, cameras=np.array(names))
    write_krt(tmp_path / "KRT_512", cameras)
    out = tmp_path / "out"
    assert fit_script.main(["--keypoints2d", str(tmp_path / "views.npz"), "--cameras", str(tmp_path / "KRT_512"),
                            "--image_shape", "1024,668", "--convention", "openpose", "--hand_model", str(hand_dir),
                            "--out", str(out), "--independent"]) == 0, capsys.readouterr().err
    fit = np.load(out / "fit.npz")
    assert np.abs(fit["keypoints_fitted"] - truth.keypoints).max() < 0.5
    assert np.abs(fit["keypoints_triangulated"] - truth.keypoints).max() < 0.5
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "2d" and report["residual"]["mean"] < 0.5  # pixels of the cameras' space


def test_ctrl_c_writes_the_fit_so_far(tmp_path, hand_dir, sequence, monkeypatch, capsys):
    import common.fitting.solver as solver

    model, truth = sequence
    np.save(tmp_path / "k.npy", truth.keypoints)
    calls = {"n": 0}
    solve = solver._solve

    def interrupted_solve(*args):
        calls["n"] += 1
        if calls["n"] == 20:  # Ctrl-C in the second pass
            raise KeyboardInterrupt
        return solve(*args)

    monkeypatch.setattr(solver, "_solve", interrupted_solve)
    out = tmp_path / "out"
    code = fit_script.main(["--keypoints", str(tmp_path / "k.npy"), "--convention", "mediapipe",
                            "--hand_model", str(hand_dir), "--out", str(out)])
    assert code == fit_script.INTERRUPTED_EXIT_CODE
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] is True
    fit = np.load(out / "fit.npz")
    assert np.isfinite(fit["euler"]).all() and np.nanmean(fit["residual"]) < 20
    assert "interrupted" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_fits_as_the_cpu(default_hand):
    model = decoder(default_hand)
    rng = np.random.default_rng(110)
    truth = keypoints_of(model, "dhm", random_poses(default_hand, 6, rng), random_roots(6, rng))
    cpu = fit_keypoints(model, truth.keypoints)
    gpu = fit_keypoints(model.to("cuda"), torch.as_tensor(truth.keypoints, device="cuda"))
    assert np.abs(gpu.keypoints - cpu.keypoints).max() < 0.05
    assert np.nanmean(gpu.residual) < 0.5


def test_bench_fit_runs(tmp_path, capsys):
    from tools import bench

    assert bench.main(["fit", "--frames", "40", "--repeats", "1", "--hands", "default", "--no-accuracy"]) == 0
    out = capsys.readouterr().out
    assert "sequence of 40 frames" in out and "one frame: median" in out
    assert bench.main(["fit", "--example", str(tmp_path / "example.npy")]) == 0
    example = np.load(tmp_path / "example.npy")
    assert example.shape == (48, 21, 3) and np.isnan(example).any() and np.nanmax(np.abs(example)) < 1.0  # metres
