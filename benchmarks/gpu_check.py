"""GPU evidence kit: one offline command that checks and measures the Triton path on an NVIDIA GPU.

    causal-attn gpu-check [--out DIR] [--budget-s 450] [--dry-run]      # or: make gpu-check

Sections, each with its share of ``--budget-s`` (a case that would run past its section's share is not
started; the summary lists what was cut):

    correctness  the Triton backend against the fp64 oracle with FlashAttention's rule (fp16, bf16, fp32; GQA,
                 left/right padding, odd T, large logits, an all-padding sample) and ``patch_model`` against
                 Hugging Face eager attention on tiny Llama / Qwen2 in bf16 (logits, loss, every gradient)
    kernels      forward, backward, forward+backward: ours with and without mass, torch SDPA forced to its
                 flash backend, FlexAttention with a causal block mask (compiled, so only at T = 2k and 8k),
                 eager maps + mass (the authors' way);
                 bf16, D 64 / 128, GQA off / on, T 512 .. 16k at a fixed number of tokens per batch;
                 ``do_bench`` medians, TFLOP/s with causal FLOPs, ``max_memory_allocated``, autotune choices
    train        one AdamW step of a ~0.9B-parameter random Llama (16 layers, hidden 2048, 16 / 4 heads), bf16,
                 T 2k and 4k: plain SDPA, CAT through ``patch_model``, the authors' way

Output (``benchmarks/results/gpu/<gpu name>/`` in a checkout): summary.md, correctness.csv, kernels.csv,
train_step.csv, kernels.png, train_step.png. It runs on whatever torch / triton / transformers it finds, needs
no network and no install (``make gpu-check`` puts the checkout on ``PYTHONPATH``); a missing piece
(FlexAttention, the tests/ folder) becomes one line in the summary and the rest still runs.

``--dry-run``: the same code path on tiny shapes with CPU tensors under ``TRITON_INTERPRET=1`` (float16
where the GPU run uses bfloat16, which the interpreter cannot compute), so the kit is known to execute before
any GPU sees it (``tests/test_gpu_check.py`` runs it in ``make test``).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import causal_attn  # noqa: E402
from bench_kernels import Case, causal_flops, make_inputs, make_method  # noqa: E402
from bench_train_step import StepBench, WARM_T, projected_authors_gib  # noqa: E402
from common import do_bench_phases, measure_peak_cuda, timed_phases, write_csv  # noqa: E402

SHARES = {"correctness": 0.30, "kernels": 0.45, "train": 0.25}
KERNEL_METHODS = ("cat", "cat_nomass", "sdpa_flash", "flex", "eager")
KERNEL_LABELS = {"cat": "ours, with mass", "cat_nomass": "ours, no mass", "sdpa_flash": "SDPA (flash backend)",
                 "flex": "FlexAttention (causal block mask)", "eager": "eager maps + mass (authors' way)"}
TRAIN_METHODS = ("sdpa", "cat", "authors")
# (B, Hq, Hkv, T, D, padding, adjacency, logit scale): tails of every GPU tile size, GQA 4:1 and MQA, head dims
# 64 / 80 (padded) / 128 / 256, an all-padding sample (B = 3 with padding), logits 30x the unit scale
GPU_CASES = [
    (1, 1, 1, 1, 16, "none", "random", 1.0),
    (2, 16, 4, 1000, 64, "left", "random", 1.0),
    (1, 8, 8, 2049, 128, "right", "random", 1.0),
    (2, 4, 1, 333, 80, "none", "full", 1.0),
    (1, 4, 2, 257, 256, "left", "random", 1.0),
    (2, 4, 2, 515, 128, "right", "random", 30.0),
    (3, 2, 1, 129, 64, "left", "empty", 1.0),
]
TRAIN_MODEL_GPU = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=4)
TRAIN_MODEL_DRY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


@dataclass
class Plan:
    """Everything that differs between the GPU run and the dry run."""
    dry: bool
    device: torch.device
    backend: str
    low: torch.dtype  # the half-precision dtype of the kernel and training sections
    dtypes: tuple
    cases: list | None  # None: the interpreter cases of tests/numerics.py
    kernel_tokens: int
    kernel_seq_lens: tuple
    kernel_heads: tuple  # (Hq, Hkv with GQA on)
    head_dims: tuple
    eager_max_t: int
    train_model: dict
    train_seq_lens: tuple
    flex_seq_lens: tuple = ()
    patch_families: tuple = ("llama", "qwen2")

    @staticmethod
    def make(dry: bool) -> "Plan":
        if dry:
            return Plan(True, torch.device("cpu"), "triton", torch.float16, (torch.float32, torch.float16), None,
                        kernel_tokens=128, kernel_seq_lens=(32, 64), kernel_heads=(2, 1), head_dims=(16, 32),
                        eager_max_t=64, train_model=TRAIN_MODEL_DRY, train_seq_lens=(32, 64), flex_seq_lens=(32, 64))
        return Plan(False, torch.device("cuda"), "auto", torch.bfloat16,
                    (torch.float16, torch.bfloat16, torch.float32), GPU_CASES, kernel_tokens=16384,
                    kernel_seq_lens=(512, 1024, 2048, 4096, 8192, 16384), kernel_heads=(16, 4), head_dims=(64, 128),
                    eager_max_t=8192, train_model=TRAIN_MODEL_GPU, train_seq_lens=(2048, 4096),
                    flex_seq_lens=(2048, 8192))


@dataclass
class Section:
    """A share of the time budget; :meth:`admit` says whether the next case may start."""
    name: str
    seconds: float
    start: float = field(default_factory=time.monotonic)
    last: float = 0.0  # duration of the latest case: the estimate for the next one
    cut: list = field(default_factory=list)

    def admit(self, what: str) -> bool:
        now = time.monotonic()
        if now - self.start + self.last > self.seconds:
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


def _sync(plan: Plan):
    if plan.device.type == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ correctness
def tests_folder() -> str | None:
    path = os.path.join(os.path.dirname(HERE), "tests")
    return path if os.path.isfile(os.path.join(path, "numerics.py")) else None


def correctness(plan: Plan, sec: Section, log) -> tuple[list[dict], list[str]]:
    tests = tests_folder()
    if tests is None:
        return [], ["correctness: skipped, the checkout's tests/ folder (numerics.py, oracle.py) is not here; "
                    "run from a source checkout"]
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from numerics import TRITON_CASES, check_against_oracle, make_case

    rows = []
    for case in plan.cases or TRITON_CASES:  # dry run: the interpreter cases of tests/test_triton.py
        for dtype in plan.dtypes:
            B, Hq, Hkv, T, D, padding, adjacency, logit_scale = case
            label = f"T={T} D={D} {_dtype_name(dtype)}"
            if not sec.admit(label):
                continue
            q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, adjacency=adjacency,
                                                logit_scale=logit_scale, device=plan.device)
            failures = []
            row = dict(part="attention", B=B, Hq=Hq, Hkv=Hkv, T=T, D=D, padding=padding, adjacency=adjacency,
                       logit_scale=logit_scale, dtype=_dtype_name(dtype), seed=seed)
            try:
                errs = check_against_oracle(
                    lambda a, b, c: causal_attn.attention(a, b, c, adj, key_padding_mask=kpm, backend=plan.backend),
                    q, k, v, adj, kpm, seed, failures=failures)
                for name, (ours, eager) in errs.items():
                    row[f"{name}_err"], row[f"{name}_eager_err"] = ours, eager
                row["status"] = "ok" if not failures else "FAIL: " + "; ".join(failures)
            except Exception as e:  # noqa: BLE001  (a crash is a result of this section, not its end)
                row["status"] = f"ERROR: {type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            sec.done()
            log(f"correctness {label}: {row['status']}")
    for family in plan.patch_families:
        if sec.admit(f"patch_model {family}"):
            rows.append(_patch_equivalence(plan, family, tests))
            sec.done()
            log(f"correctness patch_model {family}: {rows[-1]['status']}")
    return rows, []


def _patch_equivalence(plan: Plan, family: str, tests: str) -> dict:
    """patch_model in plan.low against HF eager in plan.low, both against the fp64 model (FlashAttention rule)."""
    from numerics import fa_rule_violation, fresh_seed
    from tiny_models import forward_backward, random_batch, random_graph, tiny_model

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
def _flex_method(inp: dict, device: torch.device, compiled: bool):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    grad = device.type == "cuda"  # FlexAttention refuses inputs that require grad on CPU (no CPU backward)
    q, k, v = (inp[n].detach().requires_grad_(grad) for n in ("q", "k", "v"))
    T = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=str(device))
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def forward():
        return (fn(q, k, v, block_mask=block_mask, enable_gqa=gqa),)

    def backward(outs):
        return torch.autograd.grad(outs, (q, k, v), (inp["dout"],))

    return forward, (backward if device.type == "cuda" else None)  # FlexAttention has no CPU backward


def _kernel_method(name: str, inp: dict, plan: Plan):
    if name == "flex":
        return _flex_method(inp, plan.device, compiled=plan.device.type == "cuda")
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


def _time(plan: Plan, fwd, bwd) -> dict:
    if plan.device.type == "cuda":
        return do_bench_phases(fwd, bwd)
    out = fwd()  # warm-up (interpreter: first calls build the kernels)
    if bwd is not None:
        bwd(out)
    return timed_phases(fwd, bwd, plan.device)


def kernels(plan: Plan, sec: Section, log) -> tuple[list[dict], list[str]]:
    notes, rows = [], []
    flex_problem = _flex_available()
    if flex_problem:
        notes.append(f"kernels: FlexAttention not measured ({flex_problem})")
    Hq, Hkv_gqa = plan.kernel_heads
    for D in plan.head_dims:
        for gqa in (False, True):
            for T in plan.kernel_seq_lens:
                case = Case(T, D, Hq, Hkv_gqa if gqa else Hq, max(1, plan.kernel_tokens // T))
                if not sec.admit(f"T={T} D={D}{' GQA' if gqa else ''}"):
                    continue
                rows += _kernel_case(plan, case, flex_problem)
                sec.done()
                log("kernels " + ", ".join(f"{r['method']} {r.get('fwdbwd_ms', float('nan')):.2f} ms"
                                          for r in rows[-len(KERNEL_METHODS):]) + f" (T={T} D={D} GQA={gqa})")
    return rows, notes


def _flex_available() -> str | None:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"torch {torch.__version__} has no usable FlexAttention: {type(e).__name__}: {e}"
    return None


def _kernel_case(plan: Plan, case: Case, flex_problem: str | None) -> list[dict]:
    inp = make_inputs(case, plan.device, plan.low)
    base = dict(T=case.T, B=case.B, D=case.D, Hq=case.Hq, Hkv=case.Hkv, gqa=case.gqa, dtype=_dtype_name(plan.low))
    rows, times = [], {}
    for name in KERNEL_METHODS:
        row = dict(base, method=name)
        rows.append(row)
        if name == "flex" and flex_problem:
            row["status"] = "unavailable"
            continue
        if name == "flex" and case.T not in plan.flex_seq_lens:
            row["status"] = f"not measured at this T (each shape compiles; measured at T in {plan.flex_seq_lens})"
            continue
        if name == "eager" and case.T > plan.eager_max_t:
            row["status"] = f"skipped: eager maps above T={plan.eager_max_t}"
            continue
        try:
            fwd, bwd = _kernel_method(name, inp, plan)
            times[name] = t = _time(plan, fwd, bwd)
            for ph, sec in t.items():
                row[f"{ph}_ms"] = sec * 1e3
            flops = causal_flops(case)
            for ph, mult in (("fwd", 1.0), ("bwd", 2.5), ("fwdbwd", 3.5)):
                if t.get(ph):
                    row[f"tflops_{ph}"] = mult * flops / t[ph] / 1e12
            if plan.device.type == "cuda":
                row["peak_mib"] = measure_peak_cuda(lambda: bwd(fwd()) if bwd is not None else fwd())
            row["status"] = "ok" if bwd is not None else "ok: forward only (no backward on this device)"
            del fwd, bwd
        except Exception as e:  # noqa: BLE001  (out of memory, a backend refusing a shape: record, go on)
            row["status"] = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            if plan.device.type == "cuda":
                torch.cuda.empty_cache()
    ref = times.get("sdpa_flash")
    for row in rows:
        if ref and row.get("fwd_ms"):
            row["fwd_x_sdpa"] = row["fwd_ms"] / (ref["fwd"] * 1e3)
        if ref and row.get("fwdbwd_ms"):
            row["fwdbwd_x_sdpa"] = row["fwdbwd_ms"] / (ref["fwdbwd"] * 1e3)
    choices = _autotune_choices(case)
    for row in rows:
        if row["method"].startswith("cat"):
            row["autotune"] = choices
    return rows


def _autotune_choices(case: Case) -> str:
    from causal_attn.kernels import flash_mass

    picked = [f"{k.split()[0]}{' mass' if 'True' in k.split(',')[2] else ''}: {v}"
              for k, v in flash_mass.autotune_choices().items() if re.match(rf"\S+ \({case.T}, {case.D},", k)]
    return "; ".join(picked) if picked else ("pinned interpreter config" if flash_mass.interpreting() else "-")


# ------------------------------------------------------------------------------------------ training step
def train(plan: Plan, sec: Section, log) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    B = 1
    for method in TRAIN_METHODS:
        bench = None
        for T in plan.train_seq_lens:
            row = dict(method=method, T=T, B=B, dtype=_dtype_name(plan.low),
                       params_m=sum(_param_counts(plan.train_model).values()) / 1e6)
            rows.append(row)
            if method == "authors" and plan.device.type == "cuda":
                need = projected_authors_gib(T, B, plan.train_model, bytes_per_value=2)
                free = torch.cuda.mem_get_info()[0] / 2**30
                if need > 0.8 * free:
                    row["status"] = f"skipped: projected {need:.0f} GiB of maps > 80% of the {free:.0f} GiB free"
                    continue
            if not sec.admit(f"{method} T={T}"):
                row["status"] = "cut"
                continue
            try:
                if bench is None:
                    bench = StepBench(method, plan.device, model=plan.train_model, dtype=plan.low,
                                      backend=plan.backend)
                    bench.prepare(WARM_T, B).step()  # optimizer state exists before anything is measured
                bench.prepare(T, B)
                t = _time(plan, bench.forward_loss, bench.backward_step)
                row["step_ms"] = t["fwdbwd"] * 1e3
                row["forward_ms"] = t["fwd"] * 1e3
                if plan.device.type == "cuda":
                    row["peak_mib"] = measure_peak_cuda(bench.step)
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001
                row["status"] = f"ERROR: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                bench = None
                if plan.device.type == "cuda":
                    torch.cuda.empty_cache()
            sec.done()
            log(f"train {method} T={T}: {row.get('step_ms', float('nan')):.1f} ms ({row['status']})")
        del bench
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        ref = next((r for r in rows if r["method"] == "sdpa" and r["T"] == row["T"] and r.get("step_ms")), None)
        if ref and row.get("step_ms"):
            row["step_x_sdpa"] = row["step_ms"] / ref["step_ms"]
            if row.get("peak_mib") and ref.get("peak_mib"):
                row["peak_x_sdpa"] = row["peak_mib"] / ref["peak_mib"]
    return rows, notes


def _param_counts(cfg: dict) -> dict:
    h, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return {"embeddings": 2 * V * h, "layers": L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h), "norm": h}


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


def _fmt(x, spec=".2f", suffix=""):
    if x in (None, ""):
        return "-"
    try:
        return f"{float(x):{spec}}{suffix}"
    except (TypeError, ValueError):
        return str(x)


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def summary(plan: Plan, env: dict, results: dict, notes: list[str], wall: float, budget: float) -> str:
    lines = ["# GPU check" + (" (dry run)" if plan.dry else ""), "",
             "; ".join(f"{k} {v}" for k, v in env.items()) + ".",
             f"Wall time {wall:.0f} s (budget {budget:.0f} s). Reproduce: `causal-attn gpu-check"
             + (" --dry-run" if plan.dry else "") + "`.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    corr = results.get("correctness", [])
    if corr:
        att = [r for r in corr if r["part"] == "attention"]
        lines += ["## Correctness: Triton vs fp64 oracle (ours / eager in the same dtype, max abs error)", ""]
        by_dtype = {}
        for r in att:
            by_dtype.setdefault(r["dtype"], []).append(r)
        table = []
        for dt, rs in by_dtype.items():
            ok = sum(r["status"] == "ok" for r in rs)
            cells = [dt, f"{ok}/{len(rs)}"]
            for q in ("out", "mass", "dq", "dk", "dv"):
                got = [(r[f"{q}_err"], r[f"{q}_eager_err"]) for r in rs if r.get(f"{q}_err") is not None]
                cells.append(f"{max(o for o, _ in got):.1e} / {max(e for _, e in got):.1e}" if got else "-")
            table.append(cells)
        lines += _table(["dtype", "cases ok", "out", "mass", "dq", "dk", "dv"], table) + [""]
        lines += ["Largest error over the cases of each dtype (the rule is checked per case). Failures:", ""]
        lines += [f"- {r['dtype']} T={r['T']} D={r['D']} {r['padding']} x{r['logit_scale']:g}: {r['status']}"
                  for r in att if r["status"] != "ok"] or ["- none"]
        lines += [""]
        pm = [r for r in corr if r["part"] == "patch_model"]
        if pm:
            lines += ["patch_model vs Hugging Face eager (both against the fp64 model; logits, loss and every "
                      "parameter gradient):", ""]
            lines += _table(["family", "dtype", "tensors", "logits ours / eager", "worst ratio to bound", "status"],
                            [[r["family"], r["dtype"], r.get("tensors", "-"),
                              f"{_fmt(r.get('logits_err'), '.1e')} / {_fmt(r.get('logits_eager_err'), '.1e')}",
                              f"{_fmt(r.get('worst_gradient_ratio_to_bound'), '.2f')} ({r.get('worst_tensor', '')})",
                              r["status"]] for r in pm]) + [""]
    kern = results.get("kernels", [])
    if kern:
        lines += ["## Kernels: forward+backward (ratio to SDPA flash; TFLOP/s with causal FLOPs)", ""]
        cases = sorted({(r["D"], r["gqa"], r["T"], r["B"]) for r in kern}, key=lambda c: (c[0], c[1], c[2]))
        table = []
        for D, gqa, T, B in cases:
            cells = [D, "on" if gqa else "off", T, B]
            for m in KERNEL_METHODS:
                r = next(r for r in kern if (r["D"], r["gqa"], r["T"], r["method"]) == (D, gqa, T, m))
                if r.get("fwdbwd_ms") is None and r.get("fwd_ms") is None:
                    cells.append(r["status"].split(":")[0].split(" (")[0])
                elif r.get("fwdbwd_ms") is not None:
                    cells.append(f"{r['fwdbwd_ms']:.2f} ms, {_fmt(r.get('fwdbwd_x_sdpa'), '.2f', 'x')}"
                                 + ("" if plan.dry else f", {_fmt(r.get('tflops_fwdbwd'), '.0f')} TF")
                                 + (f", {r['peak_mib']:.0f} MiB" if r.get("peak_mib") is not None else ""))
                elif r.get("fwd_ms") is not None:
                    cells.append(f"fwd only {r['fwd_ms']:.2f} ms")
            table.append(cells)
        lines += _table(["D", "GQA", "T", "B"] + [KERNEL_LABELS[m] for m in KERNEL_METHODS], table) + [""]
        tuned = sorted({(r["T"], r["D"], r.get("autotune", "-")) for r in kern if r["method"] == "cat"})
        lines += ["Autotune choice per shape (BLOCK_MxBLOCK_N, warps, stages):", ""]
        lines += [f"- T={T} D={D}: {a}" for T, D, a in tuned] + [""]
    tr = results.get("train", [])
    if tr:
        params = sum(_param_counts(plan.train_model).values())
        lines += [f"## Training step: random Llama with {params / 1e6:.3g}M parameters ({plan.train_model}), "
                  f"{tr[0]['dtype']}, AdamW, batch 1", ""]
        lines += _table(["method", "T", "step ms", "x SDPA", "peak MiB", "x SDPA", "status"],
                        [[r["method"], r["T"], _fmt(r.get("step_ms"), ".1f"), _fmt(r.get("step_x_sdpa"), ".2f", "x"),
                          _fmt(r.get("peak_mib"), ".0f"), _fmt(r.get("peak_x_sdpa"), ".2f", "x"), r["status"]]
                         for r in tr]) + [""]
    lines += ["Files: summary.md, correctness.csv, kernels.csv, train_step.csv, kernels.png, train_step.png.", ""]
    return "\n".join(lines)


def plots(out: str, results: dict, plan: Plan) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    kern = [r for r in results.get("kernels", []) if r.get("fwdbwd_ms")]
    if kern:
        combos = sorted({(r["D"], r["gqa"]) for r in kern})
        fig, axes = plt.subplots(1, len(combos), figsize=(4.2 * len(combos), 3.6), squeeze=False)
        metric = "fwdbwd_ms" if plan.dry else "tflops_fwdbwd"
        for ax, (D, gqa) in zip(axes[0], combos):
            for m in KERNEL_METHODS:
                pts = sorted((r["T"], r[metric]) for r in kern if (r["D"], r["gqa"], r["method"]) == (D, gqa, m)
                             and r.get(metric))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=KERNEL_LABELS[m])
            ax.set_xscale("log", base=2)
            ax.set_title(f"D={D}, GQA {'on' if gqa else 'off'}")
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
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        Ts = sorted({r["T"] for r in tr})
        width = 0.8 / len(TRAIN_METHODS)
        for i, m in enumerate(TRAIN_METHODS):
            for ax, key in zip(axes, ("step_ms", "peak_mib")):
                vals = [next((r.get(key) or 0 for r in tr if r["method"] == m and r["T"] == T), 0) for T in Ts]
                ax.bar([j + i * width for j in range(len(Ts))], vals, width, label=m)
        for ax, title in zip(axes, ("step time, ms", "peak memory growth, MiB")):
            ax.set_xticks([j + width for j in range(len(Ts))], [f"T={T}" for T in Ts])
            ax.set_title(title)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        paths.append(os.path.join(out, "train_step.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------ driver
def default_out(plan: Plan) -> str:
    in_checkout = os.path.basename(os.path.dirname(HERE)) != "causal_attn"
    name = "dry-run" if plan.dry else re.sub(r"[^A-Za-z0-9.-]+", "_", torch.cuda.get_device_name(0)).strip("_")
    root = os.path.join(HERE, "results", "gpu") if in_checkout else os.path.abspath("causal_attn_gpu")
    return os.path.join(root, name)


def run(args, log=print) -> str:
    plan = Plan.make(args.dry_run)
    if not plan.dry and not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA device visible to torch "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                         "`causal-attn gpu-check --dry-run` runs the same code on CPU tensors")
    out = args.out or default_out(plan)
    os.makedirs(out, exist_ok=True)
    t0 = time.monotonic()
    env = environment(plan)
    log("gpu-check: " + "; ".join(f"{k} {v}" for k, v in env.items()))
    results, notes = {}, []
    for name, fn in (("correctness", correctness), ("kernels", kernels), ("train", train)):
        if name not in args.sections:
            continue
        sec = Section(name, args.budget_s * SHARES[name])
        rows, section_notes = fn(plan, sec, log)
        results[name] = rows
        notes += section_notes + ([f"{name}: {sec.note()}"] if sec.note() else [])
        filename = {"train": "train_step.csv"}.get(name, f"{name}.csv")
        if rows:
            write_csv(rows, os.path.join(out, filename))
    plots(out, results, plan)
    path = os.path.join(out, "summary.md")
    with open(path, "w") as f:
        f.write(summary(plan, env, results, notes, time.monotonic() - t0, args.budget_s))
    log(open(path).read())
    log(f"gpu-check: results in {out}")
    return path


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--out", help="output folder (default: benchmarks/results/gpu/<gpu name>/ in a checkout, "
                   "./causal_attn_gpu/<gpu name>/ otherwise)")
    p.add_argument("--budget-s", type=float, default=450.0, help="seconds for all sections together, shared "
                   + ", ".join(f"{k} {v:.0%}" for k, v in SHARES.items()))
    p.add_argument("--sections", nargs="+", default=list(SHARES), choices=list(SHARES))
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, CPU tensors, TRITON_INTERPRET=1")


def main(args) -> int:
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter is chosen when triton is imported: run the same options in a process that has it
        argv = ["--dry-run", "--budget-s", str(args.budget_s), "--sections", *args.sections]
        argv += ["--out", args.out] if args.out else []
        return subprocess.call([sys.executable, os.path.abspath(__file__), *argv],
                               env=dict(os.environ, TRITON_INTERPRET="1"))
    run(args)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
