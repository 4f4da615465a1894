"""Typed options (main/config.py): every option has a type and a range, numbers in every usual
notation from --set and from YAML files, one-line errors with exit code 2, before any work."""
import logging

import pytest
import torch

from main import test as test_script
from main import train as train_script
from main.config import OPTION_TYPES, Config, ConfigError, check_combinations
from tests.test_train import TINY, tiny_args


def test_every_option_has_a_type_and_its_default_fits():
    assert set(Config().options()) == set(OPTION_TYPES)
    check_combinations(Config())  # the original's defaults are valid values of their own types


@pytest.mark.parametrize("text, expected", [
    ("lr=1e-3", 1e-3), ("lr=1E-3", 1e-3), ("lr=0.001", 1e-3), ("lr=.5", 0.5), ("lr=5.", 5.0), ("lr=+2e-4", 2e-4),
    ("loss_lap_weight=0.5", 0.5), ("loss_penet_r_weight=0", 0.0), ("loss_penet_nr_weight=2.5", 2.5),
    ("lr_dec_factor=3.16", 3.16), ("depth_min=0.5", 0.5), ("depth_max=1.5e3", 1500.0),
    ("train_batch_size=1_000", 1000), ("end_epoch=5.", 5), ("end_epoch=1e1", 10),
    ("continue_train=yes", True), ("correctives=skeleton,pose", ["skeleton", "pose"]),
    ("correctives=[]", []), ("lr_dec_epoch=[3, 4]", [3, 4]), ("lr_dec_epoch=30", [30]),
    ("input_img_shape=[64, 48]", (64, 48)), ("input_img_shape=64x48", (64, 48)), ("gpu_ids=0-3", "0-3"),
    ("hand_model_dir=", ""),
])
def test_numbers_in_every_notation_from_the_command_line(text, expected):
    name = text.split("=")[0]
    value = getattr(Config().update_from_strings([text]), name)
    assert value == expected and type(value) is type(expected), (value, expected)


@pytest.mark.parametrize("line, name, expected", [
    ("lr: 1e-3", "lr", 1e-3), ("lr: 1E-3", "lr", 1e-3), ("lr: .5", "lr", 0.5), ("lr: 5.", "lr", 5.0),
    ("lr: 2.5e-4", "lr", 2.5e-4), ("loss_lap_weight: 0.5", "loss_lap_weight", 0.5),
    ("train_batch_size: 1_000", "train_batch_size", 1000), ("end_epoch: 010", "end_epoch", 10),
    ("depth_max: 1e3", "depth_max", 1000.0), ("lr_dec_epoch: [1e1, 20]", "lr_dec_epoch", [10, 20]),
])
def test_numbers_in_every_notation_from_yaml(tmp_path, line, name, expected):
    path = tmp_path / "c.yaml"
    path.write_text(line + "\n")
    value = getattr(Config().update_from_yaml(path), name)
    assert value == expected and type(value) is type(expected), (value, expected)


@pytest.mark.parametrize("text, needle", [
    ("lr=0", "option 'lr' expects a number > 0, got 0"),
    ("lr=-1e-3", "option 'lr' expects a number > 0, got -1e-3"),
    ("lr=fast", "option 'lr' expects a number (finite), got 'fast' (it accepts a number > 0)"),
    ("loss_lap_weight=-0.5", "option 'loss_lap_weight' expects a number >= 0, got -0.5"),
    ("train_batch_size=2.5", "option 'train_batch_size' expects an integer, got 2.5 (it accepts an integer >= 1)"),
    ("train_batch_size=0", "option 'train_batch_size' expects an integer >= 1, got 0"),
    ("resnet_type=20", "option 'resnet_type' expects one of 18, 34, 50, 101, 152, got 20"),
    ("bone_step_size=2", "option 'bone_step_size' expects a number > 0 and <= 1, got 2"),
    ("correctives=[pose,pose]", "option 'correctives' expects a list like [skeleton, pose] of some of skeleton, "
                                "identity, pose, each at most once"),
    ("renderer_backend=opengl", "option 'renderer_backend' expects one of auto, pytorch3d, native, got 'opengl'"),
    ("gpu_ids=first", "option 'gpu_ids' expects GPU ids like '0', '0,1' or '0-3'"),
    ("continue_train=maybe", "option 'continue_train' expects true or false, got 'maybe'"),
    ("input_img_shape=[64,0]", "option 'input_img_shape' expects 2 integers >= 1 [height, width] in pixels"),
])
def test_bad_values_name_the_option_and_what_it_accepts(text, needle):
    with pytest.raises(ConfigError) as err:
        Config().update_from_strings([text])
    assert str(err.value).startswith(f"--set {text}: {needle}"), str(err.value)


def test_yaml_values_are_checked_with_their_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("resnet_type: 18\nend_epoch: 2.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: option 'end_epoch' expects an integer, got 2.5 "
                                          r"\(it accepts an integer >= 1\)$"):
        Config().update_from_yaml(path)


def test_yaml_syntax_errors_in_the_projects_words(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("resnet_type: 18\n\tlr: 1e-3\n")
    with pytest.raises(ConfigError) as err:
        Config().update_from_yaml(path)
    assert str(err.value) == (f"{path}: not valid YAML: line 2, column 1: a tab; tabs are not allowed in YAML: "
                              "indent with spaces")
    path.write_text("resnet_type: 18\n  lr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: line 2, column 5: a ':' where none can be: is "
                                          r"this line indented deeper than the one before"):
        Config().update_from_yaml(path)
    path.write_text("lr_dec_epoch: [3, 4\nlr: 1e-3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: line 2, column 3: expected ',' or '\]' in the "
                                          r"'\[' opened at line 1, column 15 \(a missing '\]'\?\)$"):
        Config().update_from_yaml(path)
    path.write_text("lr_dec_epoch: [3, 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid YAML: line 1, column 15: this '\[' is never closed "
                                          r"with '\]'$"):
        Config().update_from_yaml(path)


def test_an_option_given_twice_in_a_file_warns_and_the_last_counts(tmp_path, caplog):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nresnet_type: 18\nlr: 2e-3\n")
    with caplog.at_level(logging.WARNING, logger="deephandmesh"):
        config = Config().update_from_yaml(path)
    assert config.lr == 2e-3
    assert f"{path}:3: option 'lr' is given 2 times (lines 1, 3); the last one counts" in caplog.text


def test_readme_example_trains_one_iteration(tiny_set, tmp_path):
    """``--set lr=1e-3 --set loss_lap_weight=0.5`` (the README's notation, a fraction for a weight
    the original writes as an integer) trains: one iteration on the training tests' tiny set."""
    out = tmp_path / "out"
    args = tiny_args(tiny_set, out) + ["--set", "lr=1e-3", "--set", "loss_lap_weight=0.5",
                                       "--set", "train_batch_size=6", "--end_epoch", "1"]
    assert train_script.main(args) == 0
    log = (out / "log" / "train_logs.txt").read_text()
    assert "loss_lap_weight=0.5" in log and "lr=0.001" in log  # the options the run reports as changed
    assert sum(" itr " in line for line in log.splitlines()) == 1
    assert (out / "model_dump" / "subject_4" / "snapshot_0.pth.tar").is_file()


def test_yaml_lr_1e_3_trains(tiny_set, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-3\nloss_lap_weight: 0.5\ntrain_batch_size: 6\n")
    out = tmp_path / "out"
    assert train_script.main(["--cfg", str(config), *tiny_args(tiny_set, out), "--end_epoch", "1"]) == 0
    assert "lr: 0.001" in (out / "log" / "train_logs.txt").read_text()


@pytest.mark.parametrize("options, needle", [
    (["--set", "lr=0"], "--set lr=0: option 'lr' expects a number > 0, got 0"),
    (["--set", "loss_lap_weight=heavy"], "--set loss_lap_weight=heavy: option 'loss_lap_weight' expects a number"),
    (["--set", "depth_min=50", "--set", "depth_max=20"],
     "options 'depth_min' (50 mm) and 'depth_max' (20 mm): depth_max must be larger than depth_min"),
])
def test_bad_values_stop_before_any_work_with_one_line_and_exit_2(tmp_path, capsys, options, needle):
    """The data folder does not exist: had the run loaded data first, that would be the error."""
    for script in (train_script, test_script):
        argv = (["--test_epoch", "0"] if script is test_script else []) + tiny_args(tmp_path / "no_data", tmp_path)
        assert script.main(argv + options) == 2
        err = capsys.readouterr().err
        lines = [line.split("error: ", 1)[1] for line in err.splitlines() if "error: " in line]  # after the log's time
        assert len(lines) == 1 and lines[0].startswith(needle), err
        assert "Traceback" not in err and "image folder" not in err


def test_combination_checked_when_the_trainer_is_built_in_code(tiny_set, tmp_path):
    from main.trainer import Trainer

    config = Config().update_from_strings(TINY + [f"output_dir={tmp_path}"])
    config.data_dir = str(tiny_set)
    config.depth_min, config.depth_max = 10.0, 5.0  # attributes set directly, past set()'s checks
    trainer = Trainer(config)
    with pytest.raises(ConfigError, match="depth_max must be larger than depth_min"):
        trainer.set_up()
    assert not hasattr(trainer, "dataset")  # stopped before loading anything


def test_native_rasteriser_option_reaches_the_renderer_and_is_checked(monkeypatch, default_hand):
    """``native_rasteriser`` is a typed option, the training objective's renderer gets it, and
    ``triton`` is refused before any work where the kernel cannot run (no Triton; or the CPU
    outside Triton's interpreter)."""
    from common.renderer import triton_rasterizer
    from main.objective import TrainingObjective

    config = Config()
    config.update_from_strings(["native_rasteriser=tensor", "rendered_img_shape=[8,8]"])
    objective = TrainingObjective(default_hand, torch.as_tensor(default_hand.faces), config)
    assert objective.renderer.native_rasteriser == "tensor"
    with pytest.raises(ConfigError, match="expects one of auto, tensor, triton"):
        config.update_from_strings(["native_rasteriser=cuda"])
    config.update_from_strings(["native_rasteriser=triton"])
    monkeypatch.setattr(triton_rasterizer, "interpreting", lambda: False)
    with pytest.raises(ConfigError, match="triton without --gpu"):
        check_combinations(config)
    config.update_from_strings(["gpu_ids=0"])
    check_combinations(config)
    monkeypatch.setattr(triton_rasterizer, "triton_available", lambda: False)
    with pytest.raises(ConfigError, match="Triton does not import here"):
        check_combinations(config)


def test_pixel_size_arguments_of_the_scripts():
    """The scripts' ``HxW`` arguments (make_synthetic.py, show_sample.py, personalise.py): one reader,
    bounds per script, a message with the form and the range."""
    import argparse

    from common.io.textio import pixel_size_type

    assert pixel_size_type()("512x334") == (512, 334) and pixel_size_type()(" 3X1 ") == (3, 1)
    bounded = pixel_size_type(8, 1024)
    assert bounded("8x1024") == (8, 1024)
    for text in ("7x64", "64x1025", "0x5", "64", "64x64x3", "axb", "-8x8", ""):
        with pytest.raises(argparse.ArgumentTypeError, match=r"expected HxW in pixels like 64x64 \(each from 8 to 1024\)"):
            bounded(text)
    with pytest.raises(argparse.ArgumentTypeError, match=r"\(each at least 1\); got '0x5'"):
        pixel_size_type()("0x5")


def test_name_value_options_of_fit_and_personalise():
    """fit.py's ``--weight`` and personalise.py's ``--option``: applied in order onto the defaults, each
    value in its field's type; an unknown name or a bad value is one message naming the item."""
    import argparse

    from common.errors import OptionError
    from common.fitting import FitWeights
    from common.fitting.errors import FitInputError
    from main.fit import fit_weights
    from main.personalise import personalise_options

    weights = fit_weights(["rest=0.5", "limits=0", "rest=2e-1"], independent=True)
    assert (weights.rest, weights.limits, weights.smooth_angles) == (0.2, 0.0, 0.0)
    assert weights.coupling == FitWeights().coupling
    for item, message in [("smoothness=3", "unknown prior 'smoothness'; expected one of rest, coupling"),
                          ("rest=abc", "expected NAME=VALUE with a number"), ("rest", "expected NAME=VALUE"),
                          ("rest=-1", "expected a finite weight ≥ 0"), ("rest=nan", "expected a finite weight")]:
        with pytest.raises(FitInputError, match=f"^--weight {item}: {message}"):
            fit_weights([item])

    def options(*items, iterations=200):
        return personalise_options(argparse.Namespace(iterations=iterations, pose_corrective=False, option=list(items)))

    chosen = options("identity=No", "lr_shift=0.5", "views_per_step=none", "laplacian=training", "seed=3")
    assert (chosen.identity, chosen.lr_shift, chosen.views_per_step, chosen.laplacian, chosen.seed) == \
        (False, 0.5, None, "training", 3)
    assert options("views_per_step=2", "skeleton=TRUE").views_per_step == 2 and options().skeleton
    assert options("iterations=7", iterations=50).iterations == 7  # --option after --iterations
    for item, message in [("nope=1", "unknown option 'nope'"), ("identity=maybe", "'maybe' is not a valid value "
                          "for identity \\(default True\\)"), ("seed=1.5", "'1.5' is not a valid value for seed"),
                          ("iterations=none", "'none' is not a valid value for iterations"),  # none only where it means all
                          ("lr_shift=-1", "'-1' is not a valid value for lr_shift"), ("lr_shift=inf", "'inf' is not a valid value for lr_shift")]:
        with pytest.raises(OptionError, match=f"^--option {item}: {message}"):
            options(item)
    for item in ("laplacian=both", "radii_every=0", "views_per_step=0"):
        with pytest.raises(OptionError, match="^--option"):
            options(item)
