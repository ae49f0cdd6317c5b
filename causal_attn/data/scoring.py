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
from typing import Any, Callable, Sequence

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


def _accuracy(answers: Sequence, targets: Sequence, gold_of: Callable, same: Callable) -> dict:
    """``n``, ``accuracy`` and ``unparsed`` of answers read from the predictions (None: none could be read,
    counted wrong) against ``gold_of(target)`` (which raises on a gold it cannot read)."""
    _check(answers, targets)
    hits = 0
    for v, t in zip(answers, targets):
        gold = gold_of(t)
        hits += v is not None and bool(same(v, gold))
    return {"n": len(targets), "accuracy": _frac(hits, len(targets)), "unparsed": sum(v is None for v in answers)}


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


def _gsm8k_gold(target: str) -> float:
    gold, _ = parse_gsm8k(target)
    if gold is None:
        raise ValueError(f"gold answer without a number: {str(target)[-80:]!r}")
    return gold


def score_gsm8k(predictions: Sequence[str], targets: Sequence[str], tol: float = 1e-6) -> dict:
    parsed = [parse_gsm8k(p) for p in predictions]
    out = _accuracy([v for v, _ in parsed], targets, _gsm8k_gold, lambda v, gold: _close(v, gold, tol))
    return {**out, "fallback": sum(fb for v, fb in parsed if v is not None)}


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


def _numeric_gold(target: Any) -> float:
    gold = target if isinstance(target, (int, float)) else parse_numeric_answer(target)
    if gold is None:
        raise ValueError(f"gold answer without a number: {target!r}")
    return float(gold)


def score_numeric(predictions: Sequence[str], targets: Sequence[Any], tol: float = 1e-4) -> dict:
    """SVAMP / MAWPS: relative-or-absolute tolerance ``tol`` (``|p - t| <= tol * max(1, |t|)``)."""
    return _accuracy([parse_numeric_answer(p) for p in predictions], targets, _numeric_gold,
                     lambda v, gold: _close(v, gold, tol))


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
    return _accuracy([parse_arc(p) for p in predictions], targets, lambda t: parse_arc(t) or str(t).strip().upper(),
                     lambda v, gold: v == gold)


# one name per task, as `causal-attn annotate --task` spells them; "exact" for any file of input / target pairs
SCORERS = {"exact": score_stg_e, "stg_e": score_stg_e, "stg_h": score_stg_h, "gsm8k": score_gsm8k, "arc_e": score_arc,
           "svamp": score_numeric, "mawps": score_numeric}


def score(task: str, predictions: Sequence, targets: Sequence, **kw) -> dict:
    """Dispatch by task name (the keys of :data:`SCORERS`)."""
    if task not in SCORERS:
        raise ValueError(f"no scorer for task {task!r}; known: {', '.join(SCORERS)}")
    return SCORERS[task](predictions, targets, **kw)
