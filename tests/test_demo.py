"""The demo CLI end to end: outputs another tool can read, and clear errors for bad input."""
import json
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from common.io.checkpoint import DECODER_PREFIXES, save_checkpoint
from common.hand.hand_model import load_hand_model, save_hand_model
from common.hand.pose_io import build_pose
from demo import demo
from main import model_options
from main.model import get_model
from tests.conftest import REPO
from tools.reference import fewer_vertices


def read_obj(path):
    v, vt, f = [], [], []
    for line in path.read_text().splitlines():
        w = line.split()
        if w[0] == "v":
            v.append([float(x) for x in w[1:4]])
        elif w[0] == "vt":
            vt.append([float(x) for x in w[1:3]])
        elif w[0] == "f":
            f.append([[int(i) for i in c.split("/")] for c in w[1:]])
    return np.array(v), np.array(vt), np.array(f)


def expected_mesh(hand, pose=None, overrides=()):
    model = get_model("test", hand)
    model.zero_correctives()
    with torch.no_grad():
        out = model.eval().decode(build_pose(hand, pose, overrides))
    return out["joint_out"][0].double().numpy(), out["mesh_out_refined"][0].double().numpy()


def check_outputs(out_dir, hand, pose=None, overrides=()):
    v, vt, f = read_obj(out_dir / "mesh.obj")
    joints_ref, verts_ref = expected_mesh(hand, pose, overrides)
    assert v.shape == (hand.vertex_num, 3) and np.abs(v - verts_ref).max() < 1e-4
    assert np.array_equal(vt, hand.uvs)
    assert np.array_equal(f[:, :, 0] - 1, hand.faces) and np.array_equal(f[:, :, 1] - 1, hand.face_uvs)
    lines = (out_dir / "joints.txt").read_text().splitlines()
    assert [l.split()[0] for l in lines] == hand.joint_names
    joints = np.array([[float(x) for x in l.split()[1:]] for l in lines])
    assert np.abs(joints - joints_ref).max() < 1e-4
    img = cv2.imread(str(out_dir / "render.png"))
    assert img is not None and img.ndim == 3 and min(img.shape[:2]) >= 256
    background = np.median(img.reshape(-1, 3), axis=0)
    foreground = (np.abs(img.astype(int) - background).sum(-1) > 30).mean()
    assert 0.03 < foreground < 0.9, foreground
    return joints


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "demo" / "demo.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_no_arguments_default_hand(tmp_path, default_hand):
    # With no arguments the demo writes to output/demo; here --out keeps the tree clean.
    result = run_cli("--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "correctives are zero" in result.stdout
    joints = check_outputs(tmp_path, default_hand, "original")
    # The original demo's pose bends the four fingers 90° at the knuckle: each fingertip ends up
    # on the palm side (+y in the wrist frame) of its knuckle.
    for finger in ("index", "middle", "ring", "pinky"):
        knuckle = default_hand.joint_index(f"{finger}1")
        tip = default_hand.joint_index(f"{finger}_null")
        assert joints[tip, 1] - joints[knuckle, 1] > 30


def test_cli_hand_model_folder_with_preset_and_override(tmp_path, any_hand_dir):
    result = run_cli("--hand_model", str(any_hand_dir), "--pose", "fist", "--euler", "index1=0,0,10",
                     "--euler", "b_r_thumb0=5,0,0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    check_outputs(tmp_path, load_hand_model(any_hand_dir), "fist", ["index1=0,0,10", "b_r_thumb0=5,0,0"])


@pytest.mark.parametrize("preset", ["original", "open", "fist", "point", "ok"])
def test_presets(preset, tmp_path, default_hand):
    assert demo.main(["--pose", preset, "--out", str(tmp_path)]) == 0
    check_outputs(tmp_path, default_hand, preset)


def test_pose_file_yaml_and_json(tmp_path, default_hand):
    (tmp_path / "p.json").write_text(json.dumps({"b_r_middle2": [0, 0, 45], "ring1": [0, 10, 30]}))
    assert demo.main(["--pose", str(tmp_path / "p.json"), "--out", str(tmp_path / "a")]) == 0
    (tmp_path / "p.yaml").write_text("b_r_middle2: [0, 0, 45]\nring1: [0, 10, 30]\n")
    assert demo.main(["--pose", str(tmp_path / "p.yaml"), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "mesh.obj").read_text() == (tmp_path / "b" / "mesh.obj").read_text()
    euler = build_pose(default_hand, str(tmp_path / "p.yaml"))
    assert math.isclose(float(euler[0, default_hand.joint_index("middle2"), 2]), math.radians(45), rel_tol=1e-6)
    assert math.isclose(float(euler[0, default_hand.joint_index("ring1"), 1]), math.radians(10), rel_tol=1e-6)


def test_checkpoint_by_subject_and_epoch(tmp_path, default_hand, monkeypatch):
    torch.manual_seed(1)
    model = get_model("train", default_hand)
    with torch.no_grad():
        for p in model.skin_refine_net.parameters():
            p.normal_(0, 0.05)
    monkeypatch.setattr(model_options, "ROOT", tmp_path)
    save_checkpoint({"epoch": 3, "network": {"module." + k: v for k, v in model.state_dict().items()}},
                    tmp_path / "demo" / "subject_4" / "snapshot_3.pth.tar")
    assert demo.main(["--subject", "4", "--test_epoch", "3", "--out", str(tmp_path / "o")]) == 0
    v, _, _ = read_obj(tmp_path / "o" / "mesh.obj")
    with torch.no_grad():
        ref = model.eval().decode(build_pose(default_hand, "original"))["mesh_out_refined"][0].numpy()
    assert np.abs(v - ref).max() < 1e-4
    _, template_mesh = expected_mesh(default_hand, "original")
    assert np.abs(v - template_mesh).max() > 0.5  # the correctives did change the mesh


# ---------------------------------------------------------------- bad input
def fails(capsys, argv, *needles):
    code = demo.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


def test_unknown_joint_lists_valid_ones(capsys, tmp_path):
    fails(capsys, ["--euler", "b_r_index7=0,0,10", "--out", str(tmp_path)],
          "unknown joint 'b_r_index7'", "b_r_index1", "b_r_wrist")


def test_axis_without_dof(capsys, tmp_path):
    fails(capsys, ["--euler", "index2=10,0,0", "--out", str(tmp_path)],
          "b_r_index2", "no degree of freedom about x", "its axes: z")
    fails(capsys, ["--euler", "wrist=0,0,5", "--out", str(tmp_path)], "b_r_wrist", "its axes: none")


@pytest.mark.parametrize("value,needle", [("0,a,10", "angle y is not a number"), ("0,0,nan", "angle z is not finite"),
                                          ("0,0", "three comma-separated"), ("0,0,inf", "not finite")])
def test_bad_angle_values(capsys, tmp_path, value, needle):
    fails(capsys, ["--euler", f"index1={value}", "--out", str(tmp_path)], needle)


def test_bad_pose_files(capsys, tmp_path):
    fails(capsys, ["--pose", "fistt", "--out", str(tmp_path)], "not a preset name", "fist", "open")
    (tmp_path / "bad.yaml").write_text("index1: [0, 0\n")
    fails(capsys, ["--pose", str(tmp_path / "bad.yaml"), "--out", str(tmp_path)], "bad.yaml", "not valid YAML")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    fails(capsys, ["--pose", str(tmp_path / "list.yaml"), "--out", str(tmp_path)], "list.yaml", "expected a mapping")
    (tmp_path / "two.json").write_text('{"index1": [1, 2]}')
    fails(capsys, ["--pose", str(tmp_path / "two.json"), "--out", str(tmp_path)], "two.json", "expected three angles")


def test_missing_and_malformed_hand_model(capsys, tmp_path, default_hand):
    folder = tmp_path / "hand"
    save_hand_model(default_hand, folder)
    (folder / "global_pose_inv.txt").unlink()
    fails(capsys, ["--hand_model", str(folder), "--out", str(tmp_path)], "global_pose_inv.txt", "missing hand-model file")
    save_hand_model(default_hand, folder)
    text = (folder / "skeleton.txt").read_text().splitlines()
    text[3] = text[3] + " extra"
    (folder / "skeleton.txt").write_text("\n".join(text) + "\n")
    fails(capsys, ["--hand_model", str(folder), "--out", str(tmp_path)], "skeleton.txt:4:", "expected 'name id parent_id'")


@pytest.mark.parametrize("other", ["makehuman", "1000 vertices"])
def test_checkpoint_for_other_hand(other, capsys, tmp_path, default_hand, request):
    path = tmp_path / "other.pth.tar"
    if other == "makehuman":
        state = get_model("test", request.getfixturevalue("makehuman")).state_dict()
    else:
        state = fewer_vertices(get_model("test", default_hand).state_dict(), 1000)
    save_checkpoint({"epoch": 0, "network": state}, path)
    vertices = state["skin_refine_net.fc_id.2.bias"].shape[0] // 3
    fails(capsys, ["--ckpt", str(path), "--out", str(tmp_path)], f"{vertices} vertices and 22 joints",
          f"{default_hand.vertex_num} vertices and 22 joints")
    fails(capsys, ["--ckpt", str(tmp_path / "none.pth.tar"), "--out", str(tmp_path)], "checkpoint not found")


def test_data_hand_model_is_the_default_when_present(tmp_path, any_hand_dir, monkeypatch):
    import common.hand.hand_model_source as source

    monkeypatch.setattr(source, "DATA_HAND_MODEL", any_hand_dir)
    assert source.resolve_hand_model().source == str(any_hand_dir)
    monkeypatch.setattr(source, "DATA_HAND_MODEL", tmp_path / "absent")
    assert source.resolve_hand_model().source == "<deephandmesh_default_right>"


def test_gpu_flag_without_cuda_uses_cpu(tmp_path, capsys, monkeypatch):
    # A machine without CUDA, also where there is one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.main(["--gpu", "0", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "mesh.obj").is_file()


def test_decoder_only_snapshot_decodes(tmp_path, capsys, default_hand):
    """As the original's demo (``strict=False``): a snapshot with the decoder's keys alone decodes;
    one that lacks a decoder key is refused naming it; the encoder is not needed."""
    torch.manual_seed(2)
    model = get_model("train", default_hand)
    with torch.no_grad():
        for p in list(model.skin_refine_net.parameters()) + list(model.skeleton_refine_net.parameters()):
            p.normal_(0, 0.05)
    decoder = {k: v for k, v in model.state_dict().items()
               if k.startswith(DECODER_PREFIXES)}
    path = tmp_path / "decoder.pth.tar"
    save_checkpoint({"epoch": 7, "network": {"module." + k: v for k, v in decoder.items()}}, path)
    assert demo.main(["--ckpt", str(path), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "the checkpoint holds no backbone_net, pose_net: not used for decoding" in printed, printed
    v, _, _ = read_obj(tmp_path / "o" / "mesh.obj")
    with torch.no_grad():
        ref = model.eval().decode(build_pose(default_hand, "original"))["mesh_out_refined"][0].numpy()
    assert np.abs(v - ref).max() < 1e-4

    # With pose_net.DoF too (as a trimmed original snapshot has it), only the encoder's layers are absent.
    save_checkpoint({"epoch": 7, "network": dict(decoder, **{"pose_net.DoF": model.pose_net.DoF})}, path)
    assert demo.main(["--ckpt", str(path), "--out", str(tmp_path / "o")]) == 0
    assert "holds no backbone_net, pose_net.fc:" in capsys.readouterr().out

    # A decoder key missing: refused, naming it.
    partial = {k: v for k, v in decoder.items() if not k.startswith("skin_refine_net.fc_id.")}
    save_checkpoint({"epoch": 7, "network": partial}, path)
    fails(capsys, ["--ckpt", str(path), "--out", str(tmp_path)], "missing ['skin_refine_net.fc_id.0.weight'")


@pytest.mark.parametrize("other", ["makehuman", "fewer vertices"])
def test_decoder_only_snapshot_for_another_hand_is_refused(other, tmp_path, capsys, default_hand, request):
    """Without pose_net.DoF the counts come from the corrective layers: still both are named. The
    other hand is MakeHuman's (when ../shared is there) or the default hand's networks cut to 1000
    vertices (any clone)."""
    model = get_model("test", request.getfixturevalue("makehuman") if other == "makehuman" else default_hand)
    decoder = {k: v for k, v in model.state_dict().items()
               if k.startswith(DECODER_PREFIXES)}
    if other != "makehuman":
        decoder = fewer_vertices(decoder, 1000)
    vertices = decoder["skin_refine_net.fc_id.2.bias"].shape[0] // 3
    path = tmp_path / "other.pth.tar"
    save_checkpoint({"epoch": 0, "network": decoder}, path)
    fails(capsys, ["--ckpt", str(path), "--out", str(tmp_path)], f"{vertices} vertices and 22 joints",
          f"{default_hand.vertex_num} vertices and 22 joints")


# ---------------------------------------------------------------- decoding needs only the decoder
def test_snapshot_of_a_resnet18_run_decodes(tmp_path, capsys, default_hand, small_cfg):
    """``cpu_small.yaml`` trains a ResNet-18; the demo decodes its snapshot (it used to check the
    backbone against ResNet-50 and refuse). Made as train.py writes it, without training."""
    from common.io.checkpoint import network_state_dict

    torch.manual_seed(4)
    model = get_model("train", default_hand, small_cfg)  # resnet_type 18
    with torch.no_grad():
        for p in list(model.skin_refine_net.parameters()) + list(model.skeleton_refine_net.parameters()):
            p.normal_(0, 0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    path = tmp_path / "model_dump" / "subject_4" / "snapshot_3.pth.tar"
    save_checkpoint({"epoch": 3, "network": network_state_dict(model), "optimizer": optimizer.state_dict()}, path)
    assert demo.main(["--ckpt", str(path), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "ignored (the encoder; decoding does not use it): backbone_net (ResNet-18), pose_net.fc" in printed
    assert "holds no" not in printed
    v, _, _ = read_obj(tmp_path / "o" / "mesh.obj")
    with torch.no_grad():
        ref = model.eval().decode(build_pose(default_hand, "original"))["mesh_out_refined"][0].numpy()
    assert np.abs(v - ref).max() < 1e-4
    _, template_mesh = expected_mesh(default_hand, "original")
    assert np.abs(v - template_mesh).max() > 0.5  # the snapshot's correctives were used


def test_decoding_builds_no_encoder_renderer_or_loss_tables(tmp_path, monkeypatch):
    import main.model as model_module
    import main.objective as objective_module

    def refuse(*args, **kwargs):
        raise AssertionError("built for decoding")

    for module, name in ((objective_module, "DepthRenderer"), (objective_module, "TrainingObjective"),
                         (model_module, "TrainingObjective"), (model_module, "BackboneNet"),
                         (model_module, "PoseNet")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setattr(objective_module.PenetLoss, "from_hand_model", refuse)
    monkeypatch.setattr(objective_module.LaplacianLoss, "from_hand_model", refuse)
    assert demo.main(["--out", str(tmp_path)]) == 0
    _hand, model, _device, _text = demo.load_model(demo.parse_args([]))
    assert model.objective is None and model.backbone_net is None and model.pose_net is None


def test_decoder_state_dict_is_the_full_models_less_the_encoder(default_hand, small_cfg):
    from main.model import get_decoder

    full = set(get_model("test", default_hand, small_cfg).state_dict())
    decoder = set(get_decoder(default_hand, small_cfg).state_dict())
    assert decoder == {k for k in full if not k.startswith(("backbone_net.", "pose_net."))}
    assert decoder and all(k.startswith(DECODER_PREFIXES) for k in decoder)


def test_a_decoder_without_checkpoint_is_the_same_every_time():
    """Without a checkpoint the identity code and the correctives' hidden layers are random draws
    (only the last layers are zero): drawn under a fixed seed, so that what reads them repeats, and
    without changing the caller's random state."""
    states = []
    for caller_seed in (1, 2):  # whatever the random state a run starts in
        torch.manual_seed(caller_seed)
        before = torch.get_rng_state()
        states.append(demo.load_model(demo.parse_args([]))[1].state_dict())
        assert torch.equal(torch.get_rng_state(), before)
    assert list(states[0]) == list(states[1])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert states[0]["id_code"].abs().sum() > 0 and states[0]["skin_refine_net.fc_pose.0.weight"].abs().sum() > 0
