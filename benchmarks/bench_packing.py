"""Packed (padding-free) vs padded training steps on the lengths of real annotated data sets.

Samples: the released CAT annotated sets (``--packing-data``, default GSM8K ``gsm8k_val.jsonl`` and SVAMP
``svamp_train.jsonl`` of ``shared/data/cat/annotated/``), each record encoded as training uses it
(``encode_example``: text = input + target under the Qwen2 tokenizer, EOS appended, prompt labels -100, the
adjacency from its ``important`` annotation). Token ids are folded into the benchmark model's vocabulary
(``id % vocab``): lengths, labels and adjacency are the data set's own, the model stays
``bench_train_step``'s small Llama (4 layers, hidden 256, 8 heads). The records are shuffled once (seed 0)
and cut into batches of ``--packing-batch``; every method trains on the same batches in the same order:

    sdpa_padded   plain ``attn_implementation="sdpa"``, padded batch, LM loss only (the floor)
    cat_padded    CAT through ``patch_model``, padded batch (``CATCollator``)
    cat_packed    CAT through ``patch_model``, one padding-free row per batch (``CATCollator(packing=True)``)

A step is zero_grad, forward, loss (LM + gamma * Re-Attention with alpha 2, so that the hinge is active at
random init), backward, AdamW step; collation is outside the step (a DataLoader's job). Time: one round per
batch, the methods in rotated order, the first ``--warmup`` rounds untimed; samples/s = samples / summed step
time; ``x_cat_padded`` is that throughput over CAT padded's. Memory: a fresh child process per data set, per
method the RSS high-water growth of the steps on the first ``--packing-memory-batches`` batches after a
warm-up step (``common.measure_peak``). The CAT losses of the two CAT methods are compared step by step
(same initial weights, same samples, same updates: equal up to float32 rounding).

    python -m benchmarks.runner --only packing [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile

import torch

import causal_attn
from causal_attn.data.collate import CATCollator

from .bench_train_step import GAMMA, MODEL, StepBench
from .common import (child_report, interleaved_times, measure_peak, measure_peak_cuda, run_child, section_main,
                     setup_threads, timed_phases)

METHODS = ("sdpa_padded", "cat_padded", "cat_packed")
LABELS = {"sdpa_padded": "plain SDPA, padded", "cat_padded": "CAT, padded", "cat_packed": "CAT, packed"}
ANNOTATED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cat", "annotated")
DEFAULT_DATA = [os.path.join(ANNOTATED, name) for name in ("gsm8k_val.jsonl", "svamp_train.jsonl")]
ALPHA = 2.0  # R is about 1 at random init: the hinge is active, so the Re-Attention term has a gradient


def encode_records(path: str, vocab: int) -> list[dict]:
    """The records of an annotated JSONL file as collator records (``input_ids``, ``labels``, ``edges``), token
    ids folded into ``vocab``."""
    from causal_attn.data.adjacency import encode_example
    from causal_attn.data.tokenizers import qwen2_tokenizer

    tok = qwen2_tokenizer()
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                enc = encode_example(r["input"], r["target"], r.get("important"), tok)
                out.append({"input_ids": [i % vocab for i in enc["input_ids"]],
                            "labels": [i if i < 0 else i % vocab for i in enc["labels"]], "edges": enc["edges"]})
    return out


def make_batches(records: list[dict], batch: int, n_batches: int = 0, seed: int = 0) -> list[list[dict]]:
    """Shuffled (``seed``) full batches of ``batch`` records; ``n_batches`` > 0 keeps the first ones."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    batches = [[records[i] for i in order[s:s + batch]] for s in range(0, len(order) - batch + 1, batch)]
    return batches[:n_batches] if n_batches > 0 else batches


class PackingStep(StepBench):
    """``StepBench``'s model and optimizer for one of :data:`METHODS`; :meth:`prepare_batch` collates records.
    ``history`` keeps the CAT losses of every step."""

    alpha = ALPHA

    def __init__(self, method: str, device, seed: int = 0, dtype=torch.float32, backend: str = "auto"):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        super().__init__("sdpa" if method == "sdpa_padded" else "cat", device, seed=seed, dtype=dtype,
                         backend=backend)
        self.history: list[dict[str, float]] = []
        self.collator = CATCollator(0, packing=method == "cat_packed")
        if self.method == "cat":
            self.handle = causal_attn.patch_model(self.model, alpha=self.alpha, backend=backend)

    def collate(self, records: list[dict]) -> dict:
        batch = self.collator(records)
        if self.method != "cat":
            batch.pop("adjacency", None)
        return {k: v.to(self.device) for k, v in batch.items()}

    def prepare_batch(self, batch: list[dict] | dict):
        """Records, or a batch :meth:`collate` made."""
        self.batch = batch if isinstance(batch, dict) else self.collate(batch)
        return self

    def forward_loss(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        lm = self.model(**self.batch).loss
        if self.method != "cat":
            return lm
        attn = self.handle.loss()
        loss = lm + GAMMA * attn
        self.history.append({"loss": float(loss.detach()), "attn_loss": float(attn.detach())})
        return loss


# ------------------------------------------------------------------------------------------ memory child
def child_main(argv):
    """``--child BATCHES_JSON THREADS N_BATCHES METHOD...``: peak RSS growth (MiB) of the steps on the first
    N_BATCHES batches per method, each after its own warm-up step (optimizer state allocated)."""
    path, threads, n, *methods = argv[0], int(argv[1]), int(argv[2]), *argv[3:]
    setup_threads(threads)
    with open(path) as f:
        batches = json.load(f)[:n]
    child_report(**{m: steps_peak(m, batches, measure_peak) for m in methods})


def steps_peak(method: str, batches: list[list[dict]], measure, device="cpu", **kw) -> float:
    """``measure`` (``common.measure_peak`` or ``measure_peak_cuda``) of the steps on ``batches``, after a warm-up
    step that allocates the optimizer state; the batches are collated beforehand."""
    bench = PackingStep(method, device, **kw)
    bench.prepare_batch(batches[0]).step()
    collated = [bench.collate(b) for b in batches]
    return measure(lambda: [bench.prepare_batch(b).step() for b in collated])


# ------------------------------------------------------------------------------------------ sweep
def time_dataset(batches: list[list[dict]], args) -> tuple[dict, dict]:
    """One interleaved round per batch (the first ``--warmup`` untimed). Returns ``{method: [step seconds]}`` and
    the per-step absolute differences of the CAT losses, packed vs padded (``loss``, ``attn_loss``)."""
    device = torch.device(args.device)
    benches = {m: PackingStep(m, device, dtype=getattr(torch, args.dtype), backend=args.backend)
               for m in args.packing_methods}

    def runner(bench):
        collated = iter([bench.collate(b) for b in batches])  # method m's k-th call is round k

        def run():
            bench.prepare_batch(next(collated))
            return timed_phases(bench.forward_loss, bench.backward_step, device)
        return run

    warmup = min(args.warmup, len(batches) - 1)
    samples = interleaved_times({m: runner(b) for m, b in benches.items()}, warmup=warmup,
                                repeats=len(batches) - warmup)
    times = {m: s["fwdbwd"] for m, s in samples.items()}
    diffs = {"loss": [], "attn_loss": []}
    if {"cat_padded", "cat_packed"} <= set(benches):
        for a, b in zip(benches["cat_padded"].history, benches["cat_packed"].history):
            for k in diffs:
                diffs[k].append(abs(a[k] - b[k]))
        diffs["first_step"] = benches["cat_padded"].history[0]
    return times, diffs


def batch_stats(batches: list[list[dict]]) -> dict:
    """Tokens of the samples, and the tokens a padded batch computes (B x its longest sample)."""
    lengths = [len(r["input_ids"]) for b in batches for r in b]
    padded = sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)
    return {"batches": len(batches), "samples": len(lengths), "mean_len": sum(lengths) / len(lengths), "max_len": max(lengths),
            "tokens": sum(lengths), "padded_tokens": padded}


def run_dataset(path: str, args, log=print) -> list[dict]:
    name = os.path.splitext(os.path.basename(path))[0]
    base = {"data": name, "B": args.packing_batch, "device": args.device}
    try:
        records = encode_records(path, MODEL["vocab_size"])
    except (OSError, ImportError, ValueError) as e:  # no data file or no tokenizer package: one row says so
        return [{**base, "method": m, "status": f"skipped: {type(e).__name__}: {e}"} for m in args.packing_methods]
    batches = make_batches(records, args.packing_batch, args.packing_batches)
    if not batches:
        return [{**base, "method": m, "status": f"skipped: fewer than {args.packing_batch} records"}
                for m in args.packing_methods]
    stats = batch_stats(batches)
    times, diffs = time_dataset(batches, args)
    mem = {}
    if args.packing_memory_batches > 0:
        if args.device == "cuda":
            mem = {m: steps_peak(m, batches[:args.packing_memory_batches], measure_peak_cuda, args.device,
                                 dtype=getattr(torch, args.dtype), backend=args.backend) for m in times}
        else:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(batches[:args.packing_memory_batches], f)
            try:
                mem = run_child(__spec__.name, [f.name, args.threads, args.packing_memory_batches, *times],
                                timeout=args.child_timeout)
            finally:
                os.unlink(f.name)
    timed = len(next(iter(times.values())))
    rows = []
    for m, ts in times.items():
        row = {**base, "method": m, **stats, "timed_batches": timed, "step_ms": 1e3 * sum(ts) / len(ts),
               "samples_per_s": args.packing_batch * len(ts) / sum(ts)}
        if "error" in mem:
            row["status"] = f"memory child failed: {mem['error']}"
        elif m in mem:
            row["peak_mib"] = mem[m]
        rows.append(row)
    ref = next((r for r in rows if r["method"] == "cat_padded"), None)
    for r in rows:
        if ref is not None:
            r["x_cat_padded"] = r["samples_per_s"] / ref["samples_per_s"]
            if "peak_mib" in r and "peak_mib" in ref:
                r["peak_x_cat_padded"] = r["peak_mib"] / max(ref["peak_mib"], 1e-3)
        if r["method"] == "cat_packed" and diffs["loss"]:
            r["loss_max_abs_diff"] = max(diffs["loss"])
            r["attn_loss_max_abs_diff"] = max(diffs["attn_loss"])
        r.setdefault("status", "ok")
    log(f"packing {name} (B={args.packing_batch}, {timed} timed batches, mean length {stats['mean_len']:.0f}, "
        f"padded/real tokens {stats['padded_tokens'] / stats['tokens']:.2f}): "
        + ", ".join(f"{r['method']} {r['samples_per_s']:.1f} samples/s" for r in rows)
        + (f"; CAT loss packed vs padded: max |diff| {max(diffs['loss']):.2e} (Re-Attention term "
           f"{max(diffs['attn_loss']):.2e}) over {len(diffs['loss'])} steps; first step's padded loss "
           f"{diffs['first_step']['loss']:.4f} (Re-Attention {diffs['first_step']['attn_loss']:.4f})"
           if diffs["loss"] else ""))
    return rows


def run_sweep(args, log=print) -> list[dict]:
    rows = []
    for path in args.packing_data:
        rows += run_dataset(path, args, log=log)
    return rows


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--packing-data", nargs="+", default=DEFAULT_DATA, metavar="JSONL",
                   help="annotated JSONL files (input, target, important) whose lengths the packing section uses")
    p.add_argument("--packing-batch", type=int, default=16, help="samples per training step")
    p.add_argument("--packing-batches", type=int, default=0, help="batches per data set (0: all full batches)")
    p.add_argument("--packing-memory-batches", type=int, default=4, help="batches in the peak-memory measurement "
                   "(0: none)")
    p.add_argument("--packing-methods", nargs="+", default=list(METHODS), choices=METHODS)


if __name__ == "__main__":
    sys.exit(section_main("packing", child_main))
