"""The C++ CPU kernel (backend "cpp") beyond the shared oracle suite of test_attention.py:
several key blocks (the shared shapes fit in one 256-column tile), thread-count invariance, the
diagnostic map, and the one-time fallback warning when the extension cannot load."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import causal_attn
from causal_attn.attention import get_backend
from numerics import check_against_oracle, fresh_seed, make_case

needs_cpp = pytest.mark.skipif(get_backend("cpp") is None, reason="C++ CPU extension not built here")


def _cpp(adj, kpm):
    return lambda q, k, v: causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend="cpp")


@needs_cpp
def test_several_key_blocks_match_fp64_oracle():
    """T = 521: three 256-column key tiles (the last one ragged) and nine 64-row query tiles, so the online
    softmax rescales O, l and the mass accumulator across tiles; GQA and left padding included. (Other
    dtypes are converted to fp32 before the tiles; test_attention.py covers them.)"""
    q, k, v, adj, kpm, seed = make_case(2, 2, 1, 521, 32, torch.float32, padding="left", logit_scale=4.0)
    check_against_oracle(_cpp(adj, kpm), q, k, v, adj, kpm, seed)


def _outputs_and_grads(q, k, v, adj, kpm, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, mass = causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend="cpp")
        g = torch.Generator().manual_seed(0)
        (out * torch.randn(out.shape, generator=g)).sum().add((mass * torch.randn(mass.shape, generator=g)).sum()).backward()
        return [out.detach(), mass.detach(), q.grad, k.grad, v.grad]
    finally:
        torch.set_num_threads(previous)


@needs_cpp
@pytest.mark.parametrize("B,Hq,Hkv", [(3, 4, 2), (1, 4, 1)])
def test_one_and_two_threads_agree(B, Hq, Hkv):
    """(1, 4, 1): with 2 threads the backward splits the GQA group over threads (per-head partial dK, dV),
    with 1 thread it sums the group in place; both must agree."""
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, 300, 64, torch.float32, padding="right")
    one = _outputs_and_grads(q, k, v, adj, kpm, 1)
    two = _outputs_and_grads(q, k, v, adj, kpm, 2)
    for name, a, b in zip(["out", "mass", "dq", "dk", "dv"], one, two):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"{name} differs between 1 and 2 threads (seed {seed})"


@needs_cpp
def test_attention_map_matches_torch_backend():
    q, k, v, adj, kpm, seed = make_case(2, 4, 2, 290, 16, torch.float32, padding="right")
    maps = {}
    for backend in ("torch", "cpp"):
        maps[backend] = torch.full((2, 290, 290), 0.5)
        with torch.no_grad():
            causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend=backend, attn_map=maps[backend],
                                  attn_map_weight=0.25)
    assert torch.allclose(maps["cpp"], maps["torch"], atol=1e-6), f"seed {seed}"


def test_fallback_warns_once_when_the_extension_is_missing():
    """A clean interpreter in which the compiled library cannot be found: backend "auto" on CPU runs the
    PyTorch path and warns exactly once."""
    script = textwrap.dedent(f"""
        import importlib.util, warnings
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "causal_attn._cpp_attention" else real_find_spec(name, *a)
        import torch, causal_attn
        from causal_attn.attention import resolve_backend
        torch.manual_seed({fresh_seed()})
        q = torch.randn(1, 2, 9, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out1, _ = causal_attn.attention(q, q, q)
            out2, _ = causal_attn.attention(q, q, q, backend="cpu")
        msgs = [str(w.message) for w in caught if "C++ CPU extension unavailable" in str(w.message)]
        assert len(msgs) == 1, [str(w.message) for w in caught]
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
        ref, _ = causal_attn.attention(q, q, q, backend="reference")
        assert torch.allclose(out1, ref, atol=1e-5) and torch.equal(out1, out2)
        print("ok")
    """)
    env = dict(os.environ, CAUSAL_ATTN_DISABLE_CPP="0")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@needs_cpp
def test_torch_compile_sees_one_op_and_loads_the_backend_lazily():
    """In a fresh interpreter (the extension not yet loaded) torch.compile(fullgraph=True) traces
    attention(backend="auto") to one causal_attn::attention_fwd call that runs the C++ kernel."""
    script = textwrap.dedent(f"""
        import torch, causal_attn
        from causal_attn.attention import BACKENDS
        torch.manual_seed({fresh_seed()})
        q, k, v = (torch.randn(2, 4, 70, 16, requires_grad=True) for _ in range(3))
        graph = causal_attn.CausalGraph.from_dense((torch.rand(2, 70, 70) < 0.2).tril())
        targets = []
        def counting_backend(gm, example_inputs):
            targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        def f(q, k, v):
            out, mass = causal_attn.attention(q, k, v, graph)
            return out.square().sum() + mass.sum()
        loss = torch.compile(f, backend=counting_backend, fullgraph=True)(q, k, v)
        loss.backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        assert "cpp" in BACKENDS and sum("attention_fwd" in t for t in targets) == 1, targets
        for t in (q, k, v):
            t.grad = None
        f(q, k, v).backward()
        assert all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
