"""``torch.library.opcheck`` of the custom ops ``causal_attn::attention_fwd`` / ``attention_bwd`` on every backend
that runs here, with the layouts a Hugging Face model really passes: q/k/v as (B, H, T, D) transposed views of
(B, T, H, D) projections, GQA, left padding, packed segments, fp32 and bf16, with and without adjacency and map.

opcheck runs the op eagerly and compares with its fake (meta) kernel (shapes, dtypes and strides), checks the
schema's aliasing and mutation claims, the autograd registration, and AOT dispatch with dynamic shapes."""
import pytest
import torch

from causal_attn.ops.attention import attention_bwd, attention_fwd, resolve_backend
from causal_attn.ops.graph import CausalGraph, segment_starts
from causal_attn.testing.numerics import fresh_seed, random_segments

BACKENDS = ["torch", "cpp"]  # and "triton" on CUDA: test_opcheck_triton_on_cuda


def model_layout(B, H, T, D, dtype, g):
    """(B, H, T, D) view of a (B, T, H, D) tensor, as ``proj(x).view(B, T, H, D).transpose(1, 2)`` gives."""
    return torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2).requires_grad_(True)


def op_inputs(*, dtype=torch.float32, gqa=True, padding=False, packed=False, adjacency=True, T=37, seed=None,
              device="cpu"):
    seed = fresh_seed() if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    B, Hq, D = 2, 4, 16
    Hkv = 2 if gqa else Hq
    q, k, v = (model_layout(B, h, T, D, dtype, g).detach().to(device).requires_grad_(True) for h in (Hq, Hkv, Hkv))
    kpm = None
    if padding:
        kpm = torch.ones(B, T, dtype=torch.bool)
        kpm[1, :T // 3] = False
    seg_start = segment_starts(random_segments(B, T, "random", seed), B, T, "cpu") if packed else None
    bits = None
    if adjacency:
        dense = (torch.rand(B, T, T, generator=g) < 0.3).tril()
        if seg_start is not None:
            dense &= torch.arange(T) >= seg_start[:, :, None]
        bits = CausalGraph.from_dense(dense).packed
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return q, k, v, move(bits), move(kpm), move(seg_start), seed


CASES = {  # name -> op_inputs keywords
    "fp32 gqa adjacency": dict(),
    "fp32 mha padded no-adjacency": dict(gqa=False, padding=True, adjacency=False),
    "fp32 gqa padded adjacency": dict(padding=True),
    "fp32 gqa packed adjacency": dict(packed=True),
    "fp32 gqa packed no-adjacency": dict(packed=True, adjacency=False),
    "bf16 gqa padded adjacency": dict(dtype=torch.bfloat16, padding=True),
    "bf16 gqa packed adjacency": dict(dtype=torch.bfloat16, packed=True),
}


def _opcheck_both_ops(backend, case, device="cpu"):
    q, k, v, bits, kpm, seg_start, seed = op_inputs(**CASES[case], device=device)
    scale = q.shape[-1] ** -0.5
    for want_map in (False, True):
        torch.library.opcheck(attention_fwd, (q, k, v, bits, kpm, seg_start, scale, backend, want_map))
    with torch.no_grad():
        out, lse, mass, _ = attention_fwd(q, k, v, bits, kpm, seg_start, scale, backend, False)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g).to(device=device, dtype=q.dtype)
    dmass = torch.randn(mass.shape, generator=g).to(device) if bits is not None else None
    torch.library.opcheck(attention_bwd, (q.detach(), k.detach(), v.detach(), out, lse, mass, dout, dmass, bits, kpm,
                                          seg_start, scale, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_opcheck_forward_and_backward(backend, case):
    name = resolve_backend("cpu" if backend == "cpp" else backend, torch.device("cpu"))
    if name != backend:
        pytest.skip(f"backend {backend!r} is not available here")
    _opcheck_both_ops(backend, case)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton backend runs on CUDA")
@pytest.mark.parametrize("case", CASES)
def test_opcheck_triton_on_cuda(case):
    _opcheck_both_ops("triton", case, "cuda")


def test_fake_backward_matches_real_layout():
    """The regression behind issue 31: the fake gave dq q's (transposed) strides, the kernel contiguous ones."""
    q, k, v, bits, kpm, seg_start, _ = op_inputs(padding=True)
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        out, lse, mass, _ = attention_fwd(q, k, v, bits, kpm, seg_start, scale, "torch", False)
    args = (q.detach(), k.detach(), v.detach(), out, lse, mass, torch.randn(out.shape), None, bits, kpm, seg_start,
            scale, "torch")
    real = attention_bwd(*args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = attention_bwd(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
