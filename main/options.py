"""The command-line options ``train.py`` and ``test.py`` share, and the checks run before any work.

Path options (``data_dir``, ``output_dir``, ``hand_model_dir``, ``pretrained_backbone``) given as
relative paths are taken from the repository root; ``--data_dir`` from the current folder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

from common.renderer.backend import pytorch3d_api
from common.utils.device import parse_gpu_ids
from main.config import CORRECTIVES, POSE_SOURCES, ROOT_DIR, Config, check_combinations  # noqa: F401

log = logging.getLogger("deephandmesh")

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
    repository root. Each value is checked as it is set; the combinations are checked by
    :func:`check_options`, which ``Trainer.set_up`` and ``Tester.set_up`` run first (after the log is
    open, so that the log keeps the message). Raises :class:`main.config.ConfigError`, or
    :class:`common.errors.OptionError` (bad ``--gpu``)."""
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


def check_options(config: Config) -> None:
    """The checks a run makes before any work (data, model): every option's value and the
    combinations of options (:func:`main.config.check_combinations`), and that the renderer backend
    asked for runs here. Raises :class:`main.config.ConfigError` or
    :class:`common.renderer.backend.RendererBackendError`, each one line naming the options."""
    check_combinations(config)
    if config.renderer_backend == "pytorch3d":
        pytorch3d_api()  # it imports here, or one line saying how to install it


def log_options(config: Config) -> None:
    """Log the options that differ from the original's defaults (what makes this run this run)."""
    defaults = Config().options()
    changed = {k: v for k, v in config.options().items()
               if k not in ("root_dir", "num_gpus") and v != defaults.get(k)}
    log.info("options (changed from the defaults): %s",
             ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items())) or "none")


def held_correctives(config: Config) -> List[str]:
    """The correctives held at zero: those not in ``cfg.correctives``."""
    return [c for c in CORRECTIVES if c not in config.correctives]
