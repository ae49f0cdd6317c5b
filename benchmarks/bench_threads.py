"""Thread scaling on CPU: the attention kernel and the training step at 1 thread and at all threads.

The other sweeps run at ``--threads`` (default 1, steadier on a shared machine). This one times two kernel
cases (forward+backward with mass, B=1: 8 heads without GQA, and SmolLM2-135M's attention, 9 query / 3 kv heads,
D 64, against SDPA with ``enable_gqa``) and one training step (``bench_train_step``'s model)
at each thread count of ``--scaling-threads`` (default: 1 and the thread count torch starts with). Each
measurement is a fresh process at one thread count (ours and SDPA interleaved inside it, medians of
``--repeats`` rounds); ``--scaling-rounds`` rounds run one such process per thread count, alternating which
count goes first, so slow phases of a shared machine hit every count alike (issue 27: single runs here ranged
from 1.44x to 2.23x). Reported per thread count: the median over rounds of the time, of the ratio to SDPA, and
of the speed-up over 1 thread within the same round.

    python -m benchmarks.runner --only threads [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from . import bench_kernels, bench_train_step
from .common import interleaved_times, run_child, section_main, summarize, timed_phases

DEFAULT_THREADS = torch.get_num_threads()  # read at import, before a sweep pins --threads
# the sweep options a measuring child needs
CHILD_OPTIONS = ("scaling_seq_len", "scaling_head_dim", "scaling_smollm2_seq_len", "scaling_train_seq_len", "heads",
                 "batch", "train_batch", "dtype", "backend", "warmup", "repeats", "case_budget")
SMOLLM2 = dict(Hq=9, Hkv=3, D=64)  # SmolLM2-135M's attention (the pretrained demo's model)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--scaling-threads", type=int, nargs="+", help=f"thread counts of the scaling runs (default 1 "
                   f"and {DEFAULT_THREADS}, torch's default here)")
    p.add_argument("--scaling-rounds", type=int, default=3, help="alternated rounds, one process per thread count "
                   "each; medians over rounds are reported")
    p.add_argument("--scaling-seq-len", type=int, default=4096, help="T of the kernel case")
    p.add_argument("--scaling-head-dim", type=int, default=128, help="head dim of the kernel case")
    p.add_argument("--scaling-smollm2-seq-len", type=int, default=2048, help="T of the SmolLM2 kernel case (B=1)")
    p.add_argument("--scaling-train-seq-len", type=int, default=1024, help="T of the training step")


def thread_counts(args) -> list[int]:
    return sorted(set(args.scaling_threads or [1, DEFAULT_THREADS]))


def measure(opts: dict, threads: int) -> dict:
    """In this process at ``threads`` threads: {part: {method: {"ms", "x_sdpa"}}} (medians over repeats)."""
    torch.set_num_threads(threads)
    o = argparse.Namespace(**opts)
    device = torch.device("cpu")
    cases = {"kernel": bench_kernels.Case(o.scaling_seq_len, o.scaling_head_dim, o.heads, o.heads, o.batch),
             "kernel_smollm2": bench_kernels.Case(o.scaling_smollm2_seq_len, SMOLLM2["D"], SMOLLM2["Hq"], SMOLLM2["Hkv"])}
    kernels = {}
    for part, case in cases.items():
        inp = bench_kernels.make_inputs(case, device, getattr(torch, o.dtype))
        kernels[part] = {m: bench_kernels.make_method(m, inp, o.backend) for m in ("cat", "sdpa")}
    steps = {m: bench_train_step.StepBench(m, device) for m in ("cat", "sdpa")}
    for b in steps.values():
        b.prepare(bench_train_step.WARM_T, o.train_batch).step()
        b.prepare(o.scaling_train_seq_len, o.train_batch)
    timed = {
        **{part: {m: (lambda f=f, b=b: timed_phases(f, b, device)) for m, (f, b) in methods.items()}
           for part, methods in kernels.items()},
        "train_step": {m: (lambda s=s: timed_phases(s.forward_loss, s.backward_step, device)) for m, s in steps.items()},
    }
    out = {}
    for part, runs in timed.items():
        times = summarize(interleaved_times(runs, warmup=o.warmup, repeats=o.repeats, budget_s=o.case_budget))
        out[part] = {m: {"ms": t["fwdbwd"] * 1e3, "fwd_ms": t["fwd"] * 1e3, "bwd_ms": t["bwd"] * 1e3,
                         "x_sdpa": t.get("fwdbwd_x")} for m, t in times.items()}
    return out


def child_main(argv: list[str]):
    print(json.dumps(measure(json.loads(argv[0]), int(argv[1]))), flush=True)


def run_sweep(args, log=print) -> list[dict]:
    """CSV rows: one per (part, thread count, method)."""
    if args.device != "cpu":
        log("thread scaling: CPU only, skipped on " + args.device)
        return []
    counts, opts = thread_counts(args), json.dumps({k: getattr(args, k) for k in CHILD_OPTIONS})
    rounds = []  # per round {threads: child result}
    for rnd in range(args.scaling_rounds):
        order = counts[rnd % len(counts):] + counts[:rnd % len(counts)]
        res = {n: run_child(__spec__.name, [opts, n], args.child_timeout) for n in order}
        for n in order:
            if "error" in res[n]:
                raise RuntimeError(f"thread-scaling child at {n} threads failed: {res[n]['error']}")
        rounds.append(res)
        log(f"round {rnd + 1}: " + "; ".join(f"{n} threads: " + ", ".join(
            f"{part} {m} {v['ms']:.0f} ms" for part, ms in res[n].items() for m, v in ms.items()) for n in counts))
    rows = []
    shapes = {"kernel": (args.scaling_seq_len, args.scaling_head_dim, f"{args.heads}/{args.heads}"),
              "kernel_smollm2": (args.scaling_smollm2_seq_len, SMOLLM2["D"], f"{SMOLLM2['Hq']}/{SMOLLM2['Hkv']}"),
              "train_step": (args.scaling_train_seq_len, "", "")}
    for n in counts:
        for part, (T, D, heads) in shapes.items():
            for m in ("cat", "sdpa"):
                got = [r[n][part][m] for r in rounds]
                row = {"part": part, "T": T, "D": D, "heads": heads, "threads": n, "method": m,
                       "ms": statistics.median(g["ms"] for g in got),
                       "fwd_ms": statistics.median(g["fwd_ms"] for g in got),
                       "bwd_ms": statistics.median(g["bwd_ms"] for g in got),
                       "x_sdpa": statistics.median(g["x_sdpa"] for g in got) if got[0]["x_sdpa"] is not None else "",
                       "rounds": len(got)}
                if 1 in counts:
                    for key, col in (("ms", "speedup_vs_1"), ("fwd_ms", "fwd_speedup_vs_1"),
                                     ("bwd_ms", "bwd_speedup_vs_1")):
                        row[col] = statistics.median(r[1][part][m][key] / r[n][part][m][key] for r in rounds)
                rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(section_main("threads", child_main))
