"""Command-line driver shared by ``causal-attn bench`` and the scripts in this folder.

Runs the kernel, training-step, thread-scaling and/or packing sweeps, writes ``kernels.csv`` /
``train_step.csv`` / ``threads.csv`` / ``packing.csv``, the PNG plots and ``summary.md`` (ratio tables,
memory-growth fits, targets) into ``--out``.

    python -m benchmarks.runner [--quick] [--only kernels|train|threads|packing|pretrained] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

from . import bench_compiled, bench_kernels, bench_packing, bench_pretrained, bench_threads, bench_train_step
from .common import setup_threads, write_csv

HERE = os.path.dirname(os.path.abspath(__file__))

# A checkout writes into benchmarks/results; an installed copy (causal_attn/benchmarks) into the working folder. A
# checkout is known by the marker file results/README.md (installs prune results/), not by any folder's name.
IN_CHECKOUT = os.path.isfile(os.path.join(HERE, "results", "README.md"))
RESULTS = os.path.join(HERE, "results") if IN_CHECKOUT else os.path.abspath("causal_attn_bench")

# the sections of --only, in the order of a full sweep: (name, module with run_sweep, CSV file)
SECTIONS = (("kernels", bench_kernels, "kernels.csv"), ("train", bench_train_step, "train_step.csv"),
            ("threads", bench_threads, "threads.csv"), ("packing", bench_packing, "packing.csv"),
            ("pretrained", bench_pretrained, "pretrained.csv"), ("compiled", bench_compiled, "compiled.csv"))
# sections a full sweep leaves out: run them with --only NAME (the real checkpoint's sweep takes about 10 minutes,
# the compiled step's compiles each model twice per mode)
OPT_IN = ("pretrained", "compiled")

# --quick: the same code path on a small grid (<= 2 minutes on a loaded 2-core CPU)
QUICK = dict(seq_lens=[256, 1024], head_dims=[64], gqa=[0, 1], memory_seq_lens=[1024], train_seq_lens=[256, 512],
             train_memory_seq_lens=[512], repeats=3, case_budget=15.0, train_case_budget=15.0, scaling_seq_len=1024,
             scaling_smollm2_seq_len=512, scaling_train_seq_len=256, scaling_rounds=2, packing_batches=6, packing_memory_batches=2)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--only", choices=[name for name, _, _ in SECTIONS] + ["all"], default="all")
    p.add_argument("--quick", action="store_true", help="small grid, same code path (<= 2 minutes)")
    p.add_argument("--out", help=f"output folder (default {RESULTS}, or its quick/ subfolder with --quick)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--backend", default="auto", help="causal_attn backend for our methods (default auto)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (default 1: shared machine)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per case (CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per case (CPU); median reported")
    p.add_argument("--child-timeout", type=float, default=900.0, help="seconds per memory child process")
    p.add_argument("--profile", type=int, nargs="*", metavar="T", help="also write torch.profiler tables of the "
                   "CAT and SDPA training steps at these T (default 1024 2048 when given without values)")
    p.add_argument("--no-plots", action="store_true")
    bench_kernels.add_arguments(p)
    bench_train_step.add_arguments(p)
    bench_threads.add_arguments(p)
    bench_packing.add_arguments(p)
    bench_pretrained.add_arguments(p)
    bench_compiled.add_arguments(p)


def finalize_args(args):
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k, None) in (None, p_default(k)):
                setattr(args, k, v)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.out is None:
        args.out = os.path.join(RESULTS, "quick") if args.quick else RESULTS
    if args.train_memory_seq_lens is None:
        args.train_memory_seq_lens = list(args.train_seq_lens)
    if args.profile is not None and not args.profile:
        args.profile = [1024, 2048]
    return bench_kernels.finalize_args(args)


def check_args(args) -> str | None:
    """A one-line message for options that cannot run, else None."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda but no CUDA device is visible"
    if args.heads % args.gqa_group:
        return f"--heads {args.heads} is not a multiple of --gqa-group {args.gqa_group}"
    for name in ("seq_lens", "head_dims", "train_seq_lens"):
        vals = getattr(args, name) or []
        if any(v < 1 for v in vals):
            return f"--{name.replace('_', '-')} must be positive, got {vals}"
    if any(n < 1 for n in args.scaling_threads or []):
        return f"--scaling-threads must be >= 1, got {args.scaling_threads}"
    if args.scaling_rounds < 1:
        return f"--scaling-rounds must be >= 1, got {args.scaling_rounds}"
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        return "--repeats and --threads must be >= 1 and --warmup >= 0"
    if args.packing_batch < 1 or args.packing_batches < 0 or args.packing_memory_batches < 0:
        return "--packing-batch must be >= 1, --packing-batches and --packing-memory-batches >= 0"
    return None


def p_default(name):
    """The parser default of option ``name`` (--quick replaces only values left at their default)."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.get_default(name)


def run(args, log=print) -> dict[str, str]:
    """Run the selected sweeps; returns {artifact name: path}."""
    from . import plot, report

    args = finalize_args(args)
    if args.device == "cpu":
        setup_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    paths, t0, cpu0, load0 = {}, time.perf_counter(), time.process_time(), os.getloadavg()[0]
    commit = code_version()
    for name, module, csv_name in SECTIONS:
        if args.only == name or (args.only == "all" and name not in OPT_IN and (name != "threads" or args.device == "cpu")):
            paths[f"{name}_csv"] = write_csv(module.run_sweep(args, log=log), os.path.join(args.out, csv_name))
    for T in args.profile or []:
        for m in ("sdpa", "cat"):
            path = os.path.join(args.out, f"profile_train_{m}_T{T}.txt")
            with open(path, "w") as f:
                f.write(bench_train_step.profile_step(m, T, args.train_batch, args.device))
            paths[f"profile_{m}_{T}"] = path
    if not args.no_plots:
        paths.update(plot.plot_all(args.out))
    command = "causal-attn bench" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only != "all" else "")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - cpu0 + children.ru_utime + children.ru_stime
    paths["summary"] = report.write_summary(args.out, command=command, note=(
        f"Sweep wall time {time.perf_counter() - t0:.0f} s, CPU time {cpu:.0f} s (memory children included); "
        f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores); "
        f"code: {commit}."))
    log(open(paths["summary"]).read())
    log(f"done in {time.perf_counter() - t0:.0f} s; results in {args.out}")
    return paths


def code_version() -> str:
    """Short git revision of the checkout (with -dirty for uncommitted changes), else the installed version."""
    from causal_attn.utils.provenance import git_state

    state = git_state()
    if state["git_revision"] is None:
        import causal_attn

        return f"causal_attn {causal_attn.__version__} (installed)"
    return state["git_revision"][:7] + ("-dirty" if state["git_dirty"] else "")


def main_for(which: str = "all", argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if which != "all":
        args.only = which
    error = check_args(args)
    if error:
        p.error(error)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main_for())
