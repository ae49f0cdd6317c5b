"""Compiled training step: ``torch.compile(model)`` of the plain SDPA model and of the CAT-patched model, beside the
same two steps in eager mode.

Cases (``--compiled-cases``):
    T512, T1024, T2048  (any T<n>) the train-step benchmark's Llama (4 layers, hidden 256, 8 heads, vocab 1024), B 2, random
                        tokens and an STG-shaped adjacency (``bench_train_step``)
    smollm2             SmolLM2-135M with LoRA r 8 on q/k/v/o on its first 8 released STG_M records (``bench_pretrained``)
Methods: ``sdpa`` and ``cat`` (eager), ``sdpa_compiled`` and ``cat_compiled`` (the model wrapped in
``torch.compile`` after patching, Inductor unless ``--compile-backend``; the optimizer step stays eager). A step is
zero_grad, forward, loss (+ gamma * ``handle.loss()`` for CAT), backward, AdamW step.

Timing: the four steps interleaved per round after warm-up rounds (the first call of a shape compiles; the tiny
cases run in one process, so T1024 recompiles once with a dynamic length and T2048 reuses it, as in a run whose
batches vary in length). Ratios are medians of per-round ratios: eager CAT / eager SDPA, compiled CAT / compiled
SDPA. Memory: per method the median of 3 measurements of the RSS high-water growth of one more step over the
resident set before it, in this process after the timing (every method warm), so compiled code and caches are not
counted. On CPU the tiny cases run on ``--threads`` threads (default 1) and smollm2 on ``--pretrained-threads``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from . import bench_pretrained
from .bench_train_step import WARM_T, StepBench
from .common import (fmt, interleaved_times, machine_fields, measure_peak, num, section_main, setup_threads, summarize,
                     timed_phases)

METHODS = ("sdpa", "cat", "sdpa_compiled", "cat_compiled")
CASES = ("T512", "T1024", "T2048", "smollm2")  # T<n>: the tiny Llama at T = n; smollm2: the real checkpoint
TINY_BATCH = 2
TARGETS = {"time": 1.00, "memory": 1.05}  # compiled CAT / compiled SDPA


def _compiled(bench, backend: str):
    bench.model = torch.compile(bench.model, backend=backend)
    return bench


def tiny_benches(device, backend: str, compile_backend: str) -> dict:
    benches = {}
    for m in METHODS:
        bench = StepBench(m.removesuffix("_compiled"), device, backend=backend)
        bench.prepare(WARM_T, TINY_BATCH)  # patches the CAT model before it is wrapped
        benches[m] = _compiled(bench, compile_backend) if m.endswith("_compiled") else bench
        benches[m].step()  # optimizer state exists before anything is measured
    return benches


def smollm2_benches(device, backend: str, compile_backend: str):
    base, tok = bench_pretrained.pretrained.load(bench_pretrained.MODEL_NAME, device=device)
    batch = bench_pretrained.make_batch("stg", tok, base.config.vocab_size, device)
    benches = {}
    for m in METHODS:
        bench = bench_pretrained.PretrainedStep(m.removesuffix("_compiled"), base, device, backend=backend)
        bench.prepare(batch)
        benches[m] = _compiled(bench, compile_backend) if m.endswith("_compiled") else bench
    return benches, batch


def run_sweep(args, log=print) -> list[dict]:
    device = torch.device(args.device)
    machine = machine_fields()
    rows, tiny = [], None
    for case in args.compiled_cases:
        T = None if case == "smollm2" else int(case[1:])
        if T is None:
            if device.type == "cpu":
                torch.set_num_threads(args.pretrained_threads or os.cpu_count() or 1)
            benches, batch = smollm2_benches(device, args.backend, args.compile_backend)
            B, T = batch["input_ids"].shape
        else:
            if device.type == "cpu":
                setup_threads(args.threads)
            tiny = tiny or tiny_benches(device, args.backend, args.compile_backend)
            benches, B = tiny, TINY_BATCH
            for b in benches.values():
                b.prepare(T, B)
        runs = {m: (lambda b=b: timed_phases(b.forward_loss, b.backward_step, device)) for m, b in benches.items()}
        samples = interleaved_times(runs, warmup=args.compiled_warmup, repeats=args.repeats,
                                    budget_s=args.compiled_case_budget)
        eager = summarize({m: samples[m] for m in ("sdpa", "cat")}, base="sdpa")
        compiled = summarize({m: samples[m] for m in ("sdpa_compiled", "cat_compiled")}, base="sdpa_compiled")
        peaks = {m: statistics.median(measure_peak(b.step) for _ in range(3)) for m, b in benches.items()} \
            if device.type == "cpu" else {}
        for m in METHODS:
            times = {**eager, **compiled}[m]
            base = "sdpa_compiled" if m.endswith("_compiled") else "sdpa"
            row = {"case": case, "T": T, "B": B, "method": m, "device": device.type,
                   "compile_backend": args.compile_backend if m.endswith("_compiled") else "",
                   "threads": torch.get_num_threads() if device.type == "cpu" else "", **machine,
                   "load_avg": round(os.getloadavg()[0], 1), "rounds": len(samples[m]["fwdbwd"]),
                   "step_ms": times["fwdbwd"] * 1e3, "step_x_plain": times.get("fwdbwd_x", ""),
                   "x_eager_same_method": times["fwdbwd"] / statistics.median(samples[m.removesuffix("_compiled")]["fwdbwd"]),
                   "status": "ok"}
            if m in peaks:
                row["peak_mib"] = peaks[m]
                row["peak_x_plain"] = peaks[m] / max(peaks[base], 1e-3)
            rows.append(row)
        log(f"compiled {case} (B={B}, T={T}): " + ", ".join(
            f"{m} {r['step_ms']:.0f} ms" for m, r in zip(METHODS, rows[-len(METHODS):])))
    return rows


# ------------------------------------------------------------------------------------------ report
def summary_section(rows) -> list[str]:
    """Markdown: per case the eager and compiled CAT / plain ratios, and the goals (met or missed)."""
    by = {(r["case"], r["method"]): r for r in rows}
    first = rows[0] if rows else {}
    lines = ["## Compiled training step: torch.compile(model), CAT vs plain SDPA", "",
             f"One AdamW step; compiled with `{next((r['compile_backend'] for r in rows if r['compile_backend']), '-')}`"
             f" on {first.get('machine', '?')}; ratios are medians of per-round ratios of interleaved steps; peak = RSS"
             " growth of one step of a warm model, MiB.", "",
             "| case | B | T | plain eager ms | CAT eager | plain compiled ms | CAT compiled | compiled / eager (plain, CAT) "
             "| plain compiled peak MiB | CAT compiled peak |", "|" + "---|" * 10]
    goals = []
    for case in dict.fromkeys(r["case"] for r in rows):
        s, c, sc, cc = (by.get((case, m), {}) for m in METHODS)
        lines.append(f"| {case} | {s.get('B', '-')} | {s.get('T', '-')} | {fmt(num(s, 'step_ms'), '.0f')} | "
                     f"{fmt(num(c, 'step_x_plain'), '.3f', 'x')} | {fmt(num(sc, 'step_ms'), '.0f')} | "
                     f"{fmt(num(cc, 'step_x_plain'), '.3f', 'x')} | {fmt(num(sc, 'x_eager_same_method'), '.2f', 'x')}, "
                     f"{fmt(num(cc, 'x_eager_same_method'), '.2f', 'x')} | {fmt(num(sc, 'peak_mib'), '.0f')} | "
                     f"{fmt(num(cc, 'peak_x_plain'), '.3f', 'x')} |")
        for key, target, what in (("step_x_plain", TARGETS["time"], "time"),
                                  ("peak_x_plain", TARGETS["memory"], "peak memory")):
            x = num(cc, key)
            if x is not None:
                goals.append(f"- compiled CAT step {what}, {case}: {x:.3f}x compiled plain SDPA (goal <= {target:.2f}x): "
                             + ("met" if x <= target else "MISSED"))
    return lines + ([""] + goals if goals else []) + [""]


def headline(rows) -> str:
    """One sentence for the docs: the range of compiled CAT / compiled plain over the cases."""
    cc = [r for r in rows if r["method"] == "cat_compiled" and num(r, "step_x_plain") is not None]
    if not cc:
        return ""
    xs = [num(r, "step_x_plain") for r in cc]
    ps = [num(r, "peak_x_plain") for r in cc if num(r, "peak_x_plain") is not None]
    return (f"compiled CAT step {min(xs):.2f}x-{max(xs):.2f}x the compiled plain SDPA step's time"
            + (f" and {min(ps):.2f}x-{max(ps):.2f}x its peak memory" if ps else "")
            + f" ({', '.join(r['case'] for r in cc)}; {cc[0].get('machine', '?')})")


def plot(csv_path: str, out_dir: str) -> dict[str, str]:
    """Bars per case: CAT / plain SDPA step time and peak memory, eager and compiled."""
    from .common import ratio_bars, read_csv

    path = ratio_bars(read_csv(csv_path), {"cat": "eager: CAT / plain SDPA", "cat_compiled": "compiled: CAT / plain SDPA"},
                      keys=("step_x_plain", "peak_x_plain"), ylabel="x the plain SDPA step (same mode)",
                      suptitle="torch.compile(model): one training step, CAT relative to plain SDPA", out_dir=out_dir,
                      name="compiled.png")
    return {"compiled_png": path}


def _case(text: str) -> str:
    if text == "smollm2" or (text[:1] == "T" and text[1:].isdigit() and int(text[1:]) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use T<n> (e.g. T1024) or smollm2")


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--compiled-cases", nargs="+", default=list(CASES), type=_case,
                   help="T<n> (the tiny Llama at T = n) or smollm2")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled steps")
    p.add_argument("--compiled-warmup", type=int, default=2,
                   help="untimed rounds per case (the first call of a shape compiles)")
    p.add_argument("--compiled-case-budget", type=float, default=150.0,
                   help="seconds per case after which no new timing round starts")


if __name__ == "__main__":
    sys.exit(section_main("compiled"))
