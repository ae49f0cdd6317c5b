"""Triton backend vs the independent fp64 oracle: outputs, mass and gradients through both.

Runs on CUDA tensors when a GPU is present (fp32, fp16, bf16) and, on any machine, under
``TRITON_INTERPRET=1`` on CPU tensors (fp32, fp16: the interpreter cannot do bf16 arithmetic).
The interpreter must be switched on before triton is imported, so in a normal pytest process
:func:`test_interpreter_subprocess` re-runs this file in a child ``python -m pytest`` with the variable
set; every other test file keeps the compiled Triton (or none) in the parent process.
"""
import os
import re
import subprocess
import sys

import pytest
import torch

import causal_attn
from causal_attn.testing.numerics import (SEGMENT_CASES, TRITON_CASES, check_against_oracle, make_case, max_err,
                                          random_segments)
from causal_attn.testing.oracle import oracle_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])

CASES = TRITON_CASES


def _require_device():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device; the CPU run of this file is test_interpreter_subprocess")


def _triton(adj, kpm, scale=None):
    return lambda q, k, v: causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, scale=scale, backend="triton")


@pytest.mark.cuda  # the device tests: `pytest -m cuda` (make gpu-check) runs them on a GPU
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda s: "B{}-H{}/{}-T{}-D{}-{}-{}-x{:g}".format(*s))
def test_matches_fp64_oracle(case, dtype):
    _require_device()
    B, Hq, Hkv, T, D, padding, adjacency, logit_scale = case
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, adjacency=adjacency,
                                        logit_scale=logit_scale, device=DEVICE)
    errs = check_against_oracle(_triton(adj, kpm), q, k, v, adj, kpm, seed)
    print(f"ERRORS {dtype} {case} " + " ".join(f"{n}={o:.3e}/{e:.3e}" for n, (o, e) in errs.items()))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda s: "B{}-H{}/{}-T{}-D{}-{}-{}-x{:g}".format(*s))
def test_segments_match_fp64_oracle(case, dtype):
    """Packed rows: block-diagonal causal masks (key loops start at the query block's first segment)."""
    _require_device()
    B, Hq, Hkv, T, D, padding, layout, logit_scale = case
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, logit_scale=logit_scale,
                                        device=DEVICE)
    seg = random_segments(B, T, layout, seed).to(DEVICE)

    def run(a, b, c):
        return causal_attn.attention(a, b, c, adj, key_padding_mask=kpm, segment_ids=seg, backend="triton")

    errs = check_against_oracle(run, q, k, v, adj, kpm, seed, seg=seg)
    print(f"ERRORS segments {dtype} {case} " + " ".join(f"{n}={o:.3e}/{e:.3e}" for n, (o, e) in errs.items()))


@pytest.mark.cuda
def test_scale_graph_and_strided_inputs():
    """transformers hands q/k/v as transposes of (B, T, H, D); a CausalGraph and an explicit scale."""
    _require_device()
    q, k, v, adj, kpm, seed = make_case(2, 4, 2, 50, 32, torch.float16, padding="left", device=DEVICE)
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    assert not qt.is_contiguous()
    graph = causal_attn.CausalGraph.from_dense(adj)
    check_against_oracle(_triton(graph, kpm, scale=0.29), qt, kt, vt, adj, kpm, seed, scale=0.29)


@pytest.mark.cuda
def test_gradient_through_out_only_with_adjacency():
    """Mass unused -> dmass is None -> the backward drops the g terms."""
    _require_device()
    q, k, v, adj, kpm, seed = make_case(2, 2, 1, 37, 16, torch.float32, padding="right", device=DEVICE)
    w = torch.randn(q.shape, dtype=torch.float64, device=DEVICE)
    out, _ = causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend="triton")
    ours = torch.autograd.grad((out.double() * w).sum(), (q, k, v))
    exact_out, _ = oracle_attention(q, k, v, adj, kpm)
    exact = torch.autograd.grad((exact_out * w).sum(), (q, k, v))
    for name, a, b in zip("qkv", ours, exact):
        assert max_err(a, b) < 1e-4, f"d{name} (seed {seed})"


@pytest.mark.cuda
def test_no_nan_on_fully_padded_rows_and_deterministic_backward():
    _require_device()
    q, k, v, adj, kpm, seed = make_case(3, 2, 1, 40, 16, torch.float16, padding="left", logit_scale=400.0,
                                        device=DEVICE)

    def grads():
        out, mass = causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend="triton")
        gq, gk, gv = torch.autograd.grad(out.float().sum() + mass.sum(), (q, k, v))
        return out, mass, gq, gk, gv

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.isfinite(a.float()).all(), f"non-finite values (seed {seed})"
        assert torch.equal(a, b), f"two runs differ (seed {seed})"
    no_key = ~kpm.cumsum(1).bool()[:, None].expand(-1, 2, -1)
    assert (first[0].float()[no_key] == 0).all() and (first[1][no_key] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_attention_map_diagnostic(packed):
    """Buffer += weight * sum over heads of P: equals the oracle's head-averaged map for weight 1/H."""
    _require_device()
    B, Hq, T = 2, 4, 45 if not packed else 100
    q, k, v, adj, kpm, seed = make_case(B, Hq, 2, T, 16, torch.float32, padding="right", device=DEVICE)
    seg = random_segments(B, T, "random", seed).to(DEVICE) if packed else None
    buf = torch.full((B, T, T), 0.5, device=DEVICE)
    with torch.no_grad():
        causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, segment_ids=seg, backend="triton", attn_map=buf,
                              attn_map_weight=1.0 / Hq)
    # oracle map per head: P = d out / d v through a one-hot v (independent of the kernels)
    eye = torch.eye(T, dtype=torch.float64, device=DEVICE).expand(B, 1, T, T)
    p, _ = oracle_attention(q.detach(), k.detach(), eye.repeat(1, 2, 1, 1), None, kpm, scale=16 ** -0.5, segment_ids=seg)
    assert max_err(buf - 0.5, p.mean(1)) < 1e-5, f"seed {seed}"


@pytest.mark.cuda
def test_unsupported_inputs_raise():
    _require_device()
    q = torch.randn(1, 1, 8, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        causal_attn.attention(q, q, q, backend="triton")
    q = torch.randn(1, 1, 8, 512, device=DEVICE)
    with pytest.raises(ValueError, match="head dims up to 256"):
        causal_attn.attention(q, q, q, backend="triton")
    if INTERPRET:
        q = torch.randn(1, 1, 8, 16, dtype=torch.bfloat16)
        with pytest.raises(TypeError, match="bfloat16"):
            causal_attn.attention(q, q, q, backend="triton")


@pytest.mark.skipif(INTERPRET, reason="this is the driver of the interpreter run")
def test_interpreter_subprocess():
    """Re-run this file with TRITON_INTERPRET=1 (CPU tensors) in a child process."""
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", os.path.abspath(__file__)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tail = res.stdout[-6000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"interpreter run failed:\n{tail}"
    passed = re.search(r"(\d+) passed", res.stdout)
    parametrized = ("test_matches_fp64_oracle", "test_segments_match_fp64_oracle", "test_attention_map_diagnostic")
    others = [n for n in globals() if n.startswith("test_") and n not in parametrized + ("test_interpreter_subprocess",)]
    expected = (len(CASES) + len(SEGMENT_CASES)) * 2 + 2 + len(others)  # fp32 and fp16 in the interpreter
    assert passed and int(passed.group(1)) == expected, f"expected {expected} passing interpreter tests:\n{tail}"
    print("\n".join(re.findall(r"ERRORS.*", res.stdout)))  # errors vs fp64 (ours / eager), shown with -s
