"""CATTrainer and CATCollator: padding with the graph, gradient accumulation against a hand-written loss, and a
short training run whose logs follow the gamma schedule while the Re-Attention loss falls and R rises."""
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainingArguments

from causal_attn import CATTrainer
from causal_attn.trainer import CATCollator, make_gamma
from numerics import fresh_seed
from tiny_models import tiny_model


def records(n, seed, vocab=97):
    """Records as the data pipeline writes them: input_ids, edges (row-aligned) and unrelated text fields."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(8, 16, (1,), generator=g))
        ids = torch.randint(3, vocab, (T,), generator=g).tolist()
        edges = [(i, j) for i in range(T) for j in range(i + 1) if torch.rand(1, generator=g) < 0.3]
        out.append({"input_ids": ids, "edges": edges, "input": "text", "important": "[]"})
    return out


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                num_train_epochs=1, logging_steps=1, learning_rate=1e-2, report_to=[], save_strategy="no",
                use_cpu=True, seed=0, remove_unused_columns=True)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_tokens_and_graph(side):
    recs = records(3, fresh_seed())
    recs[1].pop("edges")
    batch = CATCollator(0, padding_side=side)(recs)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "adjacency"}
    T = max(len(r["input_ids"]) for r in recs)
    dense = batch["adjacency"].to_dense()
    assert dense.shape == (3, T, T) and not dense[1].any()
    for b, r in enumerate(recs):
        n = len(r["input_ids"])
        real = slice(0, n) if side == "right" else slice(T - n, T)
        assert batch["input_ids"][b, real].tolist() == r["input_ids"]
        assert batch["attention_mask"][b].sum() == n and batch["attention_mask"][b, real].all()
        assert (batch["labels"][b] == -100).sum() == T - n
        if "edges" in r:
            shift = real.start
            assert sorted((int(i) - shift, int(j) - shift) for i, j in dense[b].nonzero()) == sorted(r["edges"])
    with pytest.raises(ValueError, match="future"):
        CATCollator(0)([{"input_ids": [5, 6, 7], "edges": [(0, 2)]}])


def test_gamma_schedules():
    assert make_gamma("exp")(2, 0.5) == math.exp(-2)
    assert make_gamma(0.3)(5, 0.9) == 0.3
    assert make_gamma("linear")(0, 0.25) == 0.75
    assert make_gamma(lambda epoch, progress: progress * 2)(0, 0.5) == 1.0
    with pytest.raises(ValueError, match="unknown gamma"):
        make_gamma("cosine-ish")


def test_gradient_accumulation_matches_hand_written_loss(tmp_path):
    """Two micro-batches: grads == those of CE over all tokens of both / their count + gamma * mean of the two
    attention losses (the Trainer passes num_items_in_batch to Llama and does not divide its loss)."""
    seed = fresh_seed()
    model = tiny_model("llama", seed=seed % 1000, train=True)
    gamma = 0.7
    trainer = CATTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_list(records(4, seed)),
                         alpha=1.5, gamma=gamma)
    assert trainer.args.remove_unused_columns is False
    batches = [trainer.data_collator(records(2, seed + i)) for i in range(2)]
    n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad()
    for b in batches:
        trainer.training_step(model, dict(b), torch.tensor(n_items))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    attn = []
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], adjacency=b["adjacency"])
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100,
                             reduction="sum")
        a = trainer.cat.loss()
        attn.append(a.item())
        (ce / n_items + gamma * a / 2).backward()
    assert min(attn) > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=f"{n} seed {seed}")


def test_short_run_follows_gamma_and_raises_ratio(tmp_path):
    model = tiny_model("qwen2", seed=3, train=True)
    trainer = CATTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=4, num_train_epochs=2),
                         train_dataset=Dataset.from_list(records(16, 11)), alpha=2.0)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "attn_loss" in h]
    assert len(logs) == 4  # 16 records / (4 x 2 accumulation) = 2 steps per epoch, 2 epochs
    previous_epoch = 0.0
    for h in logs:
        assert h["gamma"] == pytest.approx(math.exp(-math.floor(previous_epoch + 1e-9)))
        assert h["loss"] > h["lm_loss"] and 0 <= h["ratio_ge_alpha"] <= 1
        previous_epoch = h["epoch"]
    assert [h["gamma"] for h in logs] == pytest.approx([1, 1, math.exp(-1), math.exp(-1)])
    assert logs[-1]["attn_loss"] < logs[0]["attn_loss"]
    assert logs[-1]["ratio_mean"] > logs[0]["ratio_mean"]
