"""Simulated thread scaling of the C++ CPU kernel (issues 27, 33): what a 2-core machine cannot measure.

Each task of the kernel's parallel passes is timed at one thread (``torch.ops.causal_attn_cpp.task_seconds``
runs the real forward and backward with a clock around every task, in the order ``at::parallel_for`` hands
them out; the per-task minimum over ``--repeats`` runs filters out the moments another process had the core).
The makespan on p threads then follows ATen's OpenMP ``invoke_parallel`` (ATen/ParallelOpenMP.h): with grain
size 1 it uses min(p, n) threads, and thread ``tid`` runs the contiguous range
``[tid * chunk, (tid + 1) * chunk)`` with ``chunk = ceil(n / threads)``; passes run one after the other.
Predicted speed-up = baseline / makespan. Not modelled: memory bandwidth shared by the cores, caches,
turbo, and the fork/join cost of a parallel region (microseconds per pass).

The backward is timed twice (the op's ``query_groups`` argument): "grouped", the kernel's own plan (query
groups per (batch, kv head) chosen from the shape, then the pass that adds the groups' partial dK, dV), and
"single", one query group: one task per (batch, kv head), the single pass the kernel ran on 8 or more such pairs
before issue 33 (it is also what the plan picks from 32 pairs on). ``chosen`` marks the plan's structure.

Backward speed-ups are over the fastest one-thread backward of the two (the sum of its task times), so the
grouped backward's extra work (the partial dK, dV and their sum) shows in its curve, at 1 thread too; forward
speed-ups are over the forward at one thread.

    python -m benchmarks.sim_threads [--out benchmarks/results] [--repeats 3]

writes ``sim_threads.csv`` (one row per case, phase, structure and thread count) and ``sim_threads.png``.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch

from .common import write_csv

THREADS = (1, 2, 8, 16, 32, 64)


@dataclass(frozen=True)
class Case:
    name: str
    Hq: int
    Hkv: int
    T: int
    D: int
    B: int = 1


CASES = (Case("SmolLM2-135M", 9, 3, 2048, 64), Case("SmolLM2-135M", 9, 3, 8192, 64),
         Case("8 heads D=128", 8, 8, 4096, 128))


def static_makespan(times: list[float], threads: int) -> float:
    """Makespan of at::parallel_for(0, n, grain 1) over tasks with these times on ``threads`` threads."""
    n = len(times)
    if n == 0:
        return 0.0
    used = min(threads, n)
    chunk = math.ceil(n / used)
    return max(sum(times[t * chunk:(t + 1) * chunk]) for t in range(used))


def measure_tasks(case: Case, repeats: int, seed: int = 0) -> dict[str, list[list[float]]]:
    """Per-task seconds at one thread (the minimum over ``repeats`` runs), one list per pass: the forward, the
    grouped backward (the plan's) and the single-pass backward, with the mass gradient and ~6 % random
    adjacency."""
    from causal_attn.ops import cpp_backend  # noqa: F401  (loads the operators)

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(case.B, case.Hq, case.T, case.D, generator=g)
    k, v = (torch.randn(case.B, case.Hkv, case.T, case.D, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, generator=g)
    dmass = torch.randn(case.B, case.Hq, case.T, generator=g)
    words = (case.T + 31) // 32
    bits = [torch.randint(-2**31, 2**31, (case.B, case.T, words), generator=g, dtype=torch.int64) for _ in range(4)]
    packed = (bits[0] & bits[1] & bits[2] & bits[3]).to(torch.int32)  # 1/16 of the bits; non-causal ones ignored
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {"grouped": [], "single": []}
    try:
        for _ in range(repeats):
            for structure, timed in runs.items():
                timed.append(torch.ops.causal_attn_cpp.task_seconds(q, k, v, dout, dmass, packed, None, None,
                                                                    case.D ** -0.5, 0 if structure == "grouped" else 1))
    finally:
        torch.set_num_threads(previous)

    def fastest(tensors):
        return torch.stack(tensors).min(0).values.tolist()

    tasks = {"forward": [fastest([fwd for fwd, _ in runs["grouped"] + runs["single"]])]}
    for structure, timed in runs.items():
        tasks[structure] = [fastest([passes[i] for _, passes in timed]) for i in range(len(timed[0][1]))]
    return tasks


def simulate(case: Case, tasks: dict[str, list[list[float]]], threads=THREADS) -> list[dict]:
    groups = torch.ops.causal_attn_cpp.plan(case.B, case.Hq, case.Hkv, case.T)[0]
    chosen = "grouped" if groups > 1 else "single"
    serial = {name: sum(map(sum, passes)) for name, passes in tasks.items()}
    baseline = {"forward": serial["forward"], "backward": min(serial["grouped"], serial["single"])}
    rows = []
    for p in threads:
        for phase, structure, name in (("forward", "unchanged", "forward"), ("backward", "single", "single"),
                                       ("backward", "grouped", "grouped")):
            passes = tasks[name]
            span = sum(static_makespan(t, p) for t in passes)  # passes run one after the other
            speedup = baseline[phase] / span
            rows.append({"case": case.name, "Hq": case.Hq, "Hkv": case.Hkv, "T": case.T, "D": case.D, "B": case.B,
                         "phase": phase, "structure": structure, "chosen": structure in (chosen, "unchanged"),
                         "tasks": "+".join(str(len(t)) for t in passes), "threads": p,
                         "serial_ms": serial[name] * 1e3, "baseline_ms": baseline[phase] * 1e3,
                         "makespan_ms": span * 1e3, "speedup": speedup, "efficiency": speedup / p})
    return rows


def plot(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["case"], r["T"]) for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    for ax, (name, T) in zip(axes[0], cases):
        mine = [r for r in rows if (r["case"], r["T"]) == (name, T)]
        threads = sorted({r["threads"] for r in mine})
        ax.plot(threads, threads, color="grey", lw=0.8, ls=":", label="ideal")
        for phase, structure, style in (("forward", "unchanged", "-o"), ("backward", "single", "-v"),
                                        ("backward", "grouped", "-^")):
            picked = [r for r in mine if r["phase"] == phase and r["structure"] == structure]
            ys = [next(r["speedup"] for r in picked if r["threads"] == p) for p in threads]
            label = phase if structure == "unchanged" else f"{phase} {structure}"
            chosen = phase == "backward" and picked[0]["chosen"]
            ax.plot(threads, ys, style, lw=2.5 if chosen else 1.2, label=label + (" (chosen)" if chosen else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(threads, [str(p) for p in threads])
        ax.set_yticks(threads, [str(p) for p in threads])
        ax.set_xlabel("threads")
        ax.set_title(f"{name}, T={T}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("predicted speed-up over 1 thread\n(backward: over the faster one)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cases=CASES, repeats: int = 3, out: str = "benchmarks/results", threads=THREADS, log=print) -> list[dict]:
    rows = []
    for case in cases:
        tasks = measure_tasks(case, repeats)
        rows += simulate(case, tasks, threads)
        top = max(threads)
        at_top = {f"{r['phase']} {r['structure']}" + (" (chosen)" if r["chosen"] and r["phase"] == "backward" else ""):
                  r["speedup"] for r in rows if (r["case"], r["T"], r["threads"]) == (case.name, case.T, top)}
        log(f"{case.name} T={case.T}: tasks " + ", ".join(f"{k} {'+'.join(str(len(p)) for p in v)}"
                                                          for k, v in tasks.items())
            + f"; predicted speed-up at {top} threads: " + ", ".join(f"{k} {v:.1f}" for k, v in at_top.items()))
    write_csv(rows, os.path.join(out, "sim_threads.csv"))
    plot(rows, os.path.join(out, "sim_threads.png"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case; each task keeps its minimum")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    run(repeats=args.repeats, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
