"""``causal-attn bench``: run the kernel and training-step benchmarks of the repository's benchmarks/ folder.

The benchmark code is the package ``causal_attn.benchmarks``: installs carry it inside causal_attn, a source
checkout attaches its top-level ``benchmarks/`` folder under that name (``causal_attn/utils/layout.py``). Its
memory measurements re-run section modules as fresh ``python -m`` child processes of the same package.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager

from .errors import CliError

PACKAGE = "causal_attn.benchmarks"


@contextmanager
def _benchmarks_package():
    """Turns the import of a benchmarks module into a CliError when this install has no benchmarks package."""
    try:
        yield
    except ModuleNotFoundError as e:
        if e.name and (e.name == PACKAGE or e.name.startswith(PACKAGE + ".")):
            raise CliError(f"{PACKAGE} is not part of this install ({e}); reinstall causal_attn (pip install .) "
                           "or run from a source checkout") from e
        raise


def load_runner():
    with _benchmarks_package():
        from ..benchmarks import runner
    return runner


def load_gpu_check():
    with _benchmarks_package():
        from ..benchmarks import gpu_check
    return gpu_check


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="kernel and training-step benchmarks (CSV, PNG, summary.md)",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_options(p, load_runner, run)
    add_gpu_check_parser(subparsers)


def _add_options(p, load, func):
    """The options of the benchmark module ``load()`` returns; without the benchmarks package, a parser that takes
    anything, so that running the command says what is missing (a one-line CliError)."""
    try:
        load().add_arguments(p)
    except CliError:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=func)


def add_gpu_check_parser(subparsers):
    p = subparsers.add_parser("gpu-check", help="correctness, kernels and training step of CAT on a GPU (our Triton "
                              "kernels against Flex CAT and SDPA flash), offline (--dry-run: CPU tensors under "
                              "TRITON_INTERPRET=1)",
                              description="GPU evidence kit (benchmarks/gpu_check.py, docs/gpu.md): summary.md, CSVs, "
                              "PNGs.",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_options(p, load_gpu_check, run_gpu_check)


def run_gpu_check(args) -> int:
    return load_gpu_check().main(args)


def run(args) -> int:
    runner = load_runner()
    if getattr(args, "rest", None) is not None:  # parser was built without the runner's options
        raise CliError("benchmark options unavailable: the benchmarks package was not found")
    error = runner.check_args(args)
    if error:
        raise CliError(error)
    runner.run(args)
    return 0
