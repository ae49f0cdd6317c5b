"""Measurement helpers shared by the kernel and training-step benchmarks.

Time (CPU): every round runs each method once, in a rotated order, so background load on the shared
machine hits all methods alike; times are medians over rounds after warm-up rounds, ratios to SDPA are
medians of the per-round ratios. Time (CUDA): ``triton.testing.do_bench`` medians.

Memory (CPU): each case runs in a fresh ``python -m <module> --child ...`` process (a cold interpreter
costs ~5-10 s on the loaded machine, so the methods of one case share it). Per method the child frees
everything, returns free heap pages to the OS (``malloc_trim``), resets the kernel's RSS high-water mark
(``/proc/self/clear_refs``), then reports the mark after the work minus the mark before it (after imports,
input creation and a tiny warm-up). glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so large
buffers are unmapped on free and never hide in the heap. It prints one JSON line. Memory (CUDA): the
``max_memory_allocated`` growth over the allocation after input creation, in process.
"""
from __future__ import annotations

import csv
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch

MiB = 2**20


def peak_rss_mib() -> float:
    """High-water mark of this process's resident set, MiB (VmHWM; it is resettable, ru_maxrss is not)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> float:
    """Free what can be freed, reset the RSS high-water mark to the current RSS and return it (MiB)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise RuntimeError(f"cannot reset the RSS high-water mark here ({e}); needs Linux /proc") from e
    return peak_rss_mib()


def measure_peak(work: Callable[[], object]) -> float:
    """RSS high-water growth (MiB) of ``work()`` over the resident set just before it."""
    base = reset_peak_rss()
    work()
    return peak_rss_mib() - base


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(runs: dict[str, Callable[[], dict[str, float]]], *, warmup: int, repeats: int,
                      budget_s: float | None = None) -> dict[str, dict[str, list[float]]]:
    """Samples ``{method: {phase: [seconds per round]}}`` over ``repeats`` rounds after ``warmup`` rounds.

    ``runs[name]()`` executes one measurement and returns ``{phase: seconds}``. Every round runs each
    method once, starting at a different method each round. With ``budget_s``, stop after the first
    timed round that ends past the budget (at least one timed round always runs).
    """
    names = list(runs)
    samples: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    start = time.perf_counter()
    for rnd in range(warmup + repeats):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for name in order:
            phases = runs[name]()
            if rnd >= warmup:
                for phase, sec in phases.items():
                    samples[name].setdefault(phase, []).append(sec)
        if rnd >= warmup and budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return samples


def summarize(samples: dict[str, dict[str, list[float]]], base: str = "sdpa") -> dict[str, dict[str, float]]:
    """``{method: {"<phase>": median seconds, "<phase>_x": median over rounds of t / t_base}}``.

    The ratio pairs each method with the baseline run of the same round (same background load), which
    is steadier on a shared machine than a ratio of medians."""
    out = {}
    for name, phases in samples.items():
        out[name] = {}
        for phase, ts in phases.items():
            out[name][phase] = statistics.median(ts)
            ref = samples.get(base, {}).get(phase)
            if ref is not None and len(ref) == len(ts):
                out[name][f"{phase}_x"] = statistics.median(t / r for t, r in zip(ts, ref))
    return out


def timed_phases(forward: Callable[[], object], backward: Callable[[object], None] | None,
                 device: torch.device) -> dict[str, float]:
    """One forward (and backward) run -> ``{"fwd", "bwd", "fwdbwd"}`` wall seconds."""
    sync(device)
    t0 = time.perf_counter()
    out = forward()
    sync(device)
    t1 = time.perf_counter()
    if backward is None:
        return {"fwd": t1 - t0}
    backward(out)
    sync(device)
    t2 = time.perf_counter()
    return {"fwd": t1 - t0, "bwd": t2 - t1, "fwdbwd": t2 - t0}


def do_bench_phases(forward: Callable[[], object], backward: Callable[[object], None] | None) -> dict[str, float]:
    """CUDA: ``triton.testing.do_bench`` medians (seconds) of forward, backward and both."""
    from triton.testing import do_bench

    res = {"fwd": do_bench(forward, return_mode="median") / 1e3}
    if backward is not None:
        # a backward frees its graph, so it cannot be repeated on one forward's outputs: bwd = both - forward
        res["fwdbwd"] = do_bench(lambda: backward(forward()), return_mode="median") / 1e3
        res["bwd"] = max(res["fwdbwd"] - res["fwd"], 0.0)
    return res


def measure_peak_cuda(work: Callable[[], object]) -> float:
    """CUDA: ``max_memory_allocated`` growth (MiB) of ``work()`` over the allocation just before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    work()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MiB


def module_command(module: str, *args) -> list[str]:
    """``python -m module args...``. ``module`` is the full name a benchmark module has here (its
    ``__spec__.name``: ``causal_attn.benchmarks.x``, or ``benchmarks.x`` run from a checkout's root), so the child
    imports the same package as this process, from a checkout or an install alike."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_child(module: str, args: Sequence[str], timeout: float, attempts: int = 2) -> dict:
    """Run ``python -m module --child args...`` in a fresh process; return its last stdout line as JSON.

    A crashed child is retried once (e.g. a C++ extension rebuilt under its feet); a failed or timed-out
    child gives ``{"error": ...}`` so the sweep records it instead of dying."""
    cmd = module_command(module, "--child", *args)
    env = dict(os.environ, PYTHONWARNINGS="ignore", MALLOC_MMAP_THRESHOLD_="131072")
    error = "not run"
    for _ in range(attempts):
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout:.0f} s"}
        lines = res.stdout.strip().splitlines()
        if res.returncode == 0 and lines:
            return json.loads(lines[-1])
        error = f"exit {res.returncode}: {(res.stderr.strip().splitlines() or ['no output'])[-1]}"
    return {"error": error}


def section_main(section: str, child_main: Callable[[list[str]], None] | None = None) -> int:
    """``python -m <package>.<section module> --child ...``: one memory child (:func:`run_child`). A whole sweep
    runs through the runner, which owns the list of sections (a section never imports it back)."""
    if child_main is not None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
        return 0
    print(f"run this sweep through the runner: python -m {__package__}.runner --only {section} [--quick] "
          f"[--out DIR] (or: causal-attn bench --only {section})", file=sys.stderr)
    return 2


def child_report(**fields):
    """Print the one JSON line a child process hands back to :func:`run_child`."""
    print(json.dumps(fields), flush=True)


def num(row: dict, key: str) -> float | None:
    """A CSV cell as a float; None where it is empty or missing."""
    v = row.get(key, "")
    return float(v) if v not in ("", None) else None


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """A table cell: ``x`` formatted with ``spec`` and ``suffix``, "-" for None."""
    return "-" if x is None else f"{x:{spec}}{suffix}"


def ratio_bars(rows, series: dict, *, keys: tuple, ylabel: str, suptitle: str, out_dir: str, name: str,
               missing=lambda row: "n/a") -> str:
    """Two panels (step time, peak memory: the columns ``keys``) of bars per ``case``, one per method of ``series``
    ({method: label}), each labelled with its ratio; ``missing(row)`` labels a bar without a value. -> the PNG path"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.76 / len(series)
    for ax, key, title in zip(axes, keys, ("step time", "peak memory (RSS growth)")):
        for k, (method, label) in enumerate(series.items()):
            found = [next((r for r in rows if r["case"] == c and r["method"] == method), {}) for c in cases]
            vals = [num(r, key) for r in found]
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(cases))]
            bars = ax.bar(xs, [v or 0 for v in vals], width=0.95 * width, label=label)
            for b, v, r in zip(bars, vals, found):
                ax.annotate(missing(r) if v is None else f"{v:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(cases)), cases)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=8)
    fig.suptitle(suptitle)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_csv(rows: list[dict], path: str) -> str:
    """Write dict rows (union of keys, first-seen order) to ``path``; returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fit_growth(ts: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Least-squares fits of memory ``y`` (MiB) against sequence length ``T``.

    ``slope_mib_per_1k``: the linear slope (MiB per 1024 tokens); ``exponent``: ``p`` in ``y ~ T^p``
    from a log-log fit over the points with ``y > 0`` (about 1 for linear growth, 2 for quadratic).
    """
    t = np.asarray(ts, dtype=float)
    y = np.asarray(ys, dtype=float)
    if len(t) < 2:
        raise ValueError(f"need at least two points to fit, got {len(t)}")
    slope = float(np.polyfit(t, y, 1)[0]) * 1024
    pos = y > 0
    exponent = float(np.polyfit(np.log(t[pos]), np.log(y[pos]), 1)[0]) if pos.sum() >= 2 else float("nan")
    return {"slope_mib_per_1k": slope, "exponent": exponent}


def setup_threads(threads: int | None):
    """CPU runs use a fixed thread count (default 1: the machine is shared, one thread is steadier)."""
    if threads:
        torch.set_num_threads(threads)


def machine_fields() -> dict:
    """What a results row says about where it was measured: CPU model (or GPU name), torch, UTC date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    if torch.cuda.is_available():
        cpu = torch.cuda.get_device_name()
    return {"machine": f"{cpu}, {os.cpu_count()} cores", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
