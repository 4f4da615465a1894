"""Multi-process training with ``torchrun``: who this process is, and the few collective calls
the trainer needs.

``torchrun --nproc_per_node N main/train.py …`` starts N copies of the script and tells each its
place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``). :func:`context_from_env` reads them; without them (a plain
``python main/train.py``), or with ``WORLD_SIZE=1``, there is no distributed context and the
single-process path runs unchanged. The device of each process is decided, as every device, by
:func:`common.utils.device.select_device` (GPU ``gpu_ids[LOCAL_RANK]`` with ``--gpu``, else the
CPU); the backend follows it: NCCL on GPUs, gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from common.errors import OptionError

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class DistributedError(OptionError):
    """A distributed launch this program cannot run (inconsistent environment, too few GPUs)."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a ``torchrun`` launch.

    ``rank``: 0 … ``world_size - 1`` over all machines; ``local_rank``: 0 … ``local_world_size - 1``
    on this machine (it picks the GPU).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows progress and writes snapshots."""
        return self.rank == 0


def _env_int(name: str, environ) -> int:
    text = environ.get(name)
    try:
        return int(text)
    except (TypeError, ValueError):
        raise DistributedError(f"environment variable {name}={text!r}: expected an integer "
                               f"(set by torchrun; launch with torchrun or unset {', '.join(ENV_VARS)})") from None


def context_from_env(environ=None) -> Optional[DistributedContext]:
    """The context ``torchrun`` describes in ``environ`` (default ``os.environ``), or None when the
    process was not started by it or is alone (``WORLD_SIZE`` absent or 1)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ or _env_int("WORLD_SIZE", environ) <= 1:
        return None
    world_size = _env_int("WORLD_SIZE", environ)
    rank = _env_int("RANK", environ)
    local_rank = _env_int("LOCAL_RANK", environ)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", environ) if "LOCAL_WORLD_SIZE" in environ else world_size
    if not 0 <= rank < world_size:
        raise DistributedError(f"RANK={rank} is outside 0..{world_size - 1} (WORLD_SIZE={world_size})")
    if not 0 <= local_rank < local_world_size:
        raise DistributedError(f"LOCAL_RANK={local_rank} is outside 0..{local_world_size - 1} "
                               f"(LOCAL_WORLD_SIZE={local_world_size})")
    return DistributedContext(rank, world_size, local_rank, local_world_size)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(context: DistributedContext, device: torch.device, timeout_s: float = 1800) -> None:
    """Join the process group (``MASTER_ADDR``/``MASTER_PORT`` rendezvous, as torchrun sets them)."""
    if dist.is_initialized():
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DistributedError(f"environment variable {name} is not set: launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), rank=context.rank, world_size=context.world_size,
                            timeout=timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_tensor(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` (any shape, float) over all processes; itself when alone."""
    if not is_active():
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of process ``src``, on every process (our own processes' objects, never a file's)."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_dense_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process ``src``'s dense buffers (the identity code, batch-norm statistics, the
    hand model's tensors); sparse ones (the Laplacian) are built from the hand model on each."""
    if not is_active():
        return
    for buffer in module.buffers():
        if not buffer.is_sparse:
            dist.broadcast(buffer.data, src=src)


def barrier() -> None:
    if is_active():
        dist.barrier()

