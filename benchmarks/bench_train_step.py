"""Training-step benchmark: one AdamW step of a small random Llama at sequence length T.

Model: ``LlamaForCausalLM`` with 4 layers, hidden 256, 8 heads (head dim 32), MLP 704, vocab 1024, batch 2.
A step is zero_grad, forward, loss, backward, optimizer step. Methods (same weights, tokens and adjacency):
    sdpa     plain ``attn_implementation="sdpa"``, next-token loss only (the floor)
    cat      CAT through ``causal_attn.patch_model``: next-token loss + gamma * ``handle.loss()``
    authors  the authors' way: ``attn_implementation="eager"``, ``output_attentions=True``, every layer's
             (B, H, T, T) map stacked and averaged over layers and heads, then the row means over causal and
             non-causal columns, their ratio and the hinge, all on dense tensors

Timing: the three steps run interleaved in one process (medians after warm-up). Memory: one fresh child
process per T; per method the RSS high-water growth of one step over the resident set after building
the model, optimizer and inputs and a warm-up step at T=32 (so optimizer state already exists); see
``common`` for how the mark is reset between methods.
"""
from __future__ import annotations

import argparse
import sys

import torch

import causal_attn

from .common import (child_report, do_bench_phases, interleaved_times, measure_peak, measure_peak_cuda, run_child,
                     section_main, setup_threads, summarize, timed_phases)

METHODS = ("sdpa", "cat", "authors")
LABELS = {"sdpa": "plain SDPA step (no CAT)", "cat": "CAT via patch_model", "authors": "authors' way (eager maps)"}
MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8)
ALPHA, GAMMA = 0.2, 1.0
WARM_T = 32


def stg_like_graph(B: int, T: int, generator: torch.Generator) -> causal_attn.CausalGraph:
    """Adjacency shaped like an STG sample: the last T/16 rows (the answer) attend to three random
    4-token spans of the prompt."""
    answer = max(2, T // 16)
    dense = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        for start in torch.randint(0, max(1, T - answer - 4), (3,), generator=generator).tolist():
            dense[b, T - answer:, start:start + 4] = True
    return causal_attn.CausalGraph.from_dense(dense.tril())


def authors_re_attention(attentions, dense_adj: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """The authors' construction on dense maps: A = mean over layers and heads of the stacked maps;
    C_i = mean of A_ij over causal j, N_i = mean over the other allowed j; hinge max(0, alpha - C/N)
    averaged over rows that have both kinds of columns."""
    a = torch.stack(attentions).mean(dim=(0, 2))  # (B, T, T)
    T = a.shape[-1]
    allowed = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    causal = dense_adj & allowed
    other = allowed & ~dense_adj
    c, n = causal.sum(-1), other.sum(-1)
    C = (a * causal).sum(-1) / c.clamp_min(1)
    N = (a * other).sum(-1) / n.clamp_min(1)
    rows = (c > 0) & (n > 0)
    hinge = torch.relu(alpha - C / N.clamp_min(eps))
    return (hinge * rows).sum() / rows.sum().clamp_min(1)


class StepBench:
    """One model + optimizer for ``method``; :meth:`prepare` sets inputs for a T, :meth:`step` trains once."""

    alpha = ALPHA  # the Re-Attention margin of the CAT and authors' steps (subclasses may set their own)

    def __init__(self, method: str, device, seed: int = 0, model: dict | None = None, dtype=torch.float32,
                 backend: str = "auto"):
        """``model``: LlamaConfig fields (default :data:`MODEL`); ``dtype`` of weights and optimizer state;
        ``backend`` of the CAT attention."""
        from transformers import LlamaConfig, LlamaForCausalLM

        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        self.method, self.device, self.backend = method, torch.device(device), backend
        self.config = dict(MODEL if model is None else model)
        cfg = LlamaConfig(**self.config, max_position_embeddings=65536)
        torch.manual_seed(seed)
        impl = "eager" if method == "authors" else "sdpa"
        with self.device:  # initialised where it runs: a 1B model is built on the GPU in a second
            self.model = LlamaForCausalLM._from_config(cfg, attn_implementation=impl)
        self.model = self.model.to(device=self.device, dtype=dtype).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.handle = None

    def prepare(self, T: int, B: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed + T)
        self.ids = torch.randint(0, self.config["vocab_size"], (B, T), generator=g).to(self.device)
        graph = stg_like_graph(B, T, g).to(self.device)
        if self.method == "cat":
            if self.handle is None:
                self.handle = causal_attn.patch_model(self.model, graph, alpha=self.alpha, backend=self.backend)
            else:
                self.handle.set_adjacency(graph)
        self.dense_adj = graph.to_dense() if self.method == "authors" else None
        return self

    def model_inputs(self) -> dict:
        return {"input_ids": self.ids, "labels": self.ids}

    def forward_loss(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        if self.method == "authors":
            out = self.model(**self.model_inputs(), output_attentions=True)
            return out.loss + GAMMA * authors_re_attention(out.attentions, self.dense_adj, self.alpha)
        out = self.model(**self.model_inputs())
        return out.loss + GAMMA * self.handle.loss() if self.method == "cat" else out.loss

    def backward_step(self, loss: torch.Tensor):
        loss.backward()
        self.opt.step()

    def step(self):
        self.backward_step(self.forward_loss())


# ------------------------------------------------------------------------------------------ memory child
def child_main(argv):
    """``--child T B THREADS METHOD...``: peak RSS growth (MiB) of one training step per method, measured
    one after another in this fresh process, each after its own warm-up step at T=32."""
    T, B, threads, *methods = int(argv[0]), int(argv[1]), int(argv[2]), *argv[3:]
    setup_threads(threads)
    peaks = {}
    for method in methods:
        bench = StepBench(method, "cpu")
        bench.prepare(WARM_T, B).step()
        bench.prepare(T, B)
        peaks[method] = measure_peak(bench.step)
        del bench
    child_report(**peaks)


def memory_cuda(benches: dict) -> dict:
    return {m: measure_peak_cuda(bench.step) for m, bench in benches.items()}


def projected_authors_gib(T: int, B: int, model: dict | None = None, bytes_per_value: int = 4) -> float:
    """Rough peak of the authors' way: about 4 live (B, H, T, T) maps per layer (scores, masked
    scores, softmax output kept for output_attentions, backward temporaries) plus the layer stack."""
    model = MODEL if model is None else model
    per_map = B * model["num_attention_heads"] * T * T * bytes_per_value
    return (4 * model["num_hidden_layers"] + model["num_hidden_layers"]) * per_map / 2**30


def maps_mib(T: int, B: int, model: dict, bytes_per_value: int = 4) -> float:
    """MiB of one (B, H, T, T) attention map in every layer: the unit the authors' extra memory grows in."""
    return B * model["num_attention_heads"] * T * T * bytes_per_value * model["num_hidden_layers"] / 2**20


def fit_maps_per_layer(points) -> float | None:
    """Least-squares ``k`` of ``extra_mib = k * maps_mib`` (through 0) over measured ``(maps_mib, extra_mib)``
    points of the authors' way; None without a point."""
    points = [(x, y) for x, y in points if x > 0]
    if not points:
        return None
    return sum(x * y for x, y in points) / sum(x * x for x, _ in points)


# ------------------------------------------------------------------------------------------ sweep
def run_sweep(args, log=print) -> list[dict]:
    device = torch.device(args.device)
    benches = {m: StepBench(m, device) for m in args.train_methods}
    for b in benches.values():  # first step allocates optimizer state: keep it out of all measurements
        b.prepare(WARM_T, args.train_batch).step()
    rows = []
    for T in args.train_seq_lens:
        skip = {m: f"skipped: projected peak {projected_authors_gib(T, args.train_batch):.1f} GiB > "
                   f"--max-gib {args.max_gib}"
                for m in benches if m == "authors" and projected_authors_gib(T, args.train_batch) > args.max_gib}
        runs = {}
        for m, b in benches.items():
            if m in skip:
                continue
            b.prepare(T, args.train_batch)
            runs[m] = (lambda b=b: do_bench_phases(b.forward_loss, b.backward_step)) if device.type == "cuda" else \
                (lambda b=b: timed_phases(b.forward_loss, b.backward_step, device))
        if device.type == "cuda":
            times = summarize({m: {p: [t] for p, t in r().items()} for m, r in runs.items()})
        else:
            times = summarize(interleaved_times(runs, warmup=args.warmup, repeats=args.repeats,
                                                budget_s=args.train_case_budget))
        mem = {}
        if T in args.train_memory_seq_lens:
            mem = memory_cuda({m: benches[m] for m in times}) if device.type == "cuda" else run_child(
                __spec__.name, [T, args.train_batch, args.threads, *times], timeout=args.child_timeout)
        case_rows = []
        for m in benches:
            row = {"T": T, "B": args.train_batch, "method": m, "device": device.type}
            case_rows.append(row)
            if m in skip:
                row["status"] = skip[m]
                continue
            fill_step_row(row, times[m], mem)
        add_memory_ratios(case_rows)
        rows += case_rows
        log(f"train step T={T}: " + ", ".join(f"{m} {times[m]['fwdbwd'] * 1e3:.0f} ms" for m in times))
    return rows


def fill_step_row(row: dict, times: dict, mem: dict):
    """A method's row of a case: step time, its ratio to SDPA, peak memory (or why there is none), status."""
    method = row["method"]
    row["step_ms"] = times["fwdbwd"] * 1e3
    if "fwdbwd_x" in times:
        row["step_x_sdpa"] = times["fwdbwd_x"]
    if "error" in mem:
        row["status"] = f"memory child failed: {mem['error']}"
    elif method in mem:
        row["peak_mib"] = mem[method]
    row.setdefault("status", "ok")


def add_memory_ratios(case_rows: list[dict]):
    """``peak_x_sdpa`` and ``extra_mib`` (peak - SDPA's peak) of each row of one case."""
    sdpa = next((r for r in case_rows if r["method"] == "sdpa" and "peak_mib" in r), None)
    for r in case_rows:
        if sdpa is not None and "peak_mib" in r:
            r["peak_x_sdpa"] = r["peak_mib"] / max(sdpa["peak_mib"], 1e-3)
            r["extra_mib"] = r["peak_mib"] - sdpa["peak_mib"]


def profile_step(method: str, T: int, B: int, device="cpu", row_limit: int = 25) -> str:
    """torch.profiler table (self CPU time) of one training step after a warm-up step."""
    from torch.profiler import ProfilerActivity, profile

    bench = StepBench(method, device)
    bench.prepare(WARM_T, B).step()
    bench.prepare(T, B).step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bench.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--train-seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--train-memory-seq-lens", type=int, nargs="*", help="T values with a memory measurement "
                   "(default: all)")
    p.add_argument("--train-case-budget", type=float, default=120.0, help="seconds per T after which no new "
                   "timing round starts (CPU)")
    p.add_argument("--max-gib", type=float, default=8.0, help="skip the authors' way where its projected peak "
                   "exceeds this many GiB")


if __name__ == "__main__":
    sys.exit(section_main("train", child_main))
