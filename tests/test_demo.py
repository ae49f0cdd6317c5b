"""`causal-attn demo --quick`: the whole code path on a small budget, plus the demo's building blocks."""
import json
import random
import re
from pathlib import Path

import pytest
import torch

from causal_attn.cli import main
from causal_attn.data.stg import STG_E_CAUSAL, STG_E_IRRELEVANT, STG_E_SPURIOUS, generate_stg_e
from causal_attn.demo.fit import Recipe, encode_records, factor_masses, span_columns, train_run
from causal_attn.demo.model import build_word_tokenizer, tiny_llama
from causal_attn.demo.stg import demo_phrases, format_table

PNG = b"\x89PNG\r\n\x1a\n"


def test_quick_cat_demo_writes_table_results_and_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "cat", "--quick", "--out", str(out), "--steps", "8"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"cat", "seconds", "provenance"}
    res = res["cat"]
    for m in ("vanilla", "cat"):
        assert 0.0 <= res[m]["iid_acc"] <= 1.0 and 0.0 <= res[m]["ood_acc"] <= 1.0
        assert res[m]["iid_per_seed"] == [res[m]["iid_acc"]]
        masses = res[m]["attention_mass"]
        assert set(masses) == {"causal", "spurious", "irrelevant"} and 0 <= sum(masses.values()) <= 1 + 1e-5
        assert len(res[m]["runs"][0]["curve"]) >= 2
    assert res["majority"]["label"] == "Low Risk" and res["run_seconds"] > 0
    table = (out / "table.md").read_text().strip()
    assert format_table(res) in printed and format_table(res) in table
    for name in res["figures"].values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000


def test_both_parts_share_one_pool_of_worker_processes(tmp_path, capsys):
    """`causal-attn demo` with --jobs 2: every run of both parts comes back from the spawned workers."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--jobs", "2", "--out", str(out), "--steps", "4", "--capt-steps", "4"]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"cat", "capt", "seconds", "provenance"}
    assert [r["method"] for r in res["cat"]["vanilla"]["runs"] + res["cat"]["cat"]["runs"]] == ["vanilla", "cat"]
    for m in ("vanilla", "capt", "capt_order"):
        assert [r["method"] for r in res["capt"][m]["runs"]] == [m]
    assert len(re.findall(r"^  seed 0 ", printed, flags=re.M)) == 5  # 2 CAT runs + 3 CAPT runs reported


def test_demo_bad_arguments_give_one_line(tmp_path, capsys):
    for bad in (["--seeds", "0"], ["--first-seed", "-1"], ["--steps", "0"], ["--extra-train", "-1"], ["capt", "--capt-steps", "0"],
                ["capt", "--capt-copies", "0"]):
        assert main(["demo", "--out", str(tmp_path), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("causal-attn demo: error:") and len(err.splitlines()) == 1


def test_seed_options_pick_each_parts_seeds():
    """``--seeds`` / ``--first-seed`` over each part's defaults: the pretrained part starts past seed 0, the seed its
    recipe search trained (its test seeds and its search seeds are disjoint)."""
    import argparse

    from causal_attn.demo.capt import CaptPart
    from causal_attn.demo.capt_pretrained import CaptPretrainedPart
    from causal_attn.demo.pretrained import PretrainedPart
    from causal_attn.demo.stg import CatPart

    args = lambda **kw: argparse.Namespace(**{"seeds": None, "first_seed": None, "quick": False, **kw})  # noqa: E731
    assert CatPart.seed_list(args()) == CaptPart.seed_list(args()) == [0, 1, 2]
    assert PretrainedPart.seed_list(args()) == [1, 2, 3, 4, 5]
    assert CaptPretrainedPart.seed_list(args()) == [0, 1, 2]
    assert PretrainedPart.seed_list(args(seeds=2, first_seed=7)) == [7, 8]
    assert CatPart.seed_list(args(seeds=4, first_seed=2)) == [2, 3, 4, 5]
    assert PretrainedPart.seed_list(args(quick=True)) == [1]
    docs = Path(__file__).resolve().parents[1] / "docs"
    for part, log in ((PretrainedPart, "pretrained_search.jsonl"), (CaptPretrainedPart, "capt_pretrained_search.jsonl")):
        search_seeds = {json.loads(line)["seed"] for line in open(docs / log)}
        assert search_seeds and not search_seeds & set(part.seed_list(args())), log


def test_factor_masses_against_a_hand_built_map():
    """The answer-row mass per factor type equals the sum of an eager averaged map over the spans' tokens."""
    recs = generate_stg_e(seed=random.randrange(10**6), n_iid=4, n_ood=3, n_test=0)["test_ood"]
    tok = build_word_tokenizer([r["input"] + r["target"] for r in recs])
    model = tiny_llama(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=random.randrange(1000)).eval()
    from causal_attn.hf.patch import patch_model

    handle = patch_model(model)
    factors = {"causal": STG_E_CAUSAL, "spurious": STG_E_SPURIOUS, "irrelevant": STG_E_IRRELEVANT}
    got = factor_masses(model, handle, tok, recs, factors)
    handle.unpatch()
    model.set_attn_implementation("eager")
    for i, r in enumerate(recs):
        enc = tok(r["input"], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            att = model(**enc, output_attentions=True).attentions
        row = torch.stack([a[0].double().mean(0) for a in att]).mean(0)[-1]  # layer/head mean, answer row
        tokens = tok.convert_ids_to_tokens(enc["input_ids"][0])
        for kind, names in factors.items():
            cols = []  # by token position: the name's words, ":" and the number
            for n in names:
                w = n.split()
                start = next(j for j in range(len(tokens)) if tokens[j:j + len(w) + 1] == w + [":"])
                cols += range(start, start + len(w) + 2)
            assert got["per_sample"][kind][i] == pytest.approx(float(row[cols].sum()), abs=1e-5)


def test_span_columns():
    text = "a: 1, bb: 22, a: 3"
    offsets = [(0, 1), (1, 2), (3, 4), (4, 5), (6, 8), (8, 9), (10, 12), (12, 13), (14, 15), (15, 16), (17, 18)]
    assert span_columns(text, ["a: 1"], offsets) == [0, 1, 2]
    assert span_columns(text, ["bb: 22", "a: 3"], offsets) == [4, 5, 6, 8, 9, 10]


def test_demo_training_goes_through_cattrainer(monkeypatch):
    """The demo's curve is CATTrainer's training log (steps, LM / attention loss, ratio_mean, the named decay
    schedule of gamma, the cosine learning rate), and vanilla logs the same first batch with gamma 0."""
    import math

    from causal_attn.hf.trainer import CATTrainer

    trainers = []
    train = CATTrainer.train

    def spy(self, *args, **kwargs):
        trainers.append(self)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(CATTrainer, "train", spy)
    recs = generate_stg_e(seed=random.randrange(10**6), n_iid=40, n_ood=0, n_test=0)["train_L"]
    tok = build_word_tokenizer([r["input"] + r["target"] for r in recs], phrases=demo_phrases())
    enc = encode_records(recs, tok)
    recipe = Recipe(steps=6, batch_size=8, curve_points=3, hidden=32, layers=1, heads=2, intermediate=64, gamma=2.0,
                    gamma_decay=1.5, lr=1e-2, warmup=0.4)
    seed = random.randrange(1000)
    curves = {m: train_run(m, seed, enc, tok, recipe)[2] for m in ("cat", "vanilla")}
    assert len(trainers) == 2 and all(not t.model.training for t in trainers)
    cat = trainers[0]
    assert (cat.args.max_steps, cat.args.max_grad_norm, cat.args.seed) == (6, 1.0, seed)
    logged = [h for h in cat.state.log_history if "lm_loss" in h]
    assert [p["step"] for p in curves["cat"]] == [h["step"] for h in logged] == [1, 2, 4, 6]
    for point, h in zip(curves["cat"], logged):
        assert all(point[k] == h[k] for k in ("lm_loss", "attn_loss", "gamma", "ratio_mean", "learning_rate"))
    # gamma: the mean of 2 exp(-1.5 step / 6) over the steps since the previous log
    steps_between = [[0], [1], [2, 3], [4, 5]]
    for point, steps in zip(curves["cat"], steps_between):
        assert point["gamma"] == pytest.approx(sum(2 * math.exp(-1.5 * k / 6) for k in steps) / len(steps))
    lr = [p["learning_rate"] for p in curves["cat"]]  # linear warm-up from 0, then cosine decay towards 0
    assert cat.args.lr_scheduler_type == "cosine" and lr[0] == 0 < lr[1] and lr[3] < max(lr) <= 1e-2
    first_v, first_c = curves["vanilla"][0], curves["cat"][0]
    assert all(p["gamma"] == 0 for p in curves["vanilla"]) and "ratio_mean" in first_v
    assert (first_v["lm_loss"], first_v["attn_loss"], first_v["ratio_mean"]) == pytest.approx(
        (first_c["lm_loss"], first_c["attn_loss"], first_c["ratio_mean"]))


def test_encoded_records_mark_the_answer_rows():
    recs = generate_stg_e(seed=random.randrange(10**6), n_iid=6, n_ood=0, n_test=0)["train_L"]
    tok = build_word_tokenizer([r["input"] + r["target"] for r in recs])
    for r, enc in zip(recs, encode_records(recs, tok)):
        n_prompt = len(tok(r["input"], add_special_tokens=False)["input_ids"])
        assert [i for i, lab in enumerate(enc["labels"]) if lab != -100] == [n_prompt, n_prompt + 1, n_prompt + 2]
        rows = sorted({row for row, _ in enc["edges"]})
        assert rows == [n_prompt - 1, n_prompt]  # the rows predicting the two label words
        assert len({col for _, col in enc["edges"]}) == 9  # three "Name: value" spans of three tokens


def test_encoded_records_without_edges_keep_ids_and_labels():
    recs = generate_stg_e(seed=random.randrange(10**6), n_iid=6, n_ood=0, n_test=0)["train_L"]
    tok = build_word_tokenizer([r["input"] + r["target"] for r in recs])
    for full, bare in zip(encode_records(recs, tok), encode_records(recs, tok, edges=False)):
        assert full["edges"] and not bare["edges"]
        assert (bare["input_ids"], bare["labels"]) == (full["input_ids"], full["labels"])


@pytest.mark.parametrize("std", [0.02, 0.08])
def test_tiny_llama_init_std_sets_the_weight_scale(std):
    tok = build_word_tokenizer(["a b c d e f g h"])
    model = tiny_llama(tok, hidden=64, layers=1, heads=2, intermediate=128, init_std=std, seed=random.randrange(1000))
    for w in (model.model.layers[0].mlp.gate_proj.weight, model.model.layers[0].self_attn.q_proj.weight):
        assert abs(float(w.detach().std()) - std) < 0.05 * std  # 8192 / 4096 draws: relative error ~1 %


def test_phrase_tokenizer_keeps_phrases_whole_with_exact_offsets():
    recs = generate_stg_e(seed=random.randrange(10**6), n_iid=6, n_ood=2, n_test=0)["train_L"]
    tok = build_word_tokenizer([r["input"] + r["target"] for r in recs], phrases=demo_phrases())
    for r, enc in zip(recs, encode_records(recs, tok)):
        text = r["input"] + r["target"]
        got = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        pieces = [text[a:b] for a, b in got["offset_mapping"]]
        assert pieces == tok.convert_ids_to_tokens(got["input_ids"])  # offsets cut out each token exactly
        factors = re.findall(r"[A-Z][a-z]+(?: [a-z]+)?: \d+", r["input"])
        assert pieces[0] == demo_phrases()[0] and "Answer" in pieces and len(factors) == 8
        assert all(f in pieces for f in factors)  # every "Name: value" is one token
        causal = [pieces.index(f) for f in factors if f.split(":")[0] in STG_E_CAUSAL]
        assert sorted({col for _, col in enc["edges"]}) == sorted(causal)  # Smoking / Weight / Exercise
        covered = {i for a, b in got["offset_mapping"] for i in range(a, b)}
        assert all(text[i].isspace() for i in range(len(text)) if i not in covered)  # only whitespace dropped


def test_search_trains_a_grid_on_the_validation_splits_and_resumes(tmp_path, capsys):
    """`python -m causal_attn.demo.search --part cat`: one line per run (vanilla shared by settings that differ
    in CAT-only fields), nothing trained again on a second call, and a table of the file."""
    from causal_attn.demo import search

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"name": "a", "steps": 2, "batch_size": 4, "curve_points": 1, "alpha": 5.0},
                                {"name": "b", "steps": 2, "batch_size": 4, "curve_points": 1, "alpha": 7.0}]))
    out = tmp_path / "search.jsonl"
    argv = ["--part", "cat", "--grid", str(grid), "--out", str(out), "--jobs", "1", "--val-size", "8"]
    assert search.main(argv) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((x["setting"]["name"], x["method"]) for x in lines) == [("a", "cat"), ("a", "vanilla"), ("b", "cat")]
    assert all(x["val_size"] == 8 and 0 <= x["val_ood"] <= 1 and "ratio_mean" in x["final"] for x in lines)
    from causal_attn.utils.provenance import code_hash

    assert all(x["code"]["code_hash"] == code_hash() and "git_revision" in x["code"] for x in lines)
    capsys.readouterr()
    assert search.main(argv) == 0 and capsys.readouterr().out == "" and len(out.read_text().splitlines()) == 3
    rows = search.table(str(out)).splitlines()[2:]
    assert [r.split(" | ")[0] for r in rows] == ["| a", "| b", "| majority class (Low Risk)"]
