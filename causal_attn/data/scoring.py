"""Scorers for generated answers: STG_E, STG_H, GSM8K, ARC, SVAMP / MAWPS, and ``score(task, ...)``.

Every ``score_*(predictions, targets)`` returns a dict with ``n``, the metric(s) as fractions and
``unparsed`` (predictions from which no answer could be read; they count as wrong, never silently
dropped). Per-item parsers are exposed for reuse. ``score`` dispatches on the task names of
:data:`SCORERS` (``exact, stg_e, stg_h, gsm8k, arc_e, svamp, mawps``), which ``causal-attn eval --task`` offers.

- STG_E (and ``exact``, for any file): exact match of the stripped prediction against the target.
- STG_H: the first integer in the prediction vs the integer AQI; ``exact``, ``mae`` (over parsed
  predictions; ``mae_all`` charges an unparsed prediction the worst error 100) and ``within5``.
- GSM8K: the number after the last ``####`` (else the last number, counted in ``fallback``),
  thousands separators and ``$`` removed, compared numerically with the gold's ``#### x``.
- ARC: the chosen letter (``Answer: B``, ``(B)``, ``B)``, ``B.`` or a lone ``B``; digits 1-5 map to A-E).
- SVAMP / MAWPS: the first number after ``Answer:`` (else the last number) within ``tol`` of the gold.
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
_INT = re.compile(r"-?\d+")


def parse_number(s: str) -> float | None:
    """A number from a token like ``1,234.5`` / ``$12`` / ``-3``; None if it is not one."""
    s = s.strip().replace("$", "").replace(",", "")
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def numbers_in(text: str) -> list[float]:
    out = []
    for m in _NUMBER.finditer(str(text)):
        v = parse_number(m.group())
        if v is not None:
            out.append(v)
    return out


def _check(predictions: Sequence, targets: Sequence) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")


def _frac(k: int, n: int) -> float:
    return k / n if n else float("nan")


# ----------------------------------------------------------------------------- STG

def score_stg_e(predictions: Sequence[str], targets: Sequence[str]) -> dict:
    _check(predictions, targets)
    hits = sum(str(p).strip() == str(t).strip() for p, t in zip(predictions, targets))
    return {"n": len(targets), "exact": _frac(hits, len(targets)), "unparsed": 0}


def parse_stg_h(prediction: str) -> int | None:
    m = _INT.search(str(prediction))
    return int(m.group()) if m else None


def score_stg_h(predictions: Sequence[str], targets: Sequence[int]) -> dict:
    _check(predictions, targets)
    parsed = [parse_stg_h(p) for p in predictions]
    errs = [abs(p - int(t)) for p, t in zip(parsed, targets) if p is not None]
    unparsed = sum(p is None for p in parsed)
    n = len(targets)
    return {"n": n, "exact": _frac(sum(e == 0 for e in errs), n), "within5": _frac(sum(e <= 5 for e in errs), n),
            "mae": sum(errs) / len(errs) if errs else float("nan"),
            "mae_all": _frac(sum(errs) + 100 * unparsed, n), "unparsed": unparsed}


# ----------------------------------------------------------------------------- math word problems

def parse_gsm8k(text: str) -> tuple[float | None, bool]:
    """``(value, used_fallback)``: the number after the last ``####``, else the last number."""
    text = str(text)
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        nums = numbers_in(tail)
        if nums:
            return nums[0], False
    nums = numbers_in(text)
    return (nums[-1], True) if nums else (None, True)


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


def score_gsm8k(predictions: Sequence[str], targets: Sequence[str], tol: float = 1e-6) -> dict:
    _check(predictions, targets)
    hits = unparsed = fallback = 0
    for p, t in zip(predictions, targets):
        gold, _ = parse_gsm8k(t)
        if gold is None:
            raise ValueError(f"gold answer without a number: {str(t)[-80:]!r}")
        v, fb = parse_gsm8k(p)
        if v is None:
            unparsed += 1
            continue
        fallback += fb
        hits += _close(v, gold, tol)
    return {"n": len(targets), "accuracy": _frac(hits, len(targets)), "unparsed": unparsed, "fallback": fallback}


def parse_numeric_answer(text: str) -> float | None:
    """First number after the last ``Answer:``, else the last number in the text."""
    text = str(text)
    if "answer:" in text.lower():
        idx = text.lower().rfind("answer:")
        nums = numbers_in(text[idx + 7:])
        if nums:
            return nums[0]
    nums = numbers_in(text)
    return nums[-1] if nums else None


def score_numeric(predictions: Sequence[str], targets: Sequence[Any], tol: float = 1e-4) -> dict:
    """SVAMP / MAWPS: relative-or-absolute tolerance ``tol`` (``|p - t| <= tol * max(1, |t|)``)."""
    _check(predictions, targets)
    hits = unparsed = 0
    for p, t in zip(predictions, targets):
        gold = t if isinstance(t, (int, float)) else parse_numeric_answer(t)
        if gold is None:
            raise ValueError(f"gold answer without a number: {t!r}")
        v = parse_numeric_answer(p)
        if v is None:
            unparsed += 1
            continue
        hits += _close(v, float(gold), tol)
    return {"n": len(targets), "accuracy": _frac(hits, len(targets)), "unparsed": unparsed}


# ----------------------------------------------------------------------------- multiple choice

_ARC_PATTERNS = [
    re.compile(r"answer\s*(?:is)?\s*[:\-]?\s*\(?([A-E1-5])\b", re.IGNORECASE),
    re.compile(r"\(([A-E1-5])\)"),
    re.compile(r"^\s*([A-E1-5])\s*[).:]", re.MULTILINE),
    re.compile(r"^\s*([A-E1-5])\s*$", re.MULTILINE),
]


def parse_arc(text: str) -> str | None:
    for pat in _ARC_PATTERNS:
        m = pat.search(str(text))
        if m:
            c = m.group(1).upper()
            return "ABCDE"[int(c) - 1] if c.isdigit() else c
    return None


def score_arc(predictions: Sequence[str], targets: Sequence[str]) -> dict:
    _check(predictions, targets)
    hits = unparsed = 0
    for p, t in zip(predictions, targets):
        gold = parse_arc(t) or str(t).strip().upper()
        v = parse_arc(p)
        if v is None:
            unparsed += 1
            continue
        hits += v == gold
    return {"n": len(targets), "accuracy": _frac(hits, len(targets)), "unparsed": unparsed}


# one name per task, as `causal-attn annotate --task` spells them; "exact" for any file of input / target pairs
SCORERS = {"exact": score_stg_e, "stg_e": score_stg_e, "stg_h": score_stg_h, "gsm8k": score_gsm8k, "arc_e": score_arc,
           "svamp": score_numeric, "mawps": score_numeric}


def score(task: str, predictions: Sequence, targets: Sequence, **kw) -> dict:
    """Dispatch by task name (the keys of :data:`SCORERS`)."""
    if task not in SCORERS:
        raise ValueError(f"no scorer for task {task!r}; known: {', '.join(SCORERS)}")
    return SCORERS[task](predictions, targets, **kw)
