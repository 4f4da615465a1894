"""Shapes as plain tuples, for error messages that read ``[2, 778, 3]`` rather than ``torch.Size([...])``."""
from __future__ import annotations

from typing import Tuple

import torch


def shape_of(t: torch.Tensor) -> Tuple[int, ...]:
    """``t.shape`` as a tuple of ints."""
    return tuple(int(s) for s in t.shape)
