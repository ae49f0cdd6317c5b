"""CAPT data sets and scoring (SPEC section 6, step 3): CLadder and PrOntoQA loaders with their
commonsense / anti-commonsense / non-sense variants, the answer parser and accuracy per variant.
Imported through :mod:`causal_attn.data.capt`.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
import re
from typing import Sequence

from ..jsonl import numbered_jsonl
from .intervention import FIELDS

VARIANTS = ("commonsense", "anticommonsense", "nonsense")
CHOICES = {"cladder": ("yes", "no"), "prontoqa": ("true", "false")}


# ------------------------------------------------------------------------------- data loaders

@dataclasses.dataclass
class Loaded:
    """Records read from a file, and the reasons for records skipped as unusable."""
    records: list
    skipped: list

    def __len__(self) -> int:
        return len(self.records)


def normalize_variant(name: str | None) -> str | None:
    """Map spellings (``anti-commonsense``, ``non-sense``, ``noncommonsense``, ``fictional`` ...) to
    one of :data:`VARIANTS`; ``None`` stays ``None``."""
    if name is None:
        return None
    key = re.sub(r"[^a-z]", "", name.lower())
    aliases = {"commonsense": "commonsense", "true": "commonsense", "trueontology": "commonsense",
               "anticommonsense": "anticommonsense", "false": "anticommonsense",
               "falseontology": "anticommonsense", "nonsense": "nonsense", "noncommonsense": "nonsense",
               "fictional": "nonsense", "fictionalontology": "nonsense"}
    if key not in aliases:
        raise ValueError(f"unknown test variant {name!r}; expected one of {', '.join(VARIANTS)}")
    return aliases[key]


def _variant_from_path(path: str) -> str | None:
    """The variant named in a file name (CLadder and PrOntoQA releases name them there)."""
    base = re.sub(r"[^a-z]", "", os.path.basename(path).lower())
    for word, variant in (("anticommonsense", "anticommonsense"), ("noncommonsense", "nonsense"),
                          ("nonsense", "nonsense"), ("fictional", "nonsense"), ("commonsense", "commonsense"),
                          ("falseontology", "anticommonsense"), ("trueontology", "commonsense")):
        if word in base:
            return variant
    return None


def _read_rows(path: str):
    """Rows of a ``.json`` (list, or dict of id -> row), ``.jsonl`` or ``.csv`` file, with ids."""
    if path.endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            return list(enumerate(csv.DictReader(f)))
    if path.endswith(".jsonl"):
        return [(n - 1, row) for n, row in numbered_jsonl(path).records]  # ids count lines from 0
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return list(data.items()) if isinstance(data, dict) else list(enumerate(data))


def _answer_word(value, choices) -> str | None:
    if isinstance(value, bool):
        value = "true" if value else "false"
    word = str(value).strip().lower() if value is not None else ""
    return word if word in choices else None


def _with_answer(word: str) -> str:
    return f" <answer>{word.capitalize()}</answer>"


def load_cladder(path: str, variant: str | None = None) -> Loaded:
    """CLadder records (Yes/No causal questions) from the release formats.

    v1 JSON (a list of ``{question_id, desc_id, given_info, question, answer, meta, reasoning}``)
    and v1.5 CSV / JSONL rows (``id, prompt, label`` or ``given_info, question, answer``). The
    variant comes from ``variant``, else a ``variant`` column, else the file name
    (``commonsense`` / ``anticommonsense`` / ``noncommonsense``). Output records:
    ``{id, source, variant, input, target, answer, meta}``; ``target`` is `` <answer>Yes</answer>``.
    """
    default = normalize_variant(variant) if variant else _variant_from_path(path)
    records, skipped = [], []
    for idx, row in _read_rows(path):
        rid = row.get("question_id", row.get("id", idx)) if isinstance(row, dict) else idx
        if not isinstance(row, dict):
            skipped.append(f"{rid}: not a record")
            continue
        answer = _answer_word(row.get("answer", row.get("label")), CHOICES["cladder"])
        if row.get("given_info") and row.get("question"):
            context, question = str(row["given_info"]).strip(), str(row["question"]).strip()
            text = f"{context}\nQuestion: {question}\nAnswer:"
        elif row.get("prompt"):
            text = str(row["prompt"]).rstrip() + "\nAnswer:"
        else:
            skipped.append(f"{rid}: no given_info/question or prompt")
            continue
        if answer is None:
            skipped.append(f"{rid}: answer {row.get('answer', row.get('label'))!r} is not yes/no")
            continue
        meta = {k: v for k, v in row.items() if k in ("desc_id", "meta", "rung", "query_type", "phenomenon")}
        records.append({"id": rid, "source": "cladder",
                        "variant": normalize_variant(row.get("variant")) if row.get("variant") else default,
                        "input": text, "target": _with_answer(answer), "answer": answer, "meta": meta})
    return Loaded(records, skipped)


def load_prontoqa(path: str, variant: str | None = None, *, include_in_context: bool = False) -> Loaded:
    """PrOntoQA records (True/False deduction) from the release format.

    A JSON dict ``{"example1": {"in_context_example0": {...}, ..., "test_example": {"question",
    "query", "chain_of_thought", "answer"}}, ...}``; ``include_in_context`` also yields the
    in-context examples (as training material). Ids are ``<file stem>:<example key>`` (unique across
    the variant files). The variant comes from ``variant`` or the file name
    (``true`` / ``false`` / ``fictional`` ontology -> commonsense / anticommonsense / nonsense).
    ``target`` is the chain of thought followed by `` <answer>True</answer>``.
    """
    default = normalize_variant(variant) if variant else _variant_from_path(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    records, skipped = [], []
    for ex_id, problem in _read_rows(path):
        if not isinstance(problem, dict):
            skipped.append(f"{ex_id}: not a record")
            continue
        parts = [(k, v) for k, v in problem.items()
                 if k == "test_example" or (include_in_context and k.startswith("in_context_example"))]
        if not parts:
            skipped.append(f"{ex_id}: no test_example")
        for part, ex in parts:
            rid = f"{stem}:{ex_id}" + ("" if part == "test_example" else f"/{part}")
            answer = _answer_word(ex.get("answer") if isinstance(ex, dict) else None, CHOICES["prontoqa"])
            if answer is None or not ex.get("question") or not ex.get("query"):
                skipped.append(f"{rid}: needs question, query and a True/False answer")
                continue
            cot = ex.get("chain_of_thought") or []
            reasoning = " ".join(cot) if isinstance(cot, list) else str(cot)
            target = (" " + reasoning if reasoning else "") + _with_answer(answer)
            records.append({"id": rid, "source": "prontoqa", "variant": default,
                            "input": f"{ex['question'].strip()} {ex['query'].strip()}\nAnswer:",
                            "target": target, "answer": answer, "meta": {"split": part}})
    return Loaded(records, skipped)


def _guess_kind(path: str) -> str:
    """``prontoqa`` / ``cladder`` / ``jsonl`` from the first record's fields."""
    first = next((row for _, row in _read_rows(path) if isinstance(row, dict)), {})
    if "test_example" in first:
        return "prontoqa"
    if "input" in first and "target" in first:
        return "jsonl"
    if ("given_info" in first or "prompt" in first) and ("answer" in first or "label" in first):
        return "cladder"
    raise ValueError(f"{path}: cannot tell the record format; pass kind='cladder', 'prontoqa' or 'jsonl'")


def load_records(path: str, kind: str | None = None, variant: str | None = None) -> Loaded:
    """Dispatch on ``kind`` (``cladder`` / ``prontoqa`` / ``jsonl``), guessed from the first record.

    ``jsonl`` reads already prepared records (for example the output of ``capt estimate``) as they
    are; records without ``input`` / ``target`` strings are skipped and counted.
    """
    if kind is None:
        kind = _guess_kind(path)
    if kind == "cladder":
        return load_cladder(path, variant)
    if kind == "prontoqa":
        return load_prontoqa(path, variant)
    if kind != "jsonl":
        raise ValueError(f"unknown data kind {kind!r}")
    records, skipped = [], []
    for i, row in _read_rows(path):
        if isinstance(row, dict) and all(isinstance(row.get(f), str) for f in FIELDS):
            records.append(row)
        else:
            skipped.append(f"{i}: needs string fields {FIELDS}")
    return Loaded(records, skipped)


# ------------------------------------------------------------------------------- answers

_TAG = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)


def parse_answer(text: str | None, choices: Sequence[str] = ("yes", "no", "true", "false")) -> str | None:
    """The answer word (lower case) of a generation, or ``None``.

    The first ``<answer>...</answer>`` whose content holds one of ``choices`` wins (its first such
    word); otherwise the first of ``choices`` anywhere in the text as a whole word.
    """
    if not text:
        return None
    word = re.compile(r"\b(" + "|".join(map(re.escape, choices)) + r")\b", re.IGNORECASE)
    for m in _TAG.finditer(text):
        hit = word.search(m.group(1))
        if hit:
            return hit.group(1).lower()
    hit = word.search(text)
    return hit.group(1).lower() if hit else None


def accuracy_by_variant(records: Sequence[dict], generations: Sequence[str]) -> dict:
    """``{variant: {"n", "correct", "unparsed", "accuracy"}}`` plus ``"all"``.

    Each record needs ``answer``; ``variant`` missing -> ``"unknown"``. The answer word set is the
    record's source's (yes/no for CLadder, true/false for PrOntoQA), all four otherwise.
    """
    if len(records) != len(generations):
        raise ValueError(f"{len(records)} records but {len(generations)} generations")
    table: dict = collections.defaultdict(lambda: {"n": 0, "correct": 0, "unparsed": 0})
    for rec, gen in zip(records, generations):
        choices = CHOICES.get(rec.get("source"), ("yes", "no", "true", "false"))
        pred = parse_answer(gen, choices)
        for key in (rec.get("variant") or "unknown", "all"):
            row = table[key]
            row["n"] += 1
            row["correct"] += pred is not None and pred == str(rec["answer"]).lower()
            row["unparsed"] += pred is None
    return {k: {**v, "accuracy": v["correct"] / v["n"]} for k, v in table.items()}
