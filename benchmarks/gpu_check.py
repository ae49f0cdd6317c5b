"""GPU evidence kit: one offline command that checks and measures CAT on an NVIDIA GPU (Triton and Flex).

    causal-attn gpu-check [--out DIR] [--budget-s 510] [--sections ...] [--dry-run]      # or: make gpu-check

Sections, in this order, inside one budget (``--budget-s``, default 510 s: a 10-minute call with margin). Each
section gets its share (:data:`SECTIONS`) of the time still left, so what one leaves unused goes to the next; a
case that would run past its section's time is not started and the summary lists what was cut.

    tests        ``pytest -m cuda``: the Triton, Flex-backward and compiled-model tests that skip without a GPU
                 (55), results per test; what the section's time does not reach is listed as not run
    correctness  the Triton backend against the fp64 oracle with FlashAttention's rule in bf16, each launch on the
                 first config of its list (``flash_mass.pin_first_config``: one binary per variant, no autotuning;
                 the CUDA tests check fp16 / bf16 / fp32 on the autotuned path and ``backend="flex"``): GQA,
                 left/right padding, odd T, head dims 64 / 128 / 256, large logits, an all-padding sample;
                 ``patch_model`` against Hugging Face eager attention on tiny Llama / Qwen2 in bf16
    kernels      forward, backward, forward+backward of ours with mass, Flex CAT (two compiled Flex calls,
                 ``backend="flex"``) and torch SDPA forced to its flash backend (no mass); bf16, GQA 16 / 4 heads,
                 D 128, T 2k / 8k at 16k tokens per batch; ours and Flex CAT on two adjacency kinds (``adjacency``
                 column): ``random`` (5 % of allowed pairs) and ``answer_rows`` (STG-like,
                 bench_kernels.answer_rows_graph); ``do_bench`` medians, TFLOP/s with causal FLOPs of one attention
                 (Flex CAT's second call counts as overhead), ``max_memory_allocated``
    train        one AdamW step, bf16, batch 1, of a ~0.9B random Llama (16 layers, hidden 2048, 16 / 4 heads):
                 plain SDPA and CAT through ``patch_model`` on our kernels at T 2k and 8k, the authors' way at 2k,
                 then, last (the budget cuts it first), the compiled step at 2k: both models wrapped in
                 ``torch.compile`` (Inductor; ``aot_eager`` in the dry run) after patching

What was cut from an earlier, larger plan to fit the budget, and why: docs/gpu.md.

A new section is one function ``fn(plan, sec, log, save) -> (rows, notes)`` and one entry of :data:`SECTIONS`.

The summary names each goal, met or not, on both adjacency kinds: our CAT step <= 1.10x the plain SDPA step;
ours >= 1.5x faster than Flex CAT in forward+backward; our kernel's TFLOP/s >= 0.8x SDPA flash's; the compiled CAT
step <= 1.00x the compiled plain SDPA step's time and <= 1.05x its peak memory; beside them the
CUDA test results, and the time budget: per section the wall time, what it compiled (Triton binaries, Flex graphs,
torch.compile graphs) and timed, and the GPU time predicted from those counts
(benchmarks/gpu_budget.py).

Output (``benchmarks/results/gpu/<gpu name>/`` in a checkout, found by the marker file
``benchmarks/results/README.md``, which installs do not ship): summary.md, tests.csv, correctness.csv,
kernels.csv, train_step.csv, budget.csv, kernels.png, train_step.png. Each CSV is rewritten after every case and
the summary after every section, so a crash or a kill keeps what was measured; a section that fails becomes a
note and the next one runs. It runs on whatever torch / triton / transformers it finds, needs no network and no
install (``make gpu-check`` puts the checkout on ``PYTHONPATH``); a missing piece (FlexAttention, pytest, the
tests/ folder) becomes one line in the summary and the rest still runs.

``--dry-run``: the same code path on tiny shapes with CPU tensors under ``TRITON_INTERPRET=1`` (float16
where the GPU run uses bfloat16, which the interpreter cannot compute; Flex runs forward only, torch has no CPU
Flex backward, through the compiled path with dynamo's eager backend; the compiled training step with
``aot_eager``, Inductor's C++ compiles being minutes on a small CPU), so the kit is known to execute before any
GPU sees it (``tests/test_gpu_check.py`` runs it in ``make test``); it writes ``benchmarks/results/gpu/dry-run/``
(ignored by git) unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

import causal_attn

from . import gpu_budget, gpu_report
from .bench_kernels import ADJACENCY_KINDS, Case, causal_flops, make_inputs, make_method
from .bench_train_step import StepBench, projected_authors_gib
from .common import do_bench_phases, measure_peak_cuda, module_command, read_csv, timed_phases, write_csv
from .gpu_report import fmt, plots, summary

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_BUDGET_S = 510.0  # (gpu_report.budget_section says the same) 8.5 minutes: one 10-minute call with margin for start-up and the report
DRY_BUDGET_S = 1800.0  # the dry run checks that the code runs: nothing of it is cut on a loaded machine
# (B, Hq, Hkv, T, D, padding, adjacency, logit scale): tails of every GPU tile size, GQA 4:1 and MQA, head dims
# 64 / 80 (padded) / 128 / 256, an all-padding sample (B = 3 with padding), logits 30x the unit scale
# Cut from this list to the CUDA tests (numerics.TRITON_CASES, autotuned, fp32 / fp16 / bf16), each case here being
# four more Triton binaries (~9 s): T = 1 at D = 16, and MQA at D = 80 with a full adjacency. The last two cases add
# no binary (their launch variants are those of the second and third).
GPU_CASES = [
    (2, 16, 4, 1000, 64, "left", "random", 1.0),
    (1, 8, 8, 2049, 128, "right", "random", 1.0),
    (1, 4, 2, 257, 256, "left", "random", 1.0),
    (2, 4, 2, 515, 128, "right", "random", 30.0),
    (3, 2, 1, 129, 64, "left", "empty", 1.0),
]
# The dry run mirrors the GPU cases at T <= 40 (the interpreter's pace; lengths stay off multiples of 16): the same
# head dims, flags and odd lengths, so it launches the same kernel variants the GPU run will (its census predicts
# the GPU's compile time, benchmarks/gpu_budget.py)
DRY_CASES = [(B, Hq, Hkv, min(T, 40), D, pad, adj, x) for B, Hq, Hkv, T, D, pad, adj, x in GPU_CASES]
# backend="flex" against the oracle is left to the CUDA tests (test_flex.py: forward and backward, fp32 and bf16,
# the Triton cases and one more): a case here compiled four more Flex graphs (about 40 s) for a table of errors.
# A case is (B, Hq, Hkv, T, D, padding, adjacency, logit scale), as above.
FLEX_GPU_CASES: list = []
FLEX_DRY_CASES: list = []
# One model (the ~0.9B Llama: GQA 16 / 4, head dim 128, the kernels section's shape, so it compiles no Triton binary
# of its own). SmolLM2-135M's shape (head dim 64) would add a head-dim class of Triton binaries and its own Flex and
# Inductor graphs; the CPU benchmarks cover it (causal-attn bench: pretrained, compiled).
TRAIN_MODELS_GPU = {
    "llama-0.9B": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=4),
}
TRAIN_MODELS_DRY = {
    "llama-0.9B": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2),
}


@dataclass
class Plan:
    """Everything that differs between the GPU run and the dry run."""
    dry: bool
    device: torch.device
    backend: str
    low: torch.dtype  # the half-precision dtype of the kernel and training sections
    dtypes: tuple
    cases: list
    flex_cases: list
    flex_dtypes: tuple
    kernel_tokens: int
    kernel_seq_lens: tuple
    kernel_heads: tuple  # (Hq, Hkv): GQA on
    head_dims: tuple
    train_models: dict
    train_seq_lens: tuple
    compiled_seq_lens: tuple  # the compiled training step's lengths (one: each new length is another compile)
    compile_backend: str  # torch.compile backend of the compiled step (GPU: Inductor)
    kernel_methods: tuple = ("cat", "flex_cat", "sdpa_flash")
    train_methods: tuple = ("sdpa", "cat", "authors")  # eager; then COMPILED_METHODS, last (cut first)
    patch_families: tuple = ("llama", "qwen2")

    @staticmethod
    def make(dry: bool) -> "Plan":
        # Correctness in one dtype (the GPU's bfloat16; the dry run's float16 stands for it), each launch variant
        # pinned to its first config (flash_mass.pin_first_config): the CUDA tests check fp16, bf16 and fp32 on the
        # autotuned path. Kernels at one head dim and two lengths; the dry run's lengths keep the adjacency at two
        # words or more and B off 1 and off the head counts, so dynamo compiles Flex's functions once each, as on the
        # GPU (B 8 and 2; T 32 at one word would specialise and compile twice). The training step at the kernels'
        # lengths and head dim (GPU and dry run alike), so it compiles and autotunes no Triton launch of its own.
        if dry:
            return Plan(True, torch.device("cpu"), "triton", torch.float16, (torch.float16,), DRY_CASES,
                        FLEX_DRY_CASES, (torch.float32, torch.bfloat16), kernel_tokens=160, kernel_seq_lens=(48, 80),
                        kernel_heads=(4, 1), head_dims=(16,), train_models=TRAIN_MODELS_DRY,
                        train_seq_lens=(48, 80), compiled_seq_lens=(48,), compile_backend="aot_eager")
        return Plan(False, torch.device("cuda"), "auto", torch.bfloat16, (torch.bfloat16,), GPU_CASES, FLEX_GPU_CASES,
                    (torch.bfloat16, torch.float32), kernel_tokens=16384, kernel_seq_lens=(2048, 8192),
                    kernel_heads=(16, 4), head_dims=(128,), train_models=TRAIN_MODELS_GPU,
                    train_seq_lens=(2048, 8192), compiled_seq_lens=(2048,), compile_backend="inductor")


@dataclass
class Section:
    """A share of the time budget; :meth:`admit` says whether the next case may start."""
    name: str
    seconds: float
    start: float = field(default_factory=time.monotonic)
    last: float = 0.0  # duration of the latest case: the estimate for the next one
    cut: list = field(default_factory=list)
    measurements: int = 0  # timed cases (gpu_budget counts them)
    oracle_cases: int = 0

    def admit(self, what: str, estimate_s: float = 0.0) -> bool:
        """``estimate_s``: the case's expected seconds where the previous case's are no guide (a compile)."""
        now = time.monotonic()
        if now - self.start + max(self.last, estimate_s) > self.seconds:
            self.cut.append(what)
            return False
        self._case_start = now
        return True

    def done(self):
        self.last = time.monotonic() - self._case_start

    def note(self) -> str | None:
        if not self.cut:
            return None
        return (f"cut: {len(self.cut)} case(s) not started, the section's {self.seconds:.0f} s were spent or the "
                f"next case would have overrun them ({', '.join(self.cut[:6])}{' ...' if len(self.cut) > 6 else ''})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------ CUDA tests
_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)")


def cuda_tests(plan: Plan, sec: Section, log, save) -> tuple[list[dict], list[str]]:
    """``pytest -m cuda`` in a child process, stopped at the section's time; one row per test (outcome, seconds
    since the previous result), the tests it did not reach as "not run". The dry run's child sees no
    TRITON_INTERPRET, so there, as on any machine without CUDA, every test skips."""
    tests = tests_folder()
    if tests is None:
        return [], ["tests: skipped, the checkout's tests/ folder is not here; run from a source checkout"]
    try:
        import pytest  # noqa: F401
    except ImportError:
        return [], ["tests: skipped, pytest is not installed here (pip install pytest)"]
    root = os.path.dirname(tests)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-v", "-p", "no:cacheprovider", "tests"]
    rows, notes = [], []
    deadline = sec.start + sec.seconds
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    last, tail = time.monotonic(), []
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    timed_out = False
    while True:
        if time.monotonic() > deadline:
            timed_out = True
            os.killpg(proc.pid, 9)
            break
        if not sel.select(timeout=1.0):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        tail = (tail + [line.rstrip()])[-40:]
        m = _OUTCOME.match(line)
        if m:
            now = time.monotonic()
            rows.append(dict(test=m.group(1), outcome=m.group(2), seconds=round(now - last, 2)))
            last = now
            save(rows)
    proc.wait()
    sel.close()
    if timed_out:  # the tests it did not reach, by name
        done = {r["test"] for r in rows}
        rows += [dict(test=t, outcome="not run", seconds="") for t in _collect_cuda_tests(root, env) if t not in done]
        notes.append(f"tests: stopped after the section's {sec.seconds:.0f} s; "
                     f"{sum(r['outcome'] == 'not run' for r in rows)} test(s) not run")
    elif proc.returncode not in (0, 1, 5):  # 1: some failed (in the rows); 5: none collected
        notes.append(f"tests: pytest exited {proc.returncode}: " + " | ".join(tail[-3:]))
    counts = {o: sum(r["outcome"] == o for r in rows) for o in dict.fromkeys(r["outcome"] for r in rows)}
    log("tests: " + (", ".join(f"{n} {o}" for o, n in counts.items()) or "none collected"))
    return rows, notes


def _collect_cuda_tests(root: str, env: dict) -> list[str]:
    res = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "tests"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return [ln.strip() for ln in res.stdout.splitlines() if "::" in ln]


# ------------------------------------------------------------------------------------------ correctness
def tests_folder() -> str | None:
    """The checkout's tests/ (beside benchmarks/), or None in an install."""
    path = os.path.join(os.path.dirname(HERE), "tests")
    return path if os.path.isfile(os.path.join(path, "conftest.py")) else None


def correctness(plan: Plan, sec: Section, log, save) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    from causal_attn.kernels import flash_mass

    with flash_mass.pin_first_config():  # one binary per launch variant; the CUDA tests take the autotuned path
        _correctness(plan, sec, log, save, rows, notes)
    return rows, notes


def _correctness(plan: Plan, sec: Section, log, save, rows: list, notes: list):
    for case in plan.cases:
        for dtype in plan.dtypes:
            _oracle_case(plan, sec, log, rows, "attention", plan.backend, case, dtype, grads=True)
            save(rows)
    flex_problem = _flex_available()
    if not plan.flex_cases:
        notes.append("correctness: backend='flex' against the oracle is left to the CUDA tests (test_flex.py)")
    elif flex_problem:
        notes.append(f"correctness: backend='flex' not checked ({flex_problem})")
    else:  # Flex differentiates on CUDA only
        for case in plan.flex_cases:
            for dtype in plan.flex_dtypes:
                _oracle_case(plan, sec, log, rows, "flex", "flex", case, dtype, grads=plan.device.type == "cuda")
                save(rows)
    for family in plan.patch_families:
        if sec.admit(f"patch_model {family}"):
            rows.append(_patch_equivalence(plan, family))
            sec.done()
            save(rows)
            log(f"correctness patch_model {family}: {rows[-1]['status']}")


def _oracle_case(plan: Plan, sec: Section, log, rows: list, part: str, backend: str, case, dtype, grads: bool):
    """One case of ``backend`` against the fp64 oracle (FlashAttention's rule); appends its row."""
    from causal_attn.testing.numerics import (check_against_oracle, check_forward_against_oracle, lse_difference_slack,
                                              make_case)

    B, Hq, Hkv, T, D, padding, adjacency, logit_scale = case
    label = f"{part} T={T} D={D} {_dtype_name(dtype)}"
    if not sec.admit(label):
        return
    row = dict(part=part, B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, padding=padding, adjacency=adjacency,
               logit_scale=logit_scale, dtype=_dtype_name(dtype), grads=grads)
    sec.oracle_cases += 1
    try:
        q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, adjacency=adjacency,
                                            logit_scale=logit_scale, device=plan.device)
        row["seed"] = seed
        # a mass from two fp32 LSEs is rounded at |LSE| (see numerics.lse_difference_slack)
        slack = lse_difference_slack(q, k, kpm) if backend == "flex" else None
        check = check_against_oracle if grads else check_forward_against_oracle
        failures = []
        errs = check(lambda a, b, c: causal_attn.attention(a, b, c, adj, key_padding_mask=kpm, backend=backend),
                     q, k, v, adj, kpm, seed, failures=failures, slack=slack)
        for name, (ours, eager) in errs.items():
            row[f"{name}_err"], row[f"{name}_eager_err"] = ours, eager
        row["status"] = "ok" if not failures else "FAIL: " + "; ".join(failures)
    except Exception as e:  # noqa: BLE001  (a crash is a result of this section, not its end)
        row["status"] = f"ERROR: {type(e).__name__}: {str(e)[:300]}"
        _free(plan)
    rows.append(row)
    sec.done()
    log(f"correctness {label}{'' if grads else ' (forward only)'}: {row['status']}")


def _free(plan: Plan):
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


def _patch_equivalence(plan: Plan, family: str) -> dict:
    """patch_model in plan.low against HF eager in plan.low, both against the fp64 model (FlashAttention rule)."""
    from causal_attn.testing.models import forward_backward, random_batch, random_graph, tiny_model
    from causal_attn.testing.numerics import fa_rule_violation, fresh_seed

    seed = fresh_seed()
    row = dict(part="patch_model", family=family, dtype=_dtype_name(plan.low), seed=seed, T=40, B=2)
    try:
        kw = dict(seed=seed % 1000, kv_heads=2)
        eager = tiny_model(family, dtype=plan.low, **kw).to(plan.device)
        exact = tiny_model(family, dtype=torch.float64, attn_implementation="sdpa", **kw).to(plan.device)
        ours = tiny_model(family, dtype=plan.low, **kw).to(plan.device)
        ids, mask, labels = random_batch(eager.config.vocab_size, 2, 40, padding="left", seed=seed)
        graph = random_graph(mask, seed=seed + 1)
        ids, mask, labels = ids.to(plan.device), mask.to(plan.device), labels.to(plan.device)
        causal_attn.patch_model(ours, backend=plan.backend)
        ref = forward_backward(eager, ids, mask, labels)
        ex = forward_backward(exact, ids, mask, labels)
        got = forward_backward(ours, ids, mask, labels, adjacency=graph.to(plan.device))
        real = mask.bool()
        pairs = [("logits", got[0][real], ref[0][real], ex[0][real]), ("loss", got[1], ref[1], ex[1])]
        pairs += [(n, got[2][n], ref[2][n], ex[2][n]) for n in ex[2]]
        problems, worst = [], (0.0, "")
        for name, o, e, x in pairs:
            atol = 1e-2 * max(x.abs().max().item(), 1e-3)
            e_ours, e_eager, problem = fa_rule_violation(name, o, e, x, atol, seed)
            if problem:
                problems.append(problem)
            ratio = e_ours / max(2 * e_eager + atol, 1e-30)
            if ratio >= worst[0]:
                worst = (ratio, name)
            if name in ("logits", "loss"):
                row[f"{name}_err"], row[f"{name}_eager_err"] = e_ours, e_eager
        row["worst_gradient_ratio_to_bound"], row["worst_tensor"] = worst
        row["tensors"] = len(pairs)
        row["status"] = "ok" if not problems else "FAIL: " + "; ".join(problems[:3])
    except Exception as e:  # noqa: BLE001
        row["status"] = f"ERROR: {type(e).__name__}: {str(e)[:300]}"
    return row


# ------------------------------------------------------------------------------------------ kernels
def _kernel_method(name: str, inp: dict, plan: Plan):
    """-> (forward, backward or None): backward is None where the device has none (Flex on CPU)."""
    if name == "flex_cat":
        fwd, bwd = make_method("cat", inp, "flex")
        if plan.device.type == "cuda":
            return fwd, bwd

        def forward():  # torch's FlexAttention has no CPU backward: forward on inputs without grad
            with torch.no_grad():
                return fwd()
        return forward, None
    if name == "sdpa_flash":
        fwd, bwd = make_method("sdpa", inp, plan.backend)
        if plan.device.type != "cuda":
            return fwd, bwd
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(f):
            def forward():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the backward follows the forward's kernel
                    return f()
            return forward

        try:
            flash(fwd)()
        except RuntimeError:  # a flash backend without enable_gqa: expanded k / v (their copy is timed too)
            G = inp["q"].shape[1] // inp["k"].shape[1]
            fwd, bwd = make_method("sdpa", dict(inp, k=inp["k"].repeat_interleave(G, 1),
                                                v=inp["v"].repeat_interleave(G, 1)), plan.backend)
        return flash(fwd), bwd
    return make_method(name, inp, plan.backend)


def _time(plan: Plan, sec: Section, fwd, bwd) -> dict:
    sec.measurements += 1
    if plan.device.type == "cuda":
        return do_bench_phases(fwd, bwd)  # its first call (outside the timing) compiles / autotunes
    out = fwd()  # warm-up (interpreter: first calls build the kernels)
    if bwd is not None:
        bwd(out)
    return timed_phases(fwd, bwd, plan.device)


def kernels(plan: Plan, sec: Section, log, save) -> tuple[list[dict], list[str]]:
    notes, rows = [], []
    flex_problem = _flex_available()
    if flex_problem:
        notes.append(f"kernels: Flex CAT not measured ({flex_problem})")
    Hq, Hkv = plan.kernel_heads
    for D in plan.head_dims:
        for T in plan.kernel_seq_lens:
            case = Case(T, D, Hq, Hkv, max(1, plan.kernel_tokens // T))
            if not sec.admit(f"T={T} D={D}"):
                continue
            new = _kernel_case(plan, sec, case, flex_problem)
            rows += new
            sec.done()
            save(rows)
            log(f"kernels T={T} D={D} B={case.B}: " + ", ".join(
                f"{r['method']}{'' if r['adjacency'] in ('none', 'random') else ' ' + r['adjacency']} "
                f"{fmt(r.get('fwdbwd_ms', r.get('fwd_ms')))} ms" for r in new))
    return rows, notes


def _flex_available() -> str | None:
    from causal_attn.ops.backends import get_backend

    if get_backend("flex") is None:
        return f"torch {torch.__version__} has no usable FlexAttention"
    return None


def _kernel_case(plan: Plan, sec: Section, case: Case, flex_problem: str | None) -> list[dict]:
    """The methods on one shape: those with mass once per adjacency kind (same q, k, v), the others once."""
    first = make_inputs(case, plan.device, plan.low, adjacency=ADJACENCY_KINDS[0])
    inputs = {kind: dict(first, graph=make_inputs(case, "cpu", plan.low, adjacency=kind)["graph"].to(plan.device))
              for kind in ADJACENCY_KINDS[1:]}
    inputs[ADJACENCY_KINDS[0]] = first
    base = dict(T=case.T, B=case.B, D=case.D, Hq=case.Hq, Hkv=case.Hkv, gqa=case.gqa, dtype=_dtype_name(plan.low))
    rows, times = [], {}
    for name in plan.kernel_methods:
        for kind in (ADJACENCY_KINDS if name in MASS_METHODS else ("none",)):
            row = dict(base, method=name, adjacency=kind)
            rows.append(row)
            if name == "flex_cat" and flex_problem:
                row["status"] = "unavailable"
                continue
            inp = inputs[kind if kind != "none" else ADJACENCY_KINDS[0]]
            try:
                fwd, bwd = _kernel_method(name, inp, plan)
                times[name, kind] = t = _time(plan, sec, fwd, bwd)
                for ph, secs in t.items():
                    row[f"{ph}_ms"] = secs * 1e3
                flops = causal_flops(case)
                for ph, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
                    if t.get(ph):
                        row[f"tflops_{ph}"] = mult * flops / t[ph] / 1e12
                if plan.device.type == "cuda":
                    row["peak_mib"] = measure_peak_cuda(lambda: bwd(fwd()) if bwd is not None else fwd())
                if name == "flex_cat":
                    row["flex_second_call_blocks"] = _second_call_blocks(inp, case, plan)
                row["status"] = "ok" if bwd is not None else "ok: forward only (no backward on this device)"
                del fwd, bwd
            except Exception as e:  # noqa: BLE001  (out of memory, a backend refusing a shape: record, go on)
                row["status"] = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                _free(plan)
    ref = times.get(("sdpa_flash", "none"))
    for row in rows:
        for ph in ("fwd", "bwd", "fwdbwd"):
            if ref and ref.get(ph) and row.get(f"{ph}_ms"):
                row[f"{ph}_x_sdpa"] = row[f"{ph}_ms"] / (ref[ph] * 1e3)
    choices = _autotune_choices(case)
    for row in rows:
        if row["method"].startswith("cat"):
            row["autotune"] = choices
    return rows


MASS_METHODS = ("cat", "flex_cat")  # the methods whose work depends on the adjacency


def _second_call_blocks(inp: dict, case: Case, plan: Plan) -> float:
    """Flex CAT's second call over its first, in the (query block, key block) pairs its block masks visit: the
    share of the full attention work the mass costs Flex (its block sparsity skips the rest)."""
    from causal_attn.ops import flex

    mask_all, mask_s = flex.block_masks(inp["graph"], None, None, case.B, case.T, plan.device)

    def visited(m):
        return int(m.kv_num_blocks.sum()) + (int(m.full_kv_num_blocks.sum()) if m.full_kv_num_blocks is not None else 0)

    return visited(mask_s) / max(visited(mask_all), 1)


def _autotune_choices(case: Case) -> str:
    from causal_attn.kernels import flash_mass

    picked = [f"{k.split()[0]}{' mass' if 'True' in k.split(',')[2] else ''}: {v}"
              for k, v in flash_mass.autotune_choices().items() if re.match(rf"\S+ \({case.T}, {case.D},", k)]
    return "; ".join(picked) if picked else ("pinned interpreter config" if flash_mass.interpreting() else "-")


# ------------------------------------------------------------------------------------------ training step
COMPILED_METHODS = ("sdpa_compiled", "cat_compiled")  # the StepBench model wrapped in torch.compile after patching


def _train_jobs(plan: Plan) -> list[tuple[str, str, tuple]]:
    """(model, method, lengths) in the order they run: every eager method, then the compiled steps (each an
    Inductor compile of the whole model, the most expensive cases), last so that the budget cuts them first."""
    # the authors' way at the first length only: at the GPU's second (8k) its maps (~170 GB by
    # projected_authors_gib) fit no card, the run would only record the skip
    jobs = [(m, method, plan.train_seq_lens[:1] if method == "authors" else plan.train_seq_lens)
            for m in plan.train_models for method in plan.train_methods]
    return jobs + [(m, method, plan.compiled_seq_lens) for m in plan.train_models for method in COMPILED_METHODS]


def train(plan: Plan, sec: Section, log, save) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    B = 1
    for model_name, method, seq_lens in _train_jobs(plan):
        model = plan.train_models[model_name]
        compiled = method in COMPILED_METHODS
        bench = None
        for T in seq_lens:
            row = dict(model=model_name, method=method, T=T, B=B, dtype=_dtype_name(plan.low),
                       params_m=sum(_param_counts(model).values()) / 1e6)
            rows.append(row)
            if method == "authors" and plan.device.type == "cuda":
                need = projected_authors_gib(T, B, model, bytes_per_value=2)
                free = torch.cuda.mem_get_info()[0] / 2**30
                if need > 0.8 * free:
                    row["status"] = f"skipped: projected {need:.0f} GiB of maps > 80% of the {free:.0f} GiB free"
                    save(rows)
                    continue
            # a compiled case's first step compiles the model: the eager cases before it say nothing of its time
            estimate = (gpu_budget.UNIT_S["inductor_graph"] + gpu_budget.UNIT_S["train_measurement"]
                        if compiled and bench is None and not plan.dry else 0.0)
            if not sec.admit(f"{model_name} {method} T={T}", estimate):
                row["status"] = "cut"
                save(rows)
                continue
            try:
                bench = bench or _step_bench(plan, model, method, B)
                bench.prepare(T, B)
                if compiled:
                    row.update(_compile_and_warm(plan, bench))
                if method == "cat_flex" and plan.device.type != "cuda":
                    row.update(_forward_only(plan, sec, bench))
                else:
                    t = _time(plan, sec, bench.forward_loss, bench.backward_step)
                    row["step_ms"], row["forward_ms"] = t["fwdbwd"] * 1e3, t["fwd"] * 1e3
                    if plan.device.type == "cuda":
                        row["peak_mib"] = measure_peak_cuda(bench.step)
                    row["status"] = "ok"
                if compiled:
                    row["compiled_graphs"] = gpu_budget.model_graphs() - row.pop("_graphs_before")
            except Exception as e:  # noqa: BLE001
                row.pop("_graphs_before", None)
                row["status"] = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                bench = None
                _free(plan)
            sec.done()
            _step_ratios(rows)
            save(rows)
            log(f"train {model_name} {method} T={T}: {fmt(row.get('step_ms', row.get('forward_ms')), '.1f')} ms "
                + (f"(first step {fmt(row.get('first_step_s'), '.1f')} s) " if compiled else "") + f"({row['status']})")
        del bench
        _free(plan)
    return rows, notes


def _step_bench(plan: Plan, model: dict, method: str, B: int) -> StepBench:
    """A model + optimizer for ``method`` ("cat_flex": CAT through patch_model on backend "flex"; "*_compiled":
    the method's model, wrapped in torch.compile by :func:`_compile_and_warm` after ``prepare`` patched it). No
    warm-up step of its own: :func:`_time` runs one outside the timing (at the measured T, so Flex compiles only
    the shapes measured), and the optimizer state exists before the memory is measured."""
    base = method.removesuffix("_compiled")
    flex = base == "cat_flex"
    return StepBench("cat" if flex else base, plan.device, model=model, dtype=plan.low,
                     backend="flex" if flex else plan.backend)


def _compile_and_warm(plan: Plan, bench: StepBench) -> dict:
    """Wraps the prepared (for CAT: patched) model in ``torch.compile`` once, with a backend that counts its graphs
    (gpu_budget.counting_backend; Inductor on a GPU, ``plan.compile_backend``), and runs one step outside the
    timing: its seconds (``first_step_s``) are the compile's, for a new length a recompile's. The optimizer step
    stays eager, as in bench_compiled."""
    before = gpu_budget.model_graphs()
    if not getattr(bench, "compiled", False):
        bench.model = torch.compile(bench.model, backend=gpu_budget.counting_backend(plan.compile_backend))
        bench.compiled = True
    if plan.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    bench.step()
    if plan.device.type == "cuda":
        torch.cuda.synchronize()
    return {"first_step_s": time.perf_counter() - t0, "compile_backend": plan.compile_backend,
            "_graphs_before": before}


def _forward_only(plan: Plan, sec: Section, bench: StepBench) -> dict:
    sec.measurements += 1
    with torch.no_grad():
        bench.forward_loss()
        t = timed_phases(bench.forward_loss, None, plan.device)
    return {"forward_ms": t["fwd"] * 1e3, "status": "ok: forward only (no Flex backward on this device)"}


def _step_ratios(rows: list[dict]):
    """Each step over the plain SDPA step of the same model, T and mode (eager or compiled); compiled steps also
    over their own eager method's step (``step_x_eager``)."""
    def ref(row, method):
        return next((r for r in rows if r["method"] == method and (r["model"], r["T"]) == (row["model"], row["T"])
                     and r.get("step_ms")), None)

    for row in rows:
        compiled = row["method"] in COMPILED_METHODS
        base = ref(row, "sdpa_compiled" if compiled else "sdpa")
        if base and row.get("step_ms"):
            row["step_x_sdpa"] = row["step_ms"] / base["step_ms"]
            if row.get("peak_mib") and base.get("peak_mib"):
                row["peak_x_sdpa"] = row["peak_mib"] / base["peak_mib"]
        eager = ref(row, row["method"].removesuffix("_compiled")) if compiled else None
        if eager and row.get("step_ms"):
            row["step_x_eager"] = row["step_ms"] / eager["step_ms"]


def _param_counts(cfg: dict) -> dict:
    h, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    embeddings = (1 if cfg.get("tie_word_embeddings") else 2) * V * h
    return {"embeddings": embeddings, "layers": L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h), "norm": h}


# ------------------------------------------------------------------------------------------ report
def environment(plan: Plan) -> dict:
    import triton
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "causal_attn": causal_attn.__version__}
    if plan.dry:
        env["device"] = "CPU tensors under TRITON_INTERPRET=1 (dry run)"
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(device=torch.cuda.get_device_name(0), capability=f"sm_{props.major}{props.minor}",
               memory_gib=f"{props.total_memory / 2**30:.0f}", cuda=torch.version.cuda or "?")
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        env["driver"] = "unknown (nvidia-smi not available)"
    return env


# ------------------------------------------------------------------------------------------ driver
CHECKOUT_MARKER = os.path.join(HERE, "results", "README.md")  # in a checkout; installs do not ship results/


def default_out(plan: Plan) -> str:
    name = "dry-run" if plan.dry else re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name(0)).strip("_")
    root = os.path.join(HERE, "results", "gpu") if os.path.isfile(CHECKOUT_MARKER) else os.path.abspath("causal_attn_gpu")
    return os.path.join(root, name)


# name -> (function, CSV file, weight), run in this order. A section starts with the time still left times its
# weight over the weights of the sections still to run: what one leaves unused goes to the next ones.
SECTIONS = {"tests": (cuda_tests, "tests.csv", 0.35), "correctness": (correctness, "correctness.csv", 0.10),
            "kernels": (kernels, "kernels.csv", 0.30), "train": (train, "train_step.csv", 0.25)}
SHARES = {name: share for name, (_, _, share) in SECTIONS.items()}
assert SHARES["tests"] == gpu_report.TESTS_WEIGHT


def _use_compiled_flex_on_cpu():
    """Dry run: causal_attn.ops.flex's compiled path (the one CUDA takes) on CPU with dynamo's eager backend, so the
    dry run executes its dynamo part and counts the graphs a GPU will compile."""
    from causal_attn.ops import flex

    flex.COMPILE_DEVICES = tuple(dict.fromkeys(flex.COMPILE_DEVICES + ("cpu",)))
    flex.COMPILE_BACKEND = "eager"


def run(args, log=print) -> str:
    plan = Plan.make(args.dry_run)
    if args.budget_s is None:
        args.budget_s = DRY_BUDGET_S if plan.dry else DEFAULT_BUDGET_S
    if not plan.dry and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device visible to torch "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                         "`causal-attn gpu-check --dry-run` runs the same code on CPU tensors")
    out = args.out or default_out(plan)
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    if plan.dry:
        _use_compiled_flex_on_cpu()

    def progress(msg):
        log(f"[{time.monotonic() - t0:5.0f} s] {msg}")
        sys.stdout.flush()

    env = environment(plan)
    progress("gpu-check: " + "; ".join(f"{k} {v}" for k, v in env.items()) + f"; writing to {out}")
    unit = gpu_budget.measure_triton_compile_s()
    if unit is not None:
        gpu_budget.UNIT_S["triton_binary"] = unit
    progress(f"one Triton compile for sm_90 here: {'-' if unit is None else f'{unit:.1f} s'}")
    results, notes, budget = {}, [], []
    path = os.path.join(out, "summary.md")
    deadline = time.monotonic() + args.budget_s
    for name, (fn, filename, weight) in SECTIONS.items():
        if name not in args.sections:
            earlier = os.path.join(out, filename)
            if os.path.isfile(earlier):  # a run of some sections keeps the others' results in the summary
                results[name] = load_rows(earlier)
                notes.append(f"{name}: not rerun; rows from the earlier run in {filename}")
            continue
        ahead = sum(w for n, (_, _, w) in SECTIONS.items() if n in args.sections and
                    list(SECTIONS).index(n) >= list(SECTIONS).index(name))
        sec = Section(name, max(0.0, deadline - time.monotonic()) * weight / ahead)
        progress(f"section {name} ({sec.seconds:.0f} s)")
        results[name] = []

        def save(rows, name=name, filename=filename):  # after every case: a crash or a kill keeps the rows
            results[name] = rows
            if rows:
                write_csv(rows, os.path.join(out, filename))

        before = gpu_budget.snapshot()
        try:
            rows, section_notes = fn(plan, sec, progress, save)
            save(rows)
            notes += section_notes
        except Exception as e:  # noqa: BLE001  (the next section still runs; its rows so far are kept)
            notes.append(f"{name}: section stopped by {type(e).__name__}: {str(e)[:300]}")
            progress(notes[-1])
            _free(plan)
        notes += [f"{name}: {sec.note()}"] if sec.note() else []
        budget.append(budget_row(plan, name, sec, gpu_budget.section_counts(
            before, gpu_budget.snapshot(), sec.measurements, sec.oracle_cases, time.monotonic() - sec.start), args.budget_s))
        write_csv(budget, os.path.join(out, "budget.csv"))
        with open(path, "w") as f:
            f.write(summary(plan, env, results, notes, time.monotonic() - t0, args.budget_s, budget))
    try:
        plots(out, results, plan)
    except Exception as e:  # noqa: BLE001
        notes.append(f"plots: {type(e).__name__}: {e}")
    with open(path, "w") as f:
        f.write(summary(plan, env, results, notes, time.monotonic() - t0, args.budget_s, budget))
    log(open(path).read())
    progress(f"gpu-check: results in {out}")
    return path


def budget_row(plan: Plan, name: str, sec: Section, counts: dict, budget_s: float) -> dict:
    """One section's wall time, its counts as they map to the GPU plan, and the GPU seconds they predict."""
    gpu_plan = Plan.make(False) if plan.dry else plan
    if name == "correctness":  # the dry run's float16 stands for the GPU's half dtypes (bfloat16; float16 too if planned)
        def count(dtypes, kinds):
            return sum(d in kinds for d in dtypes)

        halves, fp32 = (torch.float16, torch.bfloat16), (torch.float32,)
        mapping = dict(dtype_copies={"float16": count(gpu_plan.dtypes, halves) / max(count(plan.dtypes, halves), 1),
                                     "float32": count(gpu_plan.dtypes, fp32) / max(count(plan.dtypes, fp32), 1)},
                       oracle_scale=len(gpu_plan.dtypes) / len(plan.dtypes))
    elif name == "kernels":
        mapping = dict(head_dims=len(gpu_plan.head_dims) // len(plan.head_dims),
                       lengths=len(gpu_plan.kernel_seq_lens) / len(plan.kernel_seq_lens))
    else:
        mapping = {}
    gpu = gpu_budget.gpu_counts(counts, **mapping)
    row = dict(section=name, wall_s=round(counts["wall_s"], 1), share_s=round(sec.seconds, 1),
               triton_launches=len(counts["launches"]), flex_graphs=sum(counts["flex"].values()),
               model_graphs=counts["model_graphs"],
               measurements=counts["measurements"], oracle_cases=counts["oracle_cases"],
               **{f"gpu_{k}" if k in ("measurements", "oracle_cases") else k: v for k, v in gpu.items()})
    row["predicted_gpu_s"] = None if name == "tests" else round(gpu_budget.predict_s(gpu, train=name == "train"))
    row["triton_compile_unit_s"] = round(gpu_budget.UNIT_S["triton_binary"], 2)
    row["budget_s"] = round(budget_s, 1)
    return row


def load_rows(path: str) -> list[dict]:
    """A results CSV back as rows with numbers (empty cells left out), as the sections produced them."""
    def value(x: str):
        for kind in (int, float):
            try:
                return kind(x)
            except ValueError:
                pass
        return x

    return [{k: value(v) for k, v in r.items() if v != ""} for r in read_csv(path)]


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--out", help="output folder (default: benchmarks/results/gpu/<gpu name>/ in a checkout, "
                   "./causal_attn_gpu/<gpu name>/ otherwise)")
    p.add_argument("--budget-s", type=float, help=f"seconds for all sections together (default {DEFAULT_BUDGET_S:.0f}, "
                   f"{DRY_BUDGET_S:.0f} with --dry-run); "
                   "weights of the sections (each starts with its weight's share of what is left): " + ", ".join(f"{k} {v:.0%}" for k, v in SHARES.items()))
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                   help="run only these (the summary keeps the other sections' rows from an earlier run in --out)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU tensors, TRITON_INTERPRET=1")


def main(args) -> int:
    if args.budget_s is None:
        args.budget_s = DRY_BUDGET_S if args.dry_run else DEFAULT_BUDGET_S
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter is chosen when triton is imported: run the same options in a process that has it
        argv = ["--dry-run", "--budget-s", str(args.budget_s), "--sections", *args.sections]
        argv += ["--out", args.out] if args.out else []
        return subprocess.call(module_command(__spec__.name, *argv), env=dict(os.environ, TRITON_INTERPRET="1"))
    run(args)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))

