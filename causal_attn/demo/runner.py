"""Running demo parts' runs: every part's runs in one pool (``jobs`` processes, one thread each), or in this
process with ``jobs == 1``; each result goes to ``on_result`` as soon as it is done."""
from __future__ import annotations

from typing import Callable

from .part import Part

_PARTS: list[Part] = []  # a worker process's copies of the parts


def _init(threads: int, parts: list[Part]) -> None:
    import torch

    torch.set_num_threads(threads)
    _PARTS[:] = parts


def _call(index: int, method: str, seed: int) -> tuple[int, dict]:
    return index, _PARTS[index].run(method, seed)


def run_tasks(parts: list[Part], tasks: list[tuple[int, str, int]], on_result: Callable[[Part, dict], None], *,
              jobs: int = 1, threads: int | None = None) -> None:
    """``parts[i].run(method, seed)`` for every ``(i, method, seed)`` of ``tasks``, the longest runs first (so
    the short ones fill the cores at the end instead of leaving one idle); worker processes are spawned (no
    state is shared with this process) and build each part's setup once."""
    import torch

    work = sorted(tasks, key=lambda t: -parts[t[0]].seconds_per_run)
    if jobs == 1:
        if threads:
            torch.set_num_threads(threads)
        for i, method, seed in work:
            on_result(parts[i], parts[i].run(method, seed))
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init, initargs=(threads or 1, parts)) as pool:
        for fut in as_completed([pool.submit(_call, *t) for t in work]):
            i, res = fut.result()
            on_result(parts[i], res)


def run_parts(parts: list[Part], *, jobs: int = 1, threads: int | None = None) -> None:
    """Every pending run of every part in one pool (no core idles while another part finishes); each result
    goes to its part's ``report``."""
    tasks = [(i, method, seed) for i, p in enumerate(parts) for method, seed in p.pending()]
    run_tasks(parts, tasks, lambda part, res: part.report(res), jobs=jobs, threads=threads)
