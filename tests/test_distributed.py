"""Distributed training (``torchrun`` + DDP, gloo on the CPU) against the one-process trainer.

The launches go through ``python -m torch.distributed.run`` (what the ``torchrun`` command runs)
with two processes on a tiny synthetic set; each takes a few seconds.
"""
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from common.io.checkpoint import network_state_dict
from common.utils.device import unwrap
from main.model import get_model
from main.options import resolve_paths
from main.loops import split_batch
from main.trainer import Trainer
from common.utils import device as device_module
from common.io.checkpoint import read_checkpoint
from common.utils.distributed import DistributedContext, DistributedError, context_from_env
from main.config import Config
from tests.conftest import REPO, make_tiny_set

TINY = ["resnet_type=18", "input_img_shape=[64,64]", "rendered_img_shape=[16,16]", "render_view_num=2",
        "num_thread=0", "lr=0.001"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, data_dir, out_dir, *extra):
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            str(REPO / "main" / "train.py"), "--data_dir", str(data_dir)]
    for item in TINY + [f"output_dir={out_dir}"]:
        args += ["--set", item]
    result = subprocess.run(args + list(extra), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def snapshot(out_dir, epoch):
    return read_checkpoint(out_dir / "model_dump" / "subject_4" / f"snapshot_{epoch}.pth.tar")


@pytest.fixture(scope="module")
def four_samples(tmp_path_factory, default_hand):
    """2 frames x 2 cameras: one step of a global batch of 4 is the whole epoch."""
    return make_tiny_set(tmp_path_factory, default_hand, "four_samples", seed=1, cameras=2)


# ---------------------------------------------------------------------------- the environment
def test_context_from_env():
    assert context_from_env({}) is None
    assert context_from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    ctx = context_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert ctx == DistributedContext(rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert not ctx.is_main
    with pytest.raises(DistributedError, match=r"RANK='x'"):
        context_from_env({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"})
    with pytest.raises(DistributedError, match=r"RANK=2 is outside 0..1"):
        context_from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})


def test_each_process_takes_its_own_gpu(monkeypatch):
    """With ``--gpu``, local rank k takes ``gpu_ids[k]``; too few ids for the processes is an error
    that says so. (No GPU here: CUDA's answers are stood in for.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert device_module.select_device("2-3", local_rank=1, local_world_size=2) == torch.device("cuda", 3)
    with pytest.raises(ValueError, match=r"--gpu 0 names 1 GPU\(s\), but torchrun started 2 processes"):
        device_module.select_device("0", local_rank=0, local_world_size=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_module.select_device("0-1", local_rank=1, local_world_size=2) == torch.device("cpu")


# ---------------------------------------------------------------------------- one step
def test_one_ddp_step_equals_one_process_step(four_samples, tmp_path):
    """Two processes x batch 2 update the weights as one process does with the same 4 samples.

    DDP averages the two processes' gradients; each process normalises its batch-norm layers with
    the statistics of its own 2 samples (as the original's DataParallel does per GPU). The
    one-process reference therefore takes the gradient of the mean of the two half-batch losses
    (each with its own batch statistics) and makes one Adam step."""
    out = tmp_path / "ddp"
    torchrun(2, four_samples, out, "--set", "train_batch_size=2", "--end_epoch", "1")
    ddp = snapshot(out, 0)["network"]

    config = Config()
    config.update_from_strings(TINY + ["train_batch_size=4", f"output_dir={tmp_path / 'one'}"])
    config.data_dir = str(four_samples)
    config = resolve_paths(config)
    trainer = Trainer(config, seed=0)
    trainer.make_batch_generator()
    trainer.make_model()
    trainer.set_lr(0)
    trainer.dataset.set_epoch(0)
    trainer.sampler.set_epoch(0)
    (batch,) = list(trainer.batch_generator)
    assert len(batch["img"]) == 4
    trainer.optimizer.zero_grad()
    start = {n: p.detach().clone() for n, p in unwrap(trainer.model).named_parameters()}
    group = trainer.optimizer.param_groups[0]
    lr, betas, eps = group["lr"], group["betas"], group["eps"]
    for rank in range(2):  # DistributedSampler deals the permutation out: rank r gets r, r+2, ...
        half = {k: v[rank::2] for k, v in batch.items()}
        losses = trainer.model(*split_batch(half, trainer.device), "train")
        (sum(v.mean() for v in losses.values()) / 2).backward()
    trainer.optimizer.step()
    one = network_state_dict(trainer.model)

    # The gradients: Adam's first moment after one step is (1 - beta1) x the gradient.
    ddp_state = snapshot(out, 0)["optimizer"]["state"]
    one_state = trainer.optimizer.state_dict()["state"]
    names = [k for k, _ in unwrap(trainer.model).named_parameters()]
    assert len(ddp_state) == len(one_state) == len(names)
    for index, name in enumerate(names):
        g_ddp, g_one = ddp_state[index]["exp_avg"], one_state[index]["exp_avg"]
        scale = float(g_one.abs().max())
        assert torch.allclose(g_ddp, g_one, rtol=1e-3, atol=1e-4 * scale + 1e-12), \
            f"{name}: gradient differs by {float((g_ddp - g_one).abs().max()):.3g} (scale {scale:.3g})"
        # Adam's first step moves every weight by lr x g / (|g| + eps). Where |g| is near eps
        # (1e-8) that step is sensitive to the gradients' float disagreement (DDP sums the two
        # halves in another order), so compare each run's weights with the step its own gradient
        # gives from the common start: with the gradients equal above, the DDP step is the
        # one-process step.
        w_ddp, w_one = ddp["module." + name], one["module." + name]
        for w, g in ((w_ddp, g_ddp), (w_one, g_one)):
            g = g / (1 - betas[0])
            expected = start[name] - lr * g / (g.abs() + eps)
            assert torch.allclose(w, expected, rtol=1e-5, atol=1e-7), name
    # And the step did move the weights (from the same seeded initialisation).
    torch.manual_seed(0)
    initial = get_model("train", trainer.hand_model, config).state_dict()
    key = "module.backbone_net.resnet.conv1.weight"
    assert torch.equal(initial[key[len("module."):]], start[key[len("module."):]])
    assert not torch.allclose(ddp[key], initial[key[len("module."):]])


# ---------------------------------------------------------------------------- run and resume
def test_two_process_run_resumes_bit_for_bit_and_with_another_process_count(tiny_set, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    result = torchrun(2, tiny_set, whole, "--set", "train_batch_size=1", "--end_epoch", "2")
    assert "distributed: 2 processes (gloo), this is rank 0" in result.stdout
    assert "batch 2 (1 per process)" in result.stdout
    log = (whole / "log" / "train_logs.txt").read_text()
    assert log.count("epoch 1 done") == 1  # rank 0 alone writes the log

    torchrun(2, tiny_set, parts, "--set", "train_batch_size=1", "--end_epoch", "1")
    torchrun(2, tiny_set, parts, "--set", "train_batch_size=1", "--end_epoch", "2", "--continue")
    a, b = snapshot(whole, 1), snapshot(parts, 1)
    assert a["epoch"] == b["epoch"] == 1
    for key, value in a["network"].items():
        assert torch.equal(value, b["network"][key]), key

    # A third epoch in one process, from the two processes' snapshot.
    single = subprocess.run([sys.executable, str(REPO / "main" / "train.py"), "--data_dir", str(tiny_set),
                             "--end_epoch", "3", "--continue", "--set", "train_batch_size=2",
                             *sum((["--set", s] for s in TINY + [f"output_dir={parts}"]), [])],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "snapshot_1.pth.tar" in single.stdout and "epoch 2 done" in single.stdout
    third = snapshot(parts, 2)
    assert third["epoch"] == 2
    assert np.isfinite(torch.cat([v.float().reshape(-1) for v in third["network"].values()]).numpy()).all()
