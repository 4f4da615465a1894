"""ResNet feature extractor built from torchvision's blocks, with the torchvision layout
(``conv1, bn1, layer1…layer4``) so that torchvision ImageNet state dicts load into it."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from common.io.checkpoint import load_tensor_file
from common.errors import FileFormatError, MissingFileError, OptionError

log = logging.getLogger(__name__)

RESNET_SPEC = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


class ResNetBackbone(nn.Module):
    """ResNet without its pooling and classifier.

    Input ``[B, 3, H, W]``; output ``[B, C, H/32, W/32]`` with C = 512 (18, 34) or 2048 (50+).
    """

    def __init__(self, resnet_type: int = 50):
        super().__init__()
        if resnet_type not in RESNET_SPEC:
            raise OptionError(f"resnet_type: expected one of {sorted(RESNET_SPEC)}, got {resnet_type!r}")
        block, layers = RESNET_SPEC[resnet_type]
        self.resnet_type = resnet_type
        self.out_channels = 512 * block.expansion
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        # The original's initialisation (small normal weights, unit batch norm).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, mean=0, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def init_weights(self, weights_path: str | Path | None) -> bool:
        """Initialise from a local torchvision ResNet state dict (e.g. ``resnet50-*.pth``).

        Nothing is downloaded: without a file the random initialisation stays and this is logged.
        Returns True when weights were loaded.
        """
        if not weights_path:
            log.info("backbone: no ImageNet weights file given (cfg.pretrained_backbone); "
                     "ResNet-%d starts from its random initialisation", self.resnet_type)
            return False
        path = Path(weights_path)
        if not path.is_file():
            raise MissingFileError(f"{path}: ImageNet weights file for the backbone not found")
        state = load_tensor_file(path, FileFormatError, "file of tensors")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise FileFormatError(f"{path}: not a torchvision ResNet-{self.resnet_type} state dict "
                                  f"(found {type(state).__name__})")
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            raise FileFormatError(
                f"{path}: not a torchvision ResNet-{self.resnet_type} state dict "
                f"(missing {len(missing)} keys, e.g. {missing[:3]}; unexpected {len(unexpected)}, "
                f"e.g. {unexpected[:3]}; wrong shape {len(wrong)}, e.g. {wrong[:3]})"
            )
        self.load_state_dict(state)
        log.info("backbone: ResNet-%d initialised from %s", self.resnet_type, path)
        return True
