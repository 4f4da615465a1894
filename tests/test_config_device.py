"""The configuration object and the one place that picks the device."""
import pytest
import torch

from common.utils.device import parse_gpu_ids, select_device
from main.config import Config, ConfigError


def test_original_defaults():
    c = Config()
    assert c.input_img_shape == (256, 256) and c.rendered_img_shape == (256, 256)
    assert (c.depth_min, c.depth_max, c.render_view_num) == (1, 99999, 6)
    assert (c.backbone_img_feat_dim, c.id_code_dim, c.bone_step_size, c.resnet_type) == (512, 32, 0.1, 50)
    assert (c.lr, c.lr_dec_epoch, c.lr_dec_factor, c.end_epoch) == (1e-4, [30, 32], 10, 35)
    assert (c.train_batch_size, c.test_batch_size) == (8, 1)
    assert (c.loss_penet_r_weight, c.loss_penet_nr_weight, c.loss_lap_weight) == (1, 5, 5)


def test_overrides_from_yaml_and_strings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("resnet_type: 18\ninput_img_shape: [128, 96]\nlr_dec_epoch: [3, 4]\nlr: 0.001\n")
    c = Config().update_from_yaml(path)
    assert (c.resnet_type, c.input_img_shape, c.lr_dec_epoch, c.lr) == (18, (128, 96), [3, 4], 1e-3)
    c.update_from_strings(["train_batch_size=2", "continue_train=true", "input_img_shape=[64,64]"])
    assert (c.train_batch_size, c.continue_train, c.input_img_shape) == (2, True, (64, 64))
    # The class defaults stay untouched.
    assert Config().resnet_type == 50 and Config().input_img_shape == (256, 256)


@pytest.mark.parametrize("text,needle", [
    ("resnet_typ=18", "unknown option 'resnet_typ'"),
    ("resnet_type=big", "expects an integer"),
    ("input_img_shape=[1,2,3]", "expects 2 numbers"),
    ("lr=fast", "expects a number"),
    ("resnet_type", "expected option=value"),
])
def test_bad_overrides(text, needle):
    with pytest.raises(ConfigError, match=needle):
        Config().update_from_strings([text])


def test_bad_yaml(tmp_path):
    (tmp_path / "a.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="a.yaml: expected a mapping"):
        Config().update_from_yaml(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        Config().update_from_yaml(tmp_path / "none.yaml")


def test_output_folders_follow_output_dir(tmp_path):
    c = Config().update({"output_dir": str(tmp_path)})
    assert c.model_dir == str(tmp_path / "model_dump") and c.result_dir == str(tmp_path / "result")
    assert not (tmp_path / "model_dump").exists()  # nothing is created by configuring


@pytest.mark.parametrize("text,ids", [("0-3", [0, 1, 2, 3]), ("0,1,2,3", [0, 1, 2, 3]), ("2", [2]), ("", []),
                                      (None, [])])
def test_parse_gpu_ids(text, ids):
    assert parse_gpu_ids(text) == ids


@pytest.mark.parametrize("text", ["a", "3-1", "0-x"])
def test_parse_gpu_ids_errors(text):
    with pytest.raises(ValueError, match=f"--gpu {text}"):
        parse_gpu_ids(text)


def test_select_device_falls_back_to_cpu():
    assert select_device(None).type == "cpu"
    if not torch.cuda.is_available():
        assert select_device("0").type == "cpu"
