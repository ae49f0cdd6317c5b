"""CATSFTTrainer (causal_attn.hf.trl): one optimizer step through TRL's SFTTrainer equals one CATTrainer step on
the same records (both loss terms, the logged values and the SGD update); what it refuses and why; the edges
cut with the tokens when TRL truncates. Skipped only where TRL is not installed."""
import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from causal_attn.data.collate import CATCollator  # noqa: E402
from causal_attn.hf.trl import CATSFTTrainer, truncate_record  # noqa: E402
from causal_attn.testing.numerics import fresh_seed  # noqa: E402
from test_trainer import _sgd_step, records  # noqa: E402
from causal_attn.testing.models import tiny_model  # noqa: E402

VOCAB = 97


def tokenizer():
    """A word-level tokenizer over the tiny models' 97 ids (TRL needs a processing class; pad id 0)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t2", unk_token="t1")


def sft_config(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1,
                optim="sgd", learning_rate=0.5, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=0.0,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False)
    base.update(kw)  # TRL's own defaults otherwise, gradient checkpointing (non-reentrant) included
    return trl.SFTConfig(**base)


def _sft_step(tmp_path, recs, model_seed):
    model = tiny_model("llama", seed=model_seed, train=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = CATSFTTrainer(model=model, args=sft_config(tmp_path / "sft"), train_dataset=Dataset.from_list(recs),
                            processing_class=tokenizer(), alpha=1.5, gamma=1.0)
    assert isinstance(trainer.data_collator, CATCollator) and trainer.args.gradient_checkpointing
    trainer.train()
    log = next(h for h in trainer.state.log_history if "attn_loss" in h)
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}, log


def test_sft_step_equals_cat_trainer_step(tmp_path):
    """8 records, 4 per micro-batch x 2 accumulation steps, SGD without clipping (the update is the gradient):
    TRL's fused-LM-head loss plus gamma * L_attn gives CATTrainer's losses and update up to float32 rounding."""
    seed = fresh_seed()
    recs = records(8, seed)
    ours, log_cat = _sgd_step(tmp_path, recs, False, seed % 1000)
    sft, log_sft = _sft_step(tmp_path, recs, seed % 1000)
    assert log_cat["attn_loss"] > 0, f"seed {seed}"
    assert "mean_token_accuracy" in log_sft, "the CAT terms are logged through TRL's own metrics"
    for key in ("loss", "lm_loss", "attn_loss", "gamma", "ratio_mean", "ratio_ge_alpha"):
        assert log_sft[key] == pytest.approx(log_cat[key], rel=1e-5), f"{key}: seed {seed}"
    size = max(float(u.abs().max()) for u in ours.values())
    assert size > 1e-2, f"the step is too small to test anything (seed {seed})"
    for n in ours:
        torch.testing.assert_close(sft[n], ours[n], rtol=1e-4, atol=1e-5 * size, msg=lambda m: f"{n} seed {seed}: {m}")


@pytest.mark.parametrize("setting", [dict(packing=True), dict(padding_free=True), dict(label_smoothing_factor=0.1)])
def test_refuses_what_cat_cannot_train_with(tmp_path, setting):
    model = tiny_model("llama", train=True)
    with pytest.raises(ValueError, match="CATTrainer\\(packing=True\\)|second, gradient-free forward"):
        CATSFTTrainer(model=model, args=sft_config(tmp_path, **setting), processing_class=tokenizer(),
                      train_dataset=Dataset.from_list(records(2, 0)))
    with pytest.raises(ValueError, match="model object"):
        CATSFTTrainer(model="some/model-name", args=sft_config(tmp_path), processing_class=tokenizer(),
                      train_dataset=Dataset.from_list(records(2, 0)))


def test_trl_padding_free_refuses_a_custom_collator(tmp_path):
    """What docs/trl.md says of the installed TRL: its padding-free mode takes no custom collator."""
    with pytest.raises(ValueError, match="custom data collator is not supported"):
        trl.SFTTrainer(model=tiny_model("llama", train=True), args=sft_config(tmp_path, padding_free=True),
                       data_collator=CATCollator(0), processing_class=tokenizer(),
                       train_dataset=Dataset.from_list(records(2, 0)))


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_cuts_the_edges_with_the_tokens(tmp_path, mode):
    """Through TRL's dataset preparation with a short max_length: each record's dense adjacency is the
    full record's, cut where TRL cut the tokens."""
    seed = fresh_seed()
    recs = [dict(r, attention_mask=[1] * len(r["input_ids"])) for r in records(6, seed)]
    L = 9
    trainer = CATSFTTrainer(model=tiny_model("llama", train=True), processing_class=tokenizer(),
                            args=sft_config(tmp_path, max_length=L, truncation_mode=mode),
                            train_dataset=Dataset.from_list(recs))
    prepared = list(trainer.train_dataset)
    assert len(prepared) == len(recs), f"seed {seed}"
    for r, p in zip(recs, prepared):
        n = len(r["input_ids"])
        s = max(0, n - L) if mode == "keep_end" else 0
        kept = slice(s, s + min(n, L))
        assert p["input_ids"] == r["input_ids"][kept] and len(p["attention_mask"]) == len(p["input_ids"]), f"seed {seed}"
        full = torch.zeros(n, n, dtype=torch.bool)
        for i, j in r["edges"]:
            full[i, j] = True
        cut = torch.zeros(len(p["input_ids"]), len(p["input_ids"]), dtype=torch.bool)
        for i, j in p["edges"]:
            cut[i, j] = True
        assert torch.equal(cut, full[kept, kept]), f"seed {seed}"
    assert truncate_record({"input_ids": [5, 6], "edges": [[1, 0]]}, 4) == {"input_ids": [5, 6], "edges": [[1, 0]]}


def test_lora_through_trl_peft_config(tmp_path):
    """SFTTrainer wraps the patched model with PEFT itself (peft_config): the Re-Attention term is logged and only
    the LoRA weights move."""
    from peft import LoraConfig

    seed = fresh_seed()
    model = tiny_model("llama", seed=seed % 1000, train=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    trainer = CATSFTTrainer(model=model, args=sft_config(tmp_path, learning_rate=0.05), peft_config=lora,
                            train_dataset=Dataset.from_list(records(8, seed)), processing_class=tokenizer(), alpha=1.5)
    trainer.train()
    log = next(h for h in trainer.state.log_history if "attn_loss" in h)
    assert log["attn_loss"] > 0, f"seed {seed}"
    params = dict(trainer.model.get_base_model().named_parameters())
    base_moved = [n for n, p in params.items() if "lora_" not in n and not torch.equal(p, start[n.replace("base_layer.", "")])]
    assert not base_moved, f"seed {seed}: base weights changed: {base_moved[:4]}"
    assert all(p.abs().max() > 0 for n, p in params.items() if "lora_B" in n), f"seed {seed}: a LoRA B stayed zero"
