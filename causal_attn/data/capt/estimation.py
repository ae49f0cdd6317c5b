"""CAPT event estimation (SPEC section 6, step 1): the few-shot prompt for an assistant LLM, validation
of its answers, and :func:`estimate_events` (bounded re-asks and the resumable cache through
:func:`causal_attn.data.llm.run_jobs`). Imported through :mod:`causal_attn.data.capt`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Iterable, Sequence

from .intervention import (_BAD_PLACEHOLDER, FIELDS, PLACEHOLDER, make_assignment, phrase_of,
                                placeholder_names, render)


# ------------------------------------------------------------------------------- event estimation

ESTIMATION_TASK = (
    "You turn a reasoning problem into an abstract one. Find every event, entity, property or "
    "variable that the reasoning is about and replace each of them, everywhere it occurs in the "
    "question and in the answer, by a placeholder {symbol_1}, {symbol_2}, ... numbered in order of "
    "first appearance. Keep all other words, numbers and the logical structure exactly as they are. "
    "Reply with one JSON object and nothing else: the rewritten fields under their names and "
    "\"symbols\" mapping each placeholder name (without braces) to the exact phrase it replaced. "
    "No replaced phrase may remain anywhere in the rewritten text."
)
BINARY_NOTE = (
    " Each event here is binary: give each symbol as {\"phrase\": ..., \"set\": ..., \"unset\": ...} "
    "where set / unset describe the event being true / false in the original wording."
)

_DEMOS = [
    ({"input": "Every lorpus is a jompus. Alex is a lorpus. True or false: Alex is a jompus.\nAnswer:",
      "target": " Alex is a lorpus. Every lorpus is a jompus. So Alex is a jompus. <answer>True</answer>"},
     False,
     {"input": "Every {symbol_1} is a {symbol_2}. {symbol_3} is a {symbol_1}. True or false: {symbol_3} is a "
               "{symbol_2}.\nAnswer:",
      "target": " {symbol_3} is a {symbol_1}. Every {symbol_1} is a {symbol_2}. So {symbol_3} is a {symbol_2}. "
                "<answer>True</answer>",
      "symbols": {"symbol_1": "lorpus", "symbol_2": "jompus", "symbol_3": "Alex"}}),
    ({"input": "Rain causes wet grass. Among days with rain, the probability of wet grass is 80%. Among "
               "days without rain, it is 20%. Does rain raise the chance of wet grass?\nAnswer:",
      "target": " <answer>Yes</answer>"},
     True,
     {"input": "{symbol_1} causes {symbol_2}. Among days with {symbol_1}, the probability of {symbol_2} is 80%. "
               "Among days without {symbol_1}, it is 20%. Does {symbol_1} raise the chance of {symbol_2}?"
               "\nAnswer:",
      "target": " <answer>Yes</answer>",
      "symbols": {"symbol_1": {"phrase": "rain", "set": "it rains", "unset": "it does not rain"},
                  "symbol_2": {"phrase": "wet grass", "set": "the grass is wet", "unset": "the grass is dry"}}}),
]


def _sample_block(fields: dict) -> str:
    return json.dumps(fields, ensure_ascii=False, indent=1)


def estimation_messages(fields: dict, binary: bool = False) -> list[dict]:
    """Few-shot chat messages asking for the abstraction of ``fields`` (name -> text)."""
    system = ESTIMATION_TASK + (BINARY_NOTE if binary else "")
    messages = [{"role": "system", "content": system}]
    for demo_fields, demo_binary, answer in _DEMOS:
        if demo_binary != binary:
            continue
        messages.append({"role": "user", "content": "Abstract this sample:\n" + _sample_block(demo_fields)})
        messages.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
    messages.append({"role": "user", "content": "Abstract this sample:\n" + _sample_block(fields)})
    return messages


def _word_pattern(phrase: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(phrase.strip()) + r"(?!\w)", re.IGNORECASE)


def validate_estimation(text: str, job: dict) -> dict:
    """Parse and check one estimation answer; raises ``ValueError(reason)`` when it is unusable.

    Rejected: no JSON object; a field missing or not a string; ``symbols`` missing or empty; a
    placeholder that is malformed, unmapped, or mapped but never used; an empty or repeated phrase;
    binary entries without ``set`` / ``unset``; a phrase (or set / unset wording) that does not occur
    in the sample or still occurs in the rewritten text. Returns ``{"templates", "symbols",
    "roundtrip"}`` where ``roundtrip`` says whether mode ``original`` restores the sample exactly.
    """
    from causal_attn.data.llm import extract_json

    obj = extract_json(text)
    if not isinstance(obj, dict):
        raise ValueError("the answer is not a JSON object")
    source = job["fields"]
    templates = {}
    for f in source:
        if not isinstance(obj.get(f), str):
            raise ValueError(f"field {f!r} missing or not a string")
        templates[f] = obj[f]
        stripped = PLACEHOLDER.sub("", obj[f])
        bad = _BAD_PLACEHOLDER.search(stripped)
        if bad:
            raise ValueError(f"malformed placeholder {bad.group(0)!r} in {f!r}")
    symbols = obj.get("symbols")
    if not isinstance(symbols, dict) or not symbols:
        raise ValueError("'symbols' missing or empty")
    used = set(placeholder_names(*templates.values()))
    keys = {k.strip("{}") for k in symbols}
    if len(keys) != len(symbols) or not all(PLACEHOLDER.fullmatch("{" + k + "}") for k in keys):
        raise ValueError(f"symbol names must be symbol_1, symbol_2, ...: got {sorted(symbols)}")
    if used != keys:
        raise ValueError(f"placeholders {sorted(used)} do not match the mapping {sorted(keys)}")
    symbols = {k.strip("{}"): v for k, v in symbols.items()}
    original_text = " ".join(source.values())
    rewritten = " ".join(PLACEHOLDER.sub(" ", t) for t in templates.values())
    seen = set()
    for name, entry in symbols.items():
        if job.get("binary"):
            if not (isinstance(entry, dict) and all(isinstance(entry.get(w), str) and entry[w].strip()
                                                    for w in ("phrase", "set", "unset"))):
                raise ValueError(f"{name}: binary events need non-empty 'phrase', 'set' and 'unset'")
            wordings = [entry["phrase"], entry["set"], entry["unset"]]
        else:
            if isinstance(entry, dict):
                entry = entry.get("phrase")
            if not isinstance(entry, str) or not entry.strip():
                raise ValueError(f"{name}: the phrase must be a non-empty string")
            symbols[name] = entry
            wordings = [entry]
        if phrase_of(symbols[name]).casefold() in seen:
            raise ValueError(f"{name}: phrase {phrase_of(symbols[name])!r} is mapped twice")
        seen.add(phrase_of(symbols[name]).casefold())
        if not any(_word_pattern(w).search(original_text) for w in wordings):
            raise ValueError(f"{name}: {phrase_of(symbols[name])!r} does not occur in the sample")
        for w in wordings:
            if _word_pattern(w).search(rewritten):
                raise ValueError(f"{name}: the phrase {w!r} still occurs in the abstracted text")
    assignment = make_assignment(sorted(keys), "original", mapping=symbols)
    roundtrip = all(render(templates[f], assignment).text == source[f] for f in source)
    return {"templates": templates, "symbols": symbols, "roundtrip": roundtrip}


@dataclasses.dataclass
class EstimationReport:
    """Counts of one estimation run (``accepted + rejected + errors == samples``)."""
    samples: int = 0
    accepted: int = 0
    accepted_after_retry: int = 0   # accepted, but only after at least one re-ask
    retried: int = 0                # samples that needed at least one re-ask (accepted or not)
    re_asks: int = 0                # invalid answers that were sent back with the reason
    rejected: int = 0               # still invalid after max_attempts; cached with the reason
    errors: int = 0                 # transport failures; not cached, retried on the next run
    cached: int = 0
    roundtrip: int = 0              # accepted samples that mode 'original' restores exactly
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasons: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        return (f"{self.samples} samples: {self.accepted} accepted ({self.accepted_after_retry} after a retry), "
                f"{self.retried} retried, {self.rejected} rejected, {self.errors} transport errors, "
                f"{self.cached} from cache; {self.requests} requests, {self.re_asks} re-asks; "
                f"{self.roundtrip} exact round trips")


def estimate_events(samples: Iterable[dict], client, cache, *, fields: Sequence[str] = FIELDS,
                    binary: bool | None = None, max_attempts: int = 3, progress: bool = False):
    """Estimate events for every sample through ``client`` with validation, retry and the cache.

    ``binary=None`` asks for set / unset descriptions on CLadder samples (``source == "cladder"``).
    Returns ``(estimated, report)``: the accepted samples with a ``capt`` field added (rejected and
    failed ones are left out and counted), and an :class:`EstimationReport`.
    """
    from causal_attn.data.llm import run_jobs

    samples = list(samples)
    jobs = []
    for i, s in enumerate(samples):
        missing = [f for f in fields if not isinstance(s.get(f), str)]
        if missing:
            raise ValueError(f"sample {s.get('id', i)!r} lacks text field(s) {missing}")
        is_binary = (s.get("source") == "cladder") if binary is None else bool(binary)
        jobs.append({"id": s.get("id", i), "fields": {f: s[f] for f in fields}, "binary": is_binary})
    run = run_jobs(client, cache, jobs, lambda j: estimation_messages(j["fields"], j["binary"]),
                   validate_estimation, max_attempts=max_attempts, desc="capt estimate", progress=progress)
    report = EstimationReport(samples=len(samples), errors=run.errors, cached=run.cached, re_asks=run.invalid_retries,
                              requests=run.requests, prompt_tokens=run.prompt_tokens,
                              completion_tokens=run.completion_tokens)
    reasons = collections.Counter()
    estimated = []
    for sample, rec in zip(samples, run.records):
        if rec is None:
            continue
        if rec.get("attempts", 1) > 1:
            report.retried += 1
        if rec["status"] != "ok":
            report.rejected += 1
            reasons[_reason_kind(rec.get("reason") or "")] += 1
            continue
        report.accepted += 1
        report.accepted_after_retry += rec.get("attempts", 1) > 1
        report.roundtrip += bool(rec["result"].get("roundtrip"))
        estimated.append({**sample, "capt": rec["result"]})
    report.reasons = dict(reasons)
    return estimated, report


def _reason_kind(reason: str) -> str:
    for kind in ("still occurs", "do not match", "malformed placeholder", "does not occur", "JSON",
                 "mapped twice", "binary"):
        if kind.lower() in reason.lower():
            return kind
    return reason[:40]
