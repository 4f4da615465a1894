"""Decoder-only training (pose_source=gt), correctives held at zero, TensorBoard logging and the
component study (tools/ablation.py), on tiny synthetic sets."""
import json
import logging
import shutil
import sys

import cv2
import numpy as np
import pytest
import torch

from common import summary
from common.utils.device import unwrap
from data.ground_truth import attach_gt_pose, load_gt_poses
from main.options import resolve_paths
from main import tester as tester_module
from main.loops import split_batch
from main.trainer import Trainer
from data.dataset import DeepHandMeshDataset
from tools import ablation
from main import train as train_script
from main.config import ConfigError
from main.model import get_model
from tests.test_train import TINY, tiny_args, tiny_config


def trainer_for(data_dir, out_dir, **options) -> Trainer:
    config = tiny_config(data_dir).update({"output_dir": str(out_dir), "end_epoch": 1, **options})
    trainer = Trainer(resolve_paths(config), seed=0)
    trainer.make_batch_generator()
    trainer.make_model()
    return trainer


def snapshot_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ decoder-only
def test_ground_truth_angles_and_skeleton_reproduce_the_keypoints(tiny_set, default_hand):
    """With the angles of gt/frames.npz fed in and the true skeleton offsets as the skeleton
    corrective, the training forward's joints land on the keypoints (the joint loss vanishes),
    whatever the encoder says; through the encoder they do not."""
    config = tiny_config(tiny_set)
    dataset = DeepHandMeshDataset.from_config(config, "train", default_hand, seed=0)
    batch = torch.utils.data.default_collate([dataset[0], dataset[4]])
    inputs, targets, meta_info = split_batch(batch, torch.device("cpu"))
    torch.manual_seed(0)
    model = get_model("train", default_hand, config).train()
    offset = np.load(tiny_set / "gt" / "identity.npz")["skeleton_offset"]
    with torch.no_grad():
        model.skeleton_refine_net.fc_skeleton[-1].weight.zero_()
        model.skeleton_refine_net.fc_skeleton[-1].bias.copy_(torch.from_numpy(offset).reshape(-1))
    through_encoder = model(dict(inputs), targets, meta_info, "train")["joint"]
    attach_gt_pose(inputs, batch["frame"], load_gt_poses(tiny_set, default_hand.joint_num), torch.device("cpu"))
    assert inputs["joint_euler"].shape == (2, default_hand.joint_num, 3)
    loss = model(inputs, targets, meta_info, "train")
    worst = float(loss["joint"].detach().max())
    assert worst < 1e-3, worst
    assert float(through_encoder.detach().mean()) > 5.0
    # The test mode decodes the given angles too.
    with torch.no_grad():
        out = model(inputs, mode="test")
    assert torch.equal(out["joint_euler"], inputs["joint_euler"])


def test_decoder_only_training_moves_only_the_learning_correctives(tiny_set, tmp_path):
    trainer = trainer_for(tiny_set, tmp_path, pose_source="gt", correctives=["skeleton", "identity"])
    model = unwrap(trainer.model)
    before = snapshot_of(model)
    assert float(model.skin_refine_net.fc_pose[-1].weight.abs().sum()) == 0  # held at zero from the start
    trainer.train()
    after = snapshot_of(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith(("backbone_net.", "pose_net.", "skin_refine_net.fc_pose")) for k in changed), changed
    assert any(k.startswith("skeleton_refine_net.") for k in changed)
    assert any(k.startswith("skin_refine_net.fc_id") for k in changed)
    assert float(model.skin_refine_net.fc_pose[-1].weight.abs().sum()) == 0
    assert float(model.skin_refine_net.fc_pose[-1].bias.abs().sum()) == 0


def test_decoder_only_plain_lbs_learns_nothing_and_still_runs(tiny_set, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for(tiny_set, tmp_path, pose_source="gt", correctives=[])
        before = snapshot_of(unwrap(trainer.model))
        trainer.train()
    assert "no parameter learns" in caplog.text
    after = snapshot_of(unwrap(trainer.model))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "model_dump" / "subject_4" / "snapshot_0.pth.tar").is_file()


def test_pose_source_gt_without_ground_truth_is_a_clear_error(tiny_set, tmp_path, capsys):
    data = tmp_path / "no_gt"
    shutil.copytree(tiny_set, data, ignore=shutil.ignore_patterns("gt"))
    code = train_script.main(tiny_args(data, tmp_path / "out") + ["--set", "pose_source=gt"])
    err = capsys.readouterr().err
    assert code == 2 and "gt/frames.npz" in err and "pose_source=gt" in err and "Traceback" not in err
    code = train_script.main(tiny_args(tiny_set, tmp_path / "out") + ["--set", "pose_source=labels"])
    err = capsys.readouterr().err
    assert code == 2 and "'pose_source' expects one of ['image', 'gt']" in err
    code = train_script.main(tiny_args(tiny_set, tmp_path / "out") + ["--set", "correctives=[skeleton,skin]"])
    assert code == 2 and "unknown ['skin']" in capsys.readouterr().err


def test_gt_poses_of_the_wrong_hand_are_rejected(tiny_set):
    with pytest.raises(ConfigError, match=r"expected \[2, 16, 3\]"):
        load_gt_poses(tiny_set, 16)
    with pytest.raises(ConfigError, match=r"frames \[7\]"):
        attach_gt_pose({}, torch.tensor([7]), {0: np.zeros((3, 3))}, torch.device("cpu"))


# ------------------------------------------------------------------------------ TensorBoard
def test_depth_panel_shows_known_depths_and_differences():
    img = torch.zeros(3, 4, 4)
    img[0] = 1.0  # a red crop
    captured = torch.tensor([[500.0, 520.0], [0.0, 510.0]])
    rendered = torch.tensor([[510.0, 520.0], [505.0, 0.0]])
    panel = summary.depth_panel(img, rendered, captured, diff_range_mm=20.0)
    h = summary.PANEL_HEIGHT
    assert panel.shape == (h, 4 * h, 3) and panel.dtype == np.uint8
    crop, rend, capt, diff = (panel[:, k * h:(k + 1) * h] for k in range(4))
    assert (crop[..., 0] == 255).all() and (crop[..., 1:] == 0).all()
    centre = lambda pane, r, c: pane[r * h // 2 + h // 4, c * h // 2 + h // 4]  # noqa: E731
    assert centre(capt, 0, 0).tolist() == [255] * 3  # nearest captured depth: brightest
    assert centre(capt, 0, 1).tolist() == [50] * 3  # farthest: darkest grey
    assert centre(capt, 1, 0).tolist() == [0] * 3  # no depth: black
    assert centre(rend, 0, 0).tolist() == [round(255 - 0.5 * 205)] * 3  # 510 mm, halfway
    assert centre(diff, 0, 0).tolist() == [128, 40, 0]  # 10 mm farther: half red
    assert centre(diff, 0, 1).tolist() == [0, 80, 0]  # equal
    assert centre(diff, 1, 0).tolist() == [0, 0, 0] and centre(diff, 1, 1).tolist() == [0, 0, 0]


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_tensorboard_event_files_of_training_and_testing(tiny_set, tmp_path, caplog):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed")
    with caplog.at_level(logging.INFO):
        trainer = trainer_for(tiny_set, tmp_path, tensorboard_image_interval=1)
        trainer.train()
    events = read_events(tmp_path / "tensorboard" / "train")
    tags = set(events.Tags()["scalars"])
    assert {"loss/joint", "loss/depthmap", "loss/penet", "loss/lap", "loss/total", "lr", "samples_per_s",
            "epoch_loss/total"} <= tags
    first_total = float(caplog.text.split("loss_total: ")[1].split()[0])
    total = events.Scalars("loss/total")
    assert [e.step for e in total] == [0, 1] and total[0].value == pytest.approx(first_total, abs=1e-4)
    assert events.Scalars("lr")[0].value == pytest.approx(1e-3)
    images = events.Images("depth/crop_rendered_captured_difference")
    assert [e.step for e in images] == [0, 1]
    png = cv2.imdecode(np.frombuffer(images[0].encoded_image_string, np.uint8), cv2.IMREAD_COLOR)
    assert png.shape == (summary.PANEL_HEIGHT, 4 * summary.PANEL_HEIGHT, 3)

    tester = tester_module.Tester(trainer.cfg, 0)
    tester.make_model()
    tester.make_batch_generator()
    result = tester.test()
    test_events = read_events(tmp_path / "tensorboard" / "test")
    for key in ("surface_error_mm", "joint_error_mm", "depth_error_mm", "mesh_error_mm"):
        (event,) = test_events.Scalars(f"test/{key}")
        assert event.step == 0 and event.value == pytest.approx(result[key], rel=1e-6)
    assert test_events.Scalars("test/identity/rest_surface_error_mm")[0].value == pytest.approx(
        result["identity"]["rest_surface_error_mm"], rel=1e-6)


def test_without_tensorboard_the_run_goes_on_and_says_so_once(tiny_set, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    monkeypatch.setattr(summary, "_told", False)
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for(tiny_set, tmp_path, tensorboard_image_interval=1)
        trainer.train()
        tester = tester_module.Tester(trainer.cfg, 0)
        tester.make_model()
        tester.make_batch_generator()
        tester.test()
    assert caplog.text.count("tensorboard package is not installed") == 1
    assert (tmp_path / "model_dump" / "subject_4" / "snapshot_0.pth.tar").is_file()
    assert not (tmp_path / "tensorboard").exists()


# ------------------------------------------------------------------------------ the study
@pytest.fixture(scope="module")
def two_sequence_set(tmp_path_factory, default_hand):
    """2 sequences x 1 frame x 2 cameras: one sequence to train on, one held out."""
    from data.make_synthetic import generate

    out = tmp_path_factory.mktemp("two_sequences")
    generate(out, default_hand, seed=3, sequences=2, frames=1, cameras=2, image_hw=(64, 42), depth_hw=(32, 21),
             progress=False)
    return out


def test_ablation_script_tiny(two_sequence_set, tmp_path):
    out = tmp_path / "study"
    args = ["--data_dir", str(two_sequence_set), "--holdout", "0001_RT_synthetic", "--out", str(out),
            "--end_epoch", "1", "--variants", "a,d"]
    for item in TINY:
        args += ["--set", item]
    assert ablation.main(args) == 0
    record = json.loads((out / "ablation.json").read_text())
    runs = {(r["mode"], r["variant"]): r for r in record["runs"]}
    assert set(runs) == {("decoder", "a"), ("decoder", "d"), ("encoder", "a"), ("encoder", "d")}
    for (mode, key), run in runs.items():
        written = json.loads((out / f"{mode}_{key}" / "result" / "subject_4" / "metrics.json").read_text())
        assert run["metrics"] == written
        assert written["samples"] == 2 and written["surface_error_mm"] > 0  # the held-out frame's 2 views
    assert runs[("decoder", "a")]["correctives"] == [] and runs[("encoder", "d")]["correctives"] == [
        "skeleton", "identity", "pose"]
    # Plain LBS holds every corrective at zero: its rest surface is the template's, whose distance
    # to the true rest surface is the true identity corrective's (up to sliding along the surface).
    plain = runs[("decoder", "a")]["metrics"]["identity"]
    assert plain["id_corrective_rms_mm"] == 0 and plain["skeleton_corrective_rms_mm"] == 0
    assert 0 < plain["rest_surface_error_mm"] <= plain["gt_id_corrective_rms_mm"] * 1.5

    table = (out / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[0].startswith("| mode | variant | surface")
    first = runs[("decoder", "a")]["metrics"]
    assert table[2].startswith(f"| decoder | (a) plain LBS | {first['surface_error_mm']:.2f} | ")
    image = cv2.imread(str(out / "ablation.png"))
    assert image is not None and image.shape[0] > 400 and image.shape[1] > 3 * 440
    # A rerun reuses the finished runs.
    assert ablation.main(args) == 0
    assert json.loads((out / "ablation.json").read_text())["runs"][0]["trained_epochs"] == 0


def test_ablation_rejects_bad_arguments(tiny_set, tmp_path, capsys):
    data = tmp_path / "no_gt"
    shutil.copytree(tiny_set, data, ignore=shutil.ignore_patterns("gt"))
    assert ablation.main(["--data_dir", str(data), "--holdout", "x", "--out", str(tmp_path / "o"),
                          "--end_epoch", "1"]) == 2
    assert "gt/frames.npz: not found" in capsys.readouterr().err
    assert ablation.main(["--data_dir", str(tiny_set), "--holdout", "x", "--out", str(tmp_path / "o"),
                          "--end_epoch", "1", "--variants", "a,e"]) == 2
    assert "unknown ['e']" in capsys.readouterr().err
