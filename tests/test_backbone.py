"""Backbone: torchvision layout, ImageNet initialisation from a local file only."""
import logging

import pytest
import torch
import torchvision

from common.nets.resnet import ResNetBackbone
from main.model import get_model


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_layout_matches_torchvision(depth):
    ours = ResNetBackbone(depth).state_dict()
    theirs = getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.startswith("fc.")}
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_initialises_from_local_torchvision_file(tmp_path, any_hand, small_cfg):
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    small_cfg.pretrained_backbone = str(path)
    model = get_model("train", any_hand, small_cfg)
    resnet = model.backbone_net.resnet
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(resnet.state_dict()[key], value), key
    # Same features as torchvision's own network, without its pooling and classifier.
    x = torch.rand(1, 3, 64, 64)
    reference.eval(), resnet.eval()
    with torch.no_grad():
        trunk = torch.nn.Sequential(*list(reference.children())[:-2])
        assert torch.allclose(resnet(x), trunk(x), atol=1e-6)


def test_without_file_logs_and_keeps_random_init(any_hand, small_cfg, caplog):
    with caplog.at_level(logging.INFO):
        get_model("train", any_hand, small_cfg)
    assert "no ImageNet weights file given" in caplog.text


def test_wrong_or_missing_file_is_an_error(tmp_path, any_hand, small_cfg):
    small_cfg.pretrained_backbone = str(tmp_path / "absent.pth")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        get_model("train", any_hand, small_cfg)
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    small_cfg.pretrained_backbone = str(path)  # ResNet-50 weights for a ResNet-18 backbone
    with pytest.raises(ValueError, match="not a torchvision ResNet-18 state dict"):
        get_model("train", any_hand, small_cfg)
