"""Token-level, row-aligned adjacency from word-level causal annotations (SPEC §4).

Algorithm of :func:`annotations_to_graph`:

1. Tokenise the full text once with ``return_offsets_mapping=True`` (any HF fast tokenizer; special
   tokens such as BOS get the empty offset ``(0, 0)`` and never match a span; chat-template text
   works because offsets refer to the final string).
2. Locate every occurrence of each span (stripped) in the text, in NFC form (a map sends NFC indices
   back to the original characters, so decomposed accents in the text still match). The first rule
   that finds anything wins, and its kind is counted:
   ``exact`` (occurrences on word boundaries; if none, occurrences inside words),
   ``case`` (the same, case-insensitive), ``fuzzy`` (optional, on by default; see :func:`fuzzy_find`).
   Spans found by no rule are listed in ``missing``.
3. A character range maps to the tokens whose offsets overlap it (``a < end and b > start``), so a
   token's leading space and a character split over several byte tokens are both covered.
4. For every key occurrence (tokens ``ks .. ke-1``) and every value occurrence (tokens
   ``vs .. ve-1``) whose characters end before the key's start, set rows ``ks-1 .. ke-2`` (the rows
   that predict the key's tokens: the paper's shift by one) and columns ``vs .. ve-1``; edges with
   ``col > row`` or a negative row are dropped.

Malformed annotations (a value that is a string instead of a list, nested dicts, non-string spans)
are normalised or skipped and counted in ``counts["malformed"]``; one bad sample never stops a run.

For training, :func:`encode_example` / :func:`encode_batch` (``datasets.map(batched=True)``) give per
record ``input_ids``, ``labels`` (prompt tokens ``-100``), ``attention_mask`` and ``edges`` (list of
``[row, col]``); :class:`causal_attn.data.collate.CATCollator` pads a list of such records into tensors plus a
:class:`~causal_attn.CausalGraph` under ``"adjacency"``.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
import unicodedata
from typing import Any, Iterable, Iterator

MATCH_KINDS = ("exact", "case", "fuzzy")
_WORD = re.compile(r"\w+|[^\w\s]")


# ----------------------------------------------------------------------------- annotations

def iter_annotation_pairs(annotations: Any, counts: collections.Counter | None = None) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(key, [values])`` from a list of ``{key: [values]}`` dicts (or its JSON string),
    tolerating the shapes assistant LLMs produce (one dict with several keys, a bare string value,
    a nested dict)."""
    counts = counts if counts is not None else collections.Counter()
    if isinstance(annotations, str):  # the JSON-string column of causal_attn.data.stg.as_dataset
        try:
            annotations = json.loads(annotations)
        except ValueError:
            counts["malformed"] += 1
            return
    if isinstance(annotations, dict):
        annotations = [annotations]
    if not isinstance(annotations, (list, tuple)):
        if annotations is not None:
            counts["malformed"] += 1
        return
    for item in annotations:
        if not isinstance(item, dict):
            counts["malformed"] += 1
            continue
        for key, values in item.items():
            if isinstance(values, str):
                values = [values]
            elif isinstance(values, dict):  # {outer: {inner: [...]}}: keep the inner pairs
                counts["malformed"] += 1
                yield from iter_annotation_pairs(values, counts)
                continue
            elif not isinstance(values, (list, tuple)):
                counts["malformed"] += 1
                continue
            good = [v for v in values if isinstance(v, str)]
            if len(good) < len(values):
                counts["malformed"] += len(values) - len(good)
            if isinstance(key, str):
                yield key, good


# ----------------------------------------------------------------------------- locating spans

class NormalizedText:
    """NFC form of a text with a map from each NFC character back to original character ranges."""

    def __init__(self, text: str):
        self.original = text
        self._words = None
        if unicodedata.is_normalized("NFC", text):
            self.text = text
            self._start = self._end = None
            return
        pieces, starts, ends = [], [], []
        i = 0
        while i < len(text):  # cluster = base char + following combining marks, normalised together
            j = i + 1
            while j < len(text) and unicodedata.combining(text[j]):
                j += 1
            norm = unicodedata.normalize("NFC", text[i:j])
            pieces.append(norm)
            starts.extend([i] * len(norm))
            ends.extend([j] * len(norm))
            i = j
        self.text = "".join(pieces)
        self._start, self._end = starts, ends

    @property
    def words(self) -> list[tuple[str, int, int]]:
        """Canonical words of the NFC text (for fuzzy matching), computed once."""
        if self._words is None:
            self._words = _canonical_words(self.text)
        return self._words

    def to_original(self, start: int, end: int) -> tuple[int, int]:
        if self._start is None:
            return start, end
        return self._start[start], self._end[end - 1]


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _occurrences(text: str, span: str, flags: int) -> list[tuple[int, int]]:
    """All (overlapping) occurrences; those on word boundaries if any, else all of them."""
    found, pos = [], 0
    if not flags:
        while (s := text.find(span, pos)) >= 0:
            found.append((s, s + len(span)))
            pos = s + 1
    else:
        pat = re.compile(re.escape(span), flags)
        while m := pat.search(text, pos):
            found.append((m.start(), m.end()))
            pos = m.start() + 1
    def on_boundary(s, e):
        left_ok = s == 0 or not (_is_word_char(text[s - 1]) and _is_word_char(text[s]))
        right_ok = e == len(text) or not (_is_word_char(text[e - 1]) and _is_word_char(text[e]))
        return left_ok and right_ok
    bounded = [(s, e) for s, e in found if on_boundary(s, e)]
    return bounded or found


def _near_word(a: str, b: str) -> bool:
    """Inflection-level difference between two alphabetic words: has/have, plant/planted."""
    if not (a.isalpha() and b.isalpha()):
        return False
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    return p >= 2 and min(len(a), len(b)) >= 3 and len(a) - p <= 3 and len(b) - p <= 3


_CURRENCY = frozenset("$€£¥")


def _canonical_words(s: str) -> list[tuple[str, int, int]]:
    """Casefolded words with character ranges; currency symbols dropped and thousands separators
    joined (``$1,000`` -> ``1000``), so money written two ways still aligns."""
    out: list[tuple[str, int, int]] = []
    currency_at = None  # a dropped currency symbol still belongs to the amount's character range
    for m in _WORD.finditer(s):
        w = m.group().casefold()
        if w in _CURRENCY:
            currency_at = m.start()
            continue
        start, currency_at = (m.start() if currency_at is None else currency_at), None
        if (w.isdigit() and len(w) == 3 and len(out) >= 2 and out[-1][0] == ","
                and out[-2][0].isdigit() and out[-1][1] == out[-2][2] and m.start() == out[-1][2]):
            out.pop()
            prev = out.pop()
            out.append((prev[0] + w, prev[1], m.end()))
            continue
        out.append((w, start, m.end()))
    return out


def fuzzy_find(text: "str | NormalizedText", span: str) -> list[tuple[int, int]]:
    """Conservative fuzzy match. Both sides become casefolded words (``\\w+`` or one punctuation
    mark; whitespace ignored, so ``$ 6`` matches ``$6``; currency symbols and thousands separators
    ignored). The span's words must align one-to-one with consecutive words of the text, all equal
    except at most ``max(1, n // 3)`` alphabetic words that differ only by an inflection-length
    suffix (``Mom have`` for ``Mom has``); one-word spans may differ in nothing. Numbers and
    punctuation must always be equal."""
    sw = [w for w, _, _ in _canonical_words(span)]
    n = len(sw)
    if n == 0:
        return []
    tw = text.words if isinstance(text, NormalizedText) else _canonical_words(text)
    allowed = max(1, n // 3) if n >= 2 else 0
    out = []
    for i in range(len(tw) - n + 1):
        near = 0
        for j in range(n):
            w = tw[i + j][0]
            if w == sw[j]:
                continue
            if _near_word(sw[j], w):
                near += 1
                if near <= allowed:
                    continue
            break
        else:
            out.append((tw[i][1], tw[i + n - 1][2]))
    return out


def locate(norm: NormalizedText, span: str, *, case_insensitive: bool = True,
           fuzzy: bool = True) -> tuple[str | None, list[tuple[int, int]]]:
    """``(kind, [(start, end), ...])`` in original-text characters; ``(None, [])`` if not found."""
    span = unicodedata.normalize("NFC", span.strip())
    if not span:
        return None, []
    rules = [("exact", lambda: _occurrences(norm.text, span, 0))]
    if case_insensitive:
        rules.append(("case", lambda: _occurrences(norm.text, span, re.IGNORECASE)))
    if fuzzy:
        rules.append(("fuzzy", lambda: fuzzy_find(norm, span)))
    for kind, rule in rules:
        occ = rule()
        if occ:
            return kind, [norm.to_original(s, e) for s, e in occ]
    return None, []


# ----------------------------------------------------------------------------- building edges

class TokenCover:
    """For each character, the tokens whose offsets cover it (built once per text). Offsets of
    special tokens ``(0, 0)`` cover nothing; byte-fallback pieces may share a character."""

    def __init__(self, offsets: list[tuple[int, int]], n_chars: int):
        self.first = [-1] * n_chars
        self.last = [-1] * n_chars
        spans = [(t, max(a, 0), min(b, n_chars)) for t, (a, b) in enumerate(offsets) if a < b]
        for t, a, b in spans:  # ascending: the largest covering token wins
            self.last[a:b] = [t] * (b - a)
        for t, a, b in reversed(spans):  # descending: the smallest covering token wins
            self.first[a:b] = [t] * (b - a)

    def token_range(self, start: int, end: int) -> tuple[int, int] | None:
        """``[first, last+1)`` of the tokens overlapping characters ``[start, end)``; None if none."""
        firsts = [t for t in self.first[start:end] if t >= 0]
        if not firsts:
            return None
        return min(firsts), max(self.last[start:end]) + 1


@dataclasses.dataclass
class AdjacencyResult:
    """Result of :func:`annotations_to_graph` for one text."""
    input_ids: list[int]
    edges: list[tuple[int, int]]          # row-aligned, col <= row, sorted, unique
    missing: list[str]                    # span strings not found in the text
    offsets: list[tuple[int, int]]
    counts: collections.Counter           # spans located per kind, "missing", "malformed"
    fuzzy_matches: list[tuple[str, str]]  # (span, text it matched) for every fuzzy match

    def graph(self, seq_len: int | None = None):
        """This sample as a one-row :class:`~causal_attn.CausalGraph`."""
        from ..ops.graph import CausalGraph

        return CausalGraph.from_edges([self.edges], seq_len or len(self.input_ids))


def annotations_to_graph(text: str, annotations: Any, tokenizer, *, add_special_tokens: bool = True,
                         case_insensitive: bool = True, fuzzy: bool = True, max_length: int | None = None,
                         encoding: dict | None = None) -> AdjacencyResult:
    """Row-aligned token adjacency of ``text`` from ``[{key: [values]}]`` annotations (module doc).

    ``encoding``: a precomputed ``tokenizer(text, return_offsets_mapping=True)`` result to reuse.
    ``max_length``: truncate; edges beyond it are dropped.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if encoding is None:
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError("annotations_to_graph needs a fast tokenizer (offset mapping)")
        encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                             truncation=max_length is not None, max_length=max_length)
    input_ids = list(encoding["input_ids"])
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    counts: collections.Counter = collections.Counter()
    norm = NormalizedText(text)
    cover = TokenCover(offsets, len(text))
    cache: dict[str, list[tuple[int, int, int, int]]] = {}
    missing: list[str] = []
    fuzzy_matches: list[tuple[str, str]] = []

    def find(span: str):
        """Occurrences of a span as (char_start, char_end, tok_start, tok_end), counted once per mention."""
        if span not in cache:
            kind, occ = locate(norm, span, case_insensitive=case_insensitive, fuzzy=fuzzy)
            hits = []
            for s, e in occ:
                rng = cover.token_range(s, e)
                if rng is not None:
                    hits.append((s, e, *rng))
            cache[span] = (kind, hits)
        kind, hits = cache[span]
        if not span.strip():
            counts["empty"] += 1  # an empty span names nothing: not a miss of the matcher
            return hits
        if kind is not None and not hits:
            counts["unmapped"] += 1  # found in the text but covered by no token (e.g. truncated away)
        if kind is None:
            counts["missing"] += 1
            missing.append(span)
        else:
            counts[kind] += 1
            if kind == "fuzzy":
                fuzzy_matches.append((span, text[hits[0][0]:hits[0][1]] if hits else ""))
        return hits

    edges: set[tuple[int, int]] = set()
    for key, values in iter_annotation_pairs(annotations, counts):
        key_hits = find(key)
        for value in values:
            for vcs, vce, vs, ve in find(value):
                for kcs, _kce, ks, ke in key_hits:
                    if vce > kcs:
                        continue  # value must end before the key starts
                    for row in range(max(ks - 1, 0), ke - 1):
                        for col in range(vs, min(ve, row + 1)):
                            edges.add((row, col))
    return AdjacencyResult(input_ids=input_ids, edges=sorted(edges), missing=missing, offsets=offsets,
                           counts=counts, fuzzy_matches=fuzzy_matches)


def measure_coverage(records: Iterable[dict], tokenizer, *, prompt_field: str = "input",
                     target_field: str = "target", annotation_field: str = "important", **options) -> dict:
    """Located-span statistics over annotated records: ``spans`` mentioned, per-kind counts, the
    fraction located (``located``), ``missing`` / ``malformed`` counts, ``samples`` and a list of
    ``fuzzy_matches`` (span, matched text) for inspection."""
    total: collections.Counter = collections.Counter()
    fuzzy_matches, samples = [], 0
    for rec in records:
        text = rec[prompt_field] + str(rec[target_field])
        res = annotations_to_graph(text, rec.get(annotation_field), tokenizer, **options)
        total.update(res.counts)
        fuzzy_matches.extend(res.fuzzy_matches)
        samples += 1
    spans = sum(total[k] for k in MATCH_KINDS) + total["missing"]
    out = {"samples": samples, "spans": spans, "missing": total["missing"], "malformed": total["malformed"],
           "unmapped": total["unmapped"],
           "located": (spans - total["missing"]) / spans if spans else 1.0, "fuzzy_matches": fuzzy_matches}
    out.update({k: total[k] for k in MATCH_KINDS})
    return out


# ----------------------------------------------------------------------------- training records

def encode_example(prompt: str, target: Any, annotations: Any, tokenizer, *, max_length: int | None = None,
                   append_eos: bool = True, add_special_tokens: bool = True, **match_options) -> dict:
    """One training record: ``input_ids``, ``labels`` (-100 on tokens wholly inside the prompt),
    ``attention_mask``, ``edges`` (list of ``[row, col]``), ``missing``.

    The text is ``prompt + str(target)``; with ``append_eos`` the tokenizer's EOS id is appended (and
    labelled) so the model learns to stop. A token straddling the prompt/target boundary (a leading
    space) is a target token.
    """
    text = prompt + str(target)
    limit = None if max_length is None else max_length - (1 if append_eos else 0)
    res = annotations_to_graph(text, annotations, tokenizer, add_special_tokens=add_special_tokens,
                               max_length=limit, **match_options)
    ids = list(res.input_ids)
    boundary = len(prompt)
    labels = [tid if b > boundary and a < b else -100 for tid, (a, b) in zip(ids, res.offsets)]
    eos = getattr(tokenizer, "eos_token_id", None)
    if append_eos and eos is not None:
        ids.append(eos)
        labels.append(eos)
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids),
            "edges": [[r, c] for r, c in res.edges], "missing": res.missing}


def encode_batch(batch: dict, tokenizer, *, prompt_field: str = "input", target_field: str = "target",
                 annotation_field: str = "important", **options) -> dict:
    """``datasets.Dataset.map(encode_batch, batched=True, fn_kwargs={"tokenizer": tok})`` form of
    :func:`encode_example`; records without annotations get no edges."""
    out = collections.defaultdict(list)
    n = len(batch[prompt_field])
    annotations = batch.get(annotation_field) or [None] * n
    for prompt, target, ann in zip(batch[prompt_field], batch[target_field], annotations):
        rec = encode_example(prompt, target, ann, tokenizer, **options)
        for k, v in rec.items():
            out[k].append(v)
    return dict(out)
