"""Reading JSONL input safely: every failure becomes `InvalidInput` naming the line.

Shared by `python -m feedback import` and `python -m serving generate`. A line that is not
UTF-8, not JSON, nested too deep, holds an integer too long to convert, or a string with a
lone surrogate (`"\\ud800"`, which no database can store) is refused with its line number;
nothing is read past a refusal, so callers can stay all-or-nothing. A UTF-8 byte-order mark
opening the file is skipped (JSON allows a reader to), anywhere else it is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from feedback.errors import InvalidInput

MAX_DEPTH = 32  # far deeper than any input format here needs


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of `path`."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}.") from None
    with fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                # a byte-order mark opening the file (Windows tools write one) is not data
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInput(f"line {lineno}: not UTF-8 text (byte {exc.start + 1}); "
                                   "save the file as UTF-8.") from None
            if line.strip():
                yield lineno, parse_line(lineno, line)


def parse_line(lineno: int, line: str) -> Any:
    if _depth(line) > MAX_DEPTH:
        raise InvalidInput(f"line {lineno}: nested more than {MAX_DEPTH} levels deep.")
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"line {lineno}: not valid JSON ({exc.msg} at column "
                           f"{exc.colno}).") from None
    except (ValueError, RecursionError) as exc:  # e.g. an integer of thousands of digits
        raise InvalidInput(f"line {lineno}: a value cannot be read ({exc}).") from None
    bad = _bad_string(value)
    if bad is not None:
        raise InvalidInput(f"line {lineno}: {bad} holds an invalid character (a lone UTF-16 "
                           "surrogate such as \\ud800).")
    return value


def _depth(line: str) -> int:
    """The deepest bracket nesting outside strings (checked before parsing, so a line of
    100,000 '[' cannot exhaust the parser's stack)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in line:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _bad_string(value: Any, where: str = "a value") -> str | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _bad_string(k, "a key") or _bad_string(v, f'"{k}"')
            if found:
                return found
    if isinstance(value, list):
        for v in value:
            found = _bad_string(v, where)
            if found:
                return found
    return None
