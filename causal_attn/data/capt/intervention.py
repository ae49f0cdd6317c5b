"""CAPT intervention (SPEC section 6, step 2): symbol names, rendering of ``{symbol_n}`` templates,
one assignment per sample (:func:`symbolize_sample`), replicas with fresh letters (:func:`replicate`,
:func:`fresh_symbols_transform`) and the CAT annotation re-located through the substitution
(:func:`capt_graph`). Imported through :mod:`causal_attn.data.capt`; see its docstring for the pipeline.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
import json
import random
import re
import string
from typing import Any, Sequence

FIELDS = ("input", "target")          # the record fields symbolised together (the CAT data layout)
MODES = ("random", "order", "original", "symbol")

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
