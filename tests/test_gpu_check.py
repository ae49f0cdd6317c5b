"""The GPU evidence kit (benchmarks/gpu_check.py) runs end to end before any GPU sees it: ``--dry-run`` takes
the same code path on tiny shapes with CPU tensors under TRITON_INTERPRET=1."""
import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check(*args, timeout=600):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the command must switch the interpreter on by itself
    return subprocess.run([sys.executable, "-m", "causal_attn", "gpu-check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "dry"
    res = _gpu_check("--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["budget.csv", "correctness.csv", "kernels.csv", "kernels.png", "summary.md", "tests.csv",
                     "train_step.csv", "train_step.png"], files
    assert all((out / f).stat().st_size < 16 * 2**20 for f in files)

    tests = _rows(out / "tests.csv")  # pytest -m cuda: Triton, Flex-backward, compiled-model tests, skipped without CUDA
    assert len(tests) >= 53 and {r["outcome"] for r in tests} == {"SKIPPED"}, tests[:3]
    assert {r["test"].split("::")[0] for r in tests} == {"tests/test_triton.py", "tests/test_flex.py",
                                                         "tests/test_compile.py"}

    corr = _rows(out / "correctness.csv")
    attention = [r for r in corr if r["part"] == "attention"]  # the GPU cases at T <= 40 in one dtype (bf16 there)
    assert len(attention) == 5 and {r["dtype"] for r in attention} == {"float16"}
    assert [r for r in corr if r["status"] != "ok"] == []
    assert {r["family"] for r in corr if r["part"] == "patch_model"} == {"llama", "qwen2"}
    for r in attention:  # the errors are measured, not assumed: finite and of the dtype's order
        assert 0 <= float(r["out_err"]) < 1e-2, r
    assert [r for r in corr if r["part"] == "flex"] == []  # left to the CUDA tests (test_flex.py)

    kern = _rows(out / "kernels.csv")  # per T: the methods with mass on both adjacency kinds, the others once
    assert sorted((r["T"], r["method"], r["adjacency"]) for r in kern) == sorted(
        (T, m, a) for T in ("48", "80") for m, a in [("cat", "random"), ("cat", "answer_rows"), ("flex_cat", "random"),
                                                  ("flex_cat", "answer_rows"), ("sdpa_flash", "none")])
    for r in kern:
        assert r["Hq"] != r["Hkv"], r
        if r["method"] == "flex_cat":  # CPU FlexAttention has no backward
            assert r["status"].startswith("ok: forward only") and float(r["fwd_ms"]) > 0, r
            assert 0 < float(r["flex_second_call_blocks"]) <= 1, r
        else:
            assert r["status"] == "ok", r
            assert float(r["fwdbwd_ms"]) > 0 and float(r["fwdbwd_x_sdpa"]) > 0
    assert all(r["autotune"] == "pinned interpreter config" for r in kern if r["method"] == "cat")

    budget = {r["section"]: r for r in _rows(out / "budget.csv")}  # counted, then predicted for the GPU plan
    assert list(budget) == ["tests", "correctness", "kernels", "train"]
    assert int(budget["correctness"]["triton_launches"]) > 0 and int(budget["kernels"]["triton_binaries"]) > 0
    # pinned: one binary per launch variant, nothing autotuned
    assert budget["correctness"]["triton_binaries"] == budget["correctness"]["triton_launches"]
    assert int(budget["correctness"]["autotune_runs"]) == 0
    # Flex compiles each of its four functions once at the kernels' two lengths (no specialisation, as on the GPU)
    assert (budget["kernels"]["flex_call_graphs"], budget["kernels"]["flex_mask_graphs"]) == ("2", "2")
    # the training step runs at the kernels' launch variants and lengths: nothing of its own to compile or tune;
    # the compiled step is two dynamo graphs (CAT and plain, no graph break), each an Inductor compile on a GPU
    assert (budget["train"]["triton_binaries"], float(budget["train"]["autotune_runs"])) == ("0", 0.0)
    assert budget["train"]["inductor_graphs"] == "2" and int(budget["train"]["gpu_measurements"]) == 7
    assert budget["tests"]["predicted_gpu_s"] == "" and all(
        float(budget[s]["predicted_gpu_s"]) > 0 for s in ("correctness", "kernels", "train"))

    train = _rows(out / "train_step.csv")  # eager methods first, the compiled step last (the budget cuts it first)
    assert [(r["model"], r["method"], r["T"]) for r in train] == [
        ("llama-0.9B", m, str(T)) for m in ("sdpa", "cat") for T in (48, 80)] + [
        ("llama-0.9B", "authors", "48"), ("llama-0.9B", "sdpa_compiled", "48"), ("llama-0.9B", "cat_compiled", "48")]
    for r in train:
        assert r["status"] == "ok" and float(r["step_ms"]) > 0, r
    for r in train[-2:]:  # compiled with aot_eager here (Inductor on a GPU), one graph each: no graph break
        assert r["compile_backend"] == "aot_eager" and r["compiled_graphs"] == "1", r
        assert float(r["first_step_s"]) > 0 and float(r["step_x_eager"]) > 0, r
    assert float(train[-1]["step_x_sdpa"]) > 0  # compiled CAT over compiled plain SDPA

    summary = (out / "summary.md").read_text()
    for heading in ("# GPU check (dry run", "## Goals", "## CUDA tests (`pytest -m cuda`)",
                    f"{len(tests)} tests: {len(tests)} skipped",
                    "## Time budget", "Predicted GPU time:", "## Correctness: Triton",
                    "patch_model vs Hugging Face eager", "## Kernels", "Autotune choice",
                    "## Training step: llama-0.9B", "torch.compile(model)"):
        assert heading in summary, heading
    for goal in ("plain SDPA step", "faster than Flex CAT", "SDPA flash's", "compiled plain SDPA step's time",
                 "compiled plain SDPA step's peak memory"):
        assert goal in summary, goal
    assert "D=16 T=48 answer_rows" in summary and "D=16 T=48 random" in summary  # goals judged on both kinds
    assert "llama-0.9B T=48:" in summary.split("compiled plain SDPA step's time")[1].splitlines()[0]
    assert "cut:" not in summary


def test_committed_dry_run_predicts_a_gpu_run_within_its_budget():
    """The committed census (benchmarks/results/gpu_budget_dry_run.csv, a dry run's budget.csv, docs/gpu.md's
    table): its predicted GPU time, the tests' cap included, fits the GPU run's default budget with a margin. A
    plan that grows (more cases, dtypes, shapes) must be trimmed elsewhere or fail here once its dry run is
    committed; and the committed census must come from the plan as it is (its sections and compiled step)."""
    from causal_attn.benchmarks import gpu_check, gpu_report

    rows = {r["section"]: r for r in _rows(os.path.join(ROOT, "benchmarks", "results", "gpu_budget_dry_run.csv"))}
    assert list(rows) == list(gpu_check.SECTIONS)
    budget = gpu_check.DEFAULT_BUDGET_S
    tests_cap = gpu_report.TESTS_WEIGHT * budget
    predicted = {s: float(r["predicted_gpu_s"]) for s, r in rows.items() if s != "tests"}
    total = sum(predicted.values()) + tests_cap
    assert total <= budget - 60, (total, predicted, tests_cap)  # 60 s for start-up, report and misjudged units
    assert int(rows["train"]["inductor_graphs"]) == 2  # the compiled step is counted
    # each section's prediction fits the share it starts with when the tests use their whole cap
    left, ahead = budget - tests_cap, [s for s in gpu_check.SECTIONS if s != "tests"]
    for s in ahead:
        share = left * gpu_check.SHARES[s] / sum(gpu_check.SHARES[a] for a in ahead[ahead.index(s):])
        assert predicted[s] <= share, (s, predicted[s], share)
        left -= predicted[s]


def test_budget_cuts_cases_and_says_so(tmp_path):
    out = tmp_path / "cut"
    res = _gpu_check("--dry-run", "--out", str(out), "--budget-s", "0.2", "--sections", "kernels")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    kern = _rows(out / "kernels.csv")
    assert len(kern) == 5  # the first case always runs; the second would overrun the section's 0.2 s
    summary = (out / "summary.md").read_text()
    assert "kernels: cut: 1 case(s) not started" in summary


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_says_what_to_do(tmp_path):
    res = _gpu_check("--out", str(tmp_path / "x"), timeout=300)
    assert res.returncode != 0
    assert "no CUDA device" in res.stderr and "--dry-run" in res.stderr


def test_output_folder_is_chosen_by_the_checkout_marker(monkeypatch, tmp_path):
    """In a checkout (marker benchmarks/results/README.md, whatever the folder is called) results go to
    benchmarks/results/gpu/<gpu>/, which git ignores for the dry run; elsewhere to ./causal_attn_gpu/<gpu>/."""
    from causal_attn.benchmarks import gpu_check

    plan = gpu_check.Plan.make(True)
    assert os.path.isfile(gpu_check.CHECKOUT_MARKER)
    assert gpu_check.default_out(plan) == os.path.join(ROOT, "benchmarks", "results", "gpu", "dry-run")
    monkeypatch.setattr(gpu_check, "CHECKOUT_MARKER", str(tmp_path / "absent" / "README.md"))
    monkeypatch.chdir(tmp_path)
    assert gpu_check.default_out(plan) == str(tmp_path / "causal_attn_gpu" / "dry-run")
    if shutil.which("git") and os.path.exists(os.path.join(ROOT, ".git")):  # a git checkout (or worktree)
        res = subprocess.run(["git", "check-ignore", "-q", "benchmarks/results/gpu/dry-run/summary.md"], cwd=ROOT)
        assert res.returncode == 0, "the dry run's folder must be ignored by git"
