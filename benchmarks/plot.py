"""PNG plots of the benchmark CSVs: time and peak memory against T per method, log-log axes."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .bench_kernels import LABELS as KERNEL_LABELS
from .bench_packing import LABELS as PACKING_LABELS
from .bench_train_step import LABELS as STEP_LABELS
from .common import num, read_csv


def _series(rows, key, **match):
    """{method: ([T], [value])} over rows matching ``match`` that have ``key``."""
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        if any(str(r.get(k)) != str(v) for k, v in match.items()):
            continue
        y = num(r, key)
        if y is None or y <= 0:
            continue
        kind = r.get("adjacency")  # ours on a second adjacency kind is a series of its own
        name = r["method"] + (f" ({kind})" if kind and kind not in ("random", "none") else "")
        ts, ys = out.setdefault(name, ([], []))
        ts.append(int(r["T"]))
        ys.append(y)
    return out


def _save(fig, out_dir: str, name: str) -> dict[str, str]:
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {name: path}


def _panel(ax, series, title, ylabel, labels):
    for method, (ts, ys) in sorted(series.items()):
        base, _, kind = method.partition(" (")
        ax.plot(ts, ys, marker="o", label=labels.get(base, base) + (f" ({kind}" if kind else ""))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("T")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize=7)


def plot_kernels(csv_path: str, out_dir: str) -> dict[str, str]:
    rows = read_csv(csv_path)
    groups = sorted({(int(r["D"]), r["gqa"]) for r in rows})
    paths = {}
    for key, ylabel, name in (("fwdbwd_ms", "forward+backward ms (median)", "kernels_time.png"),
                              ("peak_mib", "peak memory growth, MiB", "kernels_memory.png")):
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
        for ax, (D, gqa) in zip(axes[0], groups):
            _panel(ax, _series(rows, key, D=D, gqa=gqa), f"D={D}, GQA {'on' if gqa == 'True' else 'off'}", ylabel,
                   KERNEL_LABELS)
        paths.update(_save(fig, out_dir, name))
    return paths


def plot_train(csv_path: str, out_dir: str) -> dict[str, str]:
    rows = read_csv(csv_path)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    _panel(axes[0], _series(rows, "step_ms"), "training step time (Llama 4x256, B=2)", "ms (median)",
           STEP_LABELS)
    _panel(axes[1], _series(rows, "peak_mib"), "training step peak memory growth", "MiB", STEP_LABELS)
    return _save(fig, out_dir, "train_step.png")


def plot_threads(csv_path: str, out_dir: str) -> dict[str, str]:
    """Speed-up over 1 thread per part and method (bars), the ideal line at y = threads."""
    rows = [r for r in read_csv(csv_path) if num(r, "speedup_vs_1") is not None]
    parts = sorted({r["part"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(parts)), figsize=(4.2 * max(1, len(parts)), 3.4), squeeze=False)
    for ax, part in zip(axes[0], parts):
        counts = sorted({int(r["threads"]) for r in rows if r["part"] == part})
        methods = sorted({r["method"] for r in rows if r["part"] == part})
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ys = [next((num(r, "speedup_vs_1") for r in rows if r["part"] == part and r["method"] == m
                        and int(r["threads"]) == n), 0.0) for n in counts]
            ax.bar([c + (i - (len(methods) - 1) / 2) * width for c in range(len(counts))], ys, width,
                   label=KERNEL_LABELS.get(m, m) if part.startswith("kernel") else STEP_LABELS.get(m, m))
        ax.plot(range(len(counts)), counts, "k--", lw=0.8, label="ideal")
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_xlabel("threads")
        ax.set_ylabel("speed-up over 1 thread")
        ax.set_title(part.replace("_", " "), fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "threads.png")


def plot_packing(csv_path: str, out_dir: str) -> dict[str, str]:
    """Samples/s and peak memory per data set (bars per method); the packed bar names its ratio to CAT padded."""
    rows = read_csv(csv_path)
    datasets = list(dict.fromkeys(r["data"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    width = 0.8 / max(1, len(methods))
    for ax, key, ylabel in ((axes[0], "samples_per_s", "samples / s (training steps)"),
                            (axes[1], "peak_mib", "peak memory growth, MiB")):
        for i, m in enumerate(methods):
            xs = [d + (i - (len(methods) - 1) / 2) * width for d in range(len(datasets))]
            got = [next((r for r in rows if r["data"] == d and r["method"] == m), {}) for d in datasets]
            bars = ax.bar(xs, [num(r, key) or 0.0 for r in got], width, label=PACKING_LABELS.get(m, m))
            if key == "samples_per_s" and m == "cat_packed":
                for bar, r in zip(bars, got):
                    if num(r, "x_cat_padded") is not None:
                        ax.annotate(f"{num(r, 'x_cat_padded'):.2f}x", (bar.get_x() + bar.get_width() / 2,
                                    bar.get_height()), ha="center", va="bottom", fontsize=7)
        B = rows[0].get("B", "") if rows else ""
        ax.set_xticks(range(len(datasets)), datasets)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]}, batch {B}, same samples", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_dir, "packing.png")


def plot_all(out_dir: str) -> dict[str, str]:
    from . import bench_compiled, bench_pretrained

    paths = {}
    for csv_name, plot in (("kernels.csv", plot_kernels), ("train_step.csv", plot_train),
                           ("threads.csv", plot_threads), ("packing.csv", plot_packing),
                           ("pretrained.csv", bench_pretrained.plot), ("compiled.csv", bench_compiled.plot)):
        if os.path.exists(os.path.join(out_dir, csv_name)):
            paths.update(plot(os.path.join(out_dir, csv_name), out_dir))
    return paths


if __name__ == "__main__":
    import sys

    print(plot_all(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "results")))
