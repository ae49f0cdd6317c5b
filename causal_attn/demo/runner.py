"""Running the demo's training runs: every part's runs in one pool (``--jobs`` processes, one thread each), or
in this process with ``--jobs 1``."""
from __future__ import annotations

import importlib
import statistics
from dataclasses import dataclass
from typing import Callable


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


@dataclass
class Plan:
    """One part's runs: ``module.one_run(*task, setup)`` for each task, ``report`` on each result.

    Worker processes rebuild the part's setup with ``module._init_worker(*init_args)`` (spawned: no state
    is shared with this process). ``seconds_per_run`` (an estimate) orders the pool: longest runs first, so
    the short ones fill the cores at the end instead of leaving one idle."""
    module: str
    tasks: list
    setup: object
    init_args: tuple
    report: Callable[[dict], None]
    finish: Callable[[str], tuple]   # out_dir -> (results, table), once every run is reported
    seconds_per_run: float = 1.0


def _init(threads: int, inits) -> None:
    import torch

    torch.set_num_threads(threads)
    for module, init_args in inits:
        importlib.import_module(module)._init_worker(*init_args)


def _call(module: str, task: tuple) -> tuple[str, dict]:
    return module, importlib.import_module(module).one_run(*task)


def run_plans(plans: list[Plan], args) -> None:
    """Every task of every plan; each result goes to its plan's ``report`` as soon as it is done."""
    import torch

    by_module = {p.module: p for p in plans}
    work = [(p.module, t) for p in sorted(plans, key=lambda p: -p.seconds_per_run) for t in p.tasks]
    if args.jobs == 1:
        if args.threads:
            torch.set_num_threads(args.threads)
        for module, task in work:
            p = by_module[module]
            p.report(importlib.import_module(module).one_run(*task, p.setup))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init,
                             initargs=(args.threads or 1, [(p.module, p.init_args) for p in plans])) as pool:
        for fut in as_completed([pool.submit(_call, module, task) for module, task in work]):
            module, res = fut.result()
            by_module[module].report(res)
