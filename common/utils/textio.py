"""Reading the project's text files so that every problem names the file and the line.

Every text reader (hand model, ``KRT_512``, ``.pts``, pose YAML/JSON, configuration YAML) goes
through :func:`read_text`: it refuses a file larger than its kind's limit before reading it
whole, bytes that are not UTF-8 (naming the line and column of the first bad byte) and lines
longer than :data:`MAX_LINE_CHARS`, always with the reader's own error class. Lines are numbered
as editors number them: ``\\n`` ends a line (a ``\\r`` before it is dropped).

:func:`yaml_mapping` parses a YAML mapping and also returns the line of each top-level key, so
that a problem with one entry can name its line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Tuple, Type

import yaml

MAX_LINE_CHARS = 1 << 16  # the longest line of the released files is a few hundred characters
MAX_SHOWN_CHARS = 60  # tokens quoted in messages are cut to this length


def shown(token: str) -> str:
    """``token`` cut to a readable length for a message (a fuzzed token may be 60 kB long)."""
    return token if len(token) <= MAX_SHOWN_CHARS else token[:MAX_SHOWN_CHARS] + "…"


def read_text(path: os.PathLike | str, error: Type[Exception], what: str, max_bytes: int) -> str:
    """The UTF-8 text of ``path``.

    Args:
        error: the reader's error class; it receives one message starting ``path[:line]:``.
        what: what the file is, for messages (``'hand-model file'``).
        max_bytes: the largest file accepted.

    Raises:
        error: the file is too large, is not UTF-8, or has a line of more than
            :data:`MAX_LINE_CHARS` characters.
        OSError: the file cannot be opened (``FileNotFoundError`` when missing); callers word it.
    """
    path = Path(path)
    with open(path, "rb") as fp:
        # Never more than the limit, whatever stat says; but the file's size when it has one (asking
        # for the limit's worth costs an allocation of that size per read).
        size = os.fstat(fp.fileno()).st_size
        data = fp.read(size + 1 if 0 < size <= max_bytes else max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: larger than {max_bytes} bytes, too large for a {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise error(f"{path}:{line}: byte 0x{data[err.start]:02x} at column {column} is not UTF-8 "
                    f"text; a {what} is a UTF-8 text file") from None
    if len(text) > MAX_LINE_CHARS:  # only then can a line be too long
        for number, line in enumerate(text.split("\n"), 1):
            if len(line) > MAX_LINE_CHARS:
                raise error(f"{path}:{number}: line of {len(line)} characters, more than the "
                            f"{MAX_LINE_CHARS} a {what} may have")
    return text


def text_lines(text: str) -> List[str]:
    """Lines of ``text``, ``\\n``-separated (a trailing ``\\r`` dropped), numbered from 1 by position."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def key_lines_yaml(text: str) -> Tuple[object, Dict[str, int]]:
    """``yaml.safe_load(text)`` and, when it is a mapping, ``{str(key): line}`` of its keys.

    Raises ``yaml.YAMLError`` (with the line in its message) or ``RecursionError``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    lines: Dict[str, int] = {}
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        for key_node, _value in node.value:
            lines.setdefault(str(key_node.value), key_node.start_mark.line + 1)
    return data, lines


def key_lines_json(text: str, data: object) -> Dict[str, int]:
    """``{str(key): line}`` of the top-level keys of a JSON object, by the first place its quoted
    key appears (JSON's parser does not report positions)."""
    lines: Dict[str, int] = {}
    if isinstance(data, dict):
        for key in data:
            at = text.find(json.dumps(str(key)))
            if at >= 0:
                lines[str(key)] = text.count("\n", 0, at) + 1
    return lines


def where(path: os.PathLike | str, lines: Dict[str, int], key: object) -> str:
    """``path:line`` of ``key`` when known, else ``path``."""
    line = lines.get(str(key))
    return f"{path}:{line}" if line else str(path)
