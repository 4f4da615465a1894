"""The encoder's GPU options (``channels_last``, ``encoder_bf16``): off by default, the same losses
as without them (channels-last to float rounding; bf16 within a stated tolerance, and the rest of
the model untouched), and snapshots that do not depend on them."""
import pytest
import torch

from common.io.checkpoint import align_optimizer_state, optimizer_state_dict
from data.dataset import DeepHandMeshDataset
from main import train as train_script
from main.config import Config
from main.loops import split_batch
from main.model import get_model
from main.trainer import Trainer
from tests.test_train import tiny_args, tiny_config

# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per operation). Measured on the tiny
# set (ResNet-18, 64x64 crops, 4 samples, 4 initialisations): the encoder's angles moved by at most
# 6.7e-3 rad, the four losses by at most 0.22 % of their values with depth maps of 64x64 (with
# 16x16 ones by up to 1.1 %: there one pixel changing face is a large share of the depth loss).
BF16_ANGLE_TOLERANCE = 0.01  # rad
BF16_LOSS_TOLERANCE = 0.01   # of each loss's value


@pytest.fixture(scope="module")
def batch64(tiny_set, default_hand):
    """Two samples of the tiny set with depth maps rendered and cropped at 64x64."""
    config = tiny_config(tiny_set).update({"rendered_img_shape": (64, 64)})
    dataset = DeepHandMeshDataset.from_config(config, "train", default_hand, seed=0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    return config, split_batch(batch, torch.device("cpu"))


def losses_and_gradients(model, inputs, targets, meta_info):
    model.zero_grad(set_to_none=True)
    loss = model(inputs, targets, meta_info, "train")
    sum(v.mean() for v in loss.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in loss.items()}, grads


def build(default_hand, config, **options):
    config = config.copy()
    for name, value in options.items():
        config.set(name, value)
    torch.manual_seed(0)
    return get_model("train", default_hand, config).train()


def test_options_are_off_by_default_and_typed():
    config = Config()
    assert config.channels_last is False and config.encoder_bf16 is False
    config.update_from_strings(["channels_last=yes", "encoder_bf16=on"])
    assert config.channels_last is True and config.encoder_bf16 is True


def test_channels_last_gives_the_same_losses_and_gradients(default_hand, batch64):
    config, (inputs, targets, meta_info) = batch64
    plain = build(default_hand, config)
    nhwc = build(default_hand, config, channels_last=True)
    convs = [m.weight for m in nhwc.backbone_net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not nhwc.backbone_net.resnet.conv1.weight.is_contiguous()  # 7x7: the two orders differ
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), nhwc.state_dict().values()))

    ref, ref_grads = losses_and_gradients(plain, inputs, targets, meta_info)
    got, grads = losses_and_gradients(nhwc, inputs, targets, meta_info)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5 * float(ref[key].abs().max()))
    # The decoder's gradients to float rounding; the encoder's too, up to what batch norm in
    # training mode over a batch of 2 makes of rounding (BENCHMARKS.md: ~3,600-fold).
    for name, ref_grad in ref_grads.items():
        scale = float(ref_grad.abs().max())
        tolerance = 5e-2 if name.startswith("backbone_net.") else 1e-3
        assert float((grads[name] - ref_grad).abs().max()) <= tolerance * scale + 1e-12, name


def test_encoder_bf16_changes_the_encoder_alone(default_hand, batch64):
    config, (inputs, targets, meta_info) = batch64
    plain = build(default_hand, config)
    half = build(default_hand, config, encoder_bf16=True)
    with torch.no_grad():
        moved = float((half.angles(inputs) - plain.angles(inputs)).abs().max())
    assert 0 < moved <= BF16_ANGLE_TOLERANCE  # the encoder did run in bf16, within its rounding
    ref, _ = losses_and_gradients(plain, inputs, targets, meta_info)
    got, grads = losses_and_gradients(half, inputs, targets, meta_info)
    for key in ref:
        assert abs(float(got[key].mean()) - float(ref[key].mean())) <= BF16_LOSS_TOLERANCE * abs(float(ref[key].mean())), key
    assert torch.isfinite(grads["backbone_net.resnet.conv1.weight"]).all()
    assert grads["backbone_net.resnet.conv1.weight"].abs().sum() > 0

    # The angles come out in float32, and from them on everything is the float32 model's: its
    # losses, fed the bf16 encoder's angles, are bit for bit those of the bf16 model.
    with torch.no_grad():
        angles = half.angles(inputs)
        assert angles.dtype == torch.float32
        again = half(inputs, targets, meta_info, "train")
        from_angles = plain(dict(inputs, joint_euler=angles), targets, meta_info, "train")
    for key in again:
        assert torch.equal(again[key], from_angles[key]), key


def test_fused_adam_needs_the_moments_in_the_parameters_layout():
    """A state loaded in another memory layout than its parameter's: without
    :func:`align_optimizer_state` the fused update applies the moments to the wrong elements."""
    torch.manual_seed(0)
    weight = torch.randn(8, 4, 3, 3)
    grads = [torch.randn(8, 4, 3, 3) for _ in range(2)]

    def two_steps(param, between=None):
        opt = torch.optim.Adam([param], lr=0.1, fused=True)
        for i, g in enumerate(grads):
            param.grad = torch.empty_like(param).copy_(g)  # as backward does: the parameter's layout
            opt.step()
            if i == 0 and between:
                opt = between(opt, param)
        return param.detach()

    def reload_contiguous(opt, param, align=True):
        saved = optimizer_state_dict(opt)
        assert all(v.is_contiguous() for v in saved["state"][0].values())
        fresh = torch.optim.Adam([param], lr=0.1, fused=True)
        fresh.load_state_dict(saved)
        if align:
            align_optimizer_state(fresh)
            assert all(v.stride() == param.stride() for v in fresh.state[param].values() if v.dim())
        return fresh

    ref = two_steps(torch.nn.Parameter(weight.clone()))
    nhwc = lambda: torch.nn.Parameter(weight.clone().contiguous(memory_format=torch.channels_last))  # noqa: E731
    torch.testing.assert_close(two_steps(nhwc(), reload_contiguous), ref, rtol=0, atol=1e-6)
    unaligned = two_steps(nhwc(), lambda o, p: reload_contiguous(o, p, align=False))
    assert float((unaligned - ref).abs().max()) > 1e-2


def test_a_channels_last_run_saves_plain_snapshots_and_resumes(tiny_set, tmp_path):
    args = tiny_args(tiny_set, tmp_path) + ["--end_epoch", "1", "--set", "channels_last=true"]
    assert train_script.main(args) == 0
    snapshot = torch.load(tmp_path / "model_dump" / "subject_4" / "snapshot_0.pth.tar", weights_only=True)
    assert all(v.is_contiguous() for v in snapshot["network"].values() if v.layout == torch.strided)
    states = snapshot["optimizer"]["state"]
    assert states and all(v.is_contiguous() for state in states.values() for v in state.values())

    config = tiny_config(tiny_set).update({"output_dir": str(tmp_path), "channels_last": True,
                                           "continue_train": True, "end_epoch": 2})
    trainer = Trainer(config).set_up()
    assert trainer.start_epoch == 1
    params = list(trainer.model.parameters())
    for index, param in enumerate(params):
        for name, value in trainer.optimizer.state[param].items():
            if value.dim():
                assert value.stride() == param.stride(), (index, name)
                assert torch.equal(value, states[index][name]), (index, name)
    assert any(not p.is_contiguous() for p in params)


@pytest.mark.parametrize("option", ["channels_last", "encoder_bf16"])
def test_the_training_script_trains_with_each_option(tiny_set, tmp_path, option):
    args = tiny_args(tiny_set, tmp_path) + ["--end_epoch", "1", "--set", f"{option}=true"]
    assert train_script.main(args) == 0
    log = (tmp_path / "log" / "train_logs.txt").read_text()
    assert f"{option}" in log and " itr " in log
