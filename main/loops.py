"""What the training and the test loops share: the hand model a run uses, the data loader, a
collated batch moved to the device, and the timers of the log lines."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.utils.data

from common.hand.hand_model import HandModel, is_hand_model_folder, load_hand_model
from common.hand.hand_model_source import resolve_hand_model
from common.utils.device import usable_cpus
from main.config import Config
from main.model import INPUT_KEYS
from main.objective import META_KEYS, TARGET_KEYS


class Timer:
    """Accumulates intervals between ``tic()`` and ``toc()``; ``average`` is the mean interval."""

    def __init__(self):
        self.total, self.calls, self._start = 0.0, 0, None

    def tic(self) -> None:
        self._start = time.perf_counter()

    def toc(self) -> float:
        interval = time.perf_counter() - self._start
        self.total += interval
        self.calls += 1
        return interval

    @property
    def average(self) -> float:
        return self.total / max(self.calls, 1)


def training_hand_model(config: Config) -> HandModel:
    """``cfg.hand_model_dir`` when set; else ``data_dir/hand_model`` when it holds a model (a
    synthetic set has one); else :func:`common.hand.hand_model_source.resolve_hand_model`."""
    if config.hand_model_dir:
        return load_hand_model(config.hand_model_dir)
    in_data = Path(config.data_dir) / "hand_model"
    if is_hand_model_folder(in_data):
        return load_hand_model(in_data)
    return resolve_hand_model()


def split_batch(batch: Dict[str, object], device: torch.device, non_blocking: bool = False):
    """A collated data-set batch → ``(inputs, targets, meta_info)`` of tensors on ``device``
    (only tensors: DataParallel scatters them along the batch)."""
    def pick(keys):
        return {k: batch[k].to(device, non_blocking=non_blocking) for k in keys}
    return pick(INPUT_KEYS), pick(TARGET_KEYS), pick(META_KEYS)


def loader_workers(config: Config) -> int:
    """``cfg.num_thread`` data-loading workers, at most one per CPU this process may use."""
    return max(0, min(int(config.num_thread), usable_cpus()))


def epoch_time(seconds: float) -> str:
    """``'1.25h/epoch'``, or minutes below an hour."""
    return f"{seconds / 3600:.2f}h/epoch" if seconds >= 3600 else f"{seconds / 60:.1f}min/epoch"


def make_loader(dataset, batch_size: int, device: torch.device, workers: int,
                sampler: Optional[torch.utils.data.Sampler] = None) -> torch.utils.data.DataLoader:
    """The data loader of a run: in order (or ``sampler``'s), ``workers`` processes kept for the
    whole run (starting them every epoch cost most of a small epoch; the data set's epoch reaches
    them through shared memory), pinned memory on CUDA for non-blocking copies."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                                       num_workers=workers, persistent_workers=workers > 0,
                                       pin_memory=device.type == "cuda", drop_last=False)
