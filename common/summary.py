"""TensorBoard event files for ``train.py`` and ``test.py``, optional.

``SummaryWriter(folder)`` wraps :class:`torch.utils.tensorboard.SummaryWriter`. Without the
``tensorboard`` package (``pip install tensorboard``; it is in requirements.txt) the runs go on
and say once, per process, that they write no event files; every call is then a no-op.

Open the event files with ``tensorboard --logdir output/tensorboard`` (or the run's
``output_dir/tensorboard``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import cv2
import numpy as np
import torch

log = logging.getLogger("deephandmesh")

_told = False  # the missing package is reported once per process
PANEL_HEIGHT = 128  # pixels of each pane of the depth panel


def _writer_class():
    """:class:`torch.utils.tensorboard.SummaryWriter`, or None (reported once) without tensorboard."""
    global _told
    try:
        from torch.utils.tensorboard import SummaryWriter as writer
    except ImportError:  # torch raises it when the tensorboard package is missing
        if not _told:
            log.warning("the tensorboard package is not installed: no TensorBoard event files are "
                        "written (pip install tensorboard)")
            _told = True
        return None
    return writer


class SummaryWriter:
    """Scalars and images into ``folder`` (created); a no-op without tensorboard or when not enabled
    (the other processes of a distributed run)."""

    def __init__(self, folder: Path | str, enabled: bool = True):
        writer = _writer_class() if enabled else None
        self.folder = Path(folder)
        self._writer = writer(log_dir=str(self.folder)) if writer is not None else None

    @property
    def active(self) -> bool:
        return self._writer is not None

    def scalars(self, values: Dict[str, Optional[float]], step: int, prefix: str = "") -> None:
        """One scalar per entry (``prefix + name``); None values are left out."""
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self._writer.add_scalar(prefix + name, float(value), int(step))

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """``[H, W, 3]`` uint8 RGB."""
        if self._writer is not None:
            self._writer.add_image(tag, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def depth_panel(img: torch.Tensor, rendered: torch.Tensor, captured: torch.Tensor,
                diff_range_mm: float = 20.0) -> np.ndarray:
    """The input crop, the rendered depth, the captured depth and their difference side by side.

    Depths are grey (near = bright) over the captured map's range, black where empty; the
    difference ``rendered − captured`` where both exist is blue (rendered nearer) to red (farther),
    saturating at ``±diff_range_mm``, black elsewhere.

    Args:
        img: ``[3, H, W]`` crop, values in [0, 1]; rendered, captured: ``[Hr, Wr]`` mm (0 = none).
    Returns:
        ``[PANEL_HEIGHT, 4 * width, 3]`` uint8 RGB.
    """
    rendered, captured = rendered.detach().float().cpu().numpy(), captured.detach().float().cpu().numpy()
    crop = (img.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    seen = captured[captured > 0]
    lo, hi = (float(seen.min()), float(seen.max())) if seen.size else (0.0, 1.0)
    span = max(hi - lo, 1e-6)

    def grey(depth):
        level = np.clip(1 - (depth - lo) / span, 0, 1) * 205 + 50  # near bright; empty black
        g = np.where(depth > 0, level, 0).round().astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)

    both = (rendered > 0) & (captured > 0)
    t = np.clip((rendered - captured) / diff_range_mm, -1, 1)
    diff = np.zeros(rendered.shape + (3,), np.uint8)
    diff[..., 0] = np.where(both, np.clip(t, 0, 1) * 255, 0).round().astype(np.uint8)   # red: farther
    diff[..., 2] = np.where(both, np.clip(-t, 0, 1) * 255, 0).round().astype(np.uint8)  # blue: nearer
    diff[..., 1] = np.where(both, (1 - np.abs(t)) * 80, 0).round().astype(np.uint8)

    def fit(pane, interpolation):
        h, w = pane.shape[:2]
        width = max(1, round(w * PANEL_HEIGHT / h))
        return cv2.resize(pane, (width, PANEL_HEIGHT), interpolation=interpolation)

    panes = [fit(crop, cv2.INTER_AREA)] + [fit(p, cv2.INTER_NEAREST) for p in (grey(rendered), grey(captured), diff)]
    return np.concatenate(panes, axis=1)
