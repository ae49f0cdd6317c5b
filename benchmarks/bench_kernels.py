"""Kernel micro-benchmark: causal attention forward, backward and forward+backward per method.

Methods (same q, k, v, adjacency and upstream gradients for all):
    cat         ours with mass: ``causal_attn.attention(q, k, v, graph, backend=...)`` -> (out, mass)
    cat_nomass  ours without mass: adjacency None
    sdpa        ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, no statistics (GQA via
                ``enable_gqa``)
    eager       the authors' way: explicit (B, Hq, T, T) maps, mass summed from them (``backend="reference"``)

Per case (T, head dim, GQA on/off) all methods run interleaved in one process (see ``common``), giving
medians and ratios to SDPA; peak memory of forward+backward comes from a fresh child process per
case (methods measured one after another, high-water mark reset between them; see ``common``). On CUDA: do_bench medians, TFLOP/s with causal FLOPs 2*B*Hq*T^2*D forward and 2.5x
that backward, and max_memory_allocated.

    python -m benchmarks.runner --only kernels [--quick] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import causal_attn
from causal_attn.ops.attention import resolve_backend

from .common import (child_report, do_bench_phases, interleaved_times, measure_peak, measure_peak_cuda, run_child,
                     section_main, setup_threads, summarize, timed_phases)

METHODS = ("cat", "cat_nomass", "sdpa", "eager")
LABELS = {"cat": "ours, with mass", "cat_nomass": "ours, no mass", "sdpa": "torch SDPA (no statistics)",
          "eager": "eager maps + mass (authors' way)"}
PHASES = ("fwd", "bwd", "fwdbwd")
EDGE_DENSITY = 0.05  # fraction of allowed (row, col) pairs that are annotated edges


@dataclass(frozen=True)
class Case:
    T: int
    D: int
    Hq: int = 8
    Hkv: int = 8
    B: int = 1

    @property
    def gqa(self) -> bool:
        return self.Hkv != self.Hq


def random_graph(B: int, T: int, density: float, generator: torch.Generator, device="cpu") -> causal_attn.CausalGraph:
    """Row-aligned adjacency with each allowed (i, j <= i) pair an edge with probability ``density``."""
    dense = (torch.rand(B, T, T, generator=generator) < density).tril()
    return causal_attn.CausalGraph.from_dense(dense).to(device)


# The STG pattern (Qwen2 tokens of the released stg_e/train_M annotations through causal_attn.data's builder):
# samples of ~66 tokens whose only edge rows are the 2 rows predicting the label, starting 4 tokens before the
# end, each joined to every token of 3 spans of ~4 tokens ("Smoking: 8") anywhere in the prompt (STG_H: 170
# tokens, 5 rows 7 before the end, 6 spans of ~4). Scaled to T: these fractions of the length.
ANSWER_ROWS = 2 / 66
ANSWER_START = 1 - 4 / 66
SPAN_LEN = 4 / 66
SPANS = (2, 4)  # spans per sample, inclusive range


def answer_rows_graph(B: int, T: int, generator: torch.Generator, device="cpu") -> causal_attn.CausalGraph:
    """STG-like adjacency: per sample, edges only on the answer rows near the end, into 2-4 random spans before
    them (:data:`ANSWER_ROWS` and the rest of T)."""
    rows = max(1, round(ANSWER_ROWS * T))
    start = min(int(ANSWER_START * T), T - rows)
    span = max(1, round(SPAN_LEN * T))
    dense = torch.zeros(B, T, T, dtype=torch.bool)
    slots = max(1, start // (span + 1))  # spans sit in distinct slots: they never touch or overlap
    for b in range(B):
        n = int(torch.randint(SPANS[0], SPANS[1] + 1, (), generator=generator))
        for slot in torch.randperm(slots, generator=generator)[:n].tolist():
            dense[b, start:start + rows, slot * (span + 1):slot * (span + 1) + span] = True
    return causal_attn.CausalGraph.from_dense(dense.tril()).to(device)


ADJACENCY_KINDS = ("random", "answer_rows")


def make_graph(kind: str, B: int, T: int, generator: torch.Generator, device="cpu") -> causal_attn.CausalGraph:
    if kind == "random":
        return random_graph(B, T, EDGE_DENSITY, generator, device)
    if kind == "answer_rows":
        return answer_rows_graph(B, T, generator, device)
    raise ValueError(f"unknown adjacency kind {kind!r}; choose from {ADJACENCY_KINDS}")


def make_inputs(case: Case, device, dtype, seed: int = 0, adjacency: str = "random") -> dict:
    g = torch.Generator().manual_seed(seed)
    B, T, D = case.B, case.T, case.D

    def rnd(H):
        return torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)

    return {"q": rnd(case.Hq), "k": rnd(case.Hkv), "v": rnd(case.Hkv), "dout": rnd(case.Hq),
            "dmass": torch.randn(B, case.Hq, T, generator=g).to(device),
            "graph": make_graph(adjacency, B, T, g, device)}


def make_method(name: str, inp: dict, backend: str):
    """-> (forward() -> outputs, backward(outputs)); backward returns dq, dk, dv without accumulating."""
    q, k, v = (inp[n].detach().requires_grad_() for n in ("q", "k", "v"))
    gqa = q.shape[1] != k.shape[1]

    if name == "sdpa":
        def forward():
            return (F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),)
    elif name in ("cat", "cat_nomass", "eager"):
        graph = None if name == "cat_nomass" else inp["graph"]
        be = "reference" if name == "eager" else backend

        def forward():
            out, mass = causal_attn.attention(q, k, v, graph, backend=be)
            return (out,) if mass is None else (out, mass)
    else:
        raise ValueError(f"unknown method {name!r}; choose from {METHODS}")

    def backward(outs):
        grads = (inp["dout"], inp["dmass"])[: len(outs)]
        return torch.autograd.grad(outs, (q, k, v), grads)

    return forward, backward


def causal_flops(case: Case) -> float:
    """Forward FLOPs of causal attention (the issue's convention); backward is 2.5x."""
    return 2.0 * case.B * case.Hq * case.T ** 2 * case.D


# ------------------------------------------------------------------------------------------ memory child
def child_main(argv):
    """``--child T D HQ HKV B BACKEND DTYPE THREADS METHOD...``: forward+backward peak RSS growth (MiB)
    of each method, measured one after another in this fresh process."""
    T, D, Hq, Hkv, B, backend, dtype, threads, *methods = argv
    setup_threads(int(threads))
    dtype = getattr(torch, dtype)
    case = Case(int(T), int(D), int(Hq), int(Hkv), int(B))
    inp = make_inputs(case, "cpu", dtype)
    warm = make_inputs(Case(64, case.D, case.Hq, case.Hkv, case.B), "cpu", dtype, seed=1)
    peaks = {}
    for name in methods:
        fwd, bwd = make_method(name, warm, backend)
        bwd(fwd())  # lazily loaded kernels and thread pools are set up outside the measurement
        fwd, bwd = make_method(name, inp, backend)
        peaks[name] = measure_peak(lambda: bwd(fwd()))
        del fwd, bwd
    child_report(**peaks)


def memory_cpu(case: Case, methods, args) -> dict:
    """{method: peak MiB} from one fresh child process, or {"error": ...}."""
    return run_child(__spec__.name, [case.T, case.D, case.Hq, case.Hkv, case.B, args.backend,
                                     args.dtype, args.threads, *methods], timeout=args.child_timeout)


def memory_cuda(case: Case, methods, args, device) -> dict:
    inp = make_inputs(case, device, getattr(torch, args.dtype))
    peaks = {}
    for name in methods:
        fwd, bwd = make_method(name, inp, args.backend)
        peaks[name] = measure_peak_cuda(lambda: bwd(fwd()))
    return peaks


# ------------------------------------------------------------------------------------------ sweep
def add_memory_ratios(case_rows: list[dict]):
    """``peak_x_sdpa`` for every row of one case that has a peak, when SDPA's peak was measured."""
    sdpa = next((r for r in case_rows if r["method"] == "sdpa" and "peak_mib" in r), None)
    if sdpa is None:
        return
    for r in case_rows:
        if "peak_mib" in r:
            r["peak_x_sdpa"] = r["peak_mib"] / max(sdpa["peak_mib"], 1e-3)


def cases_for(args) -> list[Case]:
    return [Case(T, D, args.heads, args.heads // args.gqa_group if gqa else args.heads, args.batch)
            for D in args.head_dims for gqa in args.gqa for T in args.seq_lens]


def run_sweep(args, log=print) -> list[dict]:
    """Time every case (methods interleaved) and measure memory; returns CSV rows, one per case and method."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    resolved = "reference" if args.backend == "reference" else resolve_backend(args.backend, device)
    rows = []
    for case in cases_for(args):
        methods = [m for m in args.methods if not (m == "eager" and case.T > args.eager_max_t)]
        first, *others = args.adjacency
        inp = make_inputs(case, device, dtype, adjacency=first)
        runs = {}
        # "cat" with the first adjacency kind, then "cat@<kind>" with each other one (same q, k, v); the eager maps
        # cost the same for any adjacency and run with the first kind only
        variants = [(m, m, inp) for m in methods]
        if "cat" in methods:
            variants += [(f"cat@{kind}", "cat", dict(inp, graph=make_inputs(case, device, dtype, adjacency=kind)["graph"]))
                         for kind in others]
        for key, m, m_inp in variants:
            fwd, bwd = make_method(m, m_inp, args.backend)
            runs[key] = (lambda f=fwd, b=bwd: do_bench_phases(f, b)) if device.type == "cuda" else \
                (lambda f=fwd, b=bwd: timed_phases(f, b, device))
        if device.type == "cuda":
            times = summarize({m: {p: [t] for p, t in r().items()} for m, r in runs.items()})
        else:
            times = summarize(interleaved_times(runs, warmup=args.warmup, repeats=args.repeats,
                                                budget_s=args.case_budget))
        del inp, runs, variants
        mem = {}
        if case.T in args.memory_seq_lens and case.D in args.memory_head_dims:
            base = [m for m in times if "@" not in m]
            mem = memory_cuda(case, base, args, device) if device.type == "cuda" else memory_cpu(case, base, args)
        case_rows = []
        keys = list(args.methods) + [f"cat@{kind}" for kind in others if "cat" in args.methods]
        for key in keys:
            m, _, kind = key.partition("@")
            adjacency = kind or (first if m in ("cat", "eager") else "none")
            row = {**asdict(case), "gqa": case.gqa, "method": m, "adjacency": adjacency, "device": device.type,
                   "dtype": args.dtype, "backend": resolved if m.startswith("cat") else ""}
            case_rows.append(row)
            if key not in times:
                row["status"] = f"skipped: eager maps above T={args.eager_max_t} (--eager-max-t)"
                continue
            for ph in PHASES:
                row[f"{ph}_ms"] = times[key][ph] * 1e3
                if f"{ph}_x" in times[key]:
                    row[f"{ph}_x_sdpa"] = times[key][f"{ph}_x"]
            if device.type == "cuda":
                row["tflops_fwd"] = causal_flops(case) / times[key]["fwd"] / 1e12
                row["tflops_bwd"] = 2.5 * causal_flops(case) / times[key]["bwd"] / 1e12
            if "error" in mem:
                row["status"] = f"memory child failed: {mem['error']}"
            elif key in mem:
                row["peak_mib"] = mem[key]
            row.setdefault("status", "ok")
        add_memory_ratios(case_rows)
        rows += case_rows
        log(f"kernels T={case.T} D={case.D} Hq={case.Hq} Hkv={case.Hkv}: " + ", ".join(
            f"{m} {times[m]['fwdbwd'] * 1e3:.1f} ms" for m in times))
    return rows


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths T (default 256..4096 on CPU, "
                   "512..16384 on CUDA)")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--gqa", type=int, nargs="+", choices=[0, 1], default=[0, 1], help="1 = GQA on")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--gqa-group", type=int, default=4, help="query heads per key/value head with GQA on")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--adjacency", nargs="+", default=list(ADJACENCY_KINDS), choices=ADJACENCY_KINDS,
                   help="adjacency kinds of ours with mass (the first also for the eager maps): random = 5%% of "
                   "allowed pairs, answer_rows = STG-like edges from a few rows near the end into 2-4 spans")
    p.add_argument("--eager-max-t", type=int, help="skip the eager maps above this T (default 2048 CPU, 8192 CUDA)")
    p.add_argument("--memory-seq-lens", type=int, nargs="*", help="T values with a memory measurement "
                   "(default: all)")
    p.add_argument("--memory-head-dims", type=int, nargs="*", default=[64], help="head dims with a memory "
                   "measurement (each case costs a fresh interpreter)")
    p.add_argument("--case-budget", type=float, default=30.0, help="seconds per case after which no new "
                   "timing round starts (CPU)")


def finalize_args(args):
    cuda = args.device == "cuda"
    if args.seq_lens is None:
        args.seq_lens = [512, 1024, 2048, 4096, 8192, 16384] if cuda else [256, 512, 1024, 2048, 4096]
    if args.eager_max_t is None:
        args.eager_max_t = 8192 if cuda else 2048
    if args.memory_seq_lens is None:
        args.memory_seq_lens = list(args.seq_lens)
    return args


if __name__ == "__main__":
    sys.exit(section_main("kernels", child_main))
