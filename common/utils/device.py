"""The one place that decides which device the program runs on."""
from __future__ import annotations

import logging
import os
from typing import List, Optional, Tuple

import torch
from torch.nn.parallel import DataParallel, DistributedDataParallel

from common.errors import OptionError
from common.io.textio import shown

log = logging.getLogger(__name__)
MAX_GPU_ID = 4096  # far above any machine's GPU count; bounds the list a range such as 0-999999999 makes


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity mask, which ``taskset`` or a batch
    scheduler may narrow; all of the machine's where the platform has no such mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def parse_gpu_ids(text: Optional[str]) -> List[int]:
    """``'0-3'`` → [0, 1, 2, 3]; ``'0,2'`` → [0, 2]; ``''``/None → []."""
    if text is None or str(text).strip() == "":
        return []
    text = str(text).strip()
    try:
        if "-" in text:
            first, last = (int(x) for x in text.split("-", 1))
            if not 0 <= first <= last < MAX_GPU_ID:
                raise ValueError
            return list(range(first, last + 1))
        ids = [int(x) for x in text.split(",") if x.strip() != ""]
        if not all(0 <= i < MAX_GPU_ID for i in ids):
            raise ValueError
        return ids
    except ValueError:
        raise OptionError(f"--gpu {shown(text)}: expected GPU ids like '0', '0,1' or '0-3'") from None


def select_device(gpu_ids: Optional[str] = None, local_rank: Optional[int] = None,
                  local_world_size: int = 1) -> torch.device:
    """The device to run on: the first of ``gpu_ids`` when CUDA is available, else the CPU (said once).

    In a ``torchrun`` launch (``local_rank`` given) each process takes its own GPU,
    ``gpu_ids[local_rank]``; ``gpu_ids`` must name one per process of the machine.
    """
    ids = parse_gpu_ids(gpu_ids)
    if not ids:
        log.info("device: cpu (no --gpu given)")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log.warning("device: cpu (--gpu %s asked for, but CUDA is not available on this machine)", gpu_ids)
        return torch.device("cpu")
    count = torch.cuda.device_count()
    bad = [i for i in ids if i >= count]
    if bad:
        raise OptionError(f"--gpu {gpu_ids}: this machine has {count} GPU(s) (ids 0..{count - 1}), not {bad}")
    if local_rank is None:
        log.info("device: cuda:%d (of %s)", ids[0], ids)
        return torch.device("cuda", ids[0])
    if len(ids) < local_world_size:
        raise OptionError(f"--gpu {gpu_ids} names {len(ids)} GPU(s), but torchrun started {local_world_size} "
                         f"processes on this machine: give one GPU per process (--nproc_per_node)")
    log.info("device: cuda:%d (process %d of this machine)", ids[local_rank], local_rank)
    return torch.device("cuda", ids[local_rank])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``DataParallel`` or ``DistributedDataParallel`` wrapper (else ``model``)."""
    return model.module if isinstance(model, (DataParallel, DistributedDataParallel)) else model


def pick_device(config, context=None) -> Tuple[torch.device, List[int]]:
    """The device (decided by :func:`select_device`, which logs it once) and the GPU ids this
    process uses (empty on the CPU; in a ``torchrun`` launch its one GPU). ``config`` is the run's
    configuration (its ``gpu_ids``), ``context`` a :class:`common.utils.distributed.DistributedContext`
    or None for one process."""
    if context is not None:
        device = select_device(config.gpu_ids, context.local_rank, context.local_world_size)
        return device, ([device.index] if device.type == "cuda" else [])
    device = select_device(config.gpu_ids)
    return device, (parse_gpu_ids(config.gpu_ids) if device.type == "cuda" else [])


def place_model(model: torch.nn.Module, device: torch.device, gpu_ids: List[int]) -> torch.nn.Module:
    """Move ``model`` to ``device``; several GPUs → DataParallel over them (as the original)."""
    model = model.to(device)
    if len(gpu_ids) > 1:
        model = DataParallel(model, device_ids=gpu_ids, output_device=gpu_ids[0])
        log.info("DataParallel over GPUs %s", gpu_ids)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model
