"""The single configuration object, ``cfg``, with the original DeepHandMesh defaults
(docs/design.md, "Defaults").

Every option can be overridden from a YAML file (``cfg.update_from_yaml(path)``) and from
``key=value`` strings (``cfg.update_from_strings(["train_batch_size=2", "resnet_type=18"])``).
Importing this module creates no folders and touches no environment variables.
"""
from __future__ import annotations

import ast
import copy
import math
from pathlib import Path
from typing import Any, Dict, Iterable

import yaml

from common.utils.textio import key_lines_yaml, read_text, shown, where

ROOT_DIR = Path(__file__).resolve().parents[1]
MAX_CONFIG_BYTES = 2 ** 20
CHOICES = {"on_error": ("skip", "stop")}


class ConfigError(ValueError):
    """An unknown option or a value of the wrong type; the message names the option and its source."""


def _output_folder(name: str) -> property:
    """A read-only option: the folder ``output_dir/<name>``."""
    return property(lambda self: str(Path(self.output_dir) / name), doc=f"``output_dir/{name}``")


class Config:
    # The original's option names and defaults.
    ## input, output
    input_img_shape = (256, 256)
    rendered_img_shape = (256, 256)
    # (H, W) of the pixel space the cameras' K (KRT_512) is expressed in, whatever the size of
    # the image and depth-map files: boxes are computed there and rescaled to each file.
    original_img_shape = (512, 334)
    depth_min = 1
    depth_max = 99999
    render_view_num = 6
    backbone_img_feat_dim = 512
    id_code_dim = 32
    bone_step_size = 0.1
    # Rasteriser of the depth renderer: auto (PyTorch3D where it imports, else the project's
    # own), pytorch3d or native (common/renderer/depth_renderer.py, resolve_backend).
    renderer_backend = "auto"

    ## model
    resnet_type = 50  # 18, 34, 50, 101, 152
    # A local torchvision ResNet state dict for ImageNet initialisation; nothing is downloaded.
    pretrained_backbone = ""

    ## training config
    lr_dec_epoch = [30, 32]
    end_epoch = 35
    lr = 1e-4
    lr_dec_factor = 10
    train_batch_size = 8
    loss_penet_r_weight = 1
    loss_penet_nr_weight = 5
    loss_lap_weight = 5
    # Where the training and test forwards take the joint angles from: 'image' (the encoder, as the
    # original) or 'gt' (a synthetic set's gt/frames.npz: the encoder is bypassed and only the
    # skeleton and skin correctives learn; decoder-only).
    pose_source = "image"
    # The correctives that learn; the others are held at exactly zero (the component study).
    correctives = ["skeleton", "identity", "pose"]

    ## testing config
    test_batch_size = 1

    ## directories (relative paths are taken from the repository root)
    root_dir = str(ROOT_DIR)
    data_dir = str(ROOT_DIR / "data")
    hand_model_dir = ""  # empty: data_dir/hand_model when it holds a model, else the default hand
    output_dir = str(ROOT_DIR / "output")

    ## others
    num_thread = 40
    gpu_ids = ""
    num_gpus = 0
    continue_train = False
    subject = 4
    # Sequences left out of training and used alone for testing (empty: as the original, which
    # trains and tests on every sequence of the subject).
    holdout_sequences = []
    # What training does when one sample's file cannot be read (corrupt, missing): 'skip' it
    # (counted, and listed per file at the end of the epoch) or 'stop' with the file's error.
    on_error = "skip"
    # TensorBoard (output_dir/tensorboard): every N training iterations an image panel of input
    # crop, rendered depth, captured depth and their difference (0: none).
    tensorboard_image_interval = 100

    # ------------------------------------------------------------------
    # The output folders, as the original names them (read-only: they follow output_dir).
    model_dir = _output_folder("model_dump")
    vis_dir = _output_folder("vis")
    log_dir = _output_folder("log")
    tensorboard_dir = _output_folder("tensorboard")
    result_dir = _output_folder("result")

    def options(self) -> Dict[str, Any]:
        """All settable options with their current values."""
        names = [n for n in dir(type(self)) if not n.startswith("_")]
        return {
            n: getattr(self, n)
            for n in names
            if not callable(getattr(type(self), n)) and not isinstance(getattr(type(self), n), property)
        }

    def set(self, name: str, value: Any, source: str = "code") -> None:
        """Set one option, coercing ``value`` to the type of its default."""
        defaults = Config.options(Config())
        if name not in defaults:
            raise ConfigError(
                f"{source}: unknown option '{shown(name)}'; options are: {', '.join(sorted(defaults))}"
            )
        value = _coerce(name, value, defaults[name], source)
        if name in CHOICES and value not in CHOICES[name]:
            raise ConfigError(f"{source}: option '{name}' expects one of {', '.join(CHOICES[name])}, "
                              f"got {shown(repr(value))}")
        setattr(self, name, value)

    def update(self, values: Dict[str, Any], source: str = "code") -> "Config":
        for name, value in values.items():
            self.set(name, value, source)
        return self

    def update_from_yaml(self, path: str | Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: configuration file not found")
        try:
            text = read_text(path, ConfigError, "configuration file", MAX_CONFIG_BYTES)
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the configuration file ({err.strerror or err})") from None
        try:
            values, lines = key_lines_yaml(text)
        except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. a date 2001-13-45, a 5000-digit int
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        except RecursionError:
            raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
        for name, value in values.items():
            self.set(str(name), value, source=where(path, lines, name))
        return self

    def update_from_strings(self, assignments: Iterable[str]) -> "Config":
        for text in assignments:
            if "=" not in text:
                raise ConfigError(f"--set {text}: expected option=value")
            name, raw = text.split("=", 1)
            try:
                value = yaml.safe_load(raw)
            except (yaml.YAMLError, ValueError, RecursionError):
                value = raw
            self.set(name.strip(), value, source=f"--set {text}")
        return self

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in sorted(self.options().items())) + ")"


def _coerce(name: str, value: Any, default: Any, source: str) -> Any:
    """Convert ``value`` to the type of ``default``; tuples/lists keep their element types."""
    def fail(expected: str):
        raise ConfigError(f"{source}: option '{name}' expects {expected}, got {shown(repr(value))}")

    def finite(number) -> bool:
        try:
            return math.isfinite(number)
        except OverflowError:  # an int too large for a float
            return False

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        fail("true or false")
    if isinstance(default, int):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not finite(value)
                or int(value) != value):
            fail("an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not finite(value):
            fail("a number (finite)")
        return float(value)
    if isinstance(default, (tuple, list)):
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                fail(f"a list like {list(default)!r}")
        if not isinstance(value, (tuple, list)):
            fail(f"a list like {list(default)!r}")
        if isinstance(default, tuple) and len(value) != len(default):
            fail(f"{len(default)} numbers")
        elem = type(default[0]) if default else None
        items = [_coerce(name, v, default[0], source) for v in value] if elem else list(value)
        return type(default)(items)
    if isinstance(default, str):
        return "" if value is None else str(value)
    return value


cfg = Config()
