"""JSONL input of the commands: :func:`causal_attn.data.jsonl.numbered_jsonl` with every problem as one
:class:`CliError` line naming the file (and line)."""
from __future__ import annotations

from ..data.jsonl import JsonlError, numbered_jsonl
from .errors import CliError


def read_records(path: str, need: tuple[str, ...] = ()) -> list[dict]:
    """The records of a JSONL file, each holding the fields ``need`` (present and not null)."""
    try:
        read = numbered_jsonl(path)
    except FileNotFoundError:
        raise CliError(f"cannot read {path}: no such file") from None
    except OSError as e:
        raise CliError(f"cannot read {path}: {e.strerror or e}") from None
    except JsonlError as e:
        raise CliError(str(e)) from None
    for n, rec in read.records:
        missing = [k for k in need if rec.get(k) is None]
        if missing:
            raise CliError(f"{path}:{n}: record has no {', '.join(repr(k) for k in missing)} field")
    if not read.records:
        raise CliError(f"{path}: no records")
    return [rec for _, rec in read.records]
