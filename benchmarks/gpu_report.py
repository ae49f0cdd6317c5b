"""The report of the GPU kit (benchmarks/gpu_check.py): the method names and labels, the goals, summary.md and the
plots, from the rows the sections produce (or load back from their CSVs). ``plan`` is gpu_check's Plan."""
from __future__ import annotations

import os

KERNEL_METHODS = ("cat", "cat_nomass", "flex_cat", "sdpa_flash")
KERNEL_LABELS = {"cat": "ours, with mass", "cat_nomass": "ours, no mass", "flex_cat": "Flex CAT (2 Flex calls, mass)",
                 "sdpa_flash": "SDPA flash, no mass"}
TRAIN_METHODS = ("sdpa", "cat", "cat_flex", "authors", "sdpa_compiled", "cat_compiled")
TRAIN_LABELS = {"sdpa": "plain SDPA (no CAT)", "cat": "CAT, our kernels", "cat_flex": "CAT on Flex",
                "authors": "CAT the authors' way (eager maps)",
                "sdpa_compiled": "plain SDPA, torch.compile(model)", "cat_compiled": "CAT, our kernels, torch.compile(model)"}
GOAL_STEP, GOAL_FLEX, GOAL_TFLOPS = 1.10, 1.5, 0.8
GOAL_COMPILED_TIME, GOAL_COMPILED_MEMORY = 1.00, 1.05  # compiled CAT step / compiled plain SDPA step (issue 31)


def fmt(x, spec=".2f", suffix=""):
    if x in (None, ""):
        return "-"
    try:
        return f"{float(x):{spec}}{suffix}"
    except (TypeError, ValueError):
        return str(x)


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def summary(plan, env: dict, results: dict, notes: list[str], wall: float, budget: float,
            budget_rows: list[dict] | None = None) -> str:
    lines = ["# GPU check" + (" (dry run: CPU tensors, timings are not evidence)" if plan.dry else ""), "",
             "; ".join(f"{k} {v}" for k, v in env.items()) + ".",
             f"Wall time {wall:.0f} s (budget {budget:.0f} s). Reproduce: `causal-attn gpu-check"
             + (" --dry-run" if plan.dry else "") + "`.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += _goals_section(plan, results)
    lines += _tests_section(results.get("tests", []))
    lines += budget_section(plan, budget_rows or [], budget, budget if not plan.dry else 510.0)
    corr = results.get("correctness", [])
    for part, title in (("attention", "Triton"), ("flex", "backend='flex' (Flex CAT)")):
        rows = [r for r in corr if r["part"] == part]
        if rows:
            lines += _correctness_table(rows, title)
    pm = [r for r in corr if r["part"] == "patch_model"]
    if pm:
        lines += ["patch_model vs Hugging Face eager (both against the fp64 model; logits, loss and every "
                  "parameter gradient):", ""]
        lines += _table(["family", "dtype", "tensors", "logits ours / eager", "worst ratio to bound", "status"],
                        [[r["family"], r["dtype"], r.get("tensors", "-"),
                          f"{fmt(r.get('logits_err'), '.1e')} / {fmt(r.get('logits_eager_err'), '.1e')}",
                          f"{fmt(r.get('worst_gradient_ratio_to_bound'), '.2f')} ({r.get('worst_tensor', '')})",
                          r["status"]] for r in pm]) + [""]
    kern = results.get("kernels", [])
    if kern:
        lines += [f"## Kernels: {kern[0]['dtype']}, GQA {kern[0]['Hq']} / {kern[0]['Hkv']} heads, "
                  f"{plan.kernel_tokens} tokens per batch (x SDPA: time ratio to SDPA flash; TFLOP/s with the "
                  "causal FLOPs of one attention)", ""]
        table = []
        for r in sorted(kern, key=lambda r: (r["D"], r["T"])):
            if r.get("fwd_ms") is None:
                cells = ["-"] * 7 + [r["status"]]
            else:
                cells = [fmt(r.get("fwd_ms")), fmt(r.get("bwd_ms")), fmt(r.get("fwdbwd_ms")),
                         fmt(r.get("fwdbwd_x_sdpa"), ".2f", "x"),
                         "-" if plan.dry else fmt(r.get("tflops_fwdbwd"), ".0f"),
                         fmt(r.get("peak_mib"), ".0f"), fmt(r.get("flex_second_call_blocks"), ".2f"), r["status"]]
            table.append([r["D"], r["T"], r["B"], KERNEL_LABELS[r["method"]], r.get("adjacency", "random")] + cells)
        lines += _table(["D", "T", "B", "method", "adjacency", "fwd ms", "bwd ms", "fwd+bwd ms", "x SDPA",
                         "TFLOP/s fwd+bwd", "peak MiB", "Flex 2nd call blocks", "status"], table) + [""]
        lines += ["Adjacency: random = 5 % of allowed pairs, every row has edges; answer_rows = STG-like, edges only "
                  "from the answer rows near each sample's end into 2-4 spans (bench_kernels.answer_rows_graph). "
                  "Flex 2nd call blocks: the (query, key) blocks Flex CAT's second call (causal AND adjacency) visits, "
                  "over its first call's: the share of a full attention its mass costs it.", ""]
        tuned = sorted({(r["T"], r["D"], r.get("autotune", "-")) for r in kern if r["method"] == "cat"})
        lines += ["Autotune choice per shape (BLOCK_MxBLOCK_N, warps, stages):", ""]
        lines += [f"- T={T} D={D}: {a}" for T, D, a in tuned] + [""]
    tr = results.get("train", [])
    for model_name in dict.fromkeys(r["model"] for r in tr):
        rows = [r for r in tr if r["model"] == model_name]
        lines += [f"## Training step: {model_name}" + (" (dry run: a tiny stand-in)" if plan.dry else " shape")
                  + f", random weights, {rows[0]['params_m']:.3g}M parameters ({plan.train_models[model_name]}), "
                  f"{rows[0]['dtype']}, AdamW, batch 1", ""]
        lines += _table(["method", "T", "forward ms", "step ms", "x SDPA", "peak MiB", "x SDPA",
                         "first step s (compile)", "graphs", "x eager", "status"],
                        [[TRAIN_LABELS[r["method"]], r["T"], fmt(r.get("forward_ms"), ".1f"),
                          fmt(r.get("step_ms"), ".1f"),
                          fmt(r.get("step_x_sdpa"), ".2f", "x"), fmt(r.get("peak_mib"), ".0f"),
                          fmt(r.get("peak_x_sdpa"), ".2f", "x"), fmt(r.get("first_step_s"), ".1f"),
                          r.get("compiled_graphs", "-"), fmt(r.get("step_x_eager"), ".2f", "x"), r["status"]]
                         for r in rows]) + [""]
        if any(r["method"].endswith("_compiled") for r in rows):
            backend = next((r.get("compile_backend") for r in rows if r.get("compile_backend")), "?")
            lines += [f"x SDPA: over the plain SDPA step of the same mode (compiled rows: over the compiled plain "
                      f"step; backend `{backend}`, the optimizer step eager). First step: the compile's seconds. "
                      "Graphs: dynamo graphs of the compiled model (1: no graph break). x eager: over the same method "
                      "uncompiled.", ""]
    lines += ["Files: summary.md, tests.csv, correctness.csv, kernels.csv, train_step.csv, budget.csv, kernels.png, "
              "train_step.png.", ""]
    return "\n".join(lines)


def _correctness_table(rows: list[dict], title: str) -> list[str]:
    lines = [f"## Correctness: {title} vs fp64 oracle (max abs error, ours / eager in the same dtype)", ""]
    table = []
    for dt in dict.fromkeys(r["dtype"] for r in rows):
        rs = [r for r in rows if r["dtype"] == dt]
        cells = [dt, f"{sum(r['status'] == 'ok' for r in rs)}/{len(rs)}",
                 "yes" if all(str(r.get("grads")) in ("True", "true") for r in rs) else "forward only"]
        for q in ("out", "mass", "dq", "dk", "dv"):
            got = [(r[f"{q}_err"], r[f"{q}_eager_err"]) for r in rs if r.get(f"{q}_err") is not None]
            cells.append(f"{max(o for o, _ in got):.1e} / {max(e for _, e in got):.1e}" if got else "-")
        table.append(cells)
    lines += _table(["dtype", "cases ok", "gradients", "out", "mass", "dq", "dk", "dv"], table) + [""]
    lines += ["Largest error over the cases of each dtype (the rule is checked per case). Failures:", ""]
    lines += [f"- {r['dtype']} T={r['T']} D={r['D']} {r['padding']} x{r['logit_scale']:g}: {r['status']}"
              for r in rows if r["status"] != "ok"] or ["- none"]
    return lines + [""]


def goals(results: dict) -> list[tuple[str, bool | None, str]]:
    """``(goal, met (None: not measured), the measured ratios)`` for the goals of the GPU run; the kernel goals are
    judged on every adjacency kind (rows written before the column existed count as "random")."""
    kern = results.get("kernels", [])
    by_case: dict = {}
    for r in kern:
        by_case.setdefault((r["D"], r["T"]), {})[r["method"], r.get("adjacency") or _default_kind(r["method"])] = r
    flex, tflops = [], []
    for (D, T), ms in by_case.items():
        sdpa = ms.get(("sdpa_flash", "none"), {}).get("fwdbwd_ms")
        for kind in sorted({k for m, k in ms if m == "cat"}):
            ours = ms.get(("cat", kind), {}).get("fwdbwd_ms")
            flex_ms = ms.get(("flex_cat", kind), {}).get("fwdbwd_ms")
            if ours and flex_ms:
                flex.append((f"D={D} T={T} {kind}", flex_ms / ours))
            if ours and sdpa:
                tflops.append((f"D={D} T={T} {kind}", sdpa / ours))  # same FLOPs: time ratio
    train = results.get("train", [])
    step = [(f"{r['model']} T={r['T']}", r["step_x_sdpa"]) for r in train if r["method"] == "cat" and r.get("step_x_sdpa")]
    compiled = [r for r in train if r["method"] == "cat_compiled"]
    compiled_time = [(f"{r['model']} T={r['T']}", r["step_x_sdpa"]) for r in compiled if r.get("step_x_sdpa")]
    compiled_memory = [(f"{r['model']} T={r['T']}", r["peak_x_sdpa"]) for r in compiled if r.get("peak_x_sdpa")]

    def judge(name, pairs, ok, unit):
        if not pairs:
            return name, None, "not measured"
        return name, all(ok(x) for _, x in pairs), ", ".join(f"{c}: {x:.2f}{unit}" for c, x in pairs)

    return [judge(f"our CAT training step <= {GOAL_STEP:.2f}x the plain SDPA step", step,
                  lambda x: x <= GOAL_STEP, "x"),
            judge(f"ours >= {GOAL_FLEX:.1f}x faster than Flex CAT in forward+backward", flex,
                  lambda x: x >= GOAL_FLEX, "x faster"),
            judge(f"our kernel's TFLOP/s >= {GOAL_TFLOPS:.1f}x SDPA flash's (forward+backward)", tflops,
                  lambda x: x >= GOAL_TFLOPS, "x"),
            judge(f"compiled CAT step (torch.compile(model)) <= {GOAL_COMPILED_TIME:.2f}x the compiled plain SDPA "
                  "step's time", compiled_time, lambda x: x <= GOAL_COMPILED_TIME, "x"),
            judge(f"compiled CAT step <= {GOAL_COMPILED_MEMORY:.2f}x the compiled plain SDPA step's peak memory",
                  compiled_memory, lambda x: x <= GOAL_COMPILED_MEMORY, "x")]


def _default_kind(method: str) -> str:
    return "random" if method in ("cat", "flex_cat") else "none"


def _goals_section(plan, results: dict) -> list[str]:
    lines = ["## Goals" + (" (dry run: CPU / interpreter timings, not evidence)" if plan.dry else ""), "",
             "Kernel goals on both adjacency kinds (random, answer_rows); see docs/gpu.md for why Flex CAT gains on "
             "answer_rows.", ""]
    for name, met, detail in goals(results):
        verdict = "not measured" if met is None else ("MET" if met else "NOT MET")
        lines.append(f"- **{verdict}**: {name}" + ("" if met is None else f" ({detail})"))
    return lines + [""]


def _tests_section(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    counts = {o: sum(r["outcome"] == o for r in rows) for o in dict.fromkeys(r["outcome"] for r in rows)}
    lines = ["## CUDA tests (`pytest -m cuda`)", "",
             f"{len(rows)} tests: " + ", ".join(f"{n} {o.lower()}" for o, n in counts.items()) + ".", ""]
    bad = [r for r in rows if r["outcome"] in ("FAILED", "ERROR")]
    lines += [f"- {r['outcome']}: {r['test']}" for r in bad]
    by_file: dict = {}
    for r in rows:
        f = r["test"].split("::")[0]
        by_file.setdefault(f, {}).setdefault(r["outcome"], 0)
        by_file[f][r["outcome"]] += 1
    lines += _table(["file", "results"], [[f, ", ".join(f"{n} {o.lower()}" for o, n in c.items())]
                                           for f, c in by_file.items()])
    return lines + [""]


TESTS_WEIGHT = 0.35  # the tests section's weight in gpu_check.SECTIONS: its cap on a GPU run is this share


def budget_section(plan, rows: list[dict], budget: float, gpu_budget_s: float = 510.0) -> list[str]:
    """Per section: wall time, its share of the budget, what it compiled and timed, mapped to the GPU plan, and
    the GPU seconds predicted from those counts (benchmarks/gpu_budget.py), against the GPU run's budget."""
    if not rows:
        return []
    from .gpu_budget import UNIT_S

    predicted = [float(r["predicted_gpu_s"]) for r in rows if r.get("predicted_gpu_s") not in (None, "")]
    tests_cap = (TESTS_WEIGHT * gpu_budget_s if plan.dry else
                 next((float(r["share_s"]) for r in rows if r["section"] == "tests"), None))
    lines = ["## Time budget" + (" and the GPU run predicted from this dry run's counts" if plan.dry else ""), "",
             f"Budget {budget:.0f} s for the sections; each starts with its weight's share of the time left. "
             "Counts on the GPU plan: Triton binaries (launch variants x autotune configs for sm_90), autotune runs "
             "(x lengths), Flex graphs (dynamo graphs of causal_attn.ops.flex's compiled entry points), Inductor graphs "
             "(dynamo graphs of torch.compile(model) in the compiled training step), timed cases.", ""]
    lines += _table(["section", "wall s", "share s", "Triton launch variants", "Triton binaries", "autotune runs",
                     "Flex call / mask graphs", "Inductor graphs", "timed cases", "oracle cases", "predicted GPU s"],
                    [[r["section"], fmt(r["wall_s"], ".0f"), fmt(r["share_s"], ".0f"), r["triton_launches"],
                      r["triton_binaries"], fmt(r["autotune_runs"], ".0f"),
                      f"{r['flex_call_graphs']} / {r['flex_mask_graphs']}", r.get("inductor_graphs", 0) or 0,
                      fmt(r["gpu_measurements"], ".0f"), r["gpu_oracle_cases"],
                      "cap" if r["section"] == "tests" else fmt(r.get("predicted_gpu_s"), ".0f")] for r in rows])
    if predicted:
        total = sum(predicted) + (tests_cap or 0)
        lines += ["", f"Predicted GPU time: {sum(predicted):.0f} s for the measured sections"
                  + (f" + the tests' cap of {tests_cap:.0f} s = {total:.0f} s" if tests_cap else "")
                  + f" (the GPU run's budget: {gpu_budget_s:.0f} s). Units: Triton compile {float(rows[0]['triton_compile_unit_s']):.1f} s per binary "
                  "(measured here: one sm_90 compile ahead of time), autotune run "
                  f"{UNIT_S['autotune_run']} s, Flex graph {UNIT_S['flex_call_graph']:.0f} s per call / "
                  f"{UNIT_S['flex_mask_graph']:.0f} s per mask builder, timed case {UNIT_S['measurement']} s "
                  f"(training step {UNIT_S['train_measurement']} s), oracle case {UNIT_S['oracle_case']} s, "
                  f"Inductor graph {UNIT_S['inductor_graph']:.0f} s (forward and backward of the 16-layer model) "
                  "(assumptions, checked by the wall times of a GPU run). The tests section is a cap: its tests "
                  "skip without CUDA, so nothing of theirs is counted here."]
    return lines + [""]


def plots(out: str, results: dict, plan) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    metric = "fwdbwd_ms" if plan.dry else "tflops_fwdbwd"
    kern = [r for r in results.get("kernels", []) if r.get(metric) or r.get("fwd_ms")]
    if kern:
        dims = sorted({r["D"] for r in kern})
        fig, axes = plt.subplots(1, len(dims), figsize=(4.4 * len(dims), 3.6), squeeze=False)
        for ax, D in zip(axes[0], dims):
            for m in KERNEL_METHODS:
                key = metric if any(r.get(metric) for r in kern if r["method"] == m) else "fwd_ms"
                for kind in dict.fromkeys(r.get("adjacency") or _default_kind(m) for r in kern if r["method"] == m):
                    pts = sorted((r["T"], r[key]) for r in kern if (r["D"], r["method"]) == (D, m) and r.get(key)
                                 and (r.get("adjacency") or _default_kind(m)) == kind)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", linestyle="--" if kind == "answer_rows" else "-",
                                label=KERNEL_LABELS[m] + ("" if kind == "none" else f", {kind}")
                                + ("" if key == metric else " (fwd only)"))
            ax.set_xscale("log", base=2)
            ax.set_title(f"D={D}, GQA")
            ax.set_xlabel("T (fixed tokens per batch)")
            ax.set_ylabel("fwd+bwd ms" if plan.dry else "fwd+bwd TFLOP/s (causal)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, "kernels.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    tr = [r for r in results.get("train", []) if r.get("step_ms")]
    if tr:
        groups = sorted({(r["model"], r["T"]) for r in tr})
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        width = 0.8 / len(TRAIN_METHODS)
        for i, m in enumerate(TRAIN_METHODS):
            for ax, key in zip(axes, ("step_ms", "peak_mib")):
                vals = [next((r.get(key) or 0 for r in tr if (r["method"], r["model"], r["T"]) == (m, *g)), 0)
                        for g in groups]
                ax.bar([j + i * width for j in range(len(groups))], vals, width, label=TRAIN_LABELS[m])
        for ax, title in zip(axes, ("step time, ms", "peak memory growth, MiB")):
            ax.set_xticks([j + (len(TRAIN_METHODS) - 1) / 2 * width for j in range(len(groups))],
                          [f"{mo}\nT={T}" for mo, T in groups],
                          fontsize=7)
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        paths.append(os.path.join(out, "train_step.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
