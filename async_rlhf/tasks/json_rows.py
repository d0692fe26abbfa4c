"""Where a JSON or JSON Lines source stops being rows, by its line number as an editor shows it.

`datasets` reads these files with Arrow, whose errors count rows from 0 ("JSON parse error:
Invalid value. in row 2" for the third line) or name a byte offset ("Expected object or value at position 29"),
so a user looked at the wrong line or had to count bytes. On such a failure the file is read again here, line
by line (only then: a whole pass over it), and the first line that is not a JSON object is named.
"""
from __future__ import annotations

import bz2
import gzip
import io
import itertools
import json
import lzma
from pathlib import Path


def open_bytes(path: Path) -> io.BufferedIOBase:
    """The file's bytes, decompressed by its suffix (config.task.COMPRESSIONS) as `datasets` reads it."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    return lzma.open(path, "rb") if suffix == ".xz" else path.open("rb")


def first_bad_row(path: Path, json_lines: bool) -> str | None:
    """"line N: why" for the first line of a JSON Lines file that is not a JSON object, or the place a single
    JSON document (a .json file, `json_lines` False, whose first line is not a whole object) fails to parse; None
    where nothing is wrong with the JSON itself, or the file cannot be read again."""
    try:
        with open_bytes(path) as fh:
            lines = ((n, raw.decode("utf-8")) for n, raw in enumerate(fh, start=1))  # split at b"\n", as Arrow
            first = next(((n, text) for n, text in lines if text.strip()), None)
            if first is None:
                return None
            if not json_lines and not whole_object(first[1]):  # one document over many lines (a pretty-printed .json)
                return document_problem(path)
            rows = itertools.chain([first], lines)
            return next((f"line {n}: {why}" for n, text in rows if (why := row_problem(text))), None)
    except (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError):  # said by the caller's own reading
        return None


def whole_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def row_problem(text: str) -> str | None:
    """Why one line of a JSON Lines file is not a row (None: it is one, or it is blank)."""
    if not text.strip():
        return None
    try:
        value = json.loads(text.rstrip("\r\n"))  # its error at the line's end, not at a line after it
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    return None if isinstance(value, dict) else f"a JSON {json_kind(value)}, not an object of columns"


def document_problem(path: Path) -> str | None:
    with open_bytes(path) as fh:
        text = fh.read().decode("utf-8")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return f"line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})"
    return None


def field_problem(path: Path, field: str) -> str | None:
    """Why a JSON document has no rows under its key `field` (None: it has, or it is no JSON a key could be
    looked up in: the caller names that)."""
    try:
        with open_bytes(path) as fh:
            document = json.loads(fh.read().decode("utf-8"))
    except (OSError, EOFError, lzma.LZMAError, ValueError):  # ValueError: not UTF-8, or not JSON
        return None
    if not isinstance(document, dict):
        return f"the file is a JSON {json_kind(document)}, not an object with keys"
    if field not in document:
        return f"its keys: {', '.join(document) or 'none'}"
    value = document[field]
    return None if isinstance(value, (list, dict)) else f"the key holds a JSON {json_kind(value)}, not rows"


def key_of_rows(row: dict, column: str) -> str | None:
    """The key under which a JSON document read as one row (`{"data": [...]}` without task.dataset.field) holds
    rows that have `column`; None if it holds none."""
    for key, value in row.items():
        if isinstance(value, list) and value and isinstance(value[0], dict) and column in value[0]:
            return key
    return None


def json_kind(value: object) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")
