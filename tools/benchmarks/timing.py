"""What every benchmark needs: a median timer, the machine's description, the hands to measure."""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from common.utils.device import usable_cpus

REPO = Path(__file__).resolve().parents[2]
# The MakeHuman hand sits beside the repository (docs/tests.md); never part of it.
MAKEHUMAN = REPO.parent / "shared" / "hand_models" / "makehuman_right"


def synchronize(device: Optional[torch.device] = None) -> None:
    """Wait for queued CUDA work, so that a wall-clock interval covers it (no-op on the CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3,
                   device: Optional[torch.device] = None) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """One line: CPU, cores this process may use, torch threads and version, GPU if any."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu_name()}, {usable_cpus()} cores, {torch.get_num_threads()} torch threads, {gpu}, "
            f"torch {torch.__version__}")


def load_hands(names: Sequence[str]) -> List[Tuple[str, object]]:
    """``(name, HandModel)`` for ``'default'``, ``'makehuman'`` (skipped, with a message, when
    ``../shared`` is absent) or hand-model folders."""
    from common.hand.hand_model import load_hand_model

    hands = []
    for name in names:
        if name == "default":
            from common.hand.default_hand import make_default_hand

            hands.append(("default", make_default_hand()))
        elif name == "makehuman":
            if not MAKEHUMAN.is_dir():
                print(f"skipping makehuman: {MAKEHUMAN} not found")
                continue
            hands.append(("makehuman", load_hand_model(MAKEHUMAN)))
        else:
            hands.append((Path(name).name, load_hand_model(name)))
    return hands
