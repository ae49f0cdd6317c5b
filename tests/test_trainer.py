"""CATTrainer and CATCollator: padding with the graph, gradient accumulation against a hand-written loss, and a
short training run whose logs follow the gamma schedule while the Re-Attention loss falls and R rises."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import TrainingArguments

from causal_attn import CATTrainer
from causal_attn.data.collate import CATCollator
from causal_attn.hf.trainer import decay_gamma, make_gamma
from causal_attn.testing.numerics import fresh_seed
from causal_attn.testing.models import tiny_model


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


def test_named_decay_schedule():
    """decay:GAMMA:DECAY = GAMMA * exp(-DECAY * progress), whatever the epoch; decay 0 is the constant GAMMA."""
    g, d = 0.5 + random.random(), 3 * random.random()
    for name in (decay_gamma(g, d), f"decay:{g}:{d}"):
        f = make_gamma(name)
        for epoch, progress in ((0, 0.0), (1, 0.5), (5, 1.0)):
            assert f(epoch, progress) == pytest.approx(g * math.exp(-d * progress)), (name, progress)
    assert make_gamma("decay:1.5:2")(0, 0.5) == pytest.approx(1.5 * math.exp(-1.0))
    assert make_gamma(decay_gamma(0.8, 0))(3, 0.7) == pytest.approx(0.8)
    for bad in ("decay:1", "decay:a:b", "decay:1:2:3"):
        with pytest.raises(ValueError, match="decay:GAMMA:DECAY"):
            make_gamma(bad)


def test_lm_loss_hook_is_a_micro_batch_mean(tmp_path):
    """With ``lm_loss`` the caller's loss replaces the model's; under 2 accumulation steps each micro-batch
    contributes (its loss + gamma * its attention loss) / 2."""
    seed = fresh_seed()
    model = tiny_model("llama", seed=seed % 1000, train=True)
    gamma = 0.7

    def mean_ce(model, inputs):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    adjacency=inputs["adjacency"])
        return F.cross_entropy(out.logits[:, :-1].flatten(0, 1), inputs["labels"][:, 1:].flatten(), ignore_index=-100)

    trainer = CATTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_list(records(4, seed)),
                         alpha=1.5, gamma=gamma, lm_loss=mean_ce)
    batches = [trainer.data_collator(records(2, seed + i)) for i in range(2)]
    trainer.current_gradient_accumulation_steps = 2
    model.zero_grad()
    for b in batches:
        trainer.training_step(model, dict(b), torch.tensor(sum(int((b["labels"] != -100).sum()) for b in batches)))
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for b in batches:
        ((mean_ce(model, b) + gamma * trainer.cat.loss()) / 2).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=f"{n} seed {seed}")


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


def test_packed_collator_lays_records_end_to_end():
    recs = records(3, fresh_seed())
    recs[1]["labels"] = [-100] * 3 + recs[1]["input_ids"][3:]
    batch = CATCollator(0, packing=True)(recs)
    assert set(batch) == {"input_ids", "labels", "position_ids", "adjacency"}
    lengths = [len(r["input_ids"]) for r in recs]
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert batch["input_ids"][0].tolist() == sum((r["input_ids"] for r in recs), [])
    assert batch["position_ids"][0].tolist() == sum((list(range(n)) for n in lengths), [])
    for r, s, n in zip(recs, starts, lengths):  # a record's first token is never predicted from the one before
        assert batch["labels"][0, s:s + n].tolist() == [-100] + r.get("labels", r["input_ids"])[1:]
    graph = batch["adjacency"]
    dense = graph.to_dense()[0]
    for r, s, n in zip(recs, starts, lengths):
        assert sorted((int(i), int(j)) for i, j in dense[s:s + n, s:s + n].nonzero()) == sorted(r["edges"])
    assert int(dense.sum()) == sum(len(r["edges"]) for r in recs)
    assert graph.segment_starts()[0].tolist() == sum(([s] * n for s, n in zip(starts, lengths)), [])
    with pytest.raises(ValueError, match="padding in its attention_mask"):
        CATCollator(0, packing=True)([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 0]}])


def _sgd_step(tmp_path, recs, packing, model_seed):
    """One CATTrainer optimizer step (SGD, no clipping: the update is the gradient, scale included) over 8
    records, 4 per micro-batch x 2 accumulation steps. Returns (update per parameter, the step's log)."""
    model = tiny_model("llama", seed=model_seed, train=True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = CATTrainer(model=model, args=args(tmp_path / f"packing_{packing}", per_device_train_batch_size=4,
                                                max_steps=1, optim="sgd", learning_rate=0.5, weight_decay=0.0,
                                                lr_scheduler_type="constant", max_grad_norm=0.0),
                         train_dataset=Dataset.from_list(recs), alpha=1.5, gamma=1.0, packing=packing)
    assert trainer.data_collator.packing is packing
    trainer.train()
    log = next(h for h in trainer.state.log_history if "attn_loss" in h)
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}, log


def test_packed_training_step_equals_padded_step(tmp_path):
    """The same 8 records (4 per micro-batch, 2 accumulation steps) packed and padded: same LM loss,
    Re-Attention loss and SGD update up to float32 rounding."""
    seed = fresh_seed()
    recs = records(8, seed)
    padded, log_padded = _sgd_step(tmp_path, recs, False, seed % 1000)
    packed, log_packed = _sgd_step(tmp_path, recs, True, seed % 1000)
    assert log_padded["attn_loss"] > 0
    for key in ("loss", "lm_loss", "attn_loss", "ratio_mean"):
        assert log_packed[key] == pytest.approx(log_padded[key], rel=1e-5), f"{key} seed {seed}"
    size = max(float(u.abs().max()) for u in padded.values())
    assert size > 1e-2, "the step is too small to test anything"
    for n in padded:
        torch.testing.assert_close(packed[n], padded[n], rtol=1e-4, atol=1e-5 * size, msg=f"{n} seed {seed}")


def test_packed_short_run_keeps_the_lm_loss_within_records(tmp_path):
    """A few packed steps train (the Re-Attention loss falls, R rises); afterwards a packed batch's LM loss is
    the token-weighted mean of each record's own loss computed alone: no record is predicted from another."""
    model = tiny_model("qwen2", seed=3, train=True)
    trainer = CATTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=4, num_train_epochs=2),
                         train_dataset=Dataset.from_list(records(16, 11)), alpha=2.0, packing=True)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "attn_loss" in h]
    assert len(logs) == 4 and all(h["loss"] > h["lm_loss"] for h in logs)
    assert logs[-1]["attn_loss"] < logs[0]["attn_loss"] and logs[-1]["ratio_mean"] > logs[0]["ratio_mean"]

    recs = records(5, fresh_seed())
    batch = trainer.data_collator(recs)
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                       use_cache=True).loss  # a cache object: transformers' own packing detection is off
        total = sum(model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["input_ids"]])).loss
                    * (len(r["input_ids"]) - 1) for r in recs)
    torch.testing.assert_close(packed, total / sum(len(r["input_ids"]) - 1 for r in recs), rtol=1e-5, atol=1e-6)


def test_compiled_trainer_matches_eager_at_every_step(tmp_path):
    """TrainingArguments(torch_compile=True) (Inductor): the same run as eager, loss terms equal at every step."""
    seed = fresh_seed()
    recs = [dict(r, input_ids=r["input_ids"][:8] * 3) for r in records(12, seed)]  # 24 tokens each: one compile
    logs, graphs = [], []
    for compiled in (False, True):
        torch._dynamo.reset()
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        model = tiny_model("llama", seed=seed % 1000, train=True, attn_implementation="sdpa")
        trainer = CATTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=3, torch_compile=compiled,
                                                    gradient_accumulation_steps=1),
                             train_dataset=Dataset.from_list(recs), alpha=5.0)
        trainer.train()
        logs.append([h for h in trainer.state.log_history if "attn_loss" in h])
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
    assert graphs == [0, 1], f"graphs compiled (eager, compiled): {graphs}"  # one length: one graph, no break
    assert len(logs[0]) == len(logs[1]) == 4 and logs[0][0]["attn_loss"] > 0
    for step, (eager, compiled) in enumerate(zip(*logs)):
        for key in ("loss", "lm_loss", "attn_loss", "ratio_mean"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5), f"step {step} {key} (seed {seed})"
