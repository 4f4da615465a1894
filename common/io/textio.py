"""Reading the project's text files so that every problem names the file and the line.

Every text reader (hand model, ``KRT_512``, ``.pts``, pose YAML/JSON, configuration YAML) goes
through :func:`read_text`: it refuses a file larger than its kind's limit before reading it
whole, bytes that are not UTF-8 (naming the line and column of the first bad byte) and lines
longer than :data:`MAX_LINE_CHARS`, always with the reader's own error class. Lines are numbered
as editors number them: ``\\n`` ends a line (a ``\\r`` before it is dropped).

:func:`yaml_mapping` parses a YAML mapping and also returns the line of each top-level key (so
that a problem with one entry can name its line) and the keys given more than once. YAML is read
with :class:`YamlLoader`: PyYAML's safe loader with numbers as people write them (YAML 1.2's
forms: ``1e-3``, ``1E-3``, ``.5``, ``5.``, ``1_000``; ``010`` is ten, not eight, and ``1:30`` is
text, not ninety). :func:`yaml_error_message` words a YAML syntax error for the user: the file, the
line and column, what is wrong and what to do (``p.yaml: not valid YAML: line 2, column 1: a tab;
tabs are not allowed in YAML: indent with spaces``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type

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


# ------------------------------------------------------------------------------ YAML
_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_DIGITS = r"[0-9](?:_?[0-9])*"
YAML_INT_RE = re.compile(rf"^(?:[-+]?{_DIGITS}|0x[0-9a-fA-F](?:_?[0-9a-fA-F])*|0o[0-7](?:_?[0-7])*)$")
YAML_FLOAT_RE = re.compile(rf"^(?:[-+]?(?:{_DIGITS}\.(?:{_DIGITS})?|\.{_DIGITS})(?:[eE][-+]?[0-9]+)?"
                           rf"|[-+]?{_DIGITS}[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data only) reading numbers in YAML 1.2's forms (module notes)."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text[:2] in ("0x", "0o"):
        return int(text[2:], 16 if text[1] == "x" else 8)
    return int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = loader.construct_scalar(node).replace("_", "").lower()
    if text.lstrip("+-") == ".inf":
        return float("-inf") if text.startswith("-") else float("inf")
    return float("nan") if text == ".nan" else float(text)


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    YamlLoader.yaml_implicit_resolvers[_first] = (
        [(_INT_TAG, YAML_INT_RE), (_FLOAT_TAG, YAML_FLOAT_RE)] + YamlLoader.yaml_implicit_resolvers.get(_first, []))
YamlLoader.add_constructor(_INT_TAG, _construct_int)
YamlLoader.add_constructor(_FLOAT_TAG, _construct_float)


def yaml_value(text: str) -> Any:
    """One YAML value (e.g. the ``[64, 64]`` of ``--set input_img_shape=[64, 64]``), read with
    :class:`YamlLoader`. Raises ``yaml.YAMLError``, ``ValueError`` or ``RecursionError``."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader


def yaml_mapping(text: str) -> Tuple[object, Dict[str, int], Dict[str, List[int]]]:
    """The YAML document ``text`` (:class:`YamlLoader`) and, when it is a mapping, the line of each
    top-level key (its first occurrence) and the keys given more than once with all their lines
    (the value that counts is the last one's, as in PyYAML).

    Raises ``yaml.YAMLError`` (word it with :func:`yaml_error_message`), ``ValueError`` (a value
    that looks like a date or number but is none, e.g. ``2001-13-45``) or ``RecursionError``."""
    loader = YamlLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    lines: Dict[str, List[int]] = {}
    if isinstance(node, yaml.MappingNode) and isinstance(data, dict):
        for key_node, _value in node.value:
            lines.setdefault(str(key_node.value), []).append(key_node.start_mark.line + 1)
    first = {key: found[0] for key, found in lines.items()}
    return data, first, {key: found for key, found in lines.items() if len(found) > 1}


def key_lines_yaml(text: str) -> Tuple[object, Dict[str, int]]:
    """:func:`yaml_mapping` without the repeated keys: ``(data, {str(key): line})``."""
    data, lines, _repeated = yaml_mapping(text)
    return data, lines


def _yaml_problem(err: yaml.YAMLError) -> Tuple[str, str]:
    """``(where, what is wrong and what to do)`` of a PyYAML error, in the project's words;
    ``where`` is ``'line L, column C'`` (or ``''`` when PyYAML gives no place)."""
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context = " ".join(str(getattr(err, "context", None) or "").split())
    mark = getattr(err, "problem_mark", None)
    opened = getattr(err, "context_mark", None)
    at = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    opened_at = f"line {opened.line + 1}, column {opened.column + 1}" if opened is not None else "above"
    if "found character '\\t'" in problem:  # PyYAML shows the tab as backslash-t
        return at, "a tab; tabs are not allowed in YAML: indent with spaces"
    found_char = re.search(r"found character '(.+?)' that cannot start any token", problem)
    if found_char:
        return at, f"'{found_char.group(1)}' cannot start a value; put the value in quotes (\"{found_char.group(1)}...\")"
    if "expected <block end>, but found '<block mapping start>'" in problem:
        return at, ("this line is indented differently from the entries above it; entries of one mapping "
                    "start in the same column (indent with spaces)")
    if "expected <block end>" in problem:
        return at, ("this line does not continue what is above it: entries of one level start in the same "
                    "column, and a level is either a list ('- item') or a mapping ('name: value')")
    bracket = re.search(r"expected ',' or '([\]}])', but got '(.+?)'", problem)
    if bracket:
        close = bracket.group(1)
        open_ = "[" if close == "]" else "{"
        if bracket.group(2) == "<stream end>":
            return (opened_at if opened is not None else at), f"this '{open_}' is never closed with '{close}'"
        return at, f"expected ',' or '{close}' in the '{open_}' opened at {opened_at} (a missing '{close}'?)"
    if "mapping values are not allowed here" in problem:
        return at, ("a ':' where none can be: is this line indented deeper than the one before (entries of "
                    "one mapping start in the same column), or is the ':' of the line before missing? "
                    "Quote a value that holds ': '")
    if "could not find expected ':'" in problem:
        if opened is not None:  # the entry that lacks its ':' starts there
            return f"line {opened.line + 1}", "expected 'name: value': is the ':' (or the space after it) missing?"
        return at, "expected 'name: value': is the ':' missing, or the line wrongly indented?"
    if "end of stream" in problem and "quoted scalar" in context:
        return (opened_at if opened is not None else at), "this quote is never closed"
    alias = re.search(r"found undefined alias '(.*?)'", problem)
    if alias:
        return at, f"'*{alias.group(1)}' refers to no anchor '&{alias.group(1)}'; quote a value that starts with '*'"
    if "but found another document" in problem:
        return at, "a second document ('---'); the file holds one mapping"
    return at, problem + (f" ({context})" if context else "")


def yaml_error_message(path: os.PathLike | str, err: BaseException, kind: str = "YAML") -> str:
    """One line for a file that does not parse: ``path: not valid YAML: line L, column C: <what,
    hint>`` (``not valid JSON`` with ``kind='JSON'``).

    ``err``: a ``yaml.YAMLError`` (worded by the table above), a ``json.JSONDecodeError``, or
    another error of the parser (a date ``2001-13-45``, a 5000-digit integer; no place known),
    given in its own words."""
    if isinstance(err, yaml.YAMLError):
        at, text = _yaml_problem(err)
    elif isinstance(err, json.JSONDecodeError):
        at, text = f"line {err.lineno}, column {err.colno}", err.msg
    elif isinstance(err, RecursionError):
        at, text = "", "nested too deeply"
    else:
        at, text = "", " ".join(str(err).split())
    return f"{path}: not valid {kind}: {at + ': ' if at else ''}{text}"


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


def pixel_size_type(low: int = 1, high: Optional[int] = None, example: str = "64x64"):
    """An ``argparse`` type reading an image size written ``HxW`` (``64x64``, ``128X84``) into
    ``(H, W)`` pixels, each from ``low`` to ``high`` (None: no upper bound); anything else is
    refused with a message giving the form and the range."""
    bounds = f"each from {low} to {high}" if high is not None else f"each at least {low}"

    def parse(text: str) -> Tuple[int, int]:
        parts = text.strip().lower().split("x")
        try:
            h, w = (int(v) for v in parts)
        except ValueError:
            h = w = None
        if h is None or not all(low <= v and (high is None or v <= high) for v in (h, w)):
            raise argparse.ArgumentTypeError(f"expected HxW in pixels like {example} ({bounds}); got '{shown(text)}'")
        return h, w

    return parse


def assign_fields(target: Any, items: Iterable[str], option: str, what: str,
                  parse: Callable[[str, str], Any], error: Type[Exception]) -> Any:
    """Set fields of the dataclass instance ``target`` from a command-line option's ``NAME=VALUE``
    items (``--weight rest=0.5``), in order, and return it.

    Args:
        option: the option as typed (``'--weight'``), and ``what`` a name is (``'prior'``), for messages.
        parse: ``parse(name, value_text)`` gives the field's value, or raises ``ValueError`` whose
            text says what was expected (``'expected a finite weight ≥ 0'``).
        error: the caller's error class; its one message starts ``option item:``.
    """
    names = [f.name for f in fields(target)]
    for item in items:
        name, _, value = item.partition("=")
        if name not in names:
            raise error(f"{option} {shown(item)}: unknown {what} '{shown(name)}'; expected one of {', '.join(names)}")
        try:
            parsed = parse(name, value)
        except ValueError as err:
            raise error(f"{option} {shown(item)}: {err}") from None
        setattr(target, name, parsed)
    return target
