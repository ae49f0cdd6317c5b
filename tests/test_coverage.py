"""Coverage on the released data: fraction of annotated spans located (exact / case / fuzzy) per
dataset and real tokenizer, plus a printed sample of fuzzy matches for a reader to judge.

Run with ``-s`` to see the table (GSM8K: every 2nd record here; ``causal-attn annotate --coverage``
measures whole files). GSM8K stays below the 99% goal: about 3.6% of its spans were
invented by the annotating LLM (``Tony can lift`` where the text says ``he can lift``); matching
those would need fuzzy matches a reader would call wrong, so they are reported missing instead.
"""
from __future__ import annotations

import os
import random
import re

import pytest

from causal_attn.data.adjacency import MATCH_KINDS, measure_coverage
from causal_attn.data.jsonl import read_jsonl
from causal_attn.data.tokenizers import TokenizerUnavailable, llama3_tokenizer, qwen2_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cat")
# (file, every k-th record, minimum located fraction)
SETS = [("annotated/svamp_train.jsonl", 1, 0.99), ("annotated/mawps_train.jsonl", 1, 0.99),
        ("annotated/gsm8k_val.jsonl", 2, 0.96), ("stg_e/train_L.jsonl", 8, 1.0), ("stg_h/train.jsonl", 15, 1.0)]
_results: dict = {}


def _load(rel, step):
    path = os.path.join(DATA, rel)
    if not os.path.exists(path):
        pytest.skip(f"{path} not found")
    return read_jsonl(path)[::step]


@pytest.fixture(scope="module", params=["qwen2", "llama3"])
def tokenizer(request):
    try:
        return request.param, (qwen2_tokenizer() if request.param == "qwen2" else llama3_tokenizer())
    except TokenizerUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("rel,step,minimum", SETS, ids=[s[0].split("/")[-1] for s in SETS])
def test_located_fraction(tokenizer, rel, step, minimum):
    name, tok = tokenizer
    c = measure_coverage(_load(rel, step), tok)
    _results[(rel, name)] = c
    assert c["unmapped"] == 0  # every located span covers at least one token
    assert c["located"] >= minimum, {k: v for k, v in c.items() if k != "fuzzy_matches"}
    # fuzzy matches never change a number: the digits of span and match agree
    for span, found in c["fuzzy_matches"]:
        assert re.findall(r"\d+", span.replace(",", "")) == re.findall(r"\d+", found.replace(",", "")), (span, found)


def test_print_table_and_fuzzy_sample():
    if not _results:
        pytest.skip("no coverage measured (tokenizers or data missing)")
    lines = ["", "| dataset | tokenizer | spans | " + " | ".join(MATCH_KINDS) + " | missing | located |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for (rel, name), c in sorted(_results.items()):
        lines.append(f"| {rel} | {name} | {c['spans']} | " + " | ".join(str(c[k]) for k in MATCH_KINDS)
                     + f" | {c['missing']} | {100 * c['located']:.2f}% |")
    fuzzy = sorted({m for c in _results.values() for m in c["fuzzy_matches"]})
    lines.append(f"fuzzy matches (sample of {min(20, len(fuzzy))} of {len(fuzzy)} distinct):")
    lines += [f"  {span!r} -> {found!r}" for span, found in random.Random(0).sample(fuzzy, min(20, len(fuzzy)))]
    print("\n".join(lines))
