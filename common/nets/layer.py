"""Small layer builders shared by the networks."""
from typing import Sequence

import torch.nn as nn


def make_linear_layers(feat_dims: Sequence[int], relu_final: bool = True) -> nn.Sequential:
    """``Linear`` layers between consecutive sizes, each followed by ``ReLU`` (the last one only
    when ``relu_final``). Linear layers sit at even indices (``.0``, ``.2``…), as in the original,
    which fixes the state-dict keys of released snapshots."""
    layers = []
    for i in range(len(feat_dims) - 1):
        layers.append(nn.Linear(feat_dims[i], feat_dims[i + 1]))
        if i < len(feat_dims) - 2 or relu_final:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
