"""`causal-attn demo pretrained --quick` on the real SmolLM2-135M checkpoint, and the pieces it is built from:
the answer-only LM loss, first-token scoring and the shared LoRA initialisation."""
import importlib.metadata
import json
import random

import pytest
import torch

from causal_attn import patch_model, pretrained
from causal_attn.cli import main
from causal_attn.data.collate import CATCollator
from causal_attn.demo import pretrained as demo
from causal_attn.hf import pretrained as pretrained_mod
from causal_attn.utils import provenance as provenance_mod
from causal_attn.utils.provenance import code_hash

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smollm2():
    return pretrained.load("smollm2-135m", progress=False)


def test_quick_pretrained_demo_writes_table_results_and_figures(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    assert main(["demo", "pretrained", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"pretrained", "seconds", "provenance"}
    prov = res["provenance"]  # the code that produced it
    assert prov["code_hash"] == code_hash() and prov["versions"]["torch"] == importlib.metadata.version("torch")
    assert prov["git_revision"] is None or len(prov["git_revision"]) == 40
    res = res["pretrained"]
    assert res["model"] == "smollm2-135m" and res["split"] == "test" and res["recipe"]["steps"] == demo.QUICK.steps
    assert len(set(res["label_tokens"].values())) == 3
    for m in ("vanilla", "cat", "zero_shot"):
        r = res[m]
        assert 0.0 <= r["iid_acc"] <= 1.0 and 0.0 <= r["ood_acc"] <= 1.0
        predicted = r["iid_predicted"] if m == "zero_shot" else r["runs"][0]["iid_predicted"]
        assert sum(predicted.values()) == demo.QUICK_EVAL
        assert set(r["attention_mass"]) == {"causal", "spurious", "irrelevant"}
        assert 0 < sum(r["attention_mass"].values()) <= 1 + 1e-5
    for m in ("vanilla", "cat"):
        assert res[m]["ood_per_seed"] == [res[m]["ood_acc"]]
        curve = res[m]["runs"][0]["curve"]
        assert [p["step"] for p in curve] == list(range(1, demo.QUICK.steps + 1))  # CATTrainer's logs
        assert all(0 <= p["ratio_ge_alpha"] <= 1 for p in curve)  # the share of rows at the margin, as logged
        gammas = [p["gamma"] for p in curve]  # the default schedule: gamma exp(-gamma_decay p), p the progress
        if m == "cat":
            assert demo.QUICK.gamma_decay > 0 and all(0 < g <= demo.QUICK.gamma for g in gammas)
            assert gammas == sorted(gammas, reverse=True) and gammas[-1] < gammas[0]
        else:
            assert gammas == [0.0] * len(gammas)
    # same initial weights and the same first batch: both methods log the same first losses
    assert res["vanilla"]["runs"][0]["curve"][0]["lm_loss"] == pytest.approx(res["cat"]["runs"][0]["curve"][0]["lm_loss"])
    assert res["vanilla"]["runs"][0]["curve"][0]["attn_loss"] == pytest.approx(res["cat"]["runs"][0]["curve"][0]["attn_loss"])
    table = (out / "table.md").read_text()
    assert demo.format_table(res) in printed and demo.format_table(res) in table
    assert "untuned checkpoint" in table
    for name in res["figures"].values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    # every finished run is in the run log: a second invocation trains nothing and gives the same results
    def no_training(*args, **kwargs):
        raise AssertionError("a run in the run log was trained again")

    monkeypatch.setattr(demo.PretrainedPart, "one_run", no_training)
    assert main(["demo", "pretrained", "--quick", "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())["pretrained"]
    for m in ("vanilla", "cat", "zero_shot"):
        assert again[m]["iid_acc"] == res[m]["iid_acc"] and again[m]["attention_mass"] == res[m]["attention_mass"]
    assert again["vanilla"]["runs"][0]["curve"] == res["vanilla"]["runs"][0]["curve"]
    assert capsys.readouterr().out.count(" s, resumed)") == 3
    # another recipe does not reuse them
    monkeypatch.undo()
    log = (out / demo.RUN_LOG).read_text().splitlines()
    assert len(log) == 3
    seed = demo.PretrainedPart.first_seed  # the seed --quick trains (the untuned checkpoint's run is seed 0)
    runs = (("zero_shot", 0), ("vanilla", seed), ("cat", seed))
    same = dict(model="smollm2-135m", quick=True, split="test", recipe=demo.QUICK)
    assert all(demo.RunLog(str(out / demo.RUN_LOG), **same).get(m, s) is not None for m, s in runs)
    other = demo.RunLog(str(out / demo.RUN_LOG), "smollm2-135m", True, "test",
                        demo.PretrainedRecipe(**{**demo.QUICK.__dict__, "alpha": 7.0}))
    assert all(other.get(m, s) is None for m, s in runs)
    # nor does other code (a changed source file) or another checkpoint file under the same name
    monkeypatch.setattr(provenance_mod, "code_hash", lambda: "0" * 16)
    assert demo.RunLog(str(out / demo.RUN_LOG), **same).get("cat", seed) is None
    monkeypatch.undo()
    monkeypatch.setattr(pretrained_mod, "checkpoint_hash", lambda name: "f" * 16)
    assert demo.RunLog(str(out / demo.RUN_LOG), **same).get("cat", seed) is None


def test_quick_runs_default_to_their_own_folders():
    """--quick without --out never writes into the folder of a full run (make demo's demo_out)."""
    from causal_attn.cli.demo import default_out

    outs = {default_out(part, quick) for part in ("all", "cat", "pretrained", "capt-pretrained")
            for quick in (False, True)}
    assert default_out("all", False) == "demo_out" and default_out("pretrained", False) == "demo_pretrained_out"
    assert default_out("capt-pretrained", False) == "demo_capt_pretrained_out"
    assert len(outs) == 6 and default_out("pretrained", True) not in ("demo_out", "demo_pretrained_out")


def test_answer_loss_and_first_token_scoring_match_the_full_model(smollm2):
    """Logits only at labelled rows give the model's own loss; first-token predictions are the argmax of the
    full logits over the labels' first tokens."""
    from causal_attn.data.stg import generate_stg_e
    from causal_attn.demo.fit import encode_records

    base, tok = smollm2
    seed = random.randrange(10**6)
    recs = generate_stg_e(seed=seed, n_iid=3, n_ood=0, n_test=0)["train_L"]
    enc = encode_records(recs, tok)
    batch = CATCollator(tok.pad_token_id)(enc)
    handle = patch_model(base)
    try:
        decoder, head = demo.lm_and_head(handle)
        with torch.no_grad():
            full = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            ours = demo.answer_loss(decoder, head, batch)
            assert float(ours) == pytest.approx(float(full.loss), rel=1e-5), f"seed {seed}"
            labels = {"High Risk": 4264, "Middle Risk": 5550, "Low Risk": 8855}
            starts = [e["labels"].index(next(x for x in e["labels"] if x != -100)) for e in enc]
            prompts = [e["input_ids"][:s] for e, s in zip(enc, starts)]
            order = [2, 0, 1, 2]  # shuffled, a repeat, a batch of two and a batch of one
            got = demo.first_token_predictions(decoder, head, [prompts[i] for i in order], labels, tok.pad_token_id,
                                               batch_size=3)
            for i, g in zip(order, got):  # causal: the full text's logits at the prompt's last row
                logits = full.logits[i, starts[i] - 1]
                assert g == max(labels, key=lambda lab: float(logits[labels[lab]])), f"seed {seed}"
    finally:
        handle.unpatch()
    first = demo.label_first_tokens(tok, {r["target"]: e for r, e in zip(recs, enc)})
    assert all(first[r["target"]] == labels[r["target"]] for r in recs)
    assert all(tok.decode([labels[lab]]) == " " + lab.split()[0] for lab in labels)


def test_both_methods_start_from_the_same_lora_weights(smollm2):
    base, _ = smollm2
    recipe = demo.PretrainedRecipe(lora_r=4)
    a, pa = demo.build_model("vanilla", 3, recipe, base)
    b, pb = demo.build_model("cat", 3, recipe, base)
    c, pc = demo.build_model("cat", 4, recipe, base)
    assert len(pa) == len(pb) == 2 * 4 * base.config.num_hidden_layers  # A and B of q/k/v/o per layer
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not all(torch.equal(x, y) for x, y in zip(pa, pc))
    _, full = demo.build_model("cat", 3, demo.PretrainedRecipe(lora_r=0), base)
    assert sum(p.numel() for p in full) == sum(p.numel() for p in base.parameters())


def test_pretrained_demo_bad_arguments_give_one_line(tmp_path, capsys):
    for bad in (["--lr", "0"], ["--lora-r", "-1"], ["--steps", "0"], ["--gamma-decay", "-1"],
                ["--model", str(tmp_path / "none.gguf")]):
        assert main(["demo", "pretrained", "--out", str(tmp_path), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("causal-attn demo: error:") and len(err.splitlines()) == 1, err


def test_search_shares_vanilla_runs_and_tabulates_a_results_file(tmp_path):
    from causal_attn.demo.search import run_key, table

    a = {"name": "A", "steps": 80, "alpha": 2.0}
    b = {"name": "B", "steps": 80, "alpha": 5.0}
    c = {"name": "C", "steps": 80, "alpha": 2.0, "lora_r": 64}
    assert run_key(a, "vanilla", 0) == run_key(b, "vanilla", 0) != run_key(c, "vanilla", 0)
    assert run_key(a, "cat", 0) != run_key(b, "cat", 0) and run_key(a, "vanilla", 0) != run_key(a, "vanilla", 1)
    mass = {"causal": 0.3, "spurious": 0.1, "irrelevant": 0.05}
    lines = [{"setting": s, "method": m, "seed": 0, "val_iid": iid, "val_ood": ood, "mass": mass, "seconds": 60.0,
              "val_size": 100}
             for s, m, iid, ood in ((a, "vanilla", 0.7, 0.5), (a, "cat", 0.75, 0.625), (b, "cat", 0.8, 0.7),
                                    (c, "vanilla", 0.9, 0.6))]
    lines[2]["code"] = {"git_revision": "abcdef1234" + "0" * 30, "git_dirty": True, "code_hash": "0" * 16}
    path = tmp_path / "search.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = table(str(path)).splitlines()[2:]
    assert len(rows) == 4  # one per CAT run, each beside the vanilla run it shares, a lone vanilla run, the majority
    assert rows[2].startswith("| C |") and "| 90.0 / 60.0 | – |" in rows[2] and rows[2].endswith("| – | – | – |")
    assert rows[0].startswith("| A |") and "| 0 | 100 | 70.0 / 50.0 | 75.0 / 62.5 | 0.30 / 0.10 / 0.05 | 0.30 / 0.10 / 0.05 | 60 |" in rows[0]
    assert rows[0].endswith("| 60 | – |") and rows[1].endswith("| 60 | abcdef1+dirty |")
    assert rows[1].startswith("| B |") and "| 70.0 / 50.0 | 80.0 / 70.0 |" in rows[1]
    from causal_attn.demo.stg import validation_sets
    from causal_attn.data.stg import generate_stg_e

    val = validation_sets({k: generate_stg_e(seed=42)[k] for k in ("test_iid", "test_ood")})
    low = [100 * sum(r["target"] == "Low Risk" for r in val[k][:100]) / 100 for k in ("iid", "ood")]
    assert rows[3] == f"| majority class (Low Risk) | – | – | 100 | {low[0]:.1f} / {low[1]:.1f} | – | – | – | – | – |"


def test_capt_search_tabulates_capt_beside_vanilla(tmp_path):
    """The capt-pretrained search's table: CAPT's margin over the vanilla run of the same setting and seed (a
    vanilla run ignores ``copies``, so settings that differ only there share it)."""
    from causal_attn.demo.search import capt_table, run_key

    a = {"name": "A", "steps": 300, "copies": 4}
    b = {"name": "B", "steps": 300, "copies": 8}
    assert run_key(a, "vanilla", 10) == run_key(b, "vanilla", 10) != run_key(a, "capt", 10)
    acc = lambda c, a, n: {"commonsense": c, "anticommonsense": a, "nonsense": n}  # noqa: E731
    rows = [{"setting": a, "method": "vanilla", "seed": 10, "val_size": 50, "accuracy": acc(1.0, 0.25, 0.5),
             "unparsed": 0, "seconds": 100.0},
            {"setting": a, "method": "capt", "seed": 10, "val_size": 50, "accuracy": acc(0.98, 0.9, 0.875),
             "unparsed": 3, "seconds": 120.0, "code": {"git_revision": "1234567" + "8" * 33, "git_dirty": False}},
            {"setting": {"name": "C", "steps": 50}, "method": "vanilla", "seed": 10, "val_size": 50,
             "accuracy": acc(0.5, 0.5, 0.5), "unparsed": 1, "seconds": 10.0}]
    body = capt_table(rows).splitlines()[2:]
    assert len(body) == 2
    assert body[0].startswith("| A |") and body[0].endswith(
        "| 100.0 / 25.0 / 50.0 | 98.0 / 90.0 / 87.5 | +65.0 / +37.5 | 3 | 120 | 1234567 |")
    assert body[1].startswith("| C |") and body[1].endswith("| 50.0 / 50.0 / 50.0 | – | – | – | – | – |")
