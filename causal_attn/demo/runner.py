"""Running the demo's training runs: in this process, or one process per run (``--jobs``), one thread each."""
from __future__ import annotations

import statistics


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _init(threads: int, init, init_args):
    import torch

    torch.set_num_threads(threads)
    init(*init_args)


def map_runs(fn, tasks, args, report, *, setup, init, init_args) -> None:
    """``report(fn(*task))`` for every task. With ``args.jobs == 1`` the runs use ``setup`` here; otherwise
    each worker process rebuilds it with ``init(*init_args)`` (spawned: no state shared with this process)."""
    import torch

    if args.jobs == 1:
        if args.threads:
            torch.set_num_threads(args.threads)
        for t in tasks:
            report(fn(*t, setup))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init,
                             initargs=(args.threads or 1, init, init_args)) as pool:
        for res in pool.map(fn, *zip(*tasks)):
            report(res)
