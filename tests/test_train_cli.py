"""`causal-attn train` -> checkpoint -> resume -> `eval` on a tiny Llama with a locally built tokenizer,
for vanilla, CAT and LoRA; greedy decoding with left padding vs one-prompt-at-a-time decoding; CLI errors."""
import json
import math
import os
import random

import pytest
import torch

from causal_attn.cli import main
from causal_attn.data.stg import generate_stg_e
from causal_attn.hf.decode import greedy_decode
from causal_attn.demo.model import build_word_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_cli")
    g = generate_stg_e(seed=random.randrange(10**6), n_iid=40, n_ood=8, n_test=8)
    train = g["train_L"][:24]
    with open(root / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)
    with open(root / "test.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in g["test_iid"] + g["test_ood"])
    tok = build_word_tokenizer([r["input"] + r["target"] for recs in g.values() for r in recs])
    model = tiny_llama(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=random.randrange(1000))
    model.save_pretrained(root / "init")
    tok.save_pretrained(root / "init")
    return root


def _state(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def _train(ws, out, *extra):
    args = ["train", "--model", str(ws / "init"), "--data", str(ws / "train.jsonl"), "--out", str(out),
            "--batch-size", "8", "--lr", "3e-3", "--logging-steps", "1", *extra]
    assert main(args) == 0
    return json.loads((out / "train_summary.json").read_text())


class SimulatedCrash(Exception):
    pass


def _perturbed_copy(src, dst):
    """The model at ``src`` with every weight moved: a run that starts from it instead of a checkpoint ends
    elsewhere."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


@pytest.mark.parametrize("method", ["vanilla", "cat"])
def test_train_resume_eval(workspace, tmp_path, method, monkeypatch):
    """A run stopped right after its step-4 checkpoint, as a crash would, then resumed, ends with the weights of
    an uninterrupted run. The resumed run starts from a perturbed initial model and runs only the 2 remaining
    steps, so a restart from scratch (or from the initial weights) would not end there."""
    from causal_attn.hf.trainer import CATTrainer

    common = ["--method", method, "--alpha", "2", "--epochs", "2", "--save-steps", "2"]  # 3 steps per epoch
    straight = _train(workspace, tmp_path / "straight", *common)
    assert straight["global_step"] == 6
    logged = [h for h in straight["log_history"] if "loss" in h]
    assert logged and all(("attn_loss" in h) == (method == "cat") for h in logged)
    init, trained = _state(workspace / "init"), _state(tmp_path / "straight")
    assert any(not torch.equal(init[k], trained[k]) for k in init)

    save, steps = CATTrainer._save_checkpoint, []

    def crash_after_step_4(self, *a, **kw):
        save(self, *a, **kw)
        if self.state.global_step == 4:  # mid-epoch: the resumed run has to skip a batch of epoch 2
            raise SimulatedCrash

    out = tmp_path / method
    monkeypatch.setattr(CATTrainer, "_save_checkpoint", crash_after_step_4)
    with pytest.raises(SimulatedCrash):
        _train(workspace, out, *common)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    monkeypatch.setattr(CATTrainer, "_save_checkpoint", save)
    step = CATTrainer.training_step
    monkeypatch.setattr(CATTrainer, "training_step", lambda self, *a, **kw: steps.append(1) or step(self, *a, **kw))
    _perturbed_copy(workspace / "init", tmp_path / "other_init")
    args = ["train", "--model", str(tmp_path / "other_init"), "--data", str(workspace / "train.jsonl"), "--out",
            str(out), "--batch-size", "8", "--lr", "3e-3", "--logging-steps", "1", *common, "--resume"]
    assert main(args) == 0
    resumed = json.loads((out / "train_summary.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["global_step"] == 6 and len(steps) == 2
    final = _state(out)
    for k in trained:
        torch.testing.assert_close(final[k], trained[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")

    assert main(["eval", "--model", str(out), "--data", str(workspace / "test.jsonl"), "--batch-size", "5",
                 "--max-new-tokens", "3"]) == 0
    rows = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert len(rows) == 16
    assert metrics["test"]["exact"] == pytest.approx(sum(r["prediction"] == r["target"] for r in rows) / 16)


def test_lora_changes_only_adapted_weights(workspace, tmp_path):
    out = tmp_path / "lora"
    _train(workspace, out, "--method", "cat", "--lora", "--alpha", "2", "--epochs", "1", "--lr", "5e-2")
    init, merged = _state(workspace / "init"), _state(out)
    assert set(init) == set(merged)  # merged back into a plain Llama
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    assert changed and all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)


def test_greedy_decode_left_padding_matches_single_prompts(workspace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "init")
    model = AutoModelForCausalLM.from_pretrained(workspace / "init").eval()
    records = [json.loads(line) for line in (workspace / "test.jsonl").read_text().splitlines()]
    rng = random.Random()
    prompts = [" ".join(r["input"].split()[: rng.randint(3, 40)]) for r in records]  # different lengths
    batched = greedy_decode(model, tok, prompts, max_new_tokens=4, batch_size=6)
    for prompt, got in zip(prompts, batched):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(4):  # plain argmax loop, no cache, no padding
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
        new = ids[0, -4:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        assert got == tok.decode(new, skip_special_tokens=True).strip()


def _error(capsys, args):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("causal-attn")]  # besides progress bars
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err
    return lines[0]


def test_cli_errors(workspace, tmp_path, capsys):
    init, data = str(workspace / "init"), str(workspace / "train.jsonl")
    base = ["train", "--model", init, "--out", str(tmp_path / "o")]
    assert "stg_s" in _error(capsys, base + ["--data", "nonsense"])
    assert "cannot read" in _error(capsys, base + ["--data", str(tmp_path / "missing.jsonl")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "target": "b", "important": [{"b": ["a"]}]}\n{"input": "a"}\n')
    assert "bad.jsonl:2" in _error(capsys, base + ["--data", str(bad)])
    bad.write_text('{"input": "a", "target": "b"}\n')
    assert "'important'" in _error(capsys, base + ["--data", str(bad), "--method", "cat"])
    bad.write_text('{"input": "a", \n')
    assert "not valid JSON" in _error(capsys, base + ["--data", str(bad)])
    bad.write_text('{"input": "a", "target": "b"}\n{"input": "a", "tar')
    assert "bad.jsonl:2: the last line is cut off" in _error(capsys, base + ["--data", str(bad), "--method", "vanilla"])
    assert "--task gsm8k: gold answer without a number" in _error(capsys, [
        "eval", "--model", init, "--data", data, "--task", "gsm8k", "--limit", "2", "--max-new-tokens", "1",
        "--out", str(tmp_path / "ev")])
    assert "--gamma" in _error(capsys, base + ["--data", data, "--gamma", "sometimes"])
    assert "decay:GAMMA:DECAY" in _error(capsys, base + ["--data", data, "--gamma", "decay:1"])
    assert "no checkpoint" in _error(capsys, base + ["--data", data, "--resume"])
    assert "cannot load model" in _error(capsys, ["train", "--model", str(tmp_path / "nomodel"), "--data", data,
                                                  "--out", str(tmp_path / "o")])
    assert "cannot load model" in _error(capsys, ["eval", "--model", str(tmp_path / "nomodel"), "--data", data])

    from transformers import GPT2Config, GPT2LMHeadModel, AutoTokenizer

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64)).save_pretrained(gpt)
    AutoTokenizer.from_pretrained(init).save_pretrained(gpt)
    assert "cannot patch" in _error(capsys, ["train", "--model", str(gpt), "--data", data, "--method", "cat",
                                             "--out", str(tmp_path / "o")])
    assert os.path.exists(init)


def test_train_packing(workspace, tmp_path, monkeypatch):
    """`--packing` end to end (batches are packed rows), recorded in the summary; its first logged losses (step 1,
    before any update) equal those of the padded run on the same batches; with `--compile` every step's do."""
    from causal_attn.data.collate import CATCollator

    packed_rows = []
    original = CATCollator._packed

    def spy(self, records, ids):
        batch = original(self, records, ids)
        packed_rows.append((len(records), tuple(batch["input_ids"].shape)))
        return batch

    monkeypatch.setattr(CATCollator, "_packed", spy)
    runs = {}
    for packing in (True, False):
        out = tmp_path / f"packing_{packing}"
        packed_rows.clear()
        runs[packing] = _train(workspace, out, "--method", "cat", "--alpha", "2", "--epochs", "1",
                               *(["--packing"] if packing else []))
        assert runs[packing]["packing"] is packing and runs[packing]["global_step"] == 3
        assert bool(packed_rows) is packing and all(n == 8 and shape[0] == 1 for n, shape in packed_rows)
    init, trained = _state(workspace / "init"), _state(tmp_path / "packing_True")
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    first = {p: next(h for h in runs[p]["log_history"] if "attn_loss" in h) for p in runs}
    assert first[True]["step"] == first[False]["step"] == 1 and first[False]["attn_loss"] > 0
    for key in ("loss", "lm_loss", "attn_loss"):
        assert first[True][key] == pytest.approx(first[False][key], rel=1e-4), key

    # `--compile` (Inductor) trains the same packed run: the same losses at every step
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = _train(workspace, tmp_path / "compiled", "--method", "cat", "--alpha", "2", "--epochs", "1",
                      "--packing", "--compile")
    assert compiled["compile"] is True and compiled["global_step"] == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    steps = [[h for h in run["log_history"] if "attn_loss" in h] for run in (runs[True], compiled)]
    assert len(steps[0]) == len(steps[1]) == 3
    for eager, comp in zip(*steps):
        for key in ("loss", "lm_loss", "attn_loss"):
            assert comp[key] == pytest.approx(eager[key], rel=1e-4), (eager["step"], key)


def test_gamma_option_takes_names_numbers_and_the_decay_schedule():
    from causal_attn.cli.train import gamma_option
    from causal_attn.hf.trainer import make_gamma

    assert gamma_option("0.5") == 0.5 and gamma_option("exp") == "exp"
    assert make_gamma(gamma_option("decay:2:1"))(0, 1.0) == pytest.approx(2 * math.exp(-1))
