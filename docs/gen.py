"""The generated sections of README.md and docs/*.md: every number in them is read from a committed results file.

Each public function reads one results file and returns markdown. The markdown files call these functions
between cog markers (cogapp); ``python docs/gen.py`` (``make docs``) rewrites every marked section and
``python docs/gen.py --check`` fails when one no longer matches its file (tests/test_docs.py runs it).
A results file that is not there yet gives a "not measured yet" line instead of an error.

To add a section: write a function ``name(...) -> str`` here that reads its file through ``_read_csv`` /
``_read_json`` (both return None when the file is missing) and returns ``_missing(path)`` in that case; then
put ``cog.out(gen.name())`` between markers in a page and run ``make docs``.
"""
from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
MACHINES = RESULTS / "machines.json"  # what is known of the machine behind each results file that lacks it
DEMO_GLOB = "demo_results*.json"  # every committed run of `make demo`, one machine each


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))


# --- reading -------------------------------------------------------------------------------------------------

def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _missing(path: Path) -> str:
    return f"*Not measured yet: `{_rel(path)}` is not in this checkout.*\n"


def _read_csv(path: Path) -> list[dict] | None:
    if not path.exists():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _f(row: dict, key: str) -> float | None:
    v = (row or {}).get(key, "")
    return float(v) if v not in ("", None) else None


def _md(lines) -> str:
    return "\n".join(lines).rstrip("\n") + "\n"


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _benchmark_module(name: str):
    """benchmarks/report.py and friends format the tables of summary.md: the docs reuse them, not copies."""
    bench = str(ROOT / "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return __import__(name)


def _demoted(lines: list[str], level: int = 3) -> list[str]:
    """A section of benchmarks/report.py starts with a '## ' heading: put it at `level`."""
    return [("#" * level + " " + ln[3:]) if ln.startswith("## ") else ln for ln in lines]


# --- where each result comes from ----------------------------------------------------------------------------

def _demo_files() -> list[Path]:
    return sorted(DOCS.glob(DEMO_GLOB))


def _machine_of(path: Path) -> str:
    if path.suffix == ".json":
        machine = (_read_json(path) or {}).get("machine")
        if isinstance(machine, dict):
            return machine.get("description", "")
        if machine:
            return machine
    known = _read_json(MACHINES) or {}
    return known.get(path.name, "machine not recorded")


def sources(*names: str) -> str:
    """One line per results file a page quotes: the file and the machine it was measured on (said once)."""
    lines = []
    for name in names:
        paths = _demo_files() if name == DEMO_GLOB else [ROOT / name]
        for path in paths:
            state = _machine_of(path) if path.exists() else "not measured yet"
            lines.append(f"- `{_rel(path)}`: {state}")
    return _md(["Numbers on this page are generated from these results files (`make docs`); measured on:", ""]
               + lines)


# --- benchmarks (benchmarks/results/*.csv) -------------------------------------------------------------------

def _by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


def headline_train_step() -> str:
    """README: time and peak memory of one training step, CAT and the authors' way against plain SDPA."""
    path = RESULTS / "train_step.csv"
    rows = _read_csv(path)
    if rows is None:
        return _missing(path)
    by = _by(rows, "T", "method")
    out = []
    for T in sorted({r["T"] for r in rows}, key=int):
        sdpa, cat, authors = (by.get((T, m), {}) for m in ("sdpa", "cat", "authors"))

        def cell(r):
            if r.get("status", "ok") != "ok":
                return "not run: " + r["status"].split(": ", 1)[-1]
            return f"{_f(r, 'step_x_sdpa'):.2f}x / {_f(r, 'peak_x_sdpa'):.2f}x (+{_f(r, 'extra_mib'):.0f} MiB)"
        out.append([T, f"{_f(sdpa, 'step_ms') / 1000:.2f} s / {_f(sdpa, 'peak_mib'):.0f} MiB", cell(cat), cell(authors)])
    return _md(_table(["T", "plain SDPA step: time / peak", "CAT (this package): time / peak", "authors' way: time / peak"],
                      out))


def benchmark_header() -> str:
    """The first lines of summary.md: when, which torch, threads, wall time, code version."""
    path = RESULTS / "summary.md"
    if not path.exists():
        return _missing(path)
    body = [ln for ln in path.read_text().splitlines()[1:] if ln.strip()]
    return _md([ln for ln in body[:2] if not ln.startswith("#")])


def benchmark_targets() -> str:
    rows = {name: _read_csv(RESULTS / f"{name}.csv") for name in ("train_step", "kernels", "threads", "packing")}
    if rows["train_step"] is None or rows["kernels"] is None:
        return _missing(RESULTS / "train_step.csv")
    report = _benchmark_module("report")
    lines = report.targets(rows["train_step"], rows["kernels"], rows["threads"] or (), rows["packing"] or ())
    return _md(lines[2:] + [""] + _demoted(report.growth_fits(rows["train_step"], rows["kernels"])))


def _report_section(file: str, section: str) -> str:
    path = RESULTS / file
    rows = _read_csv(path)
    if rows is None:
        return _missing(path)
    return _md(_demoted(getattr(_benchmark_module("report"), section)(rows)))


def train_step_table() -> str:
    return _report_section("train_step.csv", "train_section")


def kernels_table() -> str:
    return _report_section("kernels.csv", "kernel_section")


def threads_table() -> str:
    return _report_section("threads.csv", "threads_section")


def packing_table() -> str:
    return _report_section("packing.csv", "packing_section")


def packing_speedup(data: str = "gsm8k_val") -> str:
    """One sentence: CAT packed vs CAT padded samples/s and memory on one data set's lengths."""
    path = RESULTS / "packing.csv"
    rows = _read_csv(path)
    if rows is None:
        return _missing(path)
    r = next((r for r in rows if r["data"] == data and r["method"] == "cat_packed"), None)
    if r is None or _f(r, "x_cat_padded") is None:
        return f"*Not measured yet: no `cat_packed` row for {data} in `{_rel(path)}`.*\n"
    return (f"On the lengths of `{data}` at batch {r['B']}, packed CAT trains {_f(r, 'x_cat_padded'):.2f}x the "
            f"samples/s of padded CAT with {_f(r, 'peak_x_cat_padded'):.2f}x its peak memory.\n")


def pretrained_table() -> str:
    """SmolLM2-135M: one LoRA step, SDPA / CAT / the authors' way (benchmarks/results/pretrained.csv)."""
    path = RESULTS / "pretrained.csv"
    rows = _read_csv(path)
    if rows is None:
        return _missing(path)
    return _md(_demoted(_benchmark_module("bench_pretrained").summary_section(rows)))


# --- data -----------------------------------------------------------------------------------------------------

def span_coverage() -> str:
    """The located-span table `causal-attn annotate --coverage` printed for the released annotated sets."""
    path = RESULTS / "span_coverage.md"
    if not path.exists():
        return _missing(path)
    text = path.read_text().splitlines()
    return _md([ln for ln in text if ln.startswith("|")])


# --- the demo (docs/demo_results*.json: one file per machine that ran `make demo`) ---------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _spread(values: list[float], digits: int = 0, scale: float = 100) -> str:
    """'95' when all runs agree, '90–95' (min–max across machines) when they do not; fractions shown as %."""
    lo, hi = (f"{scale * x:.{digits}f}" for x in (min(values), max(values)))
    return lo if lo == hi else f"{lo}–{hi}"


def _demo_runs(part: str) -> list[dict] | None:
    runs = [r[part] for r in (_read_json(p) for p in _demo_files()) if r and part in r]
    return runs or None


def _per_seed(runs: list[dict], get, digits: int = 0) -> str:
    seeds = len(get(runs[0]))
    return " / ".join(_spread([get(r)[s] for r in runs if len(get(r)) == seeds], digits) for s in range(seeds))


def _mean_cell(runs: list[dict], get_mean, digits: int = 1) -> str:
    return _spread([get_mean(r) for r in runs], digits)


def _runs_note(runs) -> str:
    n = len(runs)
    return ("one run" if n == 1 else f"{n} runs on different machines; a range is min–max across them") + \
        f", seeds {', '.join(map(str, runs[0]['seeds']))}"


def demo_cat_table() -> str:
    runs = _demo_runs("cat")
    if runs is None:
        return _missing(DOCS / "demo_results.json")
    out = []
    for method in ("vanilla", "cat"):
        out.append([method, _mean_cell(runs, lambda r: r[method]["iid_acc"]),
                    _mean_cell(runs, lambda r: r[method]["ood_acc"]),
                    _per_seed(runs, lambda r: r[method]["ood_per_seed"], 1),
                    " / ".join(_spread([r[method]["attention_mass"][k] for r in runs], 2, scale=1)
                               for k in ("causal", "spurious", "irrelevant"))])
    maj = runs[0]["majority"]
    out.append([f"majority class ({maj['label']})", _pct(maj["iid_acc"]), _pct(maj["ood_acc"]), "", "–"])
    return _md([f"Accuracy %, mean over seeds ({_runs_note(runs)}); attention = layer/head-averaged mass at the "
                "answer row, OOD samples.", ""] + _table(
        ["model", "IID acc %", "OOD acc %", "OOD per seed", "attention at answer row: causal / spurious / irrelevant"],
        out))


CAPT_VARIANTS = ("commonsense", "anticommonsense", "nonsense")


def demo_capt_table() -> str:
    runs = _demo_runs("capt")
    if runs is None:
        return _missing(DOCS / "demo_results.json")
    out = [[method.replace("_", " ")] + [
        f"{_mean_cell(runs, lambda r: r[method][v]['acc'])} ({_per_seed(runs, lambda r: r[method][v]['per_seed'])})"
        for v in CAPT_VARIANTS] for method in ("vanilla", "capt", "capt_order")]
    return _md([f"Accuracy % per test variant, mean over seeds and per seed in brackets ({_runs_note(runs)}).", ""]
               + _table(["method", *(f"{v} %" for v in CAPT_VARIANTS)], out))


def headline_demo() -> str:
    """README: the demo's two results, CAT vs vanilla OOD on STG_E and CAPT vs vanilla on unseen names."""
    cat, capt = _demo_runs("cat"), _demo_runs("capt")
    if cat is None or capt is None:
        return _missing(DOCS / "demo_results.json")
    rows = [["STG_E OOD accuracy % (CAT)", _mean_cell(cat, lambda r: r["vanilla"]["ood_acc"]),
             _mean_cell(cat, lambda r: r["cat"]["ood_acc"])]]
    for v in ("anticommonsense", "nonsense"):
        rows.append([f"deduction, {v} % (CAPT)", _mean_cell(capt, lambda r: r["vanilla"][v]["acc"]),
                     _mean_cell(capt, lambda r: r["capt"][v]["acc"])])
    return _md(_table([f"`make demo`, tiny Llamas on CPU ({len(cat[0]['seeds'])} seeds, {len(cat)} machine(s))",
                       "vanilla", "with the method"], rows))


def demo_recipe(part: str) -> str:
    """The recipe a demo part trained with, from the results file (the first run; all runs share the command)."""
    runs = _demo_runs(part)
    if runs is None:
        return _missing(DOCS / "demo_results.json")
    r = runs[0]["recipe"]
    return (f"{r['layers']} layers, hidden {r['hidden']}, {r['heads']} heads, init std {r['init_std']}; AdamW lr "
            f"{r['lr']}, weight decay {r['weight_decay']}, warm-up {r['warmup']} + cosine, {r['steps']} steps of "
            f"batch {r['batch_size']}" + (f", alpha {r['alpha']:g}, gamma {r['gamma']:g}" if part == "cat" else "")
            + f"; {r['train_records']} training records"
            + (f" ({r['copies']} CAPT copies, fresh letters each)" if "copies" in r else "") + ".\n")


def demo_seconds() -> str:
    runs = [(p, _read_json(p)) for p in _demo_files()]
    if not runs:
        return _missing(DOCS / "demo_results.json")
    return "Wall time of `causal-attn demo`: " + "; ".join(f"{d['seconds']:.0f} s (`{_rel(p)}`)" for p, d in runs) \
        + ".\n"


def tested_versions() -> str:
    """The package versions recorded with the newest demo run that records them."""
    for path in reversed(_demo_files()):
        machine = (_read_json(path) or {}).get("machine")
        if isinstance(machine, dict) and machine.get("versions"):
            v = machine["versions"]
            return _md([f"Recorded with `{_rel(path)}` ({machine.get('date', '')}):", ""]
                       + _table(list(v), [list(v.values())]))
    return "*Not recorded yet: no demo results file carries package versions.*\n"


# --- running cog ---------------------------------------------------------------------------------------------

def run_cog(check: bool) -> int:
    from cogapp import Cog

    args = ["cog", "-I", str(DOCS), "-p", "import gen", "--check" if check else "-r"]
    return Cog().main(args + [str(p) for p in pages()])


if __name__ == "__main__":
    sys.exit(run_cog(check="--check" in sys.argv[1:]))
