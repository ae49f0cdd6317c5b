"""``causal-attn bench``: run the kernel and training-step benchmarks of the repository's benchmarks/ folder.

The benchmark code lives in the repository's ``benchmarks/`` folder (``runner.py`` and its siblings; its memory
measurements re-run those scripts as fresh child processes). Installs carry a copy as ``causal_attn/benchmarks``;
a source checkout uses its own folder; ``$CAUSAL_ATTN_BENCHMARKS`` points at another one.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from ..utils.layout import folder
from .errors import CliError

ENV = "CAUSAL_ATTN_BENCHMARKS"


def benchmarks_dir() -> Path | None:
    """The benchmarks/ folder holding runner.py, or None."""
    candidates = [os.environ.get(ENV), folder("benchmarks")]
    for c in candidates:
        if c and (Path(c) / "runner.py").is_file():
            return Path(c)
    return None


def load_runner():
    folder = benchmarks_dir()
    if folder is None:
        raise CliError(f"benchmarks/runner.py is not part of this install; reinstall causal_attn (pip install .) "
                       f"or set ${ENV} to a checkout's benchmarks/ folder")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module("runner")


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="kernel and training-step benchmarks (CSV, PNG, summary.md)",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    try:
        load_runner().add_arguments(p)
    except CliError:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run)
    add_gpu_check_parser(subparsers)


def add_gpu_check_parser(subparsers):
    p = subparsers.add_parser("gpu-check", help="correctness, kernels and training step of CAT on a GPU (our Triton "
                              "kernels against Flex CAT and SDPA flash), offline (--dry-run: CPU tensors under "
                              "TRITON_INTERPRET=1)",
                              description="GPU evidence kit (benchmarks/gpu_check.py, docs/gpu.md): summary.md, CSVs, "
                              "PNGs.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    if benchmarks_dir() is not None:
        _import("gpu_check").add_arguments(p)
    p.set_defaults(func=run_gpu_check)


def _import(name: str):
    load_runner()  # puts the benchmarks folder on sys.path or says what is missing
    return importlib.import_module(name)


def run_gpu_check(args) -> int:
    return _import("gpu_check").main(args)


def run(args) -> int:
    runner = load_runner()
    if getattr(args, "rest", None) is not None:  # parser was built without the runner's options
        raise CliError("benchmark options unavailable: benchmarks/ folder not found")
    error = runner.check_args(args)
    if error:
        raise CliError(error)
    runner.run(args)
    return 0
