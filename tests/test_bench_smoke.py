"""Benchmarks: the methods compute the same thing, the helpers are right, and a tiny sweep runs end to end
through ``causal-attn bench`` (the same code path as the full sweep; numbers are never asserted on time)."""
import csv
import importlib.util
import math
import os
import random
import sys

import pytest
import torch

import causal_attn
from causal_attn.benchmarks import bench_kernels, bench_packing, bench_train_step
from causal_attn.benchmarks.common import fit_growth
from causal_attn.cli import main
from causal_attn.ops.attention import get_backend
from causal_attn.testing.oracle import oracle_attention


def err(x, ref):
    return (x.double() - ref).abs().max().item()


@pytest.mark.parametrize("hkv", [4, 1])
def test_benchmarked_methods_compute_the_same_attention_mass_and_grads(hkv):
    """Every method's outputs and gradients match the float64 oracle within 2x eager fp32's own error."""
    case = bench_kernels.Case(T=96, D=16, Hq=4, Hkv=hkv, B=2)
    inp = bench_kernels.make_inputs(case, "cpu", torch.float32, seed=random.randrange(2**31))
    q64, k64, v64 = (inp[n].double().requires_grad_() for n in ("q", "k", "v"))
    out64, mass64 = oracle_attention(q64, k64, v64, inp["graph"].to_dense())
    ref = {"with_mass": (out64, mass64, *torch.autograd.grad((out64, mass64), (q64, k64, v64),
                                                              (inp["dout"].double(), inp["dmass"].double())))}
    out64b, _ = oracle_attention(q64, k64, v64, None)
    ref["no_mass"] = (out64b, *torch.autograd.grad(out64b, (q64, k64, v64), inp["dout"].double()))
    results = {}
    for m in bench_kernels.METHODS:
        fwd, bwd = bench_kernels.make_method(m, inp, "auto")
        outs = fwd()
        results[m] = (*outs, *bwd(outs))
    for m in bench_kernels.METHODS:
        expected = ref["with_mass" if m in ("cat", "eager") else "no_mass"]
        base = results["eager"] if m in ("cat", "eager") else results["sdpa"]
        assert len(results[m]) == len(expected), m
        for got, eager, want in zip(results[m], base, expected):
            assert err(got, want) <= 2 * err(eager, want) + 1e-6, f"{m}: {err(got, want):.2e} vs eager {err(eager, want):.2e}"


def test_authors_re_attention_equals_the_loss_on_masses():
    """The authors' dense construction in the training benchmark gives CAT's Re-Attention loss."""
    g = torch.Generator().manual_seed(random.randrange(2**31))
    L, B, H, T = 3, 2, 4, 40
    logits = torch.randn(L, B, H, T, T, generator=g, dtype=torch.float64)
    maps = torch.softmax(logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf), -1)
    graph = bench_train_step.stg_like_graph(B, T, g)
    dense = graph.to_dense()
    masses = [(maps[layer] * dense[:, None]).sum(-1) for layer in range(L)]
    want = causal_attn.re_attention_loss(masses, graph, alpha=5.0)
    got = bench_train_step.authors_re_attention(list(maps), dense, alpha=5.0)
    assert want > 0
    torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-7)  # the loss computes in fp32


def test_fit_growth_recovers_linear_and_quadratic():
    ts = [512, 1024, 2048, 4096]
    lin = fit_growth(ts, [3.0 * t + 7 for t in ts])
    assert lin["slope_mib_per_1k"] == pytest.approx(3.0 * 1024)
    assert lin["exponent"] == pytest.approx(1.0, abs=0.05)
    assert fit_growth(ts, [2e-5 * t * t for t in ts])["exponent"] == pytest.approx(2.0)


def test_bench_without_benchmarks_package_is_a_clear_cli_error(monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("causal_attn.benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "causal_attn.benchmarks", None)  # what an install without it imports
    assert main(["bench"]) == 2
    assert "causal_attn.benchmarks is not part of this install" in capsys.readouterr().err


def test_bench_leaves_no_benchmark_module_importable_by_bare_name(capsys):
    """The benchmarks are a package: after the CLI imported its runner (and every section), `import runner`,
    `import common` ... still fail as before, instead of shadowing a user's own modules of those names."""
    assert main(["bench", "--seq-lens", "0"]) == 2  # builds the parser from the runner, then a one-line error
    assert "must be positive" in capsys.readouterr().err
    assert "causal_attn.benchmarks.runner" in sys.modules and "causal_attn.benchmarks.common" in sys.modules
    bare = {name: importlib.util.find_spec(name) for name in ("runner", "common", "plot", "report", "bench_kernels")}
    assert all(spec is None for spec in bare.values()), bare


@pytest.mark.parametrize("argv, message", [(["--heads", "8", "--gqa-group", "3"], "not a multiple"),
                                           (["--seq-lens", "0"], "must be positive")])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_through_the_cli(tmp_path):
    rc = main(["bench", "--seq-lens", "128", "512", "--head-dims", "32", "--gqa", "0", "--memory-seq-lens", "512", "--memory-head-dims", "32",
               "--train-seq-lens", "64", "--repeats", "1", "--scaling-seq-len", "128", "--scaling-smollm2-seq-len", "96", "--scaling-train-seq-len", "64",
               "--scaling-threads", "1", "2", "--scaling-rounds", "1", "--packing-data", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path)])
    assert rc == 0
    kernels = rows(tmp_path / "kernels.csv")
    expected = {(T, m, "random" if m in ("cat", "eager") else "none") for T in (128, 512) for m in bench_kernels.METHODS}
    assert {(int(r["T"]), r["method"], r["adjacency"]) for r in kernels} == expected | {
        (T, "cat", "answer_rows") for T in (128, 512)}
    for r in kernels:
        assert r["status"] == "ok", r
        for ph in ("fwd", "bwd", "fwdbwd"):
            assert 0 < float(r[f"{ph}_x_sdpa"]) < math.inf
    peak = {r["method"]: float(r["peak_mib"]) for r in kernels if r["T"] == "512" and r["adjacency"] != "answer_rows"}
    one_map = 8 * 512 * 512 * 4 / 2**20  # one (Hq, T, T) fp32 stack: 8 MiB
    assert peak["eager"] > 2 * one_map, peak  # the measurement sees the maps ...
    assert peak["cat"] < one_map, peak  # ... and ours keeps none
    train = rows(tmp_path / "train_step.csv")
    assert [r["method"] for r in train] == list(bench_train_step.METHODS)
    for r in train:
        assert r["status"] == "ok", r
        assert float(r["step_ms"]) > 0 and math.isfinite(float(r["peak_mib"]))
    scaling = rows(tmp_path / "threads.csv")
    assert {(r["part"], int(r["threads"]), r["method"]) for r in scaling} == {
        (p, n, m) for p in ("kernel", "kernel_smollm2", "train_step") for n in (1, 2) for m in ("cat", "sdpa")}
    assert {(r["part"], r["T"], r["heads"]) for r in scaling} == {("kernel", "128", "8/8"), ("kernel_smollm2", "96", "9/3"),
                                                                  ("train_step", "64", "")}
    for r in scaling:
        assert float(r["ms"]) > 0 and float(r["speedup_vs_1"]) > 0, r
        assert 0 < float(r["fwd_ms"]) < float(r["ms"]) and 0 < float(r["bwd_ms"]) < float(r["ms"]), r
        assert (float(r["speedup_vs_1"]) == 1.0) == (r["threads"] == "1"), r
        assert (float(r["bwd_speedup_vs_1"]) == 1.0) == (r["threads"] == "1"), r
    packing = rows(tmp_path / "packing.csv")  # part of the full sweep; without its data it says so per method
    assert [(r["data"], r["method"]) for r in packing] == [("absent", m) for m in bench_packing.METHODS]
    assert all(r["status"].startswith("skipped: FileNotFoundError") for r in packing), packing
    for name in ("kernels_time.png", "kernels_memory.png", "train_step.png", "threads.png", "packing.png",
                 "summary.md"):
        assert (tmp_path / name).stat().st_size > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| 512 | 32 | off |" in summary and "| kernel | 128 | 8/8 | 2 |" in summary
    assert "| kernel SmolLM2 (GQA, D 64) | 96 | 9/3 | 2 |" in summary and "SmolLM2 attention (9/3 heads)" in summary


def test_packing_section_through_the_cli(tmp_path):
    """``--only packing`` on the first records of the released GSM8K and SVAMP sets: every method trains on the
    same samples, CAT packed gives CAT padded's loss to float32 rounding, memory is measured, CSV / PNG / summary."""
    data = []
    for name in ("gsm8k_val", "svamp_train"):
        src = os.path.join(bench_packing.ANNOTATED, f"{name}.jsonl")
        if not os.path.exists(src):
            pytest.skip(f"{src} not found")
        with open(src) as f:
            head = [next(f) for _ in range(8)]
        (tmp_path / f"{name}.jsonl").write_text("".join(head))
        data.append(str(tmp_path / f"{name}.jsonl"))
    assert main(["bench", "--only", "packing", "--packing-data", *data, "--packing-batch", "4",
                 "--packing-memory-batches", "1", "--out", str(tmp_path / "out")]) == 0
    got = rows(tmp_path / "out" / "packing.csv")
    assert [(r["data"], r["method"]) for r in got] == [(d, m) for d in ("gsm8k_val", "svamp_train")
                                                       for m in bench_packing.METHODS]
    for r in got:
        assert r["status"] == "ok", r
        assert r["samples"] == "8" and r["timed_batches"] == "1" and float(r["samples_per_s"]) > 0
        assert int(r["padded_tokens"]) > int(r["tokens"]) > 8 and float(r["peak_mib"]) > 0, r
        if r["method"] == "cat_packed":
            assert float(r["x_cat_padded"]) > 0
            assert float(r["loss_max_abs_diff"]) < 1e-4 and float(r["attn_loss_max_abs_diff"]) < 1e-5, r
    assert (tmp_path / "out" / "packing.png").stat().st_size > 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## Packed vs padded training steps" in summary and "| gsm8k_val |" in summary
    assert "CAT packed samples/s on gsm8k_val lengths at batch 4" in summary


def test_packing_batches_keep_the_samples_and_collate_alike():
    """The benchmark's batches: shuffled full batches; the three methods collate the same records (packed: one
    row with the same tokens, labels and edges)."""
    records = [{"input_ids": list(range(3, 3 + n)), "labels": [-100] + list(range(4, 3 + n)),
                "edges": [[n - 1, 0]]} for n in range(2, 13)]
    batches = bench_packing.make_batches(records, 3)
    flat = [r for b in batches for r in b]
    assert len(batches) == 3 and len(flat) == 9 and all(r in records for r in flat) and flat != records[:9]
    assert bench_packing.make_batches(records, 3, 2) == batches[:2] == bench_packing.make_batches(records, 3)[:2]
    padded = bench_packing.PackingStep("cat_padded", "cpu").collate(batches[0])
    packed = bench_packing.PackingStep("cat_packed", "cpu").collate(batches[0])
    plain = bench_packing.PackingStep("sdpa_padded", "cpu").collate(batches[0])
    assert "adjacency" not in plain and torch.equal(plain["input_ids"], padded["input_ids"])
    real = padded["attention_mask"].bool()
    assert packed["input_ids"].shape == (1, int(real.sum()))
    assert packed["input_ids"][0].tolist() == padded["input_ids"][real].tolist()
    assert packed["labels"][0].tolist() == padded["labels"][real].tolist()
    assert int(packed["adjacency"].to_dense().sum()) == int(padded["adjacency"].to_dense().sum()) == 3


def test_static_makespan_follows_atens_openmp_chunks():
    """ATen's invoke_parallel: min(p, n) threads, contiguous chunks of ceil(n / threads) tasks each."""
    from causal_attn.benchmarks import sim_threads

    assert sim_threads.static_makespan([1.0] * 10, 4) == 3.0  # chunks 3, 3, 3, 1
    assert sim_threads.static_makespan([1.0] * 10, 64) == 1.0  # 10 threads, one task each
    assert sim_threads.static_makespan([4.0, 1.0, 1.0, 1.0, 1.0], 2) == 6.0  # [4, 1, 1] | [1, 1]
    assert sim_threads.static_makespan([], 8) == 0.0


@pytest.mark.skipif(get_backend("cpp") is None, reason="C++ CPU extension not built here")
def test_sim_threads_writes_csv_and_png_for_a_tiny_case(tmp_path):
    from causal_attn.benchmarks import sim_threads

    case = sim_threads.Case("tiny", Hq=8, Hkv=2, T=512, D=16)
    rows = sim_threads.run([case], repeats=1, out=str(tmp_path), threads=(1, 2, 4), log=lambda *_: None)
    groups, (fwd, bwd, total) = torch.ops.causal_attn_cpp.plan(1, 8, 2, 512)
    assert groups == 3 and bwd == 6 and total == 2 * 8
    with open(tmp_path / "sim_threads.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) == 3 * 3 and (tmp_path / "sim_threads.png").stat().st_size > 0
    by = {(r["phase"], r["structure"], int(r["threads"])): r for r in written}
    assert by[("forward", "unchanged", 2)]["tasks"] == str(fwd)
    assert by[("backward", "grouped", 4)]["tasks"] == f"{bwd}+{total}" and by[("backward", "single", 4)]["tasks"] == "2"
    assert {r["structure"] for r in written if r["chosen"] == "True"} == {"unchanged", "grouped"}
    for r in written:
        assert float(r["serial_ms"]) > 0 and 0 < float(r["speedup"]) <= int(r["threads"]) + 1e-9
        # backward speed-ups are over the faster one-thread backward of the two
        assert float(r["baseline_ms"]) <= float(r["serial_ms"]) + 1e-9
    # the single pass has 2 tasks: it stops at 2 threads
    assert by[("backward", "single", 4)]["makespan_ms"] == by[("backward", "single", 2)]["makespan_ms"]


def test_compiled_section_through_the_cli(tmp_path):
    """``--only compiled`` at a smoke size (one tiny-Llama case, the quick ``aot_eager`` backend: the Inductor path
    is tested in test_compile.py): four methods per case, both ratios, peaks, CSV / PNG / summary."""
    assert main(["bench", "--only", "compiled", "--compiled-cases", "T64", "--compile-backend", "aot_eager",
                 "--compiled-warmup", "1", "--repeats", "1", "--out", str(tmp_path)]) == 0
    compiled = rows(tmp_path / "compiled.csv")
    assert [r["method"] for r in compiled] == ["sdpa", "cat", "sdpa_compiled", "cat_compiled"]
    for r in compiled:
        assert r["status"] == "ok" and r["T"] == "64" and float(r["step_ms"]) > 0, r
        assert 0 < float(r["step_x_plain"]) < math.inf and 0 < float(r["peak_x_plain"]) < math.inf, r
        assert (r["compile_backend"] == "aot_eager") == r["method"].endswith("_compiled"), r
    assert (tmp_path / "compiled.png").stat().st_size > 0
    assert "## Compiled training step" in (tmp_path / "summary.md").read_text()


def test_answer_rows_adjacency_follows_the_released_stg_annotations():
    """The benchmark's STG-like adjacency at STG_E's length is what the released annotations give through the
    adjacency builder (edge rows and their place, 2-4 spans of ~4 tokens), and keeps those fractions at long T."""
    import json

    from causal_attn.data.adjacency import encode_example
    from causal_attn.data.tokenizers import load_tokenizer

    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cat", "stg_e", "train_M.jsonl")
    if not os.path.isfile(path):
        pytest.skip(f"no released STG data at {path}")

    def pattern(dense):  # (edge rows, first edge row counted from the end, spans, mean span length) of one sample
        rows = dense.any(-1).nonzero().flatten().tolist()
        cols = dense.any(0).nonzero().flatten().tolist()
        spans = sum(1 for i, c in enumerate(cols) if i == 0 or c != cols[i - 1] + 1)
        return len(rows), dense.shape[0] - rows[0], spans, len(cols) / spans

    tok = load_tokenizer("qwen2")
    released = []
    with open(path) as f:
        for line in list(f)[:8]:
            r = json.loads(line)
            ex = encode_example(r["input"], r["target"], r["important"], tok)
            T = len(ex["input_ids"])
            dense = torch.zeros(T, T, dtype=torch.bool)
            dense[tuple(torch.tensor(ex["edges"]).T)] = True
            released.append(pattern(dense))
    ours = [pattern(d) for d in bench_kernels.answer_rows_graph(8, 66, torch.Generator().manual_seed(1)).to_dense()]
    assert {p[:2] for p in released} == {p[:2] for p in ours} == {(2, 4)}, (released, ours)
    for p in released + ours:
        assert 2 <= p[2] <= 4 and 3 <= p[3] <= 5, (released, ours)
    for d in bench_kernels.answer_rows_graph(2, 4096, torch.Generator().manual_seed(2)).to_dense():
        rows, back, spans, length = pattern(d)
        assert rows == round(4096 * 2 / 66) and back == 4096 - int(4096 * (1 - 4 / 66)) and 2 <= spans <= 4
        assert length == round(4096 * 4 / 66)


def test_authors_extra_projection_is_fitted_to_measured_extras():
    """The pretrained benchmark projects the authors' *extra* memory as k maps per layer, k fitted to the extras it
    measured (never a total peak under that name); before any measurement it is the 5-maps bound."""
    from causal_attn.benchmarks.bench_pretrained import authors_extra, project_authors_extra
    from causal_attn.benchmarks.bench_train_step import fit_maps_per_layer, maps_mib

    shape = {"num_attention_heads": 9, "num_hidden_layers": 30}
    k = 1.5 + torch.rand(()).item()
    points = [(maps_mib(T, B, shape), k * maps_mib(T, B, shape)) for T, B in ((68, 8), (512, 4))]
    assert fit_maps_per_layer(points) == pytest.approx(k)
    assert fit_maps_per_layer([]) is None
    fitted = project_authors_extra(2048, 1, shape, points)
    assert fitted["projected_extra_mib"] == pytest.approx(k * 2048 ** 2 * 9 * 30 * 4 / 2**20, rel=1e-3)
    assert fitted["projection"].startswith(f"fit: {k:.2f} maps per layer over 2")
    bound = project_authors_extra(2048, 1, shape, [])
    assert bound["projection"].startswith("bound") and bound["projected_extra_mib"] > fitted["projected_extra_mib"]
    assert authors_extra({"status": "ok", "extra_mib": "100", **fitted}) == (100.0, False)
    assert authors_extra({"status": "skipped: ...", **fitted}) == (fitted["projected_extra_mib"], True)
