"""The CAPT part of the demo: the deduction generator's correlations, its records through the real CAPT
path (symbolize_sample, replicate, parse_answer / accuracy_by_variant, cat+capt), and the quick run."""
import json
import random
import re

import pytest

from causal_attn.cli import main
from causal_attn.data.capt import VARIANTS, accuracy_by_variant, capt_graph, replicate, symbolize_sample
from causal_attn.data.capt.deduction import NONSENSE, RHO, WORLD, generate
from causal_attn.demo.capt import format_table

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    return generate(seed=random.randrange(10**6), n_train=1500, n_test=400)


def test_variants_have_the_stated_correlations(data):
    """Train: rules agree with the names' real-world class with probability RHO; commonsense 1, anti 0,
    nonsense no world at all; every split balanced True / False."""
    agree = [r["world_agrees"] for r in data["train"]]
    assert sum(agree) / len(agree) == pytest.approx(RHO, abs=0.04)
    assert all(r["world_agrees"] for r in data["commonsense"])
    assert not any(r["world_agrees"] for r in data["anticommonsense"])
    assert all(r["world_agrees"] is None for r in data["nonsense"])
    for split, recs in data.items():
        true = sum(r["answer"] == "true" for r in recs) / len(recs)
        assert true == pytest.approx(0.5, abs=2.5 / len(recs) ** 0.5), split  # 5 binomial sd
    known = set(WORLD) | set(WORLD.values())
    made_up = set(NONSENSE["subjects"]) | set(NONSENSE["classes"])
    words = lambda r: set(re.findall(r"[a-z]+", r["input"] + r["target"]))  # noqa: E731
    assert all(words(r) & known and not words(r) & made_up for r in data["train"])
    assert all(words(r) & made_up and not words(r) & known for r in data["nonsense"])


def test_answer_follows_from_the_rules(data):
    """The target's conclusion is the relevant rule applied to the fact, and the answer tag matches it."""
    for recs in data.values():
        for r in recs[:200]:
            person, subject = re.match(r"(\w+) is a (\w+)\.", r["input"]).groups()
            cls = re.search(r"True or false: \w+ is a (\w+)\.", r["input"]).group(1)
            rule = re.search(rf"Every {subject} (is|isn't) a {cls}\.", r["input"])
            assert rule is not None and rule.group(0) in r["target"]
            # the distractor: another subject, the same class, the opposite polarity (only the subject decides)
            rules = re.findall(r"Every (\w+) (is|isn't) a (\w+)\.", r["input"])
            assert len(rules) == 2 and {c for _, _, c in rules} == {cls}
            assert len({s for s, _, _ in rules}) == 2 and {p for _, p, _ in rules} == {"is", "isn't"}
            truth = rule.group(1) == "is"
            assert f"So {person} {rule.group(1)} a {cls}." in r["target"]
            assert r["answer"] == ("true" if truth else "false")
            assert r["target"].endswith(f"<answer>{'True' if truth else 'False'}</answer>")


def test_deterministic_for_a_seed():
    assert generate(5, n_train=30, n_test=10) == generate(5, n_train=30, n_test=10)
    assert generate(5, n_train=30, n_test=10) != generate(6, n_train=30, n_test=10)


def test_records_round_trip_through_symbolize_sample(data):
    rng = random.Random(random.randrange(10**6))
    for r in data["train"][:50] + data["nonsense"][:20]:
        back = symbolize_sample(r, "original")
        assert (back["input"], back["target"]) == (r["input"], r["target"])
        sym = symbolize_sample(r, "random", rng)
        letters = sym["capt_assignment"]
        assert len(set(letters.values())) == len(letters)
        for name, phrase in r["capt"]["symbols"].items():  # one assignment for input and target
            for field in ("input", "target"):
                assert re.search(rf"\b{re.escape(phrase)}\b", sym[field]) is None
            assert re.search(rf"\b{letters[name]}\b", sym["input"])
        assert sym["answer"] == r["answer"] and sym["important"]
        ordered = symbolize_sample(r, "order")
        assert ordered["capt_assignment"]["symbol_1"] == "A"


def test_replicas_get_fresh_letters_and_cat_capt_builds_graphs(data):
    from causal_attn.demo.model import build_word_tokenizer

    train = data["train"][:40]
    copies = replicate(train, 3, seed=random.randrange(10**6))
    assert len(copies) == 120 and [c["capt_copy"] for c in copies[::40]] == [0, 1, 2]
    assert sum(copies[i]["capt_assignment"] != copies[i + 40]["capt_assignment"] for i in range(40)) >= 30
    tok = build_word_tokenizer([c["input"] + c["target"] for c in copies])
    for c in copies[:30]:
        g = capt_graph(c, tok)
        assert g.edges and not g.missing and all(col <= row for row, col in g.edges)


def test_answer_parser_scores_generations(data):
    recs = [r for v in VARIANTS for r in data[v][:10]]
    gens = [f" ... <answer>{r['answer'].title()}</answer>" if i % 3 else "unsure" for i, r in enumerate(recs)]
    table = accuracy_by_variant(recs, gens)
    assert table["all"]["unparsed"] == 10 and table["all"]["correct"] == 20


def test_quick_capt_demo_writes_table_results_and_figure(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "capt", "--quick", "--out", str(out), "--capt-steps", "6"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"capt", "seconds", "provenance"}
    res = res["capt"]
    for m in ("vanilla", "capt", "capt_order"):
        for v in VARIANTS:
            assert res[m][v]["per_seed"] == [res[m][v]["acc"]] and 0.0 <= res[m][v]["acc"] <= 1.0
    assert format_table(res) in printed and format_table(res) in (out / "table.md").read_text()
    data = (out / res["figures"]["capt_accuracy"]).read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
