"""The project's user-facing errors, and how a script turns them into one line and exit code 2.

Every problem with what the user gave (an option, a file, a pose, a snapshot, a data folder)
raises a subclass of :class:`DeepHandMeshError` whose message names the option or the file (and
line) and says what was expected. A script catches that class alone (:func:`exit_code`): the user
sees ``error: <message>`` and the script exits with code 2. Anything else that escapes is a bug
of the program: Python shows its traceback and the exit code is 1.

The subclasses also derive from the built-in class that callers caught before this module existed
(``ValueError`` for bad values and bad file contents, ``FileNotFoundError``/``OSError`` for the
file system), so ``except ValueError`` around a reader still catches its errors.
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

USER_ERROR_EXIT_CODE = 2


class DeepHandMeshError(Exception):
    """Bad input from the user (an option, a file, a pose, a snapshot, a data folder); the message
    names it and says what is expected. Scripts print it as one line and exit with code 2."""


class OptionError(DeepHandMeshError, ValueError):
    """A command-line argument or configuration option with a value the program cannot use."""


class ConfigError(OptionError):
    """An unknown option or a value of the wrong type, or what an option needs missing (e.g. the
    ground-truth angles of ``pose_source=gt``); the message names the option and its source.
    (Also importable from :mod:`main.config`.)"""


class FileFormatError(DeepHandMeshError, ValueError):
    """A file whose contents cannot be used (malformed, or made for something else); the message
    starts with the file's path (and line, for text files)."""


class DataFormatError(FileFormatError):
    """A data folder's file that cannot be used (a KRT or keypoint file that cannot be parsed, a
    camera file without colour cameras, an image folder without images); the message names the
    file (and line). (Also importable from :mod:`data.dataset`.)"""


class MissingFileError(DeepHandMeshError, FileNotFoundError):
    """A file or folder the user named (or that a named folder must hold) does not exist."""


class OutputError(DeepHandMeshError, OSError):
    """An output cannot be written (no permission, disk full, a file where a folder must be)."""


def one_line(err: BaseException) -> str:
    """The error's message as one line (a stray newline of a wrapped library message joined)."""
    return " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__


def print_error(line: str) -> None:
    print(line, file=sys.stderr)


def exit_code(action: Callable[[], Optional[int]], report: Callable[[str], None] = print_error) -> int:
    """Run a script's work: ``action()``'s exit code (an int; anything else, such as None or the
    path it wrote, counts as 0), or, when it raises a :class:`DeepHandMeshError`,
    ``report('error: <message>')`` and :data:`USER_ERROR_EXIT_CODE`.

    Every other exception propagates: it is a bug, and its traceback is what a report needs.

    Args:
        action: the script's work, without arguments.
        report: where the line goes: stderr (default), or e.g. ``log.error`` for a script whose
            log file must hold it too.
    """
    try:
        result = action()
    except DeepHandMeshError as err:
        report(f"error: {one_line(err)}")
        return USER_ERROR_EXIT_CODE
    return result if isinstance(result, int) else 0
