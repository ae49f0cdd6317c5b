"""Training step of a real checkpoint: one LoRA AdamW step of SmolLM2-135M-Instruct (30 layers, hidden 576,
9 query / 3 key-value heads, head dim 64, vocab 49152), loaded by ``pretrained.load("smollm2-135m")``.

LoRA r 8 on q/k/v/o (the base frozen), AdamW lr 1e-4. Methods (same weights, batches and adjacency):
    sdpa     plain SDPA, next-token loss only (the floor)
    cat      CAT through ``patch_model``: next-token loss + gamma * ``handle.loss()``
    authors  the authors' way: eager attention, ``output_attentions=True``, maps averaged over layers and heads,
             the hinge on dense tensors (``bench_train_step.authors_re_attention``)
Cases: ``stg`` (the first B=8 released STG_M records, tokenised by the model's own tokenizer, adjacency from their
``important`` annotations, right padding) and random tokens at T=512 (B 4) and T=2048 (B 1) with an STG-shaped
adjacency. The authors' way is skipped where its projected *extra* memory (over the SDPA step's peak) exceeds
``--pretrained-max-extra-gib`` (default: half the memory available when the sweep starts). The projection is
``k * maps_mib(T, B)`` (one (B, H, T, T) fp32 map per layer) with ``k`` fitted by least squares to the authors'
extras measured earlier in the same run (``projection`` column says which); before any measurement it is the
analytic bound of ``bench_train_step.projected_authors_gib`` (5 maps per layer). Measured rows carry the
projection too, so the CSV shows how well it predicted.

Timing: methods interleaved per round, medians of per-round ratios to SDPA. Memory: one fresh child process per
case; per method the RSS high-water growth of a step over the resident set after a warm-up step of the same case.
The STG case also records CAT's statistics at initialisation (before any step): the Re-Attention loss and the
answer rows' causal mass (layer/head-averaged) beside the mass uniform attention would give.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import causal_attn
from causal_attn import pretrained

from .bench_train_step import (METHODS, StepBench, add_memory_ratios, fill_step_row, fit_maps_per_layer, maps_mib,
                               projected_authors_gib, stg_like_graph)
from .common import (child_report, fmt, interleaved_times, machine_fields, measure_peak, num, run_child, section_main,
                     summarize, timed_phases)

MODEL_NAME = "smollm2-135m"
CASES = {"stg": (None, 8), "T512": (512, 4), "T2048": (2048, 1)}  # name -> (T or None for STG records, B)
ALPHA = 2.0  # the margin of the pretrained pilots (issue 24): the hinge is active at initialisation
LORA_R = 8
STG_M = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "cat", "stg_e",
                     "train_M.jsonl")
TARGETS = {"time": 1.02, "memory": 1.05, "authors_extra_over_ours": 10.0}


def shape_config(model) -> dict:
    c = model.config
    return {"num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers}


def stg_records(B: int) -> list[dict]:
    """The first B released STG_M records (the generator's copy when the release is not beside the checkout)."""
    if os.path.exists(STG_M):
        from causal_attn.data.stg import read_jsonl

        return read_jsonl(STG_M)[:B]
    from causal_attn.data.stg import generate_stg_e

    return list(generate_stg_e(seed=42)["train_M"])[:B]


def make_batch(case: str, tokenizer, vocab: int, device, stg_batch: int = CASES["stg"][1]) -> dict:
    """``input_ids``, ``labels``, ``attention_mask`` and ``adjacency`` of a case."""
    T, B = CASES[case]
    B = stg_batch if T is None else B
    if T is None:
        from causal_attn.data.adjacency import encode_example
        from causal_attn.data.collate import CATCollator

        enc = [encode_example(r["input"], r["target"], r["important"], tokenizer) for r in stg_records(B)]
        batch = CATCollator(tokenizer.pad_token_id)(enc)
    else:
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, vocab, (B, T), generator=g)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones(B, T, dtype=torch.long),
                 "adjacency": stg_like_graph(B, T, g)}
    return {k: v.to(device) for k, v in batch.items()}


class PretrainedStep(StepBench):
    """The real checkpoint with fresh LoRA adapters and AdamW, for one method; :meth:`step` trains once."""

    alpha = ALPHA

    def __init__(self, method: str, base, device, backend: str = "auto", seed: int = 0):
        import copy

        from peft import LoraConfig, get_peft_model

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        self.method = method
        model = copy.deepcopy(base)
        model.config._attn_implementation = "eager" if method == "authors" else "sdpa"
        torch.manual_seed(seed)
        self.model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        self.model.to(device).train()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.handle = causal_attn.patch_model(self.model, alpha=self.alpha, backend=backend) if method == "cat" else None

    def prepare(self, batch: dict):
        self.batch = batch
        if self.handle is not None:
            self.handle.set_adjacency(batch["adjacency"])
        self.dense_adj = batch["adjacency"].to_dense() if self.method == "authors" else None
        return self

    def model_inputs(self) -> dict:
        return {k: self.batch[k] for k in ("input_ids", "attention_mask", "labels")}


def initial_statistics(base, batch: dict) -> dict:
    """CAT's Re-Attention loss and the answer rows' mean causal mass at initialisation (no step taken), and the
    mass that uniform attention over the allowed keys would put on the annotated ones (c_i / n_i)."""
    import copy

    model = copy.deepcopy(base)
    handle = causal_attn.patch_model(model, alpha=ALPHA)
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adjacency=batch["adjacency"])
    mass = torch.stack(handle.masses()).mean(dim=(0, 2))  # (B, T): layer- and head-averaged
    c, n = batch["adjacency"].counts(batch["attention_mask"].bool())
    rows = c > 0
    return {"init_attn_loss": float(handle.loss()), "init_answer_mass": float(mass[rows].mean()),
            "init_uniform_mass": float((c.float() / n.clamp_min(1).float())[rows].mean()),
            "answer_rows": int(rows.sum())}


# ------------------------------------------------------------------------------------------ memory child
def child_main(argv):
    """``--child CASE STG_BATCH THREADS METHOD...``: peak RSS growth (MiB) of one step per method, one after another
    in this fresh process, each after a warm-up step of the same case (optimizer state exists)."""
    case, stg_batch, threads, *methods = argv[0], int(argv[1]), int(argv[2]), *argv[3:]
    torch.set_num_threads(threads)
    base, tok = pretrained.load(MODEL_NAME, progress=False)
    batch = make_batch(case, tok, base.config.vocab_size, "cpu", stg_batch)
    peaks = {}
    for method in methods:
        bench = PretrainedStep(method, base, "cpu").prepare(batch)
        bench.step()
        peaks[method] = measure_peak(bench.step)
        del bench
    child_report(**peaks)


def measure_memory(case: str, methods, args, device) -> dict:
    if device.type == "cuda":
        from .common import measure_peak_cuda

        base, tok = pretrained.load(MODEL_NAME, progress=False, device=device)
        batch = make_batch(case, tok, base.config.vocab_size, device, args.pretrained_stg_batch)
        out = {}
        for m in methods:
            bench = PretrainedStep(m, base, device).prepare(batch)
            bench.step()
            out[m] = measure_peak_cuda(bench.step)
        return out
    return run_child(__spec__.name, [case, args.pretrained_stg_batch, torch.get_num_threads(), *methods],
                     timeout=args.child_timeout)


# ------------------------------------------------------------------------------------------ sweep
def run_sweep(args, log=print) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cpu":  # the real model's step is long: all cores unless told otherwise
        torch.set_num_threads(args.pretrained_threads or os.cpu_count() or 1)
    base, tok = pretrained.load(MODEL_NAME, device=device)
    shape = shape_config(base)
    machine = machine_fields()
    limit_gib = args.pretrained_max_extra_gib or available_gib() / 2
    rows, measured = [], []  # measured: (maps_mib, extra_mib) of the authors' way in this run
    for case in args.pretrained_cases:
        batch = make_batch(case, tok, base.config.vocab_size, device, args.pretrained_stg_batch)
        B, T = batch["input_ids"].shape
        projection = project_authors_extra(T, B, shape, measured)
        skip = {"authors": f"skipped: projected extra {projection['projected_extra_mib'] / 1024:.1f} GiB > "
                           f"{limit_gib:.1f} GiB (--pretrained-max-extra-gib)"} \
            if projection["projected_extra_mib"] > limit_gib * 1024 else {}
        methods = [m for m in args.pretrained_methods if m not in skip]
        benches = {m: PretrainedStep(m, base, device, backend=args.backend).prepare(batch) for m in methods}
        runs = {m: (lambda b=b: timed_phases(b.forward_loss, b.backward_step, device)) for m, b in benches.items()}
        times = summarize(interleaved_times(runs, warmup=args.warmup, repeats=args.repeats,
                                            budget_s=args.pretrained_case_budget))
        del benches, runs
        mem = measure_memory(case, methods, args, device) if not args.pretrained_no_memory else {}
        extra = initial_statistics(base, batch) if case == "stg" else {}
        case_rows = []
        for m in args.pretrained_methods:
            row = {"case": case, "T": T, "B": B, "method": m, "device": device.type,
                   "threads": torch.get_num_threads() if device.type == "cpu" else "", "model": MODEL_NAME,
                   **machine, "load_avg": round(os.getloadavg()[0], 1)}
            case_rows.append(row)
            if m == "authors":
                row.update(projection)
            if m in skip:
                row.update(status=skip[m])
                continue
            fill_step_row(row, times[m], mem)
            if m == "cat":
                row.update(extra)
        add_memory_ratios(case_rows)
        measured += [(maps_mib(T, B, shape), r["extra_mib"]) for r in case_rows
                     if r["method"] == "authors" and r.get("status") == "ok" and "extra_mib" in r]
        rows += case_rows
        log(f"pretrained {case} (B={B}, T={T}): " + ", ".join(
            f"{m} {times[m]['fwdbwd'] * 1e3:.0f} ms" for m in times) + (f"; init {json.dumps(extra)}" if extra else ""))
    return rows


def available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB (total RAM where that file is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def project_authors_extra(T: int, B: int, shape: dict, measured) -> dict:
    """The authors' projected extra memory (MiB) at (T, B): fitted to this run's measured extras when there are
    some, else the analytic bound; ``projection`` says which."""
    k = fit_maps_per_layer(measured)
    if k is None:
        return {"projected_extra_mib": round(projected_authors_gib(T, B, shape) * 1024, 1),
                "projection": "bound: 5 maps per layer"}
    return {"projected_extra_mib": round(k * maps_mib(T, B, shape), 1),
            "projection": f"fit: {k:.2f} maps per layer over {len(measured)} measured case(s)"}


def authors_extra(row: dict) -> tuple[float | None, bool]:
    """(extra MiB, projected?) of an authors' row: measured when it ran, else its projection."""
    if row.get("status") == "ok" and num(row, "extra_mib") is not None:
        return num(row, "extra_mib"), False
    return num(row, "projected_extra_mib"), True


# ------------------------------------------------------------------------------------------ report
def summary_section(rows) -> list[str]:
    """Markdown: the table, the statistics at initialisation and the issue's goals (met or missed)."""
    by = {(r["case"], r["method"]): r for r in rows}
    lines = ["## Real checkpoint: one LoRA AdamW step of SmolLM2-135M (30 layers, 9 / 3 heads, vocab 49152)", "",
             "Ratios to the plain SDPA step (medians of interleaved rounds); peak = RSS growth of one step in a fresh "
             "process, MiB; extra = peak - SDPA peak.", "",
             "| case | B | T | SDPA step ms | CAT time | authors time | SDPA peak MiB | CAT mem | CAT extra MiB | "
             "authors mem | authors extra MiB |", "|" + "---|" * 11]
    goals = []
    for case in dict.fromkeys(r["case"] for r in rows):
        s, c, a = (by.get((case, m), {}) for m in METHODS)
        theirs, projected = authors_extra(a)
        authors_cell = "-" if theirs is None else f"~{theirs:.0f} (projected)" if projected else f"{theirs:.0f}"
        lines.append(f"| {case} | {s.get('B', '-')} | {s.get('T', '-')} | {fmt(num(s, 'step_ms'), '.0f')} | "
                     f"{fmt(num(c, 'step_x_sdpa'), '.3f', 'x')} | {fmt(num(a, 'step_x_sdpa'), '.2f', 'x')} | "
                     f"{fmt(num(s, 'peak_mib'), '.0f')} | {fmt(num(c, 'peak_x_sdpa'), '.3f', 'x')} | "
                     f"{fmt(num(c, 'extra_mib'), '.0f')} | {fmt(num(a, 'peak_x_sdpa'), '.2f', 'x')} | {authors_cell} |")
        for key, target, what in (("step_x_sdpa", TARGETS["time"], "time"), ("peak_x_sdpa", TARGETS["memory"],
                                                                             "peak memory")):
            x = num(c, key)
            if x is not None:
                goals.append(f"- CAT step {what}, {case}: {x:.3f}x SDPA (goal <= {target:.2f}x): "
                             + ("met" if x <= target else "MISSED"))
        ours = num(c, "extra_mib")
        if a.get("status") == "ok" and num(a, "projected_extra_mib") is not None and theirs is not None:
            goals.append(f"- projection check, {case}: the authors' extra was projected at "
                         f"{num(a, 'projected_extra_mib'):.0f} MiB ({a.get('projection')}) and measured at "
                         f"{theirs:.0f} MiB")
        if case == "T2048" and ours is not None and theirs is not None:
            ratio = theirs / max(ours, 1.0)
            goals.append(f"- authors' extra memory at T=2048: {theirs:.0f} MiB"
                         f"{' (projected)' if projected else ''} vs CAT's {ours:.0f} MiB: {ratio:.0f}x "
                         f"(goal >= {TARGETS['authors_extra_over_ours']:.0f}x): "
                         + ("met" if ratio >= TARGETS["authors_extra_over_ours"] else "MISSED"))
    init = by.get(("stg", "cat"), {})
    if num(init, "init_attn_loss") is not None:
        lines += ["", f"At initialisation on the STG batch (alpha {ALPHA:g}): Re-Attention loss "
                  f"{num(init, 'init_attn_loss'):.3f}; answer rows' causal mass {num(init, 'init_answer_mass'):.3f} "
                  f"(uniform attention would give {num(init, 'init_uniform_mass'):.3f}; "
                  f"{init.get('answer_rows')} answer rows)."]
    return lines + ([""] + goals if goals else []) + [""]


def plot(csv_path: str, out_dir: str) -> dict[str, str]:
    """Bars: step time and peak memory of CAT and the authors' way relative to plain SDPA, per case."""
    from .common import ratio_bars, read_csv

    def missing(row):
        return f"not run:\nprojected extra\n{num(row, 'projected_extra_mib') / 1024:.1f} GiB" \
            if num(row, "projected_extra_mib") is not None else "n/a"

    path = ratio_bars(read_csv(csv_path), {"cat": "CAT (patch_model)", "authors": "authors' way (eager maps)"},
                      keys=("step_x_sdpa", "peak_x_sdpa"), ylabel="x plain SDPA", missing=missing,
                      suptitle="SmolLM2-135M, one LoRA AdamW step, relative to the plain SDPA step", out_dir=out_dir,
                      name="pretrained.png")
    return {"pretrained_png": path}


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--pretrained-cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--pretrained-methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--pretrained-stg-batch", type=int, default=CASES["stg"][1], help="records in the stg case")
    p.add_argument("--pretrained-threads", type=int, default=0,
                   help="CPU threads of the pretrained section (default: torch's default, all cores)")
    p.add_argument("--pretrained-case-budget", type=float, default=150.0,
                   help="seconds per case after which no new timing round starts")
    p.add_argument("--pretrained-max-extra-gib", type=float, default=None,
                   help="skip the authors' way where its projected extra memory exceeds this (default: half the "
                   "memory available when the sweep starts)")
    p.add_argument("--pretrained-no-memory", action="store_true", help="skip the memory child processes")


if __name__ == "__main__":
    sys.exit(section_main("pretrained", child_main))
