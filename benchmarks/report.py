"""``summary.md``: ratio tables, memory-growth fits and the issue's targets, from the benchmark CSVs."""
from __future__ import annotations

import os
import platform
import time

import torch

from .common import fit_growth, fmt, num, read_csv

TARGETS = {"step_time": 1.10, "step_memory": 1.05, "kernel_fwdbwd": 1.25, "packed_speedup": 1.30}
PACKING_TARGET_DATA = "gsm8k_val"  # issue 17: CAT packed >= 1.3x CAT padded samples/s on GSM8K lengths at batch 16


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(map(str, ln)) + " |" for ln in lines]


def adjacency_of(r) -> str:
    """A kernel row's adjacency kind; rows of results written before the column existed used "random"."""
    return r.get("adjacency") or ("random" if r["method"] in ("cat", "eager") else "none")


def kernel_section(rows) -> list[str]:
    by = {(int(r["T"]), int(r["D"]), r["gqa"], r["method"], adjacency_of(r)): r for r in rows}
    cases = sorted({k[:3] for k in by}, key=lambda c: (c[1], c[2], c[0]))
    lines = []
    for T, D, gqa in cases:
        def get(m, k, adjacency=None):
            kind = adjacency or ("random" if m in ("cat", "eager") else "none")
            return num(by.get((T, D, gqa, m, kind), {}), k)

        lines.append([T, D, "on" if gqa == "True" else "off", fmt(get("sdpa", "fwdbwd_ms"), ".1f"),
                      fmt(get("cat", "fwd_x_sdpa"), ".2f", "x"), fmt(get("cat", "bwd_x_sdpa"), ".2f", "x"),
                      fmt(get("cat", "fwdbwd_x_sdpa"), ".2f", "x"),
                      fmt(get("cat", "fwdbwd_x_sdpa", "answer_rows"), ".2f", "x"),
                      fmt(get("cat_nomass", "fwdbwd_x_sdpa"), ".2f", "x"),
                      fmt(get("eager", "fwdbwd_x_sdpa"), ".2f", "x"), fmt(get("sdpa", "peak_mib"), ".0f"),
                      fmt(get("cat", "peak_mib"), ".0f"), fmt(get("eager", "peak_mib"), ".0f")])
    return ["## Attention kernels (B=1, 8 query heads; GQA on = 2 key/value heads)", "",
            "Time ratios to SDPA from interleaved runs (medians); peak = RSS growth of forward+backward in a fresh "
            "process, MiB. Ours with the random adjacency (5% of allowed pairs) unless named; answer rows = STG-like "
            "edges only from a few rows near the end.", ""] + _table(
        ["T", "D", "GQA", "SDPA fwd+bwd ms", "ours fwd", "ours bwd", "ours fwd+bwd", "ours fwd+bwd answer rows",
         "ours no-mass fwd+bwd",
         "eager fwd+bwd", "SDPA peak", "ours peak", "eager peak"], lines) + [""]


def train_section(rows) -> list[str]:
    by = {(int(r["T"]), r["method"]): r for r in rows}
    lines = []
    for T in sorted({int(r["T"]) for r in rows}):
        get = lambda m, k: num(by.get((T, m), {}), k)  # noqa: E731
        lines.append([T, fmt(get("sdpa", "step_ms"), ".0f"), fmt(get("cat", "step_x_sdpa"), ".2f", "x"),
                      fmt(get("authors", "step_x_sdpa"), ".2f", "x"), fmt(get("sdpa", "peak_mib"), ".0f"),
                      fmt(get("cat", "peak_x_sdpa"), ".2f", "x"), fmt(get("cat", "extra_mib"), ".0f"),
                      fmt(get("authors", "peak_x_sdpa"), ".2f", "x"), fmt(get("authors", "extra_mib"), ".0f")])
    skipped = [f"- T={int(r['T'])} {r['method']}: {r['status']}" for r in rows if r.get("status", "ok") != "ok"]
    return ["## Training step (Llama 4 layers, hidden 256, 8 heads, B=2; one AdamW step)", "",
            "Ratios to the plain SDPA step; extra = peak - SDPA peak (MiB, RSS growth in a fresh process).", ""] + \
        _table(["T", "SDPA step ms", "CAT time", "authors time", "SDPA peak MiB", "CAT mem", "CAT extra MiB",
                "authors mem", "authors extra MiB"], lines) + [""] + skipped + ([""] if skipped else [])


PART_NAMES = {"kernel": "kernel", "kernel_smollm2": "kernel SmolLM2 (GQA, D 64)", "train_step": "train step"}


def threads_section(rows) -> list[str]:
    by = {(r["part"], int(r["threads"]), r["method"]): r for r in rows}
    lines = []
    for part, n in sorted({(r["part"], int(r["threads"])) for r in rows}):
        get = lambda m, k: num(by.get((part, n, m), {}), k)  # noqa: E731
        T = by[(part, n, "cat")]["T"] if (part, n, "cat") in by else "-"
        heads = by.get((part, n, "cat"), {}).get("heads") or "-"
        lines.append([PART_NAMES.get(part, part.replace("_", " ")), T, heads, n, fmt(get("sdpa", "ms"), ".0f"), fmt(get("cat", "ms"), ".0f"),
                      fmt(get("cat", "x_sdpa"), ".2f", "x"), fmt(get("cat", "speedup_vs_1"), ".2f", "x"),
                      fmt(get("sdpa", "speedup_vs_1"), ".2f", "x"),
                      " / ".join(fmt(get(m, k), ".2f", "x") for m in ("cat", "sdpa")
                                 for k in ("fwd_speedup_vs_1", "bwd_speedup_vs_1"))])
    return ["## Thread scaling (kernels: fwd+bwd with mass, B=1; training step as above)", "",
            "One fresh process per thread count and round, thread counts alternated over rounds, ours and SDPA "
            "interleaved inside each; medians over rounds; speed-up = time at 1 thread / time at n threads in the "
            "same round.", ""] + \
        _table(["part", "T", "heads q/kv", "threads", "SDPA ms", "ours ms", "ours / SDPA", "ours speed-up", "SDPA speed-up",
                "speed-up fwd / bwd: ours, SDPA"], lines) + [""]


def packing_section(rows) -> list[str]:
    lines, skipped = [], []
    for r in rows:
        if num(r, "samples_per_s") is None:
            skipped.append(f"- {r['data']} {r['method']}: {r.get('status', '')}")
            continue
        lines.append([r["data"], fmt(num(r, "mean_len"), ".0f"), r["max_len"],
                      fmt(num(r, "padded_tokens") / num(r, "tokens"), ".2f"), r["method"],
                      fmt(num(r, "samples_per_s"), ".1f"), fmt(num(r, "x_cat_padded"), ".2f", "x"),
                      fmt(num(r, "peak_mib"), ".0f"), fmt(num(r, "peak_x_cat_padded"), ".2f", "x"),
                      fmt(num(r, "loss_max_abs_diff"), ".1e")])
    B = rows[0].get("B", "") if rows else ""
    return [f"## Packed vs padded training steps (real lengths, B={B}; Llama 4 layers, hidden 256; one AdamW step)", "",
            "Same samples in the same batches for every method; samples/s over all timed steps; peak = RSS growth of "
            "the first batches' steps in a fresh process, MiB; loss diff = max over steps of |CAT loss packed - "
            "padded|.", ""] + _table(
        ["data", "mean len", "max len", "padded / real tokens", "method", "samples/s", "vs CAT padded", "peak MiB",
         "peak vs CAT padded", "loss diff"], lines) + [""] + skipped + ([""] if skipped else [])


def packing_targets(rows) -> list[str]:
    r = next((r for r in rows if r["data"] == PACKING_TARGET_DATA and r["method"] == "cat_packed"
              and num(r, "x_cat_padded") is not None), None)
    if r is None:
        return []
    x, target = num(r, "x_cat_padded"), TARGETS["packed_speedup"]
    verdict = ("met" if x >= target else "MISSED") if int(r["B"]) == 16 else "not the target's batch 16"
    return [f"- CAT packed samples/s on {r['data']} lengths at batch {r['B']}: {x:.2f}x CAT padded "
            f"(target >= {target:.2f}x): {verdict}"]


def growth_fits(train_rows, kernel_rows) -> list[str]:
    """Fits of extra memory vs T: CAT should be linear (exponent ~1), the authors' way quadratic (~2)."""
    out = ["## Memory growth with T (least-squares fits)", ""]
    for method in ("cat", "authors"):
        pts = [(int(r["T"]), num(r, "extra_mib")) for r in train_rows
               if r["method"] == method and num(r, "extra_mib") is not None and 512 <= int(r["T"]) <= 4096]
        if len(pts) >= 2:
            fit = fit_growth(*zip(*pts))
            out.append(f"- training step, {method} extra memory over SDPA, T {pts[0][0]}-{pts[-1][0]}: slope "
                       f"{fit['slope_mib_per_1k']:.1f} MiB per 1k tokens, exponent {fit['exponent']:.2f} "
                       f"(points: {', '.join(f'{t}: {y:.0f}' for t, y in pts)})")
    for method in ("cat", "sdpa", "eager"):
        pts = [(int(r["T"]), num(r, "peak_mib")) for r in kernel_rows if r["method"] == method and
               adjacency_of(r) in ("random", "none") and
               int(r["D"]) == 64 and r["gqa"] == "False" and num(r, "peak_mib") is not None]
        if len(pts) >= 2:
            fit = fit_growth(*zip(*pts))
            out.append(f"- kernel fwd+bwd (D=64, no GQA), {method} peak, T {pts[0][0]}-{pts[-1][0]}: slope "
                       f"{fit['slope_mib_per_1k']:.1f} MiB per 1k tokens, exponent {fit['exponent']:.2f}")
    return out + [""]


def thread_targets(rows) -> list[str]:
    """Issue 14: at all threads the kernel scales >= 1.8x over 1 thread (2 cores) and is <= 1.0x SDPA; the CAT
    step is <= 1.0x the SDPA step."""
    out = []
    top = max((int(r["threads"]) for r in rows), default=1)
    for part, what, limit in (("kernel", "attention fwd+bwd with mass", 1.0),
                              ("kernel_smollm2", "SmolLM2 attention (9/3 heads) fwd+bwd with mass", 1.05),
                              ("train_step", "CAT training step", 1.0)):
        r = next((r for r in rows if r["part"] == part and r["method"] == "cat" and int(r["threads"]) == top), None)
        if r is None or top == 1:
            continue
        x, up = num(r, "x_sdpa"), num(r, "speedup_vs_1")
        line = f"- {what} at {top} threads, T={r['T']}: {fmt(x, '.2f', 'x')} SDPA (target <= {limit:.2f}x)"
        met = x is not None and x <= limit
        if part == "kernel":  # issue 27: our 1 -> n thread speed-up at least SDPA's in the same rounds
            sdpa = next((num(s, "speedup_vs_1") for s in rows if s["part"] == part and s["method"] == "sdpa"
                         and int(s["threads"]) == top), None)
            line += f", {fmt(up, '.3f', 'x')} faster than 1 thread (target >= SDPA's {fmt(sdpa, '.3f', 'x')})"
            met = met and up is not None and sdpa is not None and up >= sdpa
        elif part == "kernel_smollm2" and top == 2:  # issue 33: the backward on 2 threads >= 1.5x its 1-thread time
            bwd = num(r, "bwd_speedup_vs_1")
            line += f", backward {fmt(bwd, '.2f', 'x')} faster than 1 thread (target >= 1.50x)"
            met = met and bwd is not None and bwd >= 1.5
        out.append(line + (": met" if met else ": MISSED"))
    return out


def targets(train_rows, kernel_rows, thread_rows=(), packing_rows=()) -> list[str]:
    out = ["## Targets (issues 8, 14, 17 and 33)", ""] + thread_targets(thread_rows) + packing_targets(packing_rows)
    for T in (1024, 2048):
        r = next((r for r in train_rows if r["method"] == "cat" and int(r["T"]) == T), None)
        if r is None:
            continue
        for key, target, what in (("step_x_sdpa", TARGETS["step_time"], "time"),
                                  ("peak_x_sdpa", TARGETS["step_memory"], "peak memory")):
            x = num(r, key)
            if x is not None:
                verdict = "met" if x <= target else f"MISSED by {100 * (x / target - 1):.0f}%"
                out.append(f"- CAT step {what} at T={T}: {x:.2f}x SDPA (target <= {target:.2f}x): {verdict}")
    ks = [(int(r["T"]), int(r["D"]), r["gqa"], num(r, "fwdbwd_x_sdpa"), adjacency_of(r)) for r in kernel_rows
          if r["method"] == "cat" and 1024 <= int(r["T"]) <= 4096 and num(r, "fwdbwd_x_sdpa") is not None]
    if ks:
        worst = max(ks, key=lambda k: k[3])
        n_met = sum(k[3] <= TARGETS["kernel_fwdbwd"] for k in ks)
        out.append(f"- attention fwd+bwd with mass, T 1k-4k: {n_met}/{len(ks)} cases <= "
                   f"{TARGETS['kernel_fwdbwd']:.2f}x SDPA; range {min(k[3] for k in ks):.2f}x-{worst[3]:.2f}x "
                   f"(worst T={worst[0]} D={worst[1]} GQA {'on' if worst[2] == 'True' else 'off'}, {worst[4]} "
                   f"adjacency; kinds: {', '.join(sorted({k[4] for k in ks}))})")
    return out + [""]


def write_summary(out_dir: str, command: str | None = None, note: str | None = None) -> str:
    def csv_rows(name):
        path = os.path.join(out_dir, name)
        return read_csv(path) if os.path.exists(path) else []

    krows, trows, hrows, prows, rrows, crows = map(csv_rows, ("kernels.csv", "train_step.csv", "threads.csv",
                                                              "packing.csv", "pretrained.csv", "compiled.csv"))
    lines = ["# Benchmark summary", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}; "
             f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s); "
             "methods interleaved per case on a shared machine." + (f" Reproduce: `{command}`" if command else ""), ""]
    if note:
        lines += [note, ""]
    lines += targets(trows, krows, hrows, prows) + growth_fits(trows, krows)
    if crows:
        from . import bench_compiled

        lines += bench_compiled.summary_section(crows)
    if rrows:
        from . import bench_pretrained

        lines += bench_pretrained.summary_section(rrows)
    if prows:
        lines += packing_section(prows)
    if hrows:
        lines += threads_section(hrows)
    if trows:
        lines += train_section(trows)
    if krows:
        lines += kernel_section(krows)
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
