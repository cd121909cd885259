"""JSON Lines calibration sources: one JSON object per line, the text under one key."""
from __future__ import annotations

import json
from pathlib import Path

from lowbit.calib.text import read_text
from lowbit.errors import LowbitError


def read_jsonl(path: str | Path, key: str = "text") -> list[str]:
    """The ``key`` field of every record in a JSONL file, in file order.

    Blank lines are skipped. Raises ``LowbitError`` naming the file and the 1-based line
    number when a line is not JSON, not an object, lacks ``key`` (listing the keys it has) or
    holds a non-string there, and when the file has no record at all.
    """
    texts = [record_text(line, key, path, n) for n, line in enumerate(read_text(path).splitlines(), 1)
             if line.strip()]
    if not texts:
        raise LowbitError(f"calibration file {str(path)!r} holds no JSON records")
    return texts


def record_text(line: str, key: str, path: str | Path, lineno: int) -> str:
    """The text of one JSONL line (see ``read_jsonl`` for the errors)."""
    where = f"{path} line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise LowbitError(f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line of a "
                          "JSONL file must be one JSON object") from None
    if not isinstance(record, dict):
        raise LowbitError(f"{where} holds a JSON {type(record).__name__}, not an object; each line must "
                          f'be an object such as {{"{key}": "..."}}')
    if key not in record:
        found = ", ".join(repr(k) for k in record) or "none"
        raise LowbitError(f"{where} has no {key!r} key (keys found: {found}); name the text key as "
                          f"{path}#KEY in the calibration spec")
    if not isinstance(record[key], str):
        raise LowbitError(f"{where}: {key!r} holds a {type(record[key]).__name__}, not a string")
    return record[key]
