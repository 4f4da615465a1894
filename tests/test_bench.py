"""The benchmarks' own machinery (their figures are not tested): the stage clock must not change
what it measures, and the scripts must run."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from main.trainer import Trainer
from tools.benchmarks.iteration import STAGES, StageClock, profile_iterations
from tools.benchmarks.renderer import subdivide
from main.config import Config
from tests.conftest import REPO
from tests.test_train import TINY


def tiny_trainer(data_dir, out_dir) -> Trainer:
    config = Config()
    config.update_from_strings(TINY + [f"output_dir={out_dir}"])
    config.data_dir = str(data_dir)
    trainer = Trainer(config, seed=0)
    trainer.make_batch_generator()
    trainer.make_model()
    return trainer


def one_step_gradients(trainer, batch):
    from main.loops import split_batch

    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.model(*split_batch(batch, trainer.device), "train")
    sum(v.mean() for v in loss.values()).backward()
    return {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}


def test_stage_clock_leaves_gradients_unchanged_and_times_backward(tiny_set, tmp_path):
    trainer = tiny_trainer(tiny_set, tmp_path)
    batch = next(iter(trainer.batch_generator))
    plain = one_step_gradients(trainer, batch)
    model = trainer.model
    clock = StageClock(trainer.device)
    clock.attach(model.objective.renderer, "rendering", backward=True)
    objective = model.objective
    for loss in (objective.joint_loss, objective.depthmap_loss, objective.penet_loss, objective.lap_loss):
        clock.attach(loss, "losses", backward=True)
    timed = one_step_gradients(trainer, batch)
    assert plain.keys() == timed.keys() and len(plain) > 10
    for name in plain:
        assert torch.equal(plain[name], timed[name]), name
    assert clock.forward["rendering"] > 0 and clock.forward["losses"] > 0
    assert clock.backward["rendering"] > 0 and clock.backward["losses"] > 0
    clock.detach()
    assert not model.objective.renderer._forward_hooks and not model.objective.renderer._forward_pre_hooks


def test_profile_iterations_reports_every_stage(tiny_set, tmp_path):
    trainer = tiny_trainer(tiny_set, tmp_path)
    result = profile_iterations(trainer, iterations=5, warmup=1)  # the 2-batch epoch restarts
    stages = result["stages_ms"]
    assert set(stages) == {key for key, _ in STAGES}
    assert all(v >= 0 for v in stages.values())
    parts = ("data", "encoder", "decoder", "rendering", "losses", "backward", "optimizer")
    # Each iteration's parts add up to it (their medians need not: a loaded machine's times vary).
    assert len(result["iterations_ms"]) == 5
    for row in result["iterations_ms"]:
        assert sum(row[k] for k in parts) == pytest.approx(row["iteration"], rel=1e-6)
    assert result["samples_per_s"] > 0 and result["peak_rss_mb"] > 100


def test_subdivide_keeps_the_surface():
    vertices = np.array([[0.0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 4]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    fine = subdivide(vertices, faces, times=2)
    assert fine.faces.shape == (32, 3)
    # Shared edges get one midpoint: 4 + 5 edges, then 9 + 16 edges (of 8 faces).
    assert len(fine.vertices) == 9 + 16
    area = lambda v, f: 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1).sum()  # noqa: E731
    assert np.isclose(area(fine.vertices, fine.faces), area(vertices, faces))


def test_bench_script_runs_and_rejects_bad_arguments():
    run = [sys.executable, str(REPO / "tools" / "bench.py")]
    done = subprocess.run(run + ["decode", "--batch", "2", "--hands", "default", "--repeats", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "default" in done.stdout and "x" in done.stdout.splitlines()[-1]
    done = subprocess.run(run + ["surface", "--hands", "default", "--points", "40", "--shift", "1",
                                 "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = done.stdout.splitlines()[-1].split()
    assert row[:4] == ["default", "40", "9860", "1.0"] and row[-1].endswith("x"), done.stdout
    bad = subprocess.run(run + ["train", "--data_dir", str(REPO / "no_such_folder")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no_such_folder" in bad.stderr and "Traceback" not in bad.stderr


def test_data_benchmark_yardstick_reads_what_the_reader_reads(tiny_set, default_hand):
    """The original's reading transcribed in ``bench.py data`` makes the reader's input crop and, for
    the views it draws, the reader's render affines: the two readers do the same work."""
    import random

    from data.dataset import DeepHandMeshDataset
    from tools.benchmarks.data import OriginalReader

    ours = DeepHandMeshDataset(tiny_set, mode="test", joint_names=default_hand.joint_names, input_img_shape=(32, 32),
                               rendered_img_shape=(16, 16), render_view_num=3, seed=0)
    theirs = OriginalReader(ours)
    assert len(theirs) == len(ours) == 6
    random.seed(0)
    for i in range(len(ours)):
        item = ours[i]
        inputs, targets, meta = theirs[i]
        assert torch.equal(inputs["img"], item["img"]), i
        assert len(targets["depthmap"]) == 3 and targets["depthmap"][0].shape == (1, 16, 16)
        # all three cameras are targets in both: match the affines camera by camera
        ours_by_cam = {ours.cameras[v]: a for v, a in zip(item["view_cam_idx"].tolist(), item["affine"].numpy())}
        for params, affine in zip(meta["cam_param"], meta["affine_trans"]):
            cam = next(c for c, p in theirs.cam.items() if p is params)
            assert np.array_equal(affine, ours_by_cam[cam]), (i, cam)


def test_data_benchmark_runs(tiny_set):
    run = [sys.executable, str(REPO / "tools" / "bench.py"), "data", "--data", str(tiny_set), "--size", "32",
           "--views", "2", "--rounds", "2", "--samples", "3", "--workers", "1", "--batch", "2", "--repeats", "1",
           "--profile"]
    done = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "original (yardstick)" in out and "where the time goes" in out
    for row in ("ours, a worker's 1st epoch", "ours, later epochs"):
        cells = next(line for line in out.splitlines() if line.startswith(row))[len(row):].split()
        assert len(cells) == 4 and all(float(c.rstrip("x")) > 0 for c in cells), out
    peak = next(line for line in out.splitlines() if line.startswith("peak RSS"))
    assert "worker 0:" in peak and float(peak.split("worker 0:")[1].split("MB")[0]) > 10


def test_train_benchmark_times_variants_side_by_side(tiny_set, tmp_path):
    run = [sys.executable, str(REPO / "tools" / "bench.py"), "train", "--data_dir", str(tiny_set),
           "--iterations", "1", "--warmup", "0"]
    for item in TINY + [f"output_dir={tmp_path}"]:
        run += ["--set", item]
    done = subprocess.run(run + ["--variant", "channels_last=true", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\nstage ") == 2 and "variant: channels_last=true" in done.stdout
    side_by_side = done.stdout.split("variants side by side")[1].splitlines()
    assert side_by_side[1].split()[:2] == ["as", "configured"] and side_by_side[1].endswith("1.00x")
    assert side_by_side[2].split()[0] == "channels_last=true"
    bad = subprocess.run(run + ["--variant", "channels_last=maybe"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "channels_last" in bad.stderr and "Traceback" not in bad.stderr


def test_operation_count_attributes_every_stage(tiny_set, tmp_path):
    """``bench.py ops``: every stage dispatches work; the encoder none that makes the host wait for
    the device (PoseNet once found its angle slots with a ``nonzero`` at every forward)."""
    from tools.benchmarks.ops import STAGES, count_iteration_ops, format_ops

    result = count_iteration_ops(tiny_trainer(tiny_set, tmp_path))
    assert all(result[stage]["ops"] > 0 for stage in STAGES)
    assert result["iteration"]["ops"] == sum(result[stage]["ops"] for stage in STAGES)
    assert result["encoder"]["host_waits"] == 0
    assert result["rendering"]["host_waits"] >= 1  # the covered pixels' nonzero: counted where it is
    names = {name for stage in STAGES for name, _ in result[stage]["top"]}
    assert "aten::convolution" not in names and not names & {"aten::view", "aten::empty"}
    assert "encoder" in format_ops(result, "title").splitlines()[2]
