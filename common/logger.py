"""Logging for the training and test scripts: one log file plus console lines that do not break
the tqdm progress bar.

``setup_logging(log_dir, 'train_logs.txt')`` attaches a file handler (appending, so a resumed run
continues the same file) and a console handler to the root logger, so the messages of every module
(data reader, device choice, backbone initialisation) land in both. Calling it again replaces the
handlers it installed before (scripts run in-process, e.g. by tests, do not pile them up);
``close_logging()`` removes and closes them.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from common.errors import print_error
from common.io.atomic import cannot_write, make_folder

LOGGER_NAME = "deephandmesh"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CONSOLE_FORMAT = "%(asctime)s %(message)s"
DATE_FORMAT = "%m-%d %H:%M:%S"

_MARK = "_deephandmesh_handler"
_COLOURS = {logging.WARNING: "\033[33m", logging.ERROR: "\033[31m", logging.CRITICAL: "\033[31m"}


class TqdmConsoleHandler(logging.Handler):
    """A console handler that writes through ``tqdm.write`` so that an active progress bar is
    redrawn below the message instead of being torn. Information goes to stdout; warnings and
    errors to stderr, coloured on a terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            text = self.format(record)
            if record.levelno in _COLOURS and getattr(stream, "isatty", lambda: False)() and os.name != "nt":
                text = f"{_COLOURS[record.levelno]}{text}\033[0m"
            tqdm.write(text, file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def close_logging() -> None:
    """Remove and close the handlers :func:`setup_logging` installed."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
            handler.close()


def setup_logging(log_dir: Optional[str | os.PathLike] = None, log_name: str = "train_logs.txt",
                  level: int = logging.INFO, console: bool = True, console_prefix: str = "") -> logging.Logger:
    """Send log records to ``log_dir/log_name`` (appended) and to the console.

    ``console_prefix`` starts every console line (e.g. ``'[rank 1] '`` for the other processes
    of a distributed run).

    Returns the scripts' logger (``deephandmesh``).
    """
    close_logging()
    root = logging.getLogger()
    root.setLevel(level)
    if log_dir is not None:
        path = Path(log_dir) / log_name
        make_folder(path.parent)
        try:
            file_handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        except OSError as err:
            raise cannot_write(path, err) from None
        file_handler.setFormatter(logging.Formatter(FILE_FORMAT, DATE_FORMAT))
        setattr(file_handler, _MARK, True)
        root.addHandler(file_handler)
    if console:
        console_handler = TqdmConsoleHandler()
        console_handler.setFormatter(logging.Formatter(console_prefix + CONSOLE_FORMAT, DATE_FORMAT))
        setattr(console_handler, _MARK, True)
        root.addHandler(console_handler)
    return logging.getLogger(LOGGER_NAME)


class ScriptLog:
    """Where a training or test script's one-line errors go: into its log once the log is open
    (its file keeps them), to stderr before (``report`` is :func:`common.errors.exit_code`'s)."""

    def __init__(self):
        self.log: Optional[logging.Logger] = None

    def report(self, line: str) -> None:
        if self.log is not None:
            self.log.error(line)
        else:
            print_error(line)
