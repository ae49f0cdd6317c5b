"""CAPT: causality-aware post-training by symbolic intervention on events (SPEC section 6).

Pipeline
--------
1. **Event estimation** (:func:`estimate_events`): an assistant LLM rewrites each sample, replacing
   every event / entity by ``{symbol_1}``, ``{symbol_2}``, ... and returns the mapping symbol ->
   replaced phrase (for binary-event tasks such as CLadder also a ``set`` / ``unset`` description).
   Answers are validated (:func:`validate_estimation`) and re-asked a bounded number of times through
   :func:`causal_attn.data.llm.run_jobs`, which also writes every result to the resumable cache.
2. **Intervention** (:func:`symbolize`, :func:`symbolize_sample`): placeholders become fresh distinct
   letters (``random``), ``A, B, C`` by symbol number (``order``, the paper's ablation), the estimated
   phrases (``original``) or stay as they are (``symbol``). One assignment serves every field of a
   sample (prompt and target / reasoning alike). :func:`replicate` makes ``k`` copies of a training
   set, each with new letters.
3. **Data**: loaders for the CLadder (Yes/No) and PrOntoQA (True/False) record formats, their
   commonsense / anti-commonsense / non-sense variants, the answer parser and accuracy per variant.
4. **CAT composition**: a causal annotation (``important``: ``[{key_span: [value_span, ...]}]`` over
   ``input + target``) is re-located through the substitution by character offsets, so the sample
   still feeds :func:`causal_attn.data.annotations_to_graph` (:func:`capt_graph`).

Symbol names beyond 26 (documented extension): a sample with ``n > 26`` placeholders gets all 26
single letters plus ``n - 26`` distinct two-letter names ``AA .. ZZ`` (then three letters, ...),
drawn uniformly within each length and shuffled over the placeholders. ``order`` mode continues
``Z, AA, AB, ...`` (bijective base 26).
"""
from __future__ import annotations

import bisect
import collections
import csv
import dataclasses
import itertools
import json
import os
import random
import re
import string
from typing import Any, Iterable, Sequence

FIELDS = ("input", "target")          # the record fields symbolised together (the CAT data layout)
MODES = ("random", "order", "original", "symbol")
VARIANTS = ("commonsense", "anticommonsense", "nonsense")
CHOICES = {"cladder": ("yes", "no"), "prontoqa": ("true", "false")}

PLACEHOLDER = re.compile(r"\{(symbol_([1-9][0-9]*))\}")
# anything brace-delimited that mentions "symbol" but is not a well-formed placeholder
_BAD_PLACEHOLDER = re.compile(r"\{[^{}]*symbol[^{}]*\}", re.IGNORECASE)
_LETTERS = string.ascii_uppercase
_MAX_LENGTH = 3  # names up to three letters: 26 + 676 + 17576 distinct symbols per sample


# ------------------------------------------------------------------------------- symbol names

def placeholder_names(*templates: str) -> list[str]:
    """Distinct placeholder names (``symbol_3``) in the templates, sorted by symbol number."""
    names = {m.group(1): int(m.group(2)) for t in templates for m in PLACEHOLDER.finditer(t)}
    return sorted(names, key=names.get)


def ordered_symbol(i: int) -> str:
    """The ``i``-th (0-based) name in bijective base 26: A .. Z, AA, AB, .. ZZ, AAA, ..."""
    if i < 0:
        raise ValueError("symbol index must be >= 0")
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = _LETTERS[r] + out
    return out


def random_symbols(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct names, uniform over A-Z when ``n <= 26`` (see the module doc for more)."""
    if n > sum(26 ** k for k in range(1, _MAX_LENGTH + 1)):
        raise ValueError(f"{n} placeholders in one sample: more than the supported symbol names")
    names: list[str] = []
    length = 1
    while len(names) < n:
        pool = ["".join(p) for p in itertools.product(_LETTERS, repeat=length)]
        names += rng.sample(pool, min(n - len(names), len(pool)))
        length += 1
    if length > 2:  # mixed lengths: which placeholder gets a longer name is random too
        rng.shuffle(names)
    return names


def _rng(seed) -> random.Random:
    return seed if isinstance(seed, random.Random) else random.Random(seed)


def phrase_of(entry: Any) -> str:
    """The replaced phrase of a mapping entry (a string or ``{"phrase", "set", "unset"}``)."""
    return entry["phrase"] if isinstance(entry, dict) else entry


def make_assignment(names: Sequence[str], mode: str = "random", seed=None, *,
                    mapping: dict | None = None) -> dict[str, str]:
    """Placeholder name -> the string put in its place, for ``mode`` in :data:`MODES`."""
    if mode == "random":
        return dict(zip(names, random_symbols(len(names), _rng(seed))))
    if mode == "order":
        by_number = sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]))
        return {name: ordered_symbol(i) for i, name in enumerate(by_number)}
    if mode == "original":
        if mapping is None:
            raise ValueError("mode 'original' needs the mapping symbol -> phrase")
        missing = [n for n in names if n not in mapping]
        if missing:
            raise ValueError(f"mode 'original': no phrase for {', '.join(missing)}")
        return {n: phrase_of(mapping[n]) for n in names}
    if mode == "symbol":
        return {n: "{" + n + "}" for n in names}
    raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")


# ------------------------------------------------------------------------------- rendering

@dataclasses.dataclass
class Rendering:
    """A template with its placeholders filled: ``spans`` holds ``(name, start, end)`` in ``text``."""
    text: str
    spans: list


def render(template: str, assignment: dict[str, str]) -> Rendering:
    """Replace every ``{symbol_n}`` by ``assignment[name]`` (other braces are left alone)."""
    parts, spans, pos, out_len = [], [], 0, 0
    for m in PLACEHOLDER.finditer(template):
        literal = template[pos:m.start()]
        parts.append(literal)
        out_len += len(literal)
        value = assignment[m.group(1)]
        spans.append((m.group(1), out_len, out_len + len(value)))
        parts.append(value)
        out_len += len(value)
        pos = m.end()
    parts.append(template[pos:])
    return Rendering("".join(parts), spans)


def symbolize(template: str, mode: str = "random", seed=None, *, mapping: dict | None = None):
    """Fill ``template``'s placeholders; returns ``(text, assignment)`` (SPEC section 3).

    ``seed`` is an int (deterministic), ``None`` (fresh randomness) or a ``random.Random`` to draw
    from. ``mapping`` (symbol -> phrase) is needed for ``mode="original"``.
    """
    assignment = make_assignment(placeholder_names(template), mode, seed, mapping=mapping)
    return render(template, assignment).text, assignment


class _OffsetMap:
    """Maps character ranges between two renderings of the same template.

    Literal text maps one-to-one; a range touching a placeholder's value grows to the whole value.
    """

    def __init__(self, a: Rendering, b: Rendering):
        if [s[0] for s in a.spans] != [s[0] for s in b.spans]:
            raise ValueError("renderings of different templates")
        self.a_starts = [s[1] for s in a.spans]
        self.a, self.b = a.spans, b.spans

    def _locate(self, p: int):
        """Index of the last placeholder starting at or before ``p`` (or -1)."""
        return bisect.bisect_right(self.a_starts, p) - 1

    def start(self, p: int) -> int:
        k = self._locate(p)
        if k >= 0 and p < self.a[k][2]:
            return self.b[k][1]
        shift = (self.b[k][2] - self.a[k][2]) if k >= 0 else 0
        return p + shift

    def end(self, e: int) -> int:
        k = self._locate(e - 1)
        if k >= 0 and e - 1 < self.a[k][2]:
            return self.b[k][2]
        shift = (self.b[k][2] - self.a[k][2]) if k >= 0 else 0
        return e + shift


def _occurrences(text: str, needle: str) -> list[int]:
    out, i = [], text.find(needle)
    while needle and i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out


def relocate_annotations(important: list, original: Rendering, new: Rendering) -> tuple[list, dict]:
    """Move a CAT annotation from the ``original`` rendering to ``new`` (same template).

    Every occurrence of each span string in the original text is mapped by offsets; the span in the
    new text is the covered substring (a span that touches part of a replaced phrase takes the whole
    symbol). Span strings written over the template (holding ``{symbol_n}``) are rendered directly.
    Returns ``(annotations, stats)``; ``stats`` counts ``missing`` spans (not in the original text)
    and ``ambiguous`` ones (the new string occurs more often in the new text than the old one did in
    the old text, e.g. a lone letter that also appears as a word).
    """
    omap = _OffsetMap(original, new)
    assignment = {name: new.text[s:e] for name, s, e in new.spans}
    stats = collections.Counter(missing=0, ambiguous=0)

    def move(span: str) -> list[str]:
        if PLACEHOLDER.search(span):
            moved = [render(span, assignment).text]
            base = 1
        else:
            starts = _occurrences(original.text, span)
            if not starts:
                stats["missing"] += 1
                return []
            moved = list(dict.fromkeys(new.text[omap.start(s):omap.end(s + len(span))] for s in starts))
            base = len(starts)
        if sum(len(_occurrences(new.text, m)) for m in moved) > base:
            stats["ambiguous"] += 1
        return moved

    out = []
    for entry in important or []:
        for key, values in entry.items():
            new_values = list(dict.fromkeys(v2 for v in values for v2 in move(v)))
            for key2 in move(key):
                if new_values:
                    out.append({key2: new_values})
    return out, dict(stats)


# ------------------------------------------------------------------------------- samples

def _templates(sample: dict, fields: Sequence[str]) -> tuple[dict, dict]:
    capt = sample.get("capt")
    if isinstance(capt, str):  # stored as JSON text (e.g. in a datasets.Dataset column)
        capt = json.loads(capt)
    if not isinstance(capt, dict) or "symbols" not in capt:
        raise ValueError(f"sample {sample.get('id')!r} has no event estimation ('capt' field)")
    return {f: capt["templates"][f] for f in fields}, capt["symbols"]


def symbolize_sample(sample: dict, mode: str = "random", seed=None, *, fields: Sequence[str] = FIELDS) -> dict:
    """A new record with every field in ``fields`` rendered under ONE assignment.

    ``sample["capt"]`` is the estimation (``{"templates": {field: text}, "symbols": {...}}``). The
    record keeps the other fields, gains ``capt_mode`` and ``capt_assignment``, and an ``important``
    annotation (over the original text) is re-located to the new text, with ``capt_span_stats``.
    """
    templates, symbols = _templates(sample, fields)
    names = placeholder_names(*templates.values())
    assignment = make_assignment(names, mode, seed, mapping=symbols)
    out = {k: v for k, v in sample.items() if k != "capt"}
    for f in fields:
        out[f] = render(templates[f], assignment).text
    out["capt_mode"] = mode
    out["capt_assignment"] = assignment
    if sample.get("important"):
        joined = "".join(templates[f] for f in fields)
        original = render(joined, make_assignment(names, "original", mapping=symbols))
        out["important"], out["capt_span_stats"] = relocate_annotations(
            sample["important"], original, render(joined, assignment))
    return out


def replicate(samples, k: int, *, seed=0, mode: str = "random", fields: Sequence[str] = FIELDS):
    """``k`` copies of a training set, each sample with a fresh assignment per copy.

    Copy-major order (copy 0 of every sample, then copy 1, ...); each record gains ``capt_copy``.
    Deterministic for an int ``seed``. A ``datasets.Dataset`` in gives a ``datasets.Dataset`` out.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    rows = samples.to_list() if hasattr(samples, "to_list") else list(samples)
    rng = _rng(seed)
    out = []
    for copy in range(k):
        for s in rows:
            rec = symbolize_sample(s, mode, rng, fields=fields)
            rec["capt_copy"] = copy
            out.append(rec)
    if hasattr(samples, "to_list"):
        import datasets
        return datasets.Dataset.from_list(out)
    return out


def fresh_symbols_transform(mode: str = "random", seed=None, *, fields: Sequence[str] = FIELDS):
    """A ``datasets`` transform (``Dataset.set_transform``) that symbolises rows each time they are
    read, so every epoch sees new letters. Rows need the ``capt`` estimation (a dict or JSON text);
    ``seed`` seeds one stream shared by all reads."""
    rng = _rng(seed)

    def transform(batch: dict) -> dict:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [symbolize_sample(r, mode, rng, fields=fields) for r in rows]
        return {k: [o.get(k) for o in out] for k in out[0]} if out else {}
    return transform


def capt_graph(record: dict, tokenizer, *, fields: Sequence[str] = FIELDS, **options):
    """Token adjacency of a symbolised record: a thin call to ``annotations_to_graph``.

    Fuzzy and case-insensitive span matching are off by default: a symbol ``A`` must not match the
    word ``a``.
    """
    from causal_attn.data import annotations_to_graph
    options.setdefault("fuzzy", False)
    options.setdefault("case_insensitive", False)
    text = "".join(record[f] for f in fields)
    return annotations_to_graph(text, record.get("important") or [], tokenizer, **options)


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
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [(i, json.loads(line)) for i, line in enumerate(f) if line.strip()]
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
