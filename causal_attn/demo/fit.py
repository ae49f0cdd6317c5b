"""The demo's experiment: train a tiny Llama on STG_E, vanilla vs CAT, and measure it.

One run (:func:`train_run`) = a fresh ``tiny_llama`` seeded by ``seed``, patched with
:func:`causal_attn.patch_model`, trained by :func:`train` through :class:`causal_attn.hf.trainer.CATTrainer` (the
trainer ``causal-attn train`` runs) for a fixed number of AdamW steps (linear warm-up, cosine decay, gradient
clipping) on batches drawn in an order fixed by ``seed``. Every batch carries its adjacency, so both methods
compute the same attention (and log the same ratio ``ratio_mean``); the only difference is the loss:

    vanilla:  L = L_next                      (LM loss on the answer tokens; the prompt is masked)
    cat:      L = L_next + gamma(p) * L_attn  (p = step / steps, the training progress)

Evaluation (:func:`evaluate`) decodes the IID and OOD test prompts greedily and scores exact match;
:func:`factor_masses` reads the layer- and head-averaged attention map at the answer row (the row whose
output predicts the first answer token) and sums it over the tokens of the causal, spurious and
irrelevant "Name: value" spans (the paper's figure 3).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from ..data.adjacency import encode_example
from ..data.scoring import score_stg_e
from ..hf.decode import greedy_decode
from .model import tiny_llama


@dataclass
class TrainRecipe:
    """What :func:`train` reads: the optimisation and the Re-Attention loss (the tiny demo's defaults)."""
    steps: int = 800
    batch_size: int = 32
    lr: float = 1e-3
    warmup: float = 0.1
    weight_decay: float = 0.01
    alpha: float = 5.0
    gamma: float = 1.0          # gamma(p) = gamma * exp(-gamma_decay * p), p = step / steps: the named schedule
    gamma_decay: float = 0.0    # causal_attn.hf.trainer.decay_gamma ("decay:GAMMA:DECAY"; 0 = constant)
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


def encode_records(records, tokenizer, *, edges: bool = True) -> list[dict]:
    """Token ids, masked labels and (``edges``: from the records' ``important`` annotations) adjacency
    edges of each record (the data module's builder)."""
    return [encode_example(r["input"], r["target"], r.get("important") if edges else None, tokenizer,
                           add_special_tokens=False) for r in records]


def train_run(method: str, seed: int, encoded: list[dict], tokenizer, recipe: Recipe, *, progress: bool = False):
    """Train one tiny model; returns ``(model, handle, curve)`` with ``curve`` the logged points."""
    from ..hf.patch import patch_model

    check_method(method)
    model = tiny_llama(tokenizer, hidden=recipe.hidden, layers=recipe.layers, heads=recipe.heads,
                       intermediate=recipe.intermediate, init_std=recipe.init_std, seed=seed)
    handle = patch_model(model, alpha=recipe.alpha, collect_attention_map=False,
                         layers="all" if recipe.patch_layers is None else list(recipe.patch_layers))
    curve = train(model, handle, method, seed, encoded, tokenizer.pad_token_id, recipe, progress=progress)
    return model, handle, curve


def check_method(method: str):
    if method not in ("vanilla", "cat"):
        raise ValueError(f"method must be 'vanilla' or 'cat', got {method!r}")


CURVE_KEYS = ("lm_loss", "attn_loss", "gamma", "ratio_mean", "ratio_ge_alpha", "learning_rate")


class CurveLog(TrainerCallback):
    """The logged curve: one point per training log of :class:`~causal_attn.hf.trainer.CATTrainer` (its means
    since the previous log; ``step`` = optimizer steps done, ``seconds`` since training began)."""

    def __init__(self):
        self.points: list[dict] = []
        self._t0 = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "lm_loss" in logs:
            self.points.append({"step": state.global_step, **{k: logs[k] for k in CURVE_KEYS if k in logs},
                                "seconds": time.perf_counter() - self._t0})


def train(model, handle, method: str, seed: int, encoded: list[dict], pad_token_id: int, recipe: TrainRecipe, *,
          progress: bool = False, lm_loss=None) -> list[dict]:
    """Every demo's training: :class:`~causal_attn.hf.trainer.CATTrainer` (what ``causal-attn train`` runs) for
    ``recipe.steps`` AdamW steps (linear warm-up, cosine decay, gradient clipping at 1) over batches in an order
    fixed by ``seed`` (the same for both methods). CAT adds ``gamma(p) * L_attn`` (the named schedule
    ``decay:GAMMA:DECAY``), vanilla gamma 0; every batch carries its adjacency, so both methods compute the same
    attention and log the same ratio. ``lm_loss``: see ``CATTrainer``. Trains the model's trainable parameters;
    returns the logged curve (:class:`CurveLog`) and leaves the model in ``eval()`` mode."""
    import tempfile

    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from ..data.collate import CATCollator
    from ..hf.trainer import CATTrainer, decay_gamma

    gamma = decay_gamma(recipe.gamma, recipe.gamma_decay) if method == "cat" else 0.0
    curve = CurveLog()
    with tempfile.TemporaryDirectory(prefix="causal_attn_demo_") as out:  # nothing is saved there
        args = TrainingArguments(
            output_dir=out, max_steps=recipe.steps, per_device_train_batch_size=recipe.batch_size,
            learning_rate=recipe.lr, weight_decay=recipe.weight_decay, warmup_steps=recipe.warmup,
            lr_scheduler_type="cosine", optim="adamw_torch", max_grad_norm=1.0, seed=seed,
            dataloader_drop_last=True, dataloader_num_workers=0, logging_strategy="steps",
            logging_steps=max(1, recipe.steps // recipe.curve_points), logging_first_step=True,
            save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=not progress, use_cpu=True,
            log_level="error")
        trainer = CATTrainer(model=model, args=args, cat_handle=handle, gamma=gamma, lm_loss=lm_loss,
                             train_dataset=encoded, data_collator=CATCollator(pad_token_id), callbacks=[curve])
        trainer.remove_callback(PrinterCallback)  # the demo prints its own lines
        trainer.train()
    handle.set_adjacency(None)
    model.eval()
    return curve.points


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
