"""The demo's experiment: train a tiny Llama on STG_E, vanilla vs CAT, and measure it.

One run (:func:`train_run`) = a fresh ``tiny_llama`` seeded by ``seed``, patched with
:func:`causal_attn.patch_model`, trained for a fixed number of AdamW steps (linear warm-up, cosine decay,
gradient clipping) on batches drawn in an order fixed by ``seed``. Every batch carries its adjacency, so
both methods compute the same attention (and log the same ratio ``R``); the only difference is the loss:

    vanilla:  L = L_next                      (LM loss on the answer tokens; the prompt is masked)
    cat:      L = L_next + gamma(p) * L_attn  (p = step / steps, the training progress)

Evaluation (:func:`evaluate`) decodes the IID and OOD test prompts greedily and scores exact match;
:func:`factor_masses` reads the layer- and head-averaged attention map at the answer row (the row whose
output predicts the first answer token) and sums it over the tokens of the causal, spurious and
irrelevant "Name: value" spans (the paper's figure 3).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..data.adjacency import collate, encode_example
from ..data.scoring import score_stg_e
from ..hf.decode import greedy_decode
from .model import tiny_llama


@dataclass
class TrainRecipe:
    """What :func:`train_steps` reads: the optimisation and the Re-Attention loss (the tiny demo's defaults)."""
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    alpha: float = 5.0
    gamma: float = 1.0          # constant weight of L_attn over training progress (see gamma_at)
    gamma_decay: float = 0.0    # gamma(p) = gamma * exp(-gamma_decay * p)
    patch_layers: tuple | None = None   # decoder layers the Re-Attention loss averages over (None: all)
    curve_points: int = 40


@dataclass
class Recipe(TrainRecipe):
    """Everything a tiny-model run depends on besides the method and the seed."""
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    init_std: float = 0.02      # std of the model's initial weights (Hugging Face's default)


def gamma_at(recipe: TrainRecipe, progress: float) -> float:
    """Weight of the attention loss at training progress ``progress`` in [0, 1]."""
    return recipe.gamma * math.exp(-recipe.gamma_decay * progress)


def encode_records(records, tokenizer, *, edges: bool = True) -> list[dict]:
    """Token ids, masked labels and (``edges``: from the records' ``important`` annotations) adjacency
    edges of each record (the data module's builder)."""
    return [encode_example(r["input"], r["target"], r.get("important") if edges else None, tokenizer,
                           add_special_tokens=False) for r in records]


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to 0."""
    w = max(1, int(warmup * steps))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def train_run(method: str, seed: int, encoded: list[dict], tokenizer, recipe: Recipe, *, progress: bool = False):
    """Train one model; returns ``(model, handle, curve)`` with ``curve`` a list of logged points."""
    from ..hf.patch import patch_model

    check_method(method)
    model = tiny_llama(tokenizer, hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads,
                       intermediate=recipe.intermediate, init_std=recipe.init_std, seed=seed)
    handle = patch_model(model, alpha=recipe.alpha, collect_attention_map=False,
                         layers="all" if recipe.patch_layers is None else list(recipe.patch_layers))

    def lm_loss(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    curve = train_steps(model, handle, list(model.parameters()), lm_loss, method, seed, encoded,
                        tokenizer.pad_token_id, recipe, progress=progress)
    return model, handle, curve


def check_method(method: str):
    if method not in ("vanilla", "cat"):
        raise ValueError(f"method must be 'vanilla' or 'cat', got {method!r}")


def train_steps(model, handle, params, lm_loss, method: str, seed: int, encoded: list[dict], pad_token_id: int,
                recipe: TrainRecipe, *, progress: bool = False) -> list[dict]:
    """The training loop both demos share: ``recipe.steps`` AdamW steps on ``params`` (warm-up, cosine decay,
    clipping) over batches drawn in an order fixed by ``seed`` (the same for both methods), with
    ``L = lm_loss(batch) + gamma * handle.loss()`` for CAT and ``lm_loss(batch)`` for vanilla. Every batch's
    adjacency is set on ``handle``, so both methods compute the same attention and log the same ratio R.
    Returns the logged curve; leaves the model in ``eval()`` mode."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, recipe.steps, recipe.warmup))
    order = torch.Generator().manual_seed(seed)  # same batches for both methods of one seed
    perm, pos = torch.randperm(len(encoded), generator=order), 0
    every = max(1, recipe.steps // recipe.curve_points)
    curve, t0 = [], time.perf_counter()
    model.train()
    for step in tqdm(range(recipe.steps), desc=f"{method} seed {seed}", disable=not progress, leave=False):
        if pos + recipe.batch_size > len(perm):
            perm, pos = torch.randperm(len(encoded), generator=order), 0
        batch = collate([encoded[i] for i in perm[pos:pos + recipe.batch_size].tolist()], pad_token_id)
        pos += recipe.batch_size
        handle.set_adjacency(batch["adjacency"])
        lm = lm_loss(batch)
        attn_loss, stats = handle.loss(return_stats=True)
        gamma = gamma_at(recipe, step / recipe.steps) if method == "cat" else 0.0
        loss = lm + gamma * attn_loss if gamma else lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == recipe.steps - 1:
            ratio = stats.ratio.detach()[stats.rows]
            curve.append({"step": step, "lm_loss": float(lm.detach()), "attn_loss": float(attn_loss.detach()),
                          "gamma": gamma, "mean_ratio": float(ratio.mean()) if ratio.numel() else None,
                          "seconds": time.perf_counter() - t0})
    handle.set_adjacency(None)
    model.eval()
    return curve


def evaluate(model, tokenizer, tests: dict) -> dict:
    """Exact-match accuracy per test split, plus the predictions."""
    out = {}
    for name, records in tests.items():
        preds = greedy_decode(model, tokenizer, [r["input"] for r in records], max_new_tokens=4, batch_size=200)
        out[name] = {"acc": score_stg_e(preds, [r["target"] for r in records])["exact"], "predictions": preds}
    return out


def span_columns(text: str, spans, offsets) -> list[int]:
    """Token columns overlapping any occurrence of any of ``spans`` in ``text``."""
    cols = set()
    for s in spans:
        start = text.find(s)
        while start >= 0:
            end = start + len(s)
            cols.update(j for j, (a, b) in enumerate(offsets) if a < end and b > start and a < b)
            start = text.find(s, start + 1)
    return sorted(cols)


def factor_masses(model, handle, tokenizer, records, factors: dict) -> dict:
    """Mean attention mass at the answer row on each factor type's "Name: value" tokens.

    ``factors`` maps a factor type ("causal", ...) to its variable names. Returns per type the mean over
    ``records`` and the per-sample values, plus the averaged maps (for the heatmap figure)."""
    import re

    handle.collect_attention_map = True
    per_type = {k: [] for k in factors}
    maps = []
    try:
        for r in records:
            enc = tokenizer(r["input"], return_offsets_mapping=True, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                model(input_ids=enc["input_ids"])
            amap = handle.attention_map()[0]
            maps.append(amap)
            offsets = enc["offset_mapping"][0].tolist()
            row = amap[len(offsets) - 1]  # the answer row: predicts the first answer token
            for kind, names in factors.items():
                spans = [m.group(0) for n in names for m in re.finditer(re.escape(n) + r": -?\d+", r["input"])]
                per_type[kind].append(float(row[span_columns(r["input"], spans, offsets)].sum()))
    finally:
        handle.collect_attention_map = False
    return {"mean": {k: sum(v) / len(v) for k, v in per_type.items()}, "per_sample": per_type, "maps": maps}
