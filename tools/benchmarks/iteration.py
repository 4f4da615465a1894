"""A training iteration taken apart: data loading, forward (encoder, decoder), rendering, losses,
backward and the optimizer step, and the peak memory. Run through ``python tools/bench.py train``
(and, several processes at once, ``python tools/bench.py scaling``).

The iterations are the trainer's own (:class:`main.trainer.Trainer` sets up data, model and
optimizer exactly as ``train.py`` does, one process or a ``torchrun`` launch); the stages are
timed without changing what runs:

* forward time of the encoder (``backbone_net``, ``pose_net``), the renderer and the four loss
  modules by forward hooks; the decoder (identity part, root alignment, FK, LBS) is the rest of
  the forward;
* backward time of the renderer and of the losses by identity autograd functions put on their
  inputs and outputs: the interval between the gradient reaching a module's output and leaving
  its inputs. PyTorch runs the backward nodes of later modules first, so the interval holds that
  module's nodes alone;
* data loading: the wait for the next batch (with the configuration's loading workers), and its
  copy to the device.
"""
from __future__ import annotations

import resource
import statistics
import time
from collections import defaultdict
from typing import Dict, List

import torch

from tools.benchmarks.timing import synchronize


class _Mark(torch.autograd.Function):
    """Identity whose backward calls ``callback`` when the gradient passes through it."""

    @staticmethod
    def forward(ctx, tensor, callback):
        ctx.callback = callback
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.callback()
        return grad, None


class StageClock:
    """Forward and backward wall time of groups of modules ("stages"), summed per iteration."""

    def __init__(self, device: torch.device):
        self.device = device
        self.forward: Dict[str, float] = defaultdict(float)
        self.backward: Dict[str, float] = defaultdict(float)
        self._handles = []

    def now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def reset(self) -> None:
        self.forward.clear()
        self.backward.clear()

    def attach(self, module: torch.nn.Module, stage: str, backward: bool = False) -> None:
        """Time ``module``'s forward under ``stage``; with ``backward``, its backward too."""
        calls = []

        def before(mod, args, kwargs):
            call = {"start": self.now(), "grad_in": None, "left": 0}
            calls.append(call)
            if not (backward and torch.is_grad_enabled()):
                return None

            def left_input():
                call["left"] -= 1
                if call["left"] == 0 and call["grad_in"] is not None:
                    self.backward[stage] += self.now() - call["grad_in"]

            def mark(value):
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    call["left"] += 1
                    return _Mark.apply(value, left_input)
                return value
            return tuple(mark(a) for a in args), {k: mark(v) for k, v in kwargs.items()}

        def after(mod, args, kwargs, output):
            call = calls.pop()
            self.forward[stage] += self.now() - call["start"]
            if not (backward and isinstance(output, torch.Tensor) and output.requires_grad and call["left"]):
                return None

            def reached_output():
                if call["grad_in"] is None:
                    call["grad_in"] = self.now()
            return _Mark.apply(output, reached_output)

        self._handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        self._handles.append(module.register_forward_hook(after, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def peak_memory_mb(device: torch.device) -> Dict[str, float]:
    """Peak resident memory of this process and of its largest finished child (data-loading
    workers), MB; on CUDA also the peak of allocated device memory."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "peak_worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def profile_iterations(trainer, iterations: int, warmup: int = 2) -> Dict[str, object]:
    """Run ``warmup`` + ``iterations`` training iterations of a set-up ``trainer``
    (``make_batch_generator`` and ``make_model`` done) and return the median of each stage (ms),
    the iteration's median, each timed iteration's stages (``iterations_ms``), samples/s over all
    processes and the peak memory.

    The iterations are those of :meth:`main.trainer.Trainer.train_epoch` (zero_grad, forward, mean
    of each loss, sum, backward, step), the epoch's loader restarted when it runs out.
    """
    from common.utils.device import unwrap
    from main.loops import split_batch

    model = unwrap(trainer.model)
    device = trainer.device
    clock = StageClock(device)
    clock.attach(model.backbone_net, "encoder")
    clock.attach(model.pose_net, "encoder")
    clock.attach(model.objective.renderer, "rendering", backward=True)
    objective = model.objective
    for loss in (objective.joint_loss, objective.depthmap_loss, objective.penet_loss, objective.lap_loss):
        clock.attach(loss, "losses", backward=True)

    epoch = 0
    trainer.prepare_epoch(epoch)
    batches = iter(trainer.batch_generator)
    rows: List[Dict[str, float]] = []
    try:
        for step in range(warmup + iterations):
            clock.reset()
            t0 = clock.now()
            try:
                batch = next(batches)
            except StopIteration:
                epoch += 1
                trainer.prepare_epoch(epoch)
                batches = iter(trainer.batch_generator)
                batch = next(batches)
            inputs, targets, meta_info = split_batch(batch, device, non_blocking=device.type == "cuda")  # as training
            t1 = clock.now()
            trainer.optimizer.zero_grad(set_to_none=True)
            loss = trainer.model(inputs, targets, meta_info, "train")
            total = sum(v.mean() for v in loss.values())
            t2 = clock.now()
            total.backward()
            t3 = clock.now()
            trainer.optimizer.step()
            t4 = clock.now()
            forward = t2 - t1
            row = {
                "data": t1 - t0,
                "encoder": clock.forward["encoder"],
                "decoder": forward - clock.forward["encoder"] - clock.forward["rendering"] - clock.forward["losses"],
                "rendering": clock.forward["rendering"],
                "losses": clock.forward["losses"],
                "backward": t3 - t2,
                "backward_rendering": clock.backward["rendering"],
                "backward_losses": clock.backward["losses"],
                "optimizer": t4 - t3,
                "iteration": t4 - t0,
            }
            if step >= warmup:
                rows.append(row)
    finally:
        clock.detach()
    medians = {k: 1e3 * statistics.median(r[k] for r in rows) for k in rows[0]}
    global_batch = trainer.batch_size * trainer.world_size
    return {
        "stages_ms": medians,
        "iterations_ms": [{k: 1e3 * v for k, v in r.items()} for r in rows],
        "global_batch": global_batch,
        "processes": trainer.world_size,
        "samples_per_s": global_batch / (medians["iteration"] / 1e3),
        "iterations": iterations,
        **peak_memory_mb(device),
    }


STAGES = [("data", "data loading (wait + copy)"), ("encoder", "forward: encoder (ResNet, PoseNet)"),
          ("decoder", "forward: decoder (correctives, alignment, FK, LBS)"), ("rendering", "forward: rendering"),
          ("losses", "forward: losses"), ("backward", "backward, all"),
          ("backward_rendering", "  of which rendering"), ("backward_losses", "  of which losses"),
          ("optimizer", "optimizer step (Adam)"), ("iteration", "iteration")]


def format_profile(result: Dict[str, object], title: str) -> str:
    stages = result["stages_ms"]
    total = stages["iteration"]
    lines = [title, f"{'stage':<52} {'ms':>9} {'share':>6}"]
    for key, label in STAGES:
        lines.append(f"{label:<52} {stages[key]:>9.1f} {100 * stages[key] / total:>5.1f}%")
    lines.append(f"samples/s: {result['samples_per_s']:.2f} (global batch {result['global_batch']}, "
                 f"{result['processes']} process(es)); peak RSS {result['peak_rss_mb']:.0f} MB "
                 f"(largest loading worker {result['peak_worker_rss_mb']:.0f} MB)"
                 + (f"; peak CUDA {result['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in result else ""))
    return "\n".join(lines)
