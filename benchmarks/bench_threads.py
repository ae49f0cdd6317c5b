"""Thread scaling on CPU: the attention kernel and the training step at 1 thread and at all threads.

The other sweeps run at ``--threads`` (default 1, steadier on a shared machine). This one re-times one kernel
case (forward+backward with mass; B=1, 8 heads, no GQA) and one training step (``bench_train_step``'s model)
at each thread count of ``--scaling-threads`` (default: 1 and the thread count torch starts with), ours and
SDPA interleaved as everywhere else. Reported per thread count: the median time, the ratio to SDPA at the
same thread count, and the speed-up over 1 thread.

    python benchmarks/runner.py --only threads [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels  # noqa: E402
import bench_train_step  # noqa: E402
from common import interleaved_times, section_main, summarize, timed_phases  # noqa: E402

DEFAULT_THREADS = torch.get_num_threads()  # read at import, before a sweep pins --threads


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--scaling-threads", type=int, nargs="+", help=f"thread counts of the scaling runs (default 1 "
                   f"and {DEFAULT_THREADS}, torch's default here)")
    p.add_argument("--scaling-seq-len", type=int, default=4096, help="T of the kernel case")
    p.add_argument("--scaling-head-dim", type=int, default=128, help="head dim of the kernel case")
    p.add_argument("--scaling-train-seq-len", type=int, default=1024, help="T of the training step")


def thread_counts(args) -> list[int]:
    return sorted(set(args.scaling_threads or [1, DEFAULT_THREADS]))


def _time(runs: dict, args) -> dict:
    return summarize(interleaved_times(runs, warmup=args.warmup, repeats=args.repeats, budget_s=args.case_budget))


def run_sweep(args, log=print) -> list[dict]:
    """CSV rows: one per (part, thread count, method)."""
    if args.device != "cpu":
        log("thread scaling: CPU only, skipped on " + args.device)
        return []
    device = torch.device("cpu")
    previous = torch.get_num_threads()
    case = bench_kernels.Case(args.scaling_seq_len, args.scaling_head_dim, args.heads, args.heads, args.batch)
    inp = bench_kernels.make_inputs(case, device, getattr(torch, args.dtype))
    kernels = {m: bench_kernels.make_method(m, inp, args.backend) for m in ("cat", "sdpa")}
    steps = {m: bench_train_step.StepBench(m, device) for m in ("cat", "sdpa")}
    for b in steps.values():
        b.prepare(bench_train_step.WARM_T, args.train_batch).step()
        b.prepare(args.scaling_train_seq_len, args.train_batch)
    rows = []
    try:
        for n in thread_counts(args):
            torch.set_num_threads(n)
            parts = {
                "kernel": (case.T, _time({m: (lambda f=f, b=b: timed_phases(f, b, device)) for m, (f, b) in
                                          kernels.items()}, args)),
                "train_step": (args.scaling_train_seq_len, _time({m: (lambda s=s: timed_phases(
                    s.forward_loss, s.backward_step, device)) for m, s in steps.items()}, args)),
            }
            for part, (T, times) in parts.items():
                for m, t in times.items():
                    rows.append({"part": part, "T": T, "D": case.D if part == "kernel" else "", "threads": n,
                                 "method": m, "ms": t["fwdbwd"] * 1e3, "x_sdpa": t.get("fwdbwd_x", "")})
            log(f"threads={n}: " + ", ".join(f"{r['part']} {r['method']} {r['ms']:.0f} ms" for r in rows[-4:]))
    finally:
        torch.set_num_threads(previous)
    base = {(r["part"], r["method"]): r["ms"] for r in rows if r["threads"] == 1}
    for r in rows:
        if (r["part"], r["method"]) in base:
            r["speedup_vs_1"] = base[(r["part"], r["method"])] / r["ms"]
    return rows


if __name__ == "__main__":
    sys.exit(section_main("threads"))
