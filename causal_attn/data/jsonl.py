"""JSONL files: the one reader and the one writer of the project.

``read_jsonl(path) -> list[dict]``: one JSON object per line; blank lines are skipped. A line that is not
valid JSON (or not UTF-8, or not an object) raises :class:`JsonlError` naming ``file:line``. A last line
without its newline that does not parse is a write cut short (a killed process, a truncated copy): it
raises too, with a message that says so, since a data set one record short is a silent change of the
experiment. ``numbered_jsonl`` gives the same records with their 1-based line numbers, for callers
whose own field checks name the line. ``skip_bad=True`` (the resumable cache, whose torn lines are
expected after a kill) skips bad lines instead and counts them in :attr:`JsonlRead.skipped`.

``write_jsonl(records, path) -> int``: one ``json.dumps`` object per line, UTF-8, parent folders made,
written to a temporary file and renamed, so the file appears whole or not at all.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable


class JsonlError(ValueError):
    """A line of a JSONL file that is not a JSON object; the message starts with ``file:line``."""


@dataclasses.dataclass
class JsonlRead:
    records: list        # (line number, object) pairs, in file order
    skipped: int         # bad lines passed over (only with skip_bad)
    ends_with_newline: bool  # False when the file is non-empty and its last line has no newline


def numbered_jsonl(path: str | os.PathLike, *, skip_bad: bool = False) -> JsonlRead:
    """Every object of a JSONL file with its line number (see the module docstring for bad lines)."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # bytes: a write cut inside a multi-byte character spoils one line, not the file
        data = f.read()
    lines = data.split(b"\n")
    records, skipped = [], 0
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are ValueErrors
            if n == len(lines):  # the last line, without its newline
                problem = ("the last line is cut off (no newline at its end and not valid JSON): the file was "
                           "truncated, e.g. by an interrupted write; re-create it or delete that line")
            else:
                problem = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"not valid JSON ({e})"
        else:
            if isinstance(obj, dict):
                records.append((n, obj))
                continue
            problem = f"a record must be a JSON object, got {type(obj).__name__}"
        if not skip_bad:
            raise JsonlError(f"{path}:{n}: {problem}")
        skipped += 1
    return JsonlRead(records, skipped, not data or data.endswith(b"\n"))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The objects of a JSONL file, in order; :class:`JsonlError` (``file:line``) on a bad line."""
    return [obj for _, obj in numbered_jsonl(path).records]


def write_jsonl(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write one object per line (whole file or nothing); returns the count."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp, n = path + ".tmp", 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n
