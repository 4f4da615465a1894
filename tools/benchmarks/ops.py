"""What a training iteration asks of the device, counted on any machine: the ATen operations each
stage dispatches (on a GPU, about one kernel launch each) and the host waits among them (reads of
a device value by the host: ``item()``, ``bool()``, ``nonzero``…, which on CUDA stop the host until
the device has caught up). Run through ``python tools/bench.py ops``.

On a GPU a small batch's iteration can be bound by the host's dispatching rather than by the
device's work; the counts say where that cost lies, without a GPU: they do not depend on the
device, except that the CPU's fused Adam reads each parameter's step counter on the host (the
CUDA one does not), so on the CPU the optimizer's host waits are not counted.

Counted with ``torch.profiler`` over one iteration (after one untimed one), each operation
attributed to the innermost stage it ran in: the encoder (``backbone_net``, ``pose_net``), the
renderer, the four losses and the rest of the forward (the decoder) by forward hooks; the backward
and the optimizer step as wholes. An operation counts when no other ATen operation runs inside it
that does work (its innermost working operations): not those that only make a view, read
metadata or allocate.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile, record_function

# Operations that read a value of the device on the host: on CUDA each one waits for the device.
HOST_WAITS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
                        "aten::unique_consecutive", "aten::unique_dim", "aten::nonzero_static"})
# Operations that make a view, read metadata or allocate: no work for the device.
NO_WORK = frozenset({"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::as_strided",
                       "aten::_reshape_alias", "aten::reshape", "aten::resize_", "aten::detach", "aten::detach_",
                       "aten::t", "aten::transpose", "aten::expand", "aten::expand_as", "aten::permute",
                       "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice", "aten::alias",
                       "aten::lift_fresh", "aten::_unsafe_view", "aten::set_", "aten::resolve_conj",
                       "aten::resolve_neg", "aten::result_type", "aten::sparse_dim", "aten::dense_dim",
                       "aten::_nnz", "aten::_indices", "aten::_values", "aten::is_coalesced",
                       "aten::broadcast_tensors", "aten::split", "aten::unbind", "aten::chunk", "aten::narrow",
                       "aten::flatten", "aten::view_as", "aten::unflatten", "aten::movedim", "aten::split_with_sizes",
                       "aten::_coalesced_", "aten::scalar_tensor", "aten::as_strided_", "aten::diagonal"})
STAGES = ["encoder", "decoder", "rendering", "losses", "backward", "optimizer"]
_PREFIX = "stage:"


def _attach(module: torch.nn.Module, stage: str, handles: List) -> None:
    """Run ``module``'s forward inside ``record_function('stage:<stage>')``."""
    open_ranges = []

    def before(mod, args):
        scope = record_function(_PREFIX + stage)
        scope.__enter__()
        open_ranges.append(scope)

    def after(mod, args, output):
        open_ranges.pop().__exit__(None, None, None)

    handles.append(module.register_forward_pre_hook(before))
    handles.append(module.register_forward_hook(after))


def _launches(event) -> bool:
    """Whether ``event`` or an operation inside it does work (not a view, metadata or allocation)."""
    return event.name.startswith("aten::") and (event.name not in NO_WORK
                                                 or any(_launches(c) for c in event.cpu_children))


def _stage_of(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(_PREFIX):
            return parent.name[len(_PREFIX):]
        parent = parent.cpu_parent
    return "other"


def count_iteration_ops(trainer) -> Dict[str, Dict[str, object]]:
    """Count one training iteration of a set-up ``trainer`` (``make_batch_generator`` and
    ``make_model`` done; one process).

    Returns:
        ``{stage: {'ops': int, 'host_waits': int, 'top': [(name, count), ...]}}`` for the stages
        of :data:`STAGES` and ``'iteration'`` (their sum; ``'other'``, the data copy, is left out).
    """
    from common.utils.device import unwrap
    from main.loops import split_batch

    model = unwrap(trainer.model)
    handles: List = []
    _attach(model.backbone_net, "encoder", handles)
    _attach(model.pose_net, "encoder", handles)
    objective = model.objective
    _attach(objective.renderer, "rendering", handles)
    for loss in (objective.joint_loss, objective.depthmap_loss, objective.penet_loss, objective.lap_loss):
        _attach(loss, "losses", handles)
    trainer.prepare_epoch(0)
    batches = iter(trainer.batch_generator)

    def iteration():
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(trainer.batch_generator)
            batch = next(batches)
        inputs, targets, meta_info = split_batch(batch, trainer.device)
        trainer.optimizer.zero_grad(set_to_none=True)
        with record_function(_PREFIX + "decoder"):
            loss = trainer.model(inputs, targets, meta_info, "train")
            total = sum(v.mean() for v in loss.values())
        with record_function(_PREFIX + "backward"):
            total.backward()
        with record_function(_PREFIX + "optimizer"):
            trainer.optimizer.step()

    try:
        iteration()
        with warnings.catch_warnings():  # that a later profiling cycle would clear these: there is none
            warnings.filterwarnings("ignore", message=".*Profiler clears events")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                iteration()
    finally:
        for handle in handles:
            handle.remove()
    ops: Dict[str, Counter] = {stage: Counter() for stage in STAGES}
    events = prof.events()
    waits: Dict[str, int] = Counter()
    for event in events:
        name = event.name
        stage = _stage_of(event)
        if stage not in ops or not name.startswith("aten::"):
            continue
        if name in HOST_WAITS:  # counted whatever runs inside it (nonzero allocates its output)
            waits[stage] += 1
        if name in NO_WORK or any(_launches(child) for child in event.cpu_children):
            continue
        ops[stage][name] += 1
    result: Dict[str, Dict[str, object]] = {}
    for stage, counts in ops.items():
        stage_waits = waits[stage]
        if stage == "optimizer" and trainer.device.type == "cpu":
            stage_waits = 0  # the CPU's fused Adam reads its step counters on the host; on CUDA they stay there
        result[stage] = {"ops": sum(counts.values()), "host_waits": stage_waits, "top": counts.most_common(6)}
    result["iteration"] = {"ops": sum(r["ops"] for r in result.values()),
                           "host_waits": sum(r["host_waits"] for r in result.values()), "top": []}
    return result


def format_ops(result: Dict[str, Dict[str, object]], title: str) -> str:
    lines = [title, f"{'stage':<12} {'ops':>6} {'host waits':>11}  most frequent"]
    for stage in STAGES + ["iteration"]:
        row = result[stage]
        top = ", ".join(f"{name[6:]} {n}" for name, n in row["top"][:4])
        lines.append(f"{stage:<12} {row['ops']:>6} {row['host_waits']:>11}  {top}")
    return "\n".join(lines)
