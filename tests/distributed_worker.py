"""Worker for tests/test_distributed.py, launched as ``torchrun --nproc_per_node 2 distributed_worker.py
OUT_DIR SCENARIO...`` (gloo, CPU; scenarios ``ddp``, ``ddp_ga``, ``ddp_packed_ga``, ``fsdp``, ``trainer_ddp``,
``trainer_ddp_packed``, ``trainer_fsdp``, ``cli_train``).

Every rank builds the same tiny Llama (causal_attn/testing/models.py) patched with ``patch_model`` and the same
global batch (seeded), then
1. computes, alone and without collectives, one SGD step on the WHOLE batch in float64 (the reference)
   and in float32 (to measure float32's own rounding error against the reference), with the loss
   ``LM mean over tokens + GAMMA * Re-Attention mean over rows``;
2. takes one distributed SGD step in float32 on its half of the batch (DDP or FSDP2 with per-decoder-
   layer sharding), the LM term normalised as the HF Trainer does (``num_items_in_batch`` summed over
   ranks, times the world size) and the Re-Attention term by :mod:`causal_attn.hf.distributed`; ``_ga``
   scenarios split the half into two accumulation micro-batches; ``trainer_*`` scenarios take the step
   with ``CATTrainer`` (2 per device, 2 accumulation steps) as a user's torchrun script would; ``_packed``
   scenarios feed each rank's samples as padding-free rows (``CATCollator(packing=True)``: one row per
   micro-batch, position ids restarting per sample, the adjacency packed with its segments) and are still
   compared with the padded single-process step;
3. for DDP, also takes the step with the naive Re-Attention rule (each micro-batch's own mean,
   averaged by DDP) as a negative control that the comparison detects a wrong reduction.
``cli_train`` runs ``causal-attn train`` in every rank as torchrun would.
Each rank writes ``rank{r}.json``: per scenario the max parameter errors against the float64 reference.
SGD without clipping: unlike Adam's first step, its update is proportional to the gradient, scale included.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from causal_attn import CausalGraph, patch_model
from causal_attn.hf.distributed import count_loss_rows, data_parallel_handle_loss
from causal_attn.ops.loss import loss_rows
from causal_attn.testing.models import random_batch, random_edges, tiny_model

T, GLOBAL_B = 12, 8
SEED = int(os.environ.get("CAT_TEST_SEED", "0"))  # the same on every rank: model and batch
ALPHA, GAMMA, LR = 2.0, 1.0, 0.5
# per-sample edge densities: sample 0 has no edge, so the ranks hold different numbers of loss rows
DENSITIES = (0.0, 0.1, 0.5, 0.2, 0.9, 0.3, 0.05, 0.6)


def build(dtype):
    model = tiny_model("llama", seed=SEED % 1000, dtype=dtype, train=True)
    return model, patch_model(model, alpha=ALPHA)


def global_batch():
    ids, mask, labels = random_batch(97, GLOBAL_B, T, padding="right", seed=SEED)
    edges = [random_edges(mask[b:b + 1], density=d, seed=SEED + b)[0] for b, d in enumerate(DENSITIES)]
    # the negative control needs the two halves (ranks) to hold different numbers of loss rows; with
    # equal counts the naive per-rank mean happens to be right. Empty rank 0's samples until they differ.
    half = GLOBAL_B // 2
    for b in range(half):
        rows, _, _ = loss_rows(CausalGraph.from_edges(edges, T), mask.bool())
        if rows[:half].sum() != rows[half:].sum():
            break
        edges[b] = []
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "adjacency": CausalGraph.from_edges(edges, T).to_dense()}


def part(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def sgd(params):
    with torch.no_grad():
        for p in params:
            p -= LR * p.grad
            p.grad = None


def reference_params(dtype, batch, gamma=GAMMA):
    model, handle = build(dtype)
    loss = model(**batch).loss + gamma * handle.loss()
    loss.backward()
    sgd(model.parameters())
    return {n: p.detach().double() for n, p in model.named_parameters()}


def micro_batches(local, ga):
    step = local["input_ids"].shape[0] // ga
    return [part(local, slice(i, i + step)) for i in range(0, local["input_ids"].shape[0], step)]


def as_records(batch):
    """The samples of a (right-)padded batch as collator records: real tokens, their labels, row-aligned edges."""
    return [{"input_ids": ids[m.bool()].tolist(), "labels": lab[m.bool()].tolist(), "edges": adj.nonzero().tolist()}
            for ids, m, lab, adj in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        batch["adjacency"])]


def packed_micro_batches(local, ga):
    """Each micro-batch of ``micro_batches`` as one padding-free row."""
    from causal_attn.data.collate import CATCollator

    return [CATCollator(0, packing=True)(as_records(m)) for m in micro_batches(local, ga)]


def accumulate_gradients(model, handle, micros, naive, no_sync=None):
    """Forward/backward every micro-batch. LM term as the HF Trainer scales it. Re-Attention term,
    correct rule: rows counted over all micro-batches and ranks; naive rule: each micro-batch's own
    mean divided by the accumulation steps (then averaged over ranks by DDP)."""
    world = dist.get_world_size()
    tokens = sum(m["labels"][:, 1:].ne(-100).sum() for m in micros)
    dist.all_reduce(tokens)
    rows = count_loss_rows(micros)
    for i, m in enumerate(micros):
        sync = no_sync is None or i == len(micros) - 1
        with (torch.enable_grad() if sync else no_sync()):
            lm = model(**m, num_items_in_batch=tokens).loss * world
            attn = handle.loss() / len(micros) if naive else data_parallel_handle_loss(handle, global_rows=rows)
            (lm + GAMMA * attn).backward()


def ddp_params(micros, naive):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, handle = build(torch.float32)
    ddp = DDP(model)
    accumulate_gradients(ddp, handle, micros, naive, no_sync=ddp.no_sync)
    sgd(ddp.parameters())
    return {n.removeprefix("module."): p.detach().double() for n, p in ddp.named_parameters()}


def fsdp_params(micros):
    from torch.distributed.fsdp import fully_shard

    model, handle = build(torch.float32)
    for layer in model.model.layers:  # transformer-layer wrapping, as accelerate's auto-wrap does
        fully_shard(layer)
    fully_shard(model)
    accumulate_gradients(model, handle, micros, naive=False)
    sgd(model.parameters())
    return {n: p.detach().full_tensor().double() for n, p in model.named_parameters()}


def trainer_params(batch, fsdp, checkpointing=False, packing=False):
    """One optimizer step of ``CATTrainer`` (SGD, constant lr, no clipping, gamma 1) over the 8 samples:
    2 per device, 2 accumulation steps, on the launching torchrun's ranks, optionally with non-reentrant
    gradient checkpointing (the patched layers are replayed during backward) or packed micro-batches. Also
    returns the engine accelerate actually used (it runs FSDP only on accelerator devices)."""
    import tempfile

    from transformers import TrainingArguments

    from causal_attn.data.collate import CATCollator
    from causal_attn.hf.trainer import CATTrainer

    records = as_records(batch)
    model = tiny_model("llama", seed=SEED % 1000, train=True)
    extra = {}
    if fsdp:
        extra = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 max_steps=1, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
                                 weight_decay=0.0, max_grad_norm=0.0, report_to=[], save_strategy="no",
                                 use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, seed=0,
                                 disable_tqdm=True, logging_strategy="no", gradient_checkpointing=checkpointing,
                                 gradient_checkpointing_kwargs={"use_reentrant": False}, **extra)
        trainer = CATTrainer(model=model, args=args, train_dataset=records, alpha=ALPHA, gamma=GAMMA,
                             data_collator=CATCollator(0, packing=True) if packing
                             else CATCollator(0, pad_to_multiple_of=T))
        trainer.train()
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p) for n, p in trainer.model.named_parameters()}
    params = {n.removeprefix("module."): p.detach().double() for n, p in full.items()}
    return params, str(trainer.accelerator.distributed_type)


def cli_train(out_dir):
    """``causal-attn train`` unchanged under this torchrun: 2 ranks x 4 per device x 2 accumulation steps
    on the workspace tests/test_distributed.py wrote to OUT_DIR/cli."""
    from causal_attn.cli import main as cli

    ws = os.path.join(out_dir, "cli")
    rc = cli(["train", "--model", os.path.join(ws, "init"), "--data", os.path.join(ws, "train.jsonl"),
              "--out", os.path.join(ws, "out"), "--batch-size", "4", "--grad-accum", "2", "--epochs", "2",
              "--lr", "1e-2", "--alpha", "2", "--logging-steps", "1"])
    return {"rc": rc}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def run(scenario, batch, ref64, ref32, rank, world, out_dir):
    if scenario == "cli_train":
        return cli_train(out_dir)
    per_rank = GLOBAL_B // world
    packed = "_packed" in scenario
    micros = (packed_micro_batches if packed else micro_batches)(
        part(batch, slice(rank * per_rank, (rank + 1) * per_rank)), ga=2 if scenario.endswith("_ga") else 1)
    result = {}
    if scenario.startswith("ddp"):
        got = ddp_params(micros, naive=False)
        if packed:
            result["packed_rows"] = [m["input_ids"].shape[0] for m in micros]  # the same on every rank
        else:
            result["naive_err"] = max_diff(ddp_params(micros, naive=True), ref64)
    elif scenario == "fsdp":
        got = fsdp_params(micros)
    elif scenario.startswith("trainer"):
        got, result["engine"] = trainer_params(batch, fsdp=scenario == "trainer_fsdp",
                                               checkpointing=scenario == "trainer_ddp_checkpointing", packing=packed)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    result["dist_err"] = max_diff(got, ref64)
    result["dist_minus_single_fp32"] = max_diff(got, ref32)
    return result


def main(out_dir: str, scenarios: list[str]):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = global_batch()
    start = {n: p.detach().double() for n, p in build(torch.float64)[0].named_parameters()}
    ref64 = reference_params(torch.float64, batch)
    ref32 = reference_params(torch.float32, batch)
    results = {"world": world, "fp32_single_err": max_diff(ref32, ref64), "update_size": max_diff(ref64, start),
               "attention_term_effect": max_diff(reference_params(torch.float64, batch, gamma=0.0), ref64)}
    for scenario in scenarios:
        results[scenario] = run(scenario, batch, ref64, ref32, rank, world, out_dir)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
