"""Writing files so that a crash never leaves a half-written one behind."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from common.errors import OutputError


def cannot_write(path: os.PathLike | str, err: OSError) -> OutputError:
    """The :class:`OutputError` of an ``OSError`` met writing ``path``: one line naming it."""
    return OutputError(f"{path}: cannot write ({err.strerror or err})")


def make_folder(path: os.PathLike | str) -> Path:
    """Create the folder ``path`` and its parents (an :class:`OutputError` naming it when it cannot be)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{path}: cannot create the folder ({err.strerror or err})") from None
    return path


def sync_folder(path: os.PathLike | str) -> None:
    """Make a rename or deletion in the folder ``path`` durable (``fsync`` of the folder, where the
    platform allows opening one; elsewhere nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``:
    readers see either the old file or the whole new one. Creates the parent folders.

    Raises:
        OutputError: the file or its folder cannot be written (naming it).
    """
    path = Path(path)
    make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fp:
            fp.write(data)
        os.replace(tmp, path)
    except OSError as err:
        raise cannot_write(path, err) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: os.PathLike | str, text: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text with ``\\n`` line ends."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_npz(path: os.PathLike | str, **arrays) -> None:
    """:func:`atomic_write_bytes` of ``np.savez(file, **arrays)``."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
