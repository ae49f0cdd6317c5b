"""`causal-attn demo capt-pretrained --quick` on the real SmolLM2-135M checkpoint (vanilla vs CAPT on the deduction
task), and its data: the validation records, the test prompts each method sees."""
import json
import re

import pytest
from conftest import run_gen

from causal_attn.cli import main
from causal_attn.data.capt import VARIANTS
from causal_attn.data.capt.deduction import CLASSES, NONSENSE, WORLD
from causal_attn.demo import capt, capt_pretrained as demo

PNG = b"\x89PNG\r\n\x1a\n"
METHODS = ("vanilla", "capt", "capt_order")


def test_quick_capt_pretrained_demo_writes_table_results_and_figure(tmp_path, capsys, monkeypatch, docs_copy):
    out = tmp_path / "demo"
    assert main(["demo", "capt-pretrained", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"capt-pretrained", "seconds", "provenance"}
    res = res["capt-pretrained"]
    assert res["model"] == "smollm2-135m" and res["split"] == "test" and res["seeds"] == [0]
    assert res["recipe"]["steps"] == demo.QUICK.steps and res["recipe"]["gamma"] == 0.0
    assert res["recipe"]["test_per_variant"] == {v: demo.QUICK_TEST for v in VARIANTS}
    zero = res["zero_shot"]  # the untuned checkpoint: one accuracy per variant
    assert all(0.0 <= zero[v]["acc"] <= 1.0 for v in VARIANTS) and len(zero["examples"]) == 3
    assert 0 <= zero["unparsed"] <= len(VARIANTS) * demo.QUICK_TEST
    for m in METHODS:
        for v in VARIANTS:
            assert res[m][v]["per_seed"] == [res[m][v]["acc"]] and 0.0 <= res[m][v]["acc"] <= 1.0
        (run,) = res[m]["runs"]
        assert [p["step"] for p in run["curve"]] == list(range(1, demo.QUICK.steps + 1))  # CATTrainer's logs
        assert all(p["gamma"] == 0.0 for p in run["curve"])  # no Re-Attention loss
    # CAPT sees lettered prompts at inference, vanilla the originals
    words = set(WORLD) | set(CLASSES) | set(NONSENSE["subjects"]) | set(NONSENSE["classes"])
    names = re.compile(r"\b(" + "|".join(sorted(words)) + r")\b")
    for m, named in (("vanilla", True), ("capt", False), ("capt_order", False)):
        inputs = [e["input"] for e in res[m]["runs"][0]["examples"]]
        assert all(bool(names.search(x)) == named for x in inputs), (m, inputs)
    table = (out / "table.md").read_text()
    assert capt.format_table(res) in printed and capt.format_table(res) in table
    assert "untuned checkpoint (zero-shot)" in table
    data = (out / res["figures"]["capt_accuracy"]).read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    assert res["scoring"].startswith(f"greedy decoding ({demo.QUICK_NEW_TOKENS} new tokens)")
    # every finished run is in the run log: a second invocation trains nothing and gives the same results
    def no_training(*args, **kwargs):
        raise AssertionError("a run in the run log was trained again")

    monkeypatch.setattr(demo.CaptPretrainedPart, "one_run", no_training)
    assert main(["demo", "capt-pretrained", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["capt-pretrained"]
    for m in METHODS + ("zero_shot",):
        assert all(again[m][v]["acc"] == res[m][v]["acc"] for v in VARIANTS)
    assert capsys.readouterr().out.count(" s, resumed)") == 4
    assert len((out / demo.CaptPretrainedPart.run_log).read_text().splitlines()) == 4
    # published into the docs (docs/gen.py --import, then make docs): the page's tables follow the run
    pytest.importorskip("cogapp", reason="cogapp is in the [dev] extra (make test installs it)")
    proc = run_gen(docs_copy, "--import", str(out), "a test machine")
    assert proc.returncode == 0, proc.stderr
    published = json.loads((docs_copy / "docs" / "capt_pretrained_results.json").read_text())
    assert published["provenance"]["code_hash"] and "a test machine" in published["machine"]["description"]
    assert (docs_copy / "docs" / res["figures"]["capt_accuracy"]).read_bytes().startswith(PNG)
    assert run_gen(docs_copy).returncode == 0
    page = (docs_copy / "docs" / "demo_pretrained.md").read_text()
    assert capt.format_table(res) in page and "a test machine" in page
    gains = [f"{100 * (res['capt'][v]['acc'] - res['vanilla'][v]['acc']):+.1f}" for v in VARIANTS]
    room = [f"{100 * (1 - res['vanilla'][v]['acc']):.1f}" for v in VARIANTS[1:]]
    assert "| seed 0 | " + " | ".join(gains + room) + " |" in page  # the run's own row, not any "+0.0" on the page
    assert "the CAPT deduction task (one seed)" in (docs_copy / "README.md").read_text()


def test_validation_records_are_other_records_than_the_tests():
    train, tests = capt.load_data(100, 50)
    _, val = capt.load_data(100, 50, "val")
    assert {r["input"] for r in val}.isdisjoint(r["input"] for r in tests)
    assert {r["variant"] for r in val} == set(VARIANTS) and len(val) > 0.8 * len(tests)
    assert capt.load_data(100, 50) == (train, tests)
    with pytest.raises(ValueError):
        capt.load_data(10, 5, "dev")


def test_each_method_sees_its_own_test_prompts():
    _, tests = capt.load_data(10, 6)
    assert capt.test_records(tests, "zero_shot", 0) is tests and capt.test_records(tests, "vanilla", 0) is tests
    lettered = capt.test_records(tests, "capt", 0)
    assert lettered == capt.test_records(tests, "capt", 0) != capt.test_records(tests, "capt", 1)
    ordered = capt.test_records(tests, "capt_order", 0)
    for r, x, o in zip(tests, lettered, ordered):
        assert x["answer"] == o["answer"] == r["answer"] and x["variant"] == r["variant"]
        assert o["capt_assignment"]["symbol_1"] == "A" and x["input"] != r["input"]


def test_capt_pretrained_bad_arguments_give_one_line(tmp_path, capsys):
    for bad in (["--capt-copies", "0"], ["--steps", "0"], ["--lr", "-1"]):
        assert main(["demo", "capt-pretrained", "--out", str(tmp_path), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("causal-attn demo: error:") and len(err.splitlines()) == 1, err
