"""The command-line options ``train.py`` and ``test.py`` share, and the checks of the study options.

Path options (``data_dir``, ``output_dir``, ``hand_model_dir``, ``pretrained_backbone``) given as
relative paths are taken from the repository root; ``--data_dir`` from the current folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

from common.utils.checkpoint import CheckpointError
from common.utils.device import parse_gpu_ids
from common.utils.hand_model import HandModelError
from main.config import ROOT_DIR, Config, ConfigError

log = logging.getLogger("deephandmesh")
T = TypeVar("T")

# What bad input (options, data folder, hand model, snapshot) raises while a run is set up: the
# scripts report it in one line, without a traceback.
SETUP_ERRORS = (ConfigError, CheckpointError, HandModelError, OSError, ValueError)

# Options naming files or folders; relative values are taken from the repository root (main.config).
PATH_OPTIONS = ("data_dir", "output_dir", "hand_model_dir", "pretrained_backbone")


def resolve_paths(config: Config) -> Config:
    """Make the path options absolute: relative ones are taken from the repository root."""
    for name in PATH_OPTIONS:
        value = getattr(config, name)
        if value and not Path(value).is_absolute():
            setattr(config, name, str(ROOT_DIR / value))
    return config


def add_config_args(parser) -> None:
    """The command-line options ``train.py`` and ``test.py`` share."""
    parser.add_argument("--gpu", dest="gpu_ids", default="",
                        help="GPU ids: '0', '0,1' or '0-3'; the CPU when absent or when CUDA is not available")
    parser.add_argument("--subject", type=int, help="subject number (default: cfg.subject, 4)")
    parser.add_argument("--cfg", dest="cfg_file", help="YAML file of option: value overrides")
    parser.add_argument("--data_dir", help="data folder (images/, annotations/[, hand_model/])")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option (repeatable), e.g. --set output_dir=output/run")


def config_from_args(args, base: Optional[Config] = None) -> Config:
    """A copy of ``base`` (the global ``cfg``) with, in this order: the ``--cfg`` YAML file, the
    ``--set`` assignments, then the dedicated options (``--data_dir``, ``--subject``, ``--gpu``, …).
    ``--data_dir`` is taken from the current folder; relative paths in the configuration from the
    repository root. Raises :class:`main.config.ConfigError` or ``ValueError`` (bad ``--gpu``)."""
    from main.config import cfg as global_cfg

    config = (base or global_cfg).copy()
    if args.cfg_file:
        config.update_from_yaml(args.cfg_file)
    config.update_from_strings(args.assignments)
    if args.data_dir:
        config.set("data_dir", str(Path(args.data_dir).resolve()), "--data_dir")
    if args.subject is not None:
        config.set("subject", args.subject, "--subject")
    if args.gpu_ids:
        parse_gpu_ids(args.gpu_ids)  # a clear error for a malformed list
        config.set("gpu_ids", args.gpu_ids, "--gpu")
    return resolve_paths(config)


def log_options(config: Config) -> None:
    """Log the options that differ from the original's defaults (what makes this run this run)."""
    defaults = Config().options()
    changed = {k: v for k, v in config.options().items()
               if k not in ("root_dir", "num_gpus") and v != defaults.get(k)}
    log.info("options (changed from the defaults): %s",
             ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())) or "none")


POSE_SOURCES = ("image", "gt")
CORRECTIVES = ("skeleton", "identity", "pose")


def check_study_options(config: Config) -> None:
    """``pose_source`` and ``correctives`` hold known values (else ``ConfigError`` naming them)."""
    if config.pose_source not in POSE_SOURCES:
        raise ConfigError(f"option 'pose_source' expects one of {list(POSE_SOURCES)}, got {config.pose_source!r}")
    unknown = [c for c in config.correctives if c not in CORRECTIVES]
    if unknown:
        raise ConfigError(f"option 'correctives' expects a list of some of {list(CORRECTIVES)}, got unknown {unknown}")


def held_correctives(config: Config) -> List[str]:
    """The correctives held at zero: those not in ``cfg.correctives``."""
    return [c for c in CORRECTIVES if c not in config.correctives]


def set_up_or_report(log: logging.Logger, set_up: Callable[[], T]) -> Optional[T]:
    """``set_up()``; on bad input (:data:`SETUP_ERRORS`) its one-line error in the log and None."""
    try:
        return set_up()
    except SETUP_ERRORS as err:
        log.error("error: %s", err)
        return None
