"""The single configuration object, ``cfg``, with the original DeepHandMesh defaults
(docs/design.md, "Defaults").

Every option can be overridden from a YAML file (``cfg.update_from_yaml(path)``) and from
``key=value`` strings (``cfg.update_from_strings(["train_batch_size=2", "resnet_type=18"])``).
Importing this module creates no folders and touches no environment variables.

Every option has a declared type (:data:`OPTION_TYPES`): integers, numbers (fractions accepted
wherever the value is a weight, factor, distance or rate), true/false, one of a few choices, lists,
``[height, width]`` sizes, paths, GPU ids; with its range where it has one (``lr > 0``,
``train_batch_size >= 1`` ...). Numbers are read in every usual notation, from ``--set`` and from
YAML files alike: ``1e-3``, ``1E-3``, ``0.001``, ``.5``, ``5.``, ``1_000``. A value that does not
fit raises :class:`ConfigError`, one line naming the option, where it was given (``--set …`` or
``file.yaml:line``) and what it accepts. :func:`check_combinations` checks what single options
cannot (``depth_max > depth_min``); the scripts run it before any work starts.
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import yaml

from common.errors import ConfigError
from common.renderer.backend import BACKENDS, NATIVE_RASTERISERS
from common.utils.device import parse_gpu_ids
from common.io.textio import read_text, shown, where, yaml_error_message, yaml_mapping, yaml_value

ROOT_DIR = Path(__file__).resolve().parents[1]
MAX_CONFIG_BYTES = 2 ** 20
log = logging.getLogger("deephandmesh")

RESNET_TYPES = (18, 34, 50, 101, 152)
POSE_SOURCES = ("image", "gt")
CORRECTIVES = ("skeleton", "identity", "pose")
ON_ERROR = ("skip", "stop")
# A number as people write it: 1e-3, 1E-3, 0.001, .5, 5., 1_000, +2 (Python's float() reads them all).
NUMBER_RE = re.compile(r"[-+]?(?:\d(?:_?\d)*(?:\.(?:\d(?:_?\d)*)?)?|\.\d(?:_?\d)*)(?:[eE][-+]?\d(?:_?\d)*)?")




# ------------------------------------------------------------------------------ option types
class _Rejected(Exception):
    """A value an option type refuses: ``expected`` says what it accepts; ``detail`` what is wrong
    with the value when that helps (``unknown ['skin']``)."""

    def __init__(self, expected: str, value: Any, detail: str = ""):
        super().__init__(expected)
        self.expected, self.value, self.detail = expected, value, detail


def _as_number(value: Any, kind: str) -> float | int:
    """``value`` as an int or float: a number (not a bool), or text in :data:`NUMBER_RE`'s notation."""
    if isinstance(value, bool):
        raise _Rejected(kind, value)
    if isinstance(value, numbers.Integral):  # numpy's integers too
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if NUMBER_RE.fullmatch(text):
            digits = text.replace("_", "")
            try:
                return float(digits) if any(c in digits for c in ".eE") else int(digits)
            except ValueError:  # an integer of more digits than Python converts (4300)
                raise _Rejected(kind, value) from None
    raise _Rejected(kind, value)


def _finite(number) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


@dataclass(frozen=True)
class Number:
    """An integer (``integer=True``) or a real number, finite, within ``[low, high]`` (``low_open``:
    strictly above ``low``), or one of ``choices``."""

    integer: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    choices: Tuple[int, ...] = ()

    @property
    def kind(self) -> str:
        return "an integer" if self.integer else "a number (finite)"

    @property
    def accepts(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        noun = "an integer" if self.integer else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"<= {self.high:g}")
        return f"{noun} {' and '.join(bounds)}" if bounds else self.kind

    def parse(self, value: Any):
        number = _as_number(value, self.kind)
        if not _finite(number):
            raise _Rejected(self.kind, number)
        if self.integer:
            if int(number) != number:
                raise _Rejected(self.kind, number)
            number = int(number)
        else:
            number = float(number)
        if self.choices and number not in self.choices:
            raise _Rejected(self.accepts, number)
        too_low = self.low is not None and (number <= self.low if self.low_open else number < self.low)
        if too_low or (self.high is not None and number > self.high):
            raise _Rejected(self.accepts, number)
        return number


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


@dataclass(frozen=True)
class Flag:
    """True or false (also yes/no, on/off, 1/0)."""

    kind = accepts = "true or false"

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise _Rejected(self.kind, value)


@dataclass(frozen=True)
class Choice:
    """One of a few words (``as_list``: named as a Python list in messages, as the study options
    always were: ``one of ['image', 'gt']``)."""

    choices: Tuple[str, ...]
    as_list: bool = False

    @property
    def kind(self) -> str:
        return "one of " + (repr(list(self.choices)) if self.as_list else ", ".join(self.choices))

    accepts = kind

    def parse(self, value: Any) -> str:
        text = value.strip() if isinstance(value, str) else value
        if text not in self.choices:
            raise _Rejected(self.kind, value)
        return text


@dataclass(frozen=True)
class Text:
    """A path or other text (numbers given in YAML are taken as their text; empty: ``empty``)."""

    what: str = "a path"
    allow_empty: bool = True

    @property
    def kind(self) -> str:
        return self.what if self.allow_empty else f"{self.what} (not empty)"

    accepts = kind

    def parse(self, value: Any) -> str:
        if value is None:
            value = ""
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise _Rejected(self.kind, value)
        text = str(value)
        if not text and not self.allow_empty:
            raise _Rejected(self.kind, value)
        return text


@dataclass(frozen=True)
class GpuIds:
    """``''`` (the CPU), ``'0'``, ``'0,1'`` or ``'0-3'``."""

    kind = accepts = "GPU ids like '0', '0,1' or '0-3' (empty: the CPU)"

    def parse(self, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise _Rejected(self.kind, value)
        text = str(value).strip()
        try:
            parse_gpu_ids(text)
        except ValueError:
            raise _Rejected(self.kind, value) from None
        return text


def _items(value: Any) -> list:
    """The items of a list given as a list, as YAML/flow text (``[30, 32]``), as comma-separated
    text (``skeleton,pose``) or as one value (``30``)."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = yaml_value(text)
            except (yaml.YAMLError, ValueError, RecursionError):
                raise _Rejected("", value) from None
            return list(parsed) if isinstance(parsed, list) else [parsed]
        if not text:
            return []
        return [part.strip() for part in text.split(",")]
    if value is None:
        return []
    return [value]


@dataclass(frozen=True)
class ListOf:
    """A list of items of one type (``unique``: each at most once); ``of`` names the items."""

    item: Any
    example: str
    of: str
    unique: bool = False

    @property
    def kind(self) -> str:
        return f"a list like {self.example}"

    @property
    def accepts(self) -> str:
        return f"a list like {self.example} of {self.of}" + (", each at most once" if self.unique else "")

    def parse(self, value: Any) -> list:
        try:
            items = _items(value)
        except _Rejected:
            raise _Rejected(self.kind, value) from None
        refused = []
        out = []
        for v in items:
            try:
                out.append(self.item.parse(v))
            except _Rejected:
                refused.append(v)
        if refused:
            raise _Rejected(self.accepts, value, f"unknown {refused!r}" if isinstance(self.item, Choice) else "")
        if self.unique and len(set(out)) != len(out):
            raise _Rejected(self.accepts, value)
        return out


@dataclass(frozen=True)
class Size:
    """``[height, width]`` in pixels, two integers >= 1 (also ``HxW`` text such as ``64x64``)."""

    kind = "2 numbers [height, width], like [256, 256]"
    accepts = "2 integers >= 1 [height, width] in pixels, like [256, 256]"

    def parse(self, value: Any) -> Tuple[int, int]:
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", value):
            value = value.lower().split("x")
        try:
            items = _items(value)
        except _Rejected:
            raise _Rejected(self.kind, value) from None
        if len(items) != 2:
            raise _Rejected(self.kind, value)
        try:
            return tuple(Number(integer=True, low=1).parse(v) for v in items)
        except _Rejected:
            raise _Rejected(self.accepts, value) from None


POSITIVE_INT = Number(integer=True, low=1)
COUNT = Number(integer=True, low=0)
POSITIVE = Number(low=0, low_open=True)
WEIGHT = Number(low=0)

# The type of every option (the keys are exactly Config's options).
OPTION_TYPES: Dict[str, Any] = {
    "input_img_shape": Size(), "rendered_img_shape": Size(), "original_img_shape": Size(),
    "depth_min": POSITIVE, "depth_max": POSITIVE,
    "render_view_num": POSITIVE_INT, "backbone_img_feat_dim": POSITIVE_INT, "id_code_dim": POSITIVE_INT,
    "bone_step_size": Number(low=0, low_open=True, high=1),
    "renderer_backend": Choice(BACKENDS), "native_rasteriser": Choice(NATIVE_RASTERISERS),
    "resnet_type": Number(integer=True, choices=RESNET_TYPES),
    "pretrained_backbone": Text(), "channels_last": Flag(), "encoder_bf16": Flag(),
    "lr_dec_epoch": ListOf(COUNT, "[30, 32]", "epochs (integers >= 0)"), "end_epoch": POSITIVE_INT,
    "lr": POSITIVE, "lr_dec_factor": POSITIVE, "train_batch_size": POSITIVE_INT,
    "loss_penet_r_weight": WEIGHT, "loss_penet_nr_weight": WEIGHT, "loss_lap_weight": WEIGHT,
    "pose_source": Choice(POSE_SOURCES, as_list=True),
    "correctives": ListOf(Choice(CORRECTIVES), "[skeleton, pose]", "some of " + ", ".join(CORRECTIVES), unique=True),
    "keep_last": COUNT, "keep_every": COUNT,
    "test_batch_size": POSITIVE_INT,
    "root_dir": Text(allow_empty=False), "data_dir": Text(allow_empty=False), "hand_model_dir": Text(),
    "output_dir": Text(allow_empty=False),
    "num_thread": COUNT, "gpu_ids": GpuIds(), "num_gpus": COUNT, "continue_train": Flag(), "subject": COUNT,
    "holdout_sequences": ListOf(Text("a sequence name", allow_empty=False), "[0003_RT_synthetic]", "sequence names",
                                unique=True),
    "on_error": Choice(ON_ERROR), "tensorboard_image_interval": COUNT,
}


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
    depth_min = 1.0  # mm
    depth_max = 99999.0  # mm
    render_view_num = 6
    backbone_img_feat_dim = 512
    id_code_dim = 32
    bone_step_size = 0.1
    # Rasteriser of the depth renderer: auto (PyTorch3D where it imports, else the project's
    # own), pytorch3d or native (common/renderer/depth_renderer.py, resolve_backend).
    renderer_backend = "auto"
    # How the native backend rasterises: auto (on CUDA the binned Triton kernel where Triton
    # imports, else tensor operations), tensor, or triton (common/renderer/depth_renderer.py).
    native_rasteriser = "auto"

    ## model
    resnet_type = 50  # 18, 34, 50, 101, 152
    # A local torchvision ResNet state dict for ImageNet initialisation; nothing is downloaded.
    pretrained_backbone = ""
    # Two ways of running the encoder's ResNet that are standard on GPUs, off as in the original
    # (common/nets/module.py, BackboneNet): its weights and input in channels-last memory order, and
    # bfloat16 autocast (the encoder only: the rest of the model and the losses stay in float32).
    channels_last = False
    encoder_bf16 = False

    ## training config
    lr_dec_epoch = [30, 32]
    end_epoch = 35
    lr = 1e-4
    lr_dec_factor = 10.0
    train_batch_size = 8
    loss_penet_r_weight = 1.0
    loss_penet_nr_weight = 5.0
    loss_lap_weight = 5.0
    # Where the training and test forwards take the joint angles from: 'image' (the encoder, as the
    # original) or 'gt' (a synthetic set's gt/frames.npz: the encoder is bypassed and only the
    # skeleton and skin correctives learn; decoder-only).
    pose_source = "image"
    # The correctives that learn; the others are held at exactly zero (the component study).
    correctives = ["skeleton", "identity", "pose"]
    # Snapshot retention (docs/training.md): keep the last keep_last snapshots (0: every one, as the
    # original) and, besides, every keep_every-th (snapshot_{K-1}, snapshot_{2K-1}, ...; 0: none).
    keep_last = 0
    keep_every = 0

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
        """Set one option, read and checked by its type (:data:`OPTION_TYPES`).

        Raises:
            ConfigError: unknown option, or a value its type does not accept (one line naming
                ``source``, the option and what it accepts).
        """
        if name not in OPTION_TYPES:
            raise ConfigError(
                f"{source}: unknown option '{shown(name)}'; options are: {', '.join(sorted(OPTION_TYPES))}"
            )
        setattr(self, name, parse_option(name, value, source))

    def update(self, values: Dict[str, Any], source: str = "code") -> "Config":
        for name, value in values.items():
            self.set(name, value, source)
        return self

    def update_from_yaml(self, path: str | Path) -> "Config":
        """Set the options of a YAML file ``option: value`` (an option given twice: a warning, and
        the last one counts)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: configuration file not found")
        try:
            text = read_text(path, ConfigError, "configuration file", MAX_CONFIG_BYTES)
        except OSError as err:
            raise ConfigError(f"{path}: cannot read the configuration file ({err.strerror or err})") from None
        try:
            values, lines, repeated = yaml_mapping(text)
        except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: a date 2001-13-45, a 5000-digit int
            raise ConfigError(yaml_error_message(path, err)) from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
        for name, found in repeated.items():
            log.warning("%s:%d: option '%s' is given %d times (lines %s); the last one counts", path, found[-1],
                        shown(name), len(found), ", ".join(map(str, found)))
        for name, value in values.items():
            self.set(str(name), value, source=where(path, lines, name))
        return self

    def update_from_strings(self, assignments: Iterable[str]) -> "Config":
        """Set ``option=value`` strings (``--set``); the value is text, read by the option's type."""
        for text in assignments:
            if "=" not in text:
                raise ConfigError(f"--set {text}: expected option=value")
            name, raw = text.split("=", 1)
            self.set(name.strip(), raw, source=f"--set {text}")
        return self

    def copy(self) -> "Config":
        return copy.deepcopy(self)

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in sorted(self.options().items())) + ")"


def parse_option(name: str, value: Any, source: str = "code") -> Any:
    """``value`` read by the type of option ``name``; ``ConfigError`` naming ``source`` when refused."""
    kind = OPTION_TYPES[name]
    try:
        return kind.parse(value)
    except _Rejected as refused:
        text = f"{source}: option '{name}' expects {refused.expected}, got {shown(_as_given(value))}"
        if refused.detail:
            text += f" ({refused.detail})"
        elif refused.expected != kind.accepts:
            text += f" (it accepts {kind.accepts})"
        raise ConfigError(text) from None


def _as_given(value: Any) -> str:
    """A refused value for the message: numbers and lists as written, other text quoted."""
    if isinstance(value, str) and (NUMBER_RE.fullmatch(value.strip()) or value.strip().startswith("[")):
        return value.strip()
    return repr(value)


def check_combinations(config: "Config") -> None:
    """What single options cannot check: raises :class:`ConfigError` naming the options.

    Also re-checks every option's value (code may assign attributes directly)."""
    for name in OPTION_TYPES:
        parse_option(name, getattr(config, name), "configuration")
    if not config.depth_max > config.depth_min:
        raise ConfigError(f"options 'depth_min' ({config.depth_min:g} mm) and 'depth_max' ({config.depth_max:g} mm): "
                          "depth_max must be larger than depth_min")
    if config.native_rasteriser == "triton":
        from common.renderer.triton_rasterizer import interpreting, triton_available

        if not triton_available():
            raise ConfigError("option 'native_rasteriser' is triton, but Triton does not import here (it ships "
                              "with PyTorch's CUDA wheels): use auto or tensor")
        if not config.gpu_ids and not interpreting():
            raise ConfigError("option 'native_rasteriser' is triton without --gpu: the kernel runs on CUDA, or on "
                              "the CPU only in Triton's interpreter (TRITON_INTERPRET=1); use auto or tensor")


cfg = Config()
