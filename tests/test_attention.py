"""attention(): outputs and gradients through both outputs vs the independent fp64 oracle, per backend."""
import itertools

import pytest
import torch

import causal_attn
from causal_attn.ops.attention import get_backend
from causal_attn.testing.numerics import check_against_oracle, cpp_kernel_only, fresh_seed, make_case
from causal_attn.testing.oracle import oracle_attention

CPU_BACKENDS = ["reference", "torch", "cpp"]


def _require(backend):
    if backend == "cpp" and get_backend("cpp") is None:
        pytest.skip("C++ CPU extension not built here")


def _run(backend, adj, kpm, scale=None):
    return lambda q, k, v: causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, scale=scale, backend=backend)


# (B, Hq, Hkv, T, D, padding, adjacency, logit_scale): covers T {1, 7, 64, 129}, Hq/Hkv {1, 2, 4},
# D {16, 64, 128}, both paddings (with a fully padded sample at B=3), empty/full/random/no adjacency, x30 logits
SHAPES = [
    (1, 1, 1, 1, 16, "none", "random", 1.0),
    (2, 2, 1, 7, 16, "left", "full", 1.0),
    (3, 4, 2, 64, 64, "right", "random", 1.0),
    (3, 4, 1, 129, 64, "left", "random", 1.0),
    (2, 4, 4, 129, 128, "none", "empty", 1.0),
    (2, 4, 2, 64, 16, "right", "none", 1.0),
    (3, 2, 2, 129, 16, "left", "random", 30.0),
    (2, 4, 1, 7, 128, "none", "full", 30.0),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}/{}-T{}-D{}-{}-{}-x{:g}".format(*s))
def test_matches_fp64_oracle(backend, dtype, shape):
    _require(backend)
    B, Hq, Hkv, T, D, padding, adjacency, logit_scale = shape
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, adjacency=adjacency,
                                        logit_scale=logit_scale)
    check_against_oracle(_run(backend, adj, kpm), q, k, v, adj, kpm, seed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_scale_argument_and_causal_graph_input(backend):
    _require(backend)
    q, k, v, adj, kpm, seed = make_case(2, 4, 2, 33, 32, torch.float32, padding="right")
    graph = causal_attn.CausalGraph.from_dense(adj)
    check_against_oracle(_run(backend, graph, kpm, scale=0.37), q, k, v, adj, kpm, seed, scale=0.37)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_inputs_like_transformers(backend):
    """transformers hands q/k/v as transposes of (B, T, H, D): non-contiguous."""
    _require(backend)
    q, k, v, adj, kpm, seed = make_case(2, 4, 2, 40, 16, torch.float32, padding="left")
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
    assert not qt.is_contiguous()
    check_against_oracle(_run(backend, adj, kpm), qt, kt, vt, adj, kpm, seed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_nan_on_fully_padded_rows_and_large_logits(backend):
    _require(backend)
    q, k, v, adj, kpm, seed = make_case(3, 2, 1, 50, 16, torch.bfloat16, padding="left", logit_scale=900.0)
    out, mass = causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend=backend)
    (out.float().sum() + mass.sum()).backward()
    for t in (out, mass, q.grad, k.grad, v.grad):
        assert torch.isfinite(t.float()).all(), f"non-finite values (seed {seed})"
    no_key = ~kpm.cumsum(1).bool()  # rows with no allowed key
    assert (out.float()[no_key[:, None].expand(-1, 2, -1)] == 0).all()
    assert (mass[no_key[:, None].expand(-1, 2, -1)] == 0).all()


def _gradcheck_case(dtype, seed):
    """B=2, 2 query / 1 kv heads, T=6; sample 1 has 2 padded keys (rows without any allowed key)."""
    g = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, D = 2, 2, 1, 6, 4
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    adj = (torch.rand(B, T, T, generator=g) < 0.5) & torch.ones(T, T, dtype=torch.bool).tril()
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :2] = False
    return q, k, v, adj, kpm


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(backend):
    """Finite differences in float64 through both outputs (the cpp backend hands float64 to the PyTorch path,
    so its kernel is checked in float32 by the next test)."""
    seed = fresh_seed()
    q, k, v, adj, kpm = _gradcheck_case(torch.float64, seed)
    fn = lambda a, b, c: causal_attn.attention(a, b, c, adj, key_padding_mask=kpm, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, raise_exception=False), f"seed {seed}"


def test_cpp_kernel_float32_gradients_match_fp64_oracle(monkeypatch):
    """The C++ kernel (float32; it never sees float64) on the gradcheck case: outputs and gradients through both
    outputs against the fp64 oracle with the tolerance rule."""
    _require("cpp")
    cpp_kernel_only(monkeypatch)
    seed = fresh_seed()
    q, k, v, adj, kpm = _gradcheck_case(torch.float32, seed)
    check_against_oracle(_run("cpp", adj, kpm), q, k, v, adj, kpm, seed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_map_diagnostic_matches_oracle_average(backend, monkeypatch):
    """The (B, T, T) diagnostic buffer of one layer (4 heads, weight 1/4) equals the head average of the fp64
    oracle's probabilities (the oracle's output with v = identity is P itself)."""
    _require(backend)
    if backend == "cpp":
        cpp_kernel_only(monkeypatch)
    B, Hq, Hkv, T = 2, 4, 2, 37
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, 16, torch.float32, padding="right")
    buf = torch.zeros(B, T, T)
    with torch.no_grad():
        causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend=backend, attn_map=buf, attn_map_weight=0.25)
    eye = torch.eye(T, dtype=torch.float64).expand(B, Hkv, T, T)
    probs, _ = oracle_attention(q.detach(), k.detach(), eye, None, kpm)
    torch.testing.assert_close(buf.double(), probs.mean(1), rtol=0, atol=1e-6, msg=lambda m: f"seed {seed}: {m}")
    assert (buf[kpm.logical_not()[:, None, :].expand(B, T, T)] == 0).all(), f"padded keys got weight (seed {seed})"


def test_auto_backend_on_cpu_is_a_cpu_implementation():
    from causal_attn.ops.attention import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) in ("cpp", "torch")
    assert resolve_backend("cpu", torch.device("cpu")) in ("cpp", "torch")


# ----------------------------------------------------------------------------------- bad input
def _qkv(B=2, Hq=4, Hkv=2, T=8, D=16, dtype=torch.float32):
    return torch.randn(B, Hq, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype), torch.randn(B, Hkv, T, D, dtype=dtype)


@pytest.mark.parametrize("mutate,match", [
    (lambda q, k, v: (q[0], k, v), "rank 4"),
    (lambda q, k, v: (q, k[:, :, :5], v[:, :, :5]), "T=8 but k/v have T=5"),
    (lambda q, k, v: (q[:, :3], k, v), "multiple of key/value heads"),
    (lambda q, k, v: (q, k.double(), v.double()), "share a dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int()), "unsupported dtype"),
    (lambda q, k, v: (q, k[:1], v[:1]), "disagree on batch size"),
    (lambda q, k, v: (q, k, v[..., :8]), "same shape"),
])
def test_bad_inputs_raise_clear_errors(mutate, match):
    q, k, v = mutate(*_qkv())
    with pytest.raises((ValueError, TypeError), match=match):
        causal_attn.attention(q, k, v)


def test_bad_adjacency_and_mask():
    q, k, v = _qkv()
    future = torch.zeros(2, 8, 8, dtype=torch.bool)
    future[1, 2, 5] = True
    with pytest.raises(ValueError, match=r"sample 1: edge \(row=2, col=5\) points to the future"):
        causal_attn.attention(q, k, v, future)
    with pytest.raises(ValueError, match="B=2, T=7"):
        causal_attn.attention(q, k, v, torch.zeros(2, 7, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        causal_attn.attention(q, k, v, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        causal_attn.attention(q, k, v, key_padding_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        causal_attn.attention(q, k, v, key_padding_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match="unknown backend"):
        causal_attn.attention(q, k, v, backend="cuda-magic")


def test_every_shape_family_is_covered():
    """Guard the parametrisation above against silent shrinkage."""
    Ts = {s[3] for s in SHAPES}
    ratios = {s[1] // s[2] for s in SHAPES}
    assert {1, 7, 64, 129} <= Ts and {1, 2, 4} <= ratios and {16, 64, 128} <= {s[4] for s in SHAPES}
    assert {"left", "right", "none"} <= {s[5] for s in SHAPES}
    assert {"empty", "full", "random", "none"} <= {s[6] for s in SHAPES}
    assert any(s[7] >= 30 for s in SHAPES) and len(list(itertools.product(CPU_BACKENDS, DTYPES, SHAPES))) == 72


def test_autocast_casts_inputs_as_sdpa_does():
    """Under torch.autocast the op takes q, k, v in the autocast dtype (fp32 q/k beside bf16 v, as a rotary
    embedding produces them), with the result and gradients of the same op on bf16 inputs outside autocast."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, 19, 16, generator=g) for _ in range(3))
    adj = (torch.rand(2, 19, 19, generator=g) < 0.3) & torch.ones(19, 19, dtype=torch.bool).tril(-1)
    leaves = [x.clone().requires_grad_() for x in (q, k, v.bfloat16())]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, mass = causal_attn.attention(*leaves, adj)
    (out.float().sum() + mass.sum()).backward()
    ref_leaves = [x.detach().bfloat16().requires_grad_() for x in leaves]
    ref_out, ref_mass = causal_attn.attention(*ref_leaves, adj)
    (ref_out.float().sum() + ref_mass.sum()).backward()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out) and torch.equal(mass, ref_mass), f"seed {seed}"
    for a, b in zip(leaves, ref_leaves):
        assert a.grad.dtype == a.dtype  # the cast's backward returns each gradient in its input's dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=0, atol=0, msg=f"seed {seed}")
    with pytest.raises(TypeError, match="share a dtype"):  # outside autocast mixed dtypes stay an error
        causal_attn.attention(q, k, v.bfloat16(), adj)
