"""Worker for tests/test_distributed.py, launched as ``torchrun --nproc_per_node 2 distributed_worker.py
OUT_DIR SCENARIO...`` (gloo, CPU; scenarios ``ddp``, ``ddp_ga``, ``fsdp``).

Every rank builds the same tiny attention LM and the same global batch (seeded), then
1. computes, alone and without collectives, one SGD step on the WHOLE batch in float64 (the reference)
   and in float32 (to measure float32's own rounding error against the reference);
2. takes one distributed SGD step in float32 on its half of the batch (DDP or FSDP), with the LM and
   the Re-Attention terms scaled by :mod:`causal_attn.distributed`; ``ga`` scenarios split the half
   into two accumulation micro-batches;
3. for DDP, also takes the step with the naive rule (each rank's own means, averaged by DDP) as a
   negative control that the comparison can detect a wrong reduction.
Each rank writes ``rank{r}.json``: per scenario the max parameter errors against the float64 reference.
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from causal_attn import CausalGraph, attention
from causal_attn.distributed import count_loss_rows, data_parallel_re_attention_loss, scale_for_data_parallel
from causal_attn.loss import re_attention_loss

VOCAB, DIM, HEADS, LAYERS, T, GLOBAL_B = 32, 16, 2, 2, 12, 8
ALPHA, GAMMA, LR = 2.0, 1.0, 0.5


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x, graph, mask):
        B = x.shape[0]
        q, k, v = self.qkv(x).view(B, T, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        o, mass = attention(q, k, v, graph, key_padding_mask=mask, backend="cpu")
        return x + self.out(o.transpose(1, 2).reshape(B, T, DIM)), mass


class TinyAttentionLM(nn.Module):
    """Embedding, LAYERS residual attention blocks using causal_attn.attention, LM head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids, graph, mask):
        x, masses = self.embed(ids), []
        for block in self.blocks:
            x, mass = block(x, graph, mask)
            masses.append(mass)
        return self.head(x), masses


def global_batch():
    """Same on every rank: random tokens, right padding on some samples, adjacencies of varied density
    (sample 0 has none) so the ranks hold different numbers of Re-Attention rows."""
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (GLOBAL_B, T), generator=g)
    lengths = torch.tensor([T, T, 9, T, 7, T, T, 10])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    density = torch.tensor([0.0, 0.1, 0.5, 0.2, 0.9, 0.3, 0.05, 0.6])[:, None, None]
    dense = (torch.rand(GLOBAL_B, T, T, generator=g) < density) & torch.ones(T, T, dtype=torch.bool).tril()
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    return {"ids": ids, "mask": mask, "adjacency": dense, "labels": labels}


def part(batch, rows):
    return {k: v[rows] for k, v in batch.items()}


def lm_sum_and_tokens(logits, labels):
    shifted = labels[:, 1:]
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), shifted.reshape(-1), ignore_index=-100,
                         reduction="sum")
    return lm, shifted.ne(-100).sum()


def forward(model, batch):
    graph = CausalGraph.from_dense(batch["adjacency"])
    logits, masses = model(batch["ids"], graph, batch["mask"])
    return logits, masses, graph


def single_process_loss(model, batch):
    """LM mean over tokens + GAMMA * Re-Attention mean over rows, on one batch: the definition."""
    logits, masses, graph = forward(model, batch)
    lm, tokens = lm_sum_and_tokens(logits, batch["labels"])
    return lm / tokens + GAMMA * re_attention_loss(masses, graph, alpha=ALPHA, key_padding_mask=batch["mask"])


def sgd_step(model, params, loss_fns):
    for loss_fn in loss_fns:
        loss_fn().backward()
    with torch.no_grad():
        for p in params:
            p -= LR * p.grad
            p.grad = None


def reference_params(base, batch, dtype):
    model = copy.deepcopy(base).to(dtype)
    sgd_step(model, list(model.parameters()), [lambda: single_process_loss(model, batch)])
    return {n: p.detach().double() for n, p in model.named_parameters()}


def micro_batches(local, ga):
    b = local["ids"].shape[0]
    step = b // ga
    return [part(local, slice(i, i + step)) for i in range(0, b, step)]


def distributed_losses(model, micros, naive):
    """One loss closure per micro-batch. Correct rule: counts summed over the micro-batches and ranks
    (causal_attn.distributed). Naive rule: each micro-batch's own means (what a plain per-batch mean
    gives), divided by the accumulation steps."""
    tokens = sum(m["labels"][:, 1:].ne(-100).sum() for m in micros)
    dist.all_reduce(tokens)
    rows = count_loss_rows([{"adjacency": m["adjacency"], "attention_mask": m["mask"]} for m in micros])

    def closure(m):
        def loss():
            logits, masses, graph = forward(model, m)
            lm_sum, lm_tokens = lm_sum_and_tokens(logits, m["labels"])
            if naive:
                return (lm_sum / lm_tokens + GAMMA * re_attention_loss(masses, graph, alpha=ALPHA,
                                                                      key_padding_mask=m["mask"])) / len(micros)
            lm = scale_for_data_parallel(lm_sum, global_rows=tokens)
            return lm + GAMMA * data_parallel_re_attention_loss(masses, graph, alpha=ALPHA, key_padding_mask=m["mask"],
                                                                global_rows=rows)
        return loss
    return [closure(m) for m in micros]


def ddp_step(base, micros, naive):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(copy.deepcopy(base))
    losses = distributed_losses(ddp, micros, naive)
    for i, loss_fn in enumerate(losses):
        if i < len(losses) - 1:
            with ddp.no_sync():
                loss_fn().backward()
        else:
            loss_fn().backward()
    with torch.no_grad():
        for p in ddp.parameters():
            p -= LR * p.grad
    return {n.removeprefix("module."): p.detach().double() for n, p in ddp.named_parameters()}


def fsdp_step(base, micros):
    from torch.distributed.fsdp import fully_shard

    model = copy.deepcopy(base)
    for block in model.blocks:  # transformer-layer wrapping, as accelerate's auto-wrap does
        fully_shard(block)
    fully_shard(model)
    sgd_step(model, list(model.parameters()), distributed_losses(model, micros, naive=False))
    return {n: p.detach().full_tensor().double() for n, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def run(scenario, base, batch, ref64, ref32, rank, world):
    per_rank = GLOBAL_B // world
    local = part(batch, slice(rank * per_rank, (rank + 1) * per_rank))
    micros = micro_batches(local, ga=2 if scenario.endswith("_ga") else 1)
    result = {}
    if scenario.startswith("ddp"):
        got = ddp_step(base, micros, naive=False)
        result["naive_err"] = max_diff(ddp_step(base, micros, naive=True), ref64)
    elif scenario == "fsdp":
        got = fsdp_step(base, micros)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    result["dist_err"] = max_diff(got, ref64)
    result["dist_minus_single_fp32"] = max_diff(got, ref32)
    return result


def main(scenarios: list[str], out_dir: str):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = TinyAttentionLM()
    batch = global_batch()
    start = {n: p.detach().double() for n, p in base.named_parameters()}
    ref64 = reference_params(base, batch, torch.float64)
    ref32 = reference_params(base, batch, torch.float32)
    results = {"world": world, "fp32_single_err": max_diff(ref32, ref64), "update_size": max_diff(ref64, start)}
    for scenario in scenarios:
        results[scenario] = run(scenario, base, batch, ref64, ref32, rank, world)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[2:], sys.argv[1])
