"""Training and testing: the train-mode forward, the scripts end to end, resuming, metrics.

Everything runs on a tiny synthetic set (1 sequence x 2 frames x 3 cameras, 64x42 images) with
ResNet-18, 64x64 crops and 16x16 depth maps, so that the whole file stays well under a minute.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.io.checkpoint import latest_snapshot
from common.utils.device import pick_device, unwrap
from main.options import config_from_args
from main import tester as tester_module
from main.loops import split_batch
from main.trainer import Trainer
from common.hand.kinematics import euler_to_matrix, rigid_align, to_homogeneous
from data.dataset import DeepHandMeshDataset
from main import test as test_script
from main import train as train_script
from main.config import Config
from main.model import get_model
from main.objective import align_to_keypoints
from tests.conftest import REPO

TINY = ["resnet_type=18", "input_img_shape=[64,64]", "rendered_img_shape=[16,16]", "render_view_num=2",
        "train_batch_size=3", "test_batch_size=2", "num_thread=0", "lr=0.001"]
NET_PREFIXES = ("backbone_net.", "pose_net.", "skeleton_refine_net.", "skin_refine_net.")


def tiny_args(data_dir, out_dir):
    args = ["--data_dir", str(data_dir)]
    for item in TINY + [f"output_dir={out_dir}"]:
        args += ["--set", item]
    return args


def tiny_config(data_dir) -> Config:
    config = Config()
    config.update_from_strings(TINY)
    config.data_dir = str(data_dir)
    return config


@pytest.fixture(scope="module")
def tiny_batch(tiny_set, default_hand):
    config = tiny_config(tiny_set)
    dataset = DeepHandMeshDataset.from_config(config, "train", default_hand, seed=0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    return config, split_batch(batch, torch.device("cpu"))


def run_script(script, *args, cpu_only=False):
    """``main/<script> args`` in a subprocess; ``cpu_only``: with every GPU hidden
    (``CUDA_VISIBLE_DEVICES=''``), so that ``--gpu`` falls back to the CPU on any machine."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="") if cpu_only else None
    return subprocess.run([sys.executable, str(REPO / "main" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


def random_rigid(seed):
    g = torch.Generator().manual_seed(seed)
    R = euler_to_matrix((torch.rand(3, generator=g) * 2 - 1) * math.pi)
    return to_homogeneous(R, torch.randn(3, generator=g) * 300)


# ------------------------------------------------------------------------------ the model
def test_state_dict_keys_unchanged(default_hand, small_cfg):
    """The renderer and loss modules add no key: a snapshot holds exactly the original's."""
    model = get_model("train", default_hand, small_cfg)
    keys = list(model.state_dict())
    assert keys[0] == "id_code"
    assert all(k == "id_code" or k.startswith(NET_PREFIXES) for k in keys), \
        [k for k in keys if not k.startswith(NET_PREFIXES)]
    assert set(keys) == set(get_model("test", default_hand, small_cfg).state_dict())
    assert {"pose_net.DoF", "skin_refine_net.fc_pose.2.weight", "skeleton_refine_net.fc_skeleton.0.bias"} <= set(keys)
    # ... while the training submodules and their tables are there and move with the model.
    for name in ("renderer", "joint_loss", "depthmap_loss", "penet_loss", "lap_loss"):
        assert isinstance(getattr(model.objective, name), torch.nn.Module)
    lap_loss = model.objective.lap_loss
    assert lap_loss.laplacian.is_sparse and "laplacian" in dict(lap_loss.named_buffers())


def test_weighted_alignment_uses_only_valid_points():
    g = torch.Generator().manual_seed(1)
    source = torch.randn(3, 5, 3, generator=g, dtype=torch.float64) * 40
    T = torch.stack([random_rigid(s).double() for s in range(3)])
    target = source @ T[:, :3, :3].transpose(1, 2) + T[:, None, :3, 3]
    # All valid: exactly the project's Kabsch.
    full, ok = align_to_keypoints(source, target, torch.ones(3, 5))
    assert ok.all() and torch.allclose(full, rigid_align(source, target), atol=1e-9)
    # A missing keypoint (0 in the data set, or anything): ignored, the transform stays exact.
    noisy = target.clone()
    noisy[0, 1] = 0.0
    noisy[1, 4] = 1e4
    valid = torch.ones(3, 5)
    valid[0, 1] = valid[1, 4] = 0
    got, ok = align_to_keypoints(source, noisy, valid)
    assert ok.all() and torch.allclose(got, T, atol=1e-8)
    # Fewer than three valid points: identity, flagged.
    valid[2] = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    got, ok = align_to_keypoints(source, noisy, valid)
    assert ok.tolist() == [True, True, False] and torch.allclose(got[2], torch.eye(4, dtype=got.dtype), atol=1e-9)


def test_kabsch_root_places_alignment_joints_on_the_ground_truth(default_hand, tiny_batch):
    config, (inputs, targets, meta_info) = tiny_batch
    torch.manual_seed(0)
    model = get_model("train", default_hand, config)
    with torch.no_grad():  # a visible skeleton corrective (a few mm), so that G' differs from G
        model.skeleton_refine_net.fc_skeleton[-1].bias.normal_(0, 3)
    align = model.align_joint_idx
    template = model.refined_template_pose().detach()
    assert (template[:, :3, 3] - model.global_pose[:, :3, 3]).abs().max() > 1.0
    B = targets["joint_world"].shape[0]
    rigid = torch.stack([random_rigid(10 + b) for b in range(B)])
    joint_world = targets["joint_world"].clone()
    joint_world[:, align] = template[align, :3, 3] @ rigid[:, :3, :3].transpose(1, 2) + rigid[:, None, :3, 3]
    joint_valid = targets["joint_valid"].clone()
    joint_valid[:, align] = 1
    joint_valid[0, align[1]] = 0  # a missing alignment keypoint with a garbage position
    joint_world[0, align[1]] = 0

    root, ok = model.objective.root_alignment(template, joint_world, joint_valid)
    assert ok.all()
    # [R|t] = root · G'_root⁻¹ is the rigid transform, and it puts G'[align] onto the keypoints.
    recovered = root @ torch.linalg.inv(template[model.root_joint_idx])
    assert torch.allclose(recovered, rigid, atol=1e-3)
    placed = template[align, :3, 3] @ recovered[:, :3, :3].transpose(1, 2) + recovered[:, None, :3, 3]
    err = torch.linalg.vector_norm(placed - joint_world[:, align], dim=-1) * joint_valid[:, align]
    assert err.max() < 1e-3, err

    # Through the training forward: the alignment joints' positions do not depend on the angles,
    # so their joint loss is ~0 whatever the network predicts.
    loss = model(inputs, dict(targets, joint_world=joint_world, joint_valid=joint_valid), meta_info, "train")
    assert loss["joint"][:, align].max() < 1e-3


def test_train_forward_losses_and_gradients(default_hand, tiny_batch):
    config, (inputs, targets, meta_info) = tiny_batch
    torch.manual_seed(0)
    model = get_model("train", default_hand, config).train()
    loss = model(inputs, targets, meta_info, "train")
    B, J, V = 2, default_hand.joint_num, default_hand.vertex_num
    shapes = {k: tuple(v.shape) for k, v in loss.items()}
    assert shapes == {"joint": (B, J, 3), "depthmap": (B, 16, 16), "penet": (B,), "lap": (B, V)}
    for k, v in loss.items():
        assert torch.isfinite(v).all(), k
    assert loss["joint"].mean() > 1 and loss["depthmap"].mean() > 0 and loss["lap"].mean() > 0
    sum(v.mean() for v in loss.values()).backward()
    for name, param in (("backbone conv1", model.backbone_net.resnet.conv1.weight),
                        ("backbone fc", model.backbone_net.fc[0].weight),
                        ("pose", model.pose_net.fc[0].weight),
                        ("skeleton corrective", model.skeleton_refine_net.fc_skeleton[0].weight),
                        ("pose corrective", model.skin_refine_net.fc_pose[0].weight),
                        ("identity corrective", model.skin_refine_net.fc_id[0].weight)):
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    # The test mode is unchanged: decode with the root at identity.
    model.eval()
    with torch.no_grad():
        out = model(inputs, mode="test")
        ref = model.decode(out["joint_euler"])
    assert torch.equal(out["mesh_out_refined"], ref["mesh_out_refined"])


def test_unplaceable_sample_has_no_joint_or_depth_loss(default_hand, tiny_batch):
    config, (inputs, targets, meta_info) = tiny_batch
    torch.manual_seed(0)
    model = get_model("train", default_hand, config).train()
    valid = targets["joint_valid"].clone()
    valid[1, model.align_joint_idx[:3]] = 0  # two alignment keypoints left: the root is undetermined
    loss = model(inputs, dict(targets, joint_valid=valid), meta_info, "train")
    assert loss["joint"][1].abs().sum() == 0 and loss["depthmap"][1].abs().sum() == 0
    assert loss["joint"][0].sum() > 0 and loss["penet"][1] >= 0 and loss["lap"][1].sum() > 0
    sum(v.mean() for v in loss.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_overfits_one_batch(default_hand, tiny_set):
    """On one fixed batch the total loss falls to half its first value within 25 Adam steps."""
    config = tiny_config(tiny_set)
    config.render_view_num = 1
    dataset = DeepHandMeshDataset.from_config(config, "train", default_hand, seed=0)
    inputs, targets, meta_info = split_batch(torch.utils.data.default_collate([dataset[0], dataset[3]]),
                                             torch.device("cpu"))
    torch.manual_seed(0)
    model = get_model("train", default_hand, config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(25):
        loss = model(inputs, targets, meta_info, "train")
        total = sum(v.mean() for v in loss.values())
        history.append(float(total.detach()))
        if history[-1] <= 0.5 * history[0]:
            break
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    assert min(history) <= 0.5 * history[0], history


# ------------------------------------------------------------------------------ the scripts
def test_lr_steps_as_the_original():
    config = Config()
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = config
    assert [trainer.lr_at(e) for e in (0, 29, 30, 31, 32, 34)] == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-6])
    config.lr_dec_epoch = []
    assert trainer.lr_at(50) == 1e-4


@pytest.mark.parametrize("text", ["0-1", "0,1"])
def test_gpu_ids_and_cpu_fallback(text, caplog, monkeypatch):
    args = train_script.parse_args(["--gpu", text])
    config = config_from_args(args)
    assert config.gpu_ids == text
    from common.utils.device import parse_gpu_ids

    assert parse_gpu_ids(config.gpu_ids) == [0, 1]
    # A machine without CUDA, also where there is one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO"):
        device, gpu_ids = pick_device(config)
    assert device.type == "cpu" and gpu_ids == []
    assert sum("device: cpu" in r.getMessage() for r in caplog.records) == 1


@pytest.fixture(scope="module")
def trained(tiny_set, tmp_path_factory):
    """``train.py`` run for two epochs without interruption, as a subprocess, with ``--gpu 0-1`` and
    the GPUs hidden: the CPU fallback on any machine, and a CPU run that the resume test repeats
    in this process (on the CPU: no ``--gpu``)."""
    out = tmp_path_factory.mktemp("run")
    result = run_script("train.py", "--gpu", "0-1", "--end_epoch", "2", *tiny_args(tiny_set, out), cpu_only=True)
    assert result.returncode == 0, result.stdout + result.stderr
    yield out, result
    shutil.rmtree(out, ignore_errors=True)  # ~450 MB of snapshots, no longer needed by this module


def test_train_script_writes_snapshots_and_logs(trained, default_hand):
    out, result = trained
    folder = out / "model_dump" / "subject_4"
    assert sorted(p.name for p in folder.iterdir()) == ["snapshot_0.pth.tar", "snapshot_1.pth.tar"]
    for epoch in (0, 1):
        ckpt = torch.load(folder / f"snapshot_{epoch}.pth.tar", map_location="cpu", weights_only=True)
        # the original's three keys, and the digest its loader ignores (common.io.checkpoint)
        assert set(ckpt) == {"epoch", "network", "optimizer", "tensor_digest"} and ckpt["epoch"] == epoch
        assert all(k.startswith("module.") for k in ckpt["network"])  # as the original's DataParallel
        assert "module.skin_refine_net.fc_id.2.weight" in ckpt["network"]
        assert ckpt["optimizer"]["state"] and ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-3)
    # The snapshot loads into a fresh model as any original-layout one does.
    from common.io.checkpoint import load_checkpoint

    load_checkpoint(get_model("test", default_hand, tiny_config(out)), folder / "snapshot_1.pth.tar")

    log = (out / "log" / "train_logs.txt").read_text()
    assert log.count("device: cpu") == 1 and "CUDA is not available" in log
    lines = [l for l in log.splitlines() if " itr " in l and "loss_" in l]
    assert len(lines) == 4  # 6 samples, batch 3: 2 iterations x 2 epochs
    for line in lines:
        for word in ("lr: 0.001", "s/itr", "data ", "loss_joint", "loss_depthmap", "loss_penet", "loss_lap",
                     "loss_total"):
            assert word in line, (word, line)
    assert "0 sample(s) skipped" in log and "snapshot_1.pth.tar" in log
    assert "Traceback" not in result.stderr


def test_test_script_writes_meshes_crops_and_metrics(trained, tiny_set, default_hand):
    out, _ = trained
    result = run_script("test.py", "--test_epoch", "1", *tiny_args(tiny_set, out))
    assert result.returncode == 0, result.stdout + result.stderr
    folder = out / "result" / "subject_4"
    pngs = sorted(folder.glob("*_img.png"))
    objs = sorted(folder.glob("*_mesh.obj"))
    assert len(pngs) == 6 and len(objs) == 6
    import cv2

    assert cv2.imread(str(pngs[0])).shape == (64, 64, 3)
    v_lines = [l for l in objs[0].read_text().splitlines() if l.startswith("v ")]
    assert len(v_lines) == default_hand.vertex_num
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["samples"] == 6 and metrics["evaluated_samples"] == 6
    for key in ("joint_error_mm", "depth_error_mm", "mesh_error_mm"):
        assert isinstance(metrics[key], float) and 0 < metrics[key] < 500, (key, metrics[key])
    assert metrics["mesh_samples"] == 6 and metrics["depth_pixels"] > 0 and metrics["valid_joints"] > 6 * 15
    assert metrics["joint_error_per_joint_mm"]["b_r_thumb0"] is None  # never in a keypoint file
    assert "joint error" in result.stdout and "mesh error" in result.stdout


def test_resume_after_interruption_matches_uninterrupted_run(trained, tiny_set, tmp_path, monkeypatch):
    """Killed at the end of epoch 1 before its snapshot was written, resumed with ``--continue``:
    the same weights and optimizer state as the uninterrupted run, bit for bit."""
    reference, _ = trained
    args = tiny_args(tiny_set, tmp_path) + ["--end_epoch", "2"]
    original_save = Trainer.save_model

    def killed_at_epoch_1(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original_save(self, epoch)

    monkeypatch.setattr(Trainer, "save_model", killed_at_epoch_1)
    assert train_script.main(args) == 130
    monkeypatch.setattr(Trainer, "save_model", original_save)
    folder = tmp_path / "model_dump" / "subject_4"
    assert sorted(p.name for p in folder.iterdir()) == ["snapshot_0.pth.tar"]
    (folder / "snapshot_1.pth.tar.tmp").write_bytes(b"half-written")  # what a kill mid-write leaves
    assert latest_snapshot(tiny_config(tiny_set).update({"output_dir": str(tmp_path)}))[0] == 0

    assert train_script.main(args + ["--continue"]) == 0
    log = (tmp_path / "log" / "train_logs.txt").read_text()
    assert "snapshot_0.pth.tar" in log.split("--continue")[-1]
    assert sum(" itr " in l for l in log.splitlines()) == 2 + 2 + 2  # epoch 0, epoch 1 twice
    got = torch.load(folder / "snapshot_1.pth.tar", weights_only=True)
    ref = torch.load(reference / "model_dump" / "subject_4" / "snapshot_1.pth.tar", weights_only=True)
    assert got["epoch"] == ref["epoch"] == 1
    assert list(got["network"]) == list(ref["network"])
    for k in ref["network"]:
        assert torch.equal(got["network"][k], ref["network"][k]), k
    for pid, state in ref["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer"]["state"][pid][name], value), (pid, name)


def test_each_epoch_visits_the_samples_in_its_documented_permutation(tiny_set, tmp_path):
    """Epoch e's order is torch.randperm(n) under the seed ``seed * 1_000_003 + e`` (main/trainer.py's
    notes): a new order every epoch, reproducible from the seed and e alone (resuming relies on it)."""
    seed = 5
    config = tiny_config(tiny_set).update({"output_dir": str(tmp_path)})
    trainer = Trainer(config, seed=seed)
    trainer.make_batch_generator()
    trainer.make_model()  # prepare_epoch sets the learning rate too
    n = len(trainer.dataset)
    orders = []
    for epoch in (0, 1, 2):
        trainer.prepare_epoch(epoch)
        order = [int(i) for batch in trainer.batch_generator for i in batch["index"]]
        documented = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        assert order == documented, (epoch, order, documented)
        orders.append(order)
    assert orders[0] != orders[1] and orders[1] != orders[2]
    trainer.prepare_epoch(1)  # out of sequence, as after --continue: epoch 1's order again
    assert [int(i) for batch in trainer.batch_generator for i in batch["index"]] == orders[1]


def test_bad_arguments_exit_2_without_traceback(tiny_set, tmp_path, capsys):
    # No snapshot for that epoch.
    assert test_script.main(["--test_epoch", "7", *tiny_args(tiny_set, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "snapshot_7.pth.tar: snapshot not found" in err and "Traceback" not in err
    # A data folder without the layout.
    assert train_script.main(["--end_epoch", "1", *tiny_args(tmp_path / "nowhere", tmp_path)]) == 2
    assert "image folder not found" in capsys.readouterr().err
    # Malformed options.
    assert train_script.main(["--gpu", "two", "--set", f"output_dir={tmp_path}"]) == 2
    assert "--gpu two" in capsys.readouterr().err
    assert test_script.main(["--test_epoch", "1", "--set", "resnet_typ=18"]) == 2
    assert "unknown option 'resnet_typ'" in capsys.readouterr().err


def test_metrics_of_the_ground_truth_are_zero(tiny_set, default_hand, tmp_path):
    """The Tester's metrics on a 'model' that returns the ground truth (in the wrist's frame, as
    the test mode does): joint and mesh errors vanish, depth agrees up to the data set's
    nearest-neighbour resampling of the captured maps (32x21 here: about 2 mm median on slanted
    skin); a mesh moved off its joints by 15 mm shows in the mesh and depth errors."""
    config = tiny_config(tiny_set).update({"output_dir": str(tmp_path), "test_batch_size": 1})
    gt = np.load(tiny_set / "gt" / "frames.npz")
    real = get_model("test", default_hand, config)

    class Oracle(torch.nn.Module):
        def __init__(self, frames, shift=0.0):
            super().__init__()
            self.frames, self.calls, self.shift = frames, 0, shift
            self.objective, self.align_joint_idx = real.objective, real.align_joint_idx
            # The identity metrics read the corrective networks: those of an untrained model.
            self.skin_refine_net, self.skeleton_refine_net = real.skin_refine_net, real.skeleton_refine_net
            self.id_code = real.id_code

        def forward(self, inputs, targets, meta_info, mode):
            k = int(np.nonzero(gt["frame"] == self.frames[self.calls])[0][0])
            self.calls += 1
            inv = np.linalg.inv(gt["root"][k])
            joints = gt["joints"][k] @ inv[:3, :3].T + inv[:3, 3]
            verts = gt["vertices"][k] @ inv[:3, :3].T + inv[:3, 3] + self.shift
            return {"joint_out": torch.tensor(joints[None], dtype=torch.float32),
                    "mesh_out_refined": torch.tensor(verts[None], dtype=torch.float32)}

    tester = tester_module.Tester(config, 0)
    tester.hand_model = default_hand
    tester.make_batch_generator()
    tester.model = Oracle([f for _, _, f in tester.dataset.samples])
    metrics = tester.test()
    assert metrics["evaluated_samples"] == 6
    assert metrics["joint_error_mm"] < 0.01 and metrics["mesh_error_mm"] < 0.01, metrics
    assert metrics["surface_error_mm"] < 0.01 and metrics["surface_out_to_gt_p90_mm"] < 0.01, metrics
    assert metrics["depth_error_mm"] < 6.0, metrics
    assert json.loads((tmp_path / "result" / "subject_4" / "metrics.json").read_text()) == metrics

    # A mesh moved off its joints along an oblique direction, |(3, 4, 12)| = 13 mm (an L1 sum would
    # say 19): the per-vertex error is 13 mm; the surface figures are those of the moved meshes.
    shift = np.array([3.0, 4.0, 12.0])
    tester.model = Oracle([f for _, _, f in tester.dataset.samples], shift=shift)
    moved = tester.test()
    assert moved["joint_error_mm"] < 0.01 and abs(moved["mesh_error_mm"] - 13.0) < 0.01
    assert moved["depth_error_mm"] > metrics["depth_error_mm"] + 2.0, (moved, metrics)
    from common import metrics as M

    faces = torch.as_tensor(default_hand.faces)
    there, back = [], []
    for _, _, frame in tester.dataset.samples:
        k = int(np.nonzero(gt["frame"] == frame)[0][0])
        world_shift = gt["root"][k][:3, :3] @ shift  # the shift is in the wrist's frame
        a, b = M.surface_distances(torch.tensor(gt["vertices"][k] + world_shift), torch.tensor(gt["vertices"][k]),
                                   faces)
        there.append(a.numpy())
        back.append(b.numpy())
    expected = M.summarise_surface(np.concatenate(there), np.concatenate(back))
    for key, value in expected.items():
        assert moved[key] == pytest.approx(value, abs=0.01), key
    assert 0.5 < moved["surface_error_mm"] < 13.0


def test_training_skips_unreadable_samples_and_counts_them(tiny_set, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    broken = sorted((data / "images" / "subject_4").rglob("image*.jpg"))[0]
    broken.write_bytes(b"not a jpeg")
    assert train_script.main(["--end_epoch", "1", *tiny_args(data, tmp_path / "out")]) == 0
    log = (tmp_path / "out" / "log" / "train_logs.txt").read_text()
    assert "could not be decoded" in log and str(broken) in log
    assert "1 sample(s) skipped so far" in log
    assert (tmp_path / "out" / "model_dump" / "subject_4" / "snapshot_0.pth.tar").is_file()


def test_train_forward_is_per_sample_as_dataparallel_needs(default_hand, tiny_batch):
    """DataParallel scatters the batch and concatenates the replicas' outputs along dim 0: the
    per-element losses of two half batches, concatenated, must be those of the whole batch
    (batch-norm statistics aside, hence eval())."""
    config, (inputs, targets, meta_info) = tiny_batch
    torch.manual_seed(0)
    model = get_model("train", default_hand, config).eval()

    def half(d, i):
        return {k: v[i:i + 1] for k, v in d.items()}

    with torch.no_grad():
        whole = model(inputs, targets, meta_info, "train")
        parts = [model(half(inputs, i), half(targets, i), half(meta_info, i), "train") for i in range(2)]
    for k, v in whole.items():
        assert all(isinstance(p[k], torch.Tensor) and p[k].shape[0] == 1 for p in parts)
        assert torch.allclose(torch.cat([p[k] for p in parts]), v, rtol=1e-4, atol=1e-4), k


def test_identity_metrics_measure_agreement_with_the_ground_truth(tiny_set, default_hand, tmp_path):
    config = tiny_config(tiny_set).update({"output_dir": str(tmp_path)})
    identity = np.load(tiny_set / "gt" / "identity.npz")
    model = get_model("test", default_hand, config)
    with torch.no_grad():
        model.skin_refine_net.fc_id[2].weight.zero_()
        model.skin_refine_net.fc_id[2].bias.copy_(torch.from_numpy(2 * identity["id_corrective"]).reshape(-1))
        model.skeleton_refine_net.fc_skeleton[2].weight.zero_()
        model.skeleton_refine_net.fc_skeleton[2].bias.copy_(torch.from_numpy(-identity["skeleton_offset"]).reshape(-1))
    tester = tester_module.Tester(config, 0)
    tester.hand_model = default_hand
    metrics = tester._identity_metrics(model)
    assert metrics["id_corrective_correlation"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["id_corrective_rms_mm"] == pytest.approx(2 * metrics["gt_id_corrective_rms_mm"], rel=1e-5)
    assert metrics["skeleton_corrective_correlation"] == pytest.approx(-1.0, abs=1e-6)
    with torch.no_grad():
        model.skin_refine_net.fc_pose[2].weight.zero_()
        model.skin_refine_net.fc_pose[2].bias.zero_()
    metrics = tester._identity_metrics(model)
    assert metrics["zero_pose_corrective_correlation"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["zero_pose_corrective_rms_mm"] == pytest.approx(metrics["id_corrective_rms_mm"], rel=1e-6)
    # The rest surface with twice the true identity corrective lies about one corrective (along
    # the normals) from the true rest surface; with the true one, on it.
    offset = np.linalg.norm(identity["id_corrective"], axis=1)
    assert 0.7 * offset.mean() < metrics["rest_surface_out_to_gt_mean_mm"] <= offset.mean() + 1e-6
    assert metrics["rest_surface_out_to_gt_p90_mm"] <= np.percentile(offset, 90) + 1e-6
    with torch.no_grad():
        model.skin_refine_net.fc_id[2].bias.copy_(torch.from_numpy(identity["id_corrective"]).reshape(-1))
    exact = tester._identity_metrics(model)
    assert exact["rest_surface_error_mm"] < 1e-5 and exact["rest_surface_gt_to_out_p90_mm"] < 1e-5
    with torch.no_grad():
        model.skin_refine_net.fc_id[2].bias.copy_(torch.from_numpy(2 * identity["id_corrective"]).reshape(-1))
    # A constant offset carried by the pose branch's bias instead: the identity branch alone is
    # blind to it, the zero-pose corrective is not.
    with torch.no_grad():
        model.skin_refine_net.fc_pose[2].bias.copy_(model.skin_refine_net.fc_id[2].bias)
        model.skin_refine_net.fc_id[2].bias.normal_(0.0, 0.01)
    metrics = tester._identity_metrics(model)
    assert abs(metrics["id_corrective_correlation"]) < 0.1
    assert metrics["zero_pose_corrective_correlation"] > 0.99


def test_holdout_sequences_split_train_and_test(tmp_path, default_hand):
    from data.make_synthetic import generate

    generate(tmp_path, default_hand, seed=2, sequences=2, frames=1, cameras=2, image_hw=(48, 32),
             depth_hw=(24, 16), progress=False)
    config = tiny_config(tmp_path).update_from_strings(["holdout_sequences=[0001_RT_synthetic]"])
    train = DeepHandMeshDataset.from_config(config, "train", default_hand)
    test = DeepHandMeshDataset.from_config(config, "test", default_hand)
    assert {s for s, _, _ in train.samples} == {"0000_RT_synthetic"}
    assert {s for s, _, _ in test.samples} == {"0001_RT_synthetic"}


def test_init_evaluates_the_model_train_py_starts_from(tiny_set, tmp_path, default_hand):
    result = run_script("test.py", "--init", "--seed", "3", *tiny_args(tiny_set, tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((tmp_path / "result" / "subject_4" / "metrics_init.json").read_text())
    assert metrics["epoch"] == "init" and metrics["snapshot"] is None and metrics["evaluated_samples"] == 6
    assert not (tmp_path / "result" / "subject_4" / "metrics.json").exists()
    # The model evaluated is train.py's initial model for that seed.
    config = tiny_config(tiny_set).update({"output_dir": str(tmp_path / "t")})
    trainer = Trainer(config, seed=3)
    trainer.hand_model = default_hand
    trainer.make_model()
    tester = tester_module.Tester(config, None, init_seed=3)
    tester.make_model()
    assert all(torch.equal(a, b) for a, b in zip(unwrap(trainer.model).state_dict().values(),
                                                 unwrap(tester.model).state_dict().values()))
    result = run_script("test.py", "--init", "--test_epoch", "1", *tiny_args(tiny_set, tmp_path))
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
