"""Shared numerics of the oracle tests and benchmarks: random cases, eager low-precision baselines, the FA2 rule."""
import math
import random

import torch

from .oracle import oracle_attention


# (B, Hq, Hkv, T, D, padding, adjacency, logit_scale). Interpreter blocks are 64x32 (forward, dQ) and
# 32x64 (dK/dV), so T in {1, 33, 45, 70, 129} hits tails, several diagonal sub-blocks and off-diagonal loops;
# Hq/Hkv {1, 2, 4}; D {16, 64, 80, 128} (80 pads to 128); B=3 with padding has one all-padding sample.
TRITON_CASES = [
    (1, 1, 1, 1, 16, "none", "random", 1.0),
    (2, 2, 1, 70, 16, "left", "random", 1.0),
    (3, 4, 2, 45, 64, "right", "full", 1.0),
    (2, 2, 2, 33, 128, "none", "none", 1.0),
    (2, 4, 1, 40, 80, "left", "random", 30.0),
    (1, 2, 1, 129, 16, "none", "empty", 1.0),
]


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def cpp_kernel_only(monkeypatch) -> None:
    """Make the PyTorch path that ``cpp_backend`` hands float64 (and nothing else) to fail when called, so a
    test of the ``cpp`` backend proves that the C++ kernel ran."""
    from causal_attn.ops import blocked

    def fail(*args, **kwargs):
        raise AssertionError("the cpp backend ran the PyTorch path (blocked), not the C++ kernel")

    monkeypatch.setattr(blocked, "forward", fail)
    monkeypatch.setattr(blocked, "backward", fail)


def make_case(B, Hq, Hkv, T, D, dtype, *, padding="none", adjacency="random", logit_scale=1.0, seed=None,
              device="cpu"):
    """Random q, k, v (requires_grad), dense adjacency (or None), key padding mask (or None)."""
    seed = fresh_seed() if seed is None else seed
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, Hq, T, D, generator=g) * math.sqrt(logit_scale)).to(device=device, dtype=dtype)
    k = (torch.randn(B, Hkv, T, D, generator=g) * math.sqrt(logit_scale)).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(device=device, dtype=dtype)
    kpm = None
    if padding != "none":
        kpm = torch.ones(B, T, dtype=torch.bool)
        for b in range(B):
            p = int(torch.randint(0, max(T // 2, 1) + 1, (1,), generator=g)) if b else min(T, max(1, T // 3))
            if padding == "left":
                kpm[b, :p] = False
            else:
                kpm[b, T - p:] = False
        if B > 2:
            kpm[-1] = False  # one sample entirely padding
        kpm = kpm.to(device)
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    if adjacency == "none":
        adj = None
    elif adjacency == "empty":
        adj = torch.zeros(B, T, T, dtype=torch.bool)
    elif adjacency == "full":
        adj = tril.expand(B, T, T).clone()
    else:
        adj = (torch.rand(B, T, T, generator=g) < 0.3) & tril
    if adj is not None:
        adj = adj.to(device)
    for t in (q, k, v):
        t.requires_grad_(True)
    return q, k, v, adj, kpm, seed


def random_segments(B, T, layout, seed):
    """int64 (B, T) non-decreasing segment ids: "one" (a single segment), "ones" (every token its own),
    "random" (random lengths 1 .. T/2, so segments start anywhere, also inside and across tiles)."""
    g = torch.Generator().manual_seed(seed + 2)
    if layout == "one":
        return torch.zeros(B, T, dtype=torch.int64)
    if layout == "ones":
        return torch.arange(T).expand(B, T).clone()
    seg = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        cuts = torch.rand(T, generator=g) < (4.0 / max(T, 1) + 0.05 * b)
        cuts[0] = False
        seg[b] = torch.cumsum(cuts.long(), 0)
    return seg


def allowed_keys(T, kpm, seg, device):
    """bool (B|1, 1, T, T) mask of the tests' eager baselines: causal, real key, same segment."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    if kpm is not None:
        allowed = allowed & kpm[:, None, None, :]
    if seg is not None:
        allowed = allowed & (seg[:, None, :, None] == seg[:, None, None, :]).to(device)
    return allowed


def eager_low_precision(q, k, v, adj, kpm, scale=None, seg=None):
    """What PyTorch's own eager attention computes in q's dtype (HF style: softmax in fp32, cast back)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = torch.matmul(q, kr.transpose(-1, -2)) * scale
    allowed = allowed_keys(T, kpm, seg, q.device)
    s = s.float().masked_fill(~allowed, float("-inf"))
    has = allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~has, 0.0), -1) * has
    out = torch.matmul(p.to(q.dtype), vr)
    mass = (p.to(q.dtype).float() * (adj[:, None] & allowed)).sum(-1) if adj is not None else None
    return out, mass


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def outputs_and_grads(fn, q, k, v, w_out, w_mass):
    """Run fn -> (out, mass); return out, mass and grads of <w_out,out> + <w_mass,mass> wrt q, k, v."""
    out, mass = fn(q, k, v)
    obj = (out.double() * w_out).sum()
    if mass is not None:
        obj = obj + (mass.double() * w_mass).sum()
    grads = torch.autograd.grad(obj, (q, k, v))
    return out.detach(), (mass.detach() if mass is not None else None), grads


def fa_rule_violation(name, ours, eager, exact, atol, seed, factor=2.0):
    """FlashAttention's rule |ours - fp64| <= factor * |eager same dtype - fp64| + atol.

    Returns ``(our error, eager's error, None or the message saying how it was broken)``."""
    e_ours, e_eager = max_err(ours, exact), max_err(eager, exact)
    if not torch.isfinite(ours).all():
        return e_ours, e_eager, f"{name}: NaN/inf (seed {seed})"
    if not e_ours <= factor * e_eager + atol:
        return e_ours, e_eager, (f"{name}: error vs fp64 {e_ours:.3e} > {factor} x eager's {e_eager:.3e} + "
                                 f"{atol:.1e} (seed {seed})")
    return e_ours, e_eager, None


def assert_fa_rule(name, ours, eager, exact, atol, seed, factor=2.0):
    e_ours, e_eager, problem = fa_rule_violation(name, ours, eager, exact, atol, seed, factor)
    assert problem is None, problem
    return e_ours, e_eager


def fa_rule(name, ours, eager, exact, seed, rel_atol=1e-6, factor=2.0):
    """The same rule with ``atol = rel_atol * max|fp64|`` (model outputs and parameter gradients)."""
    return assert_fa_rule(name, ours, eager, exact, rel_atol * max(exact.abs().max().item(), 1e-3), seed,
                          factor)[0]


def recompute_slack(q, k, v, adj, kpm, w_out, w_mass, scale=None, ulps=4.0, seg=None, out_eps=0.0):
    """Allowance for a backward that recomputes ``s = q k^T`` and rounds it differently from the forward.

    A flash backward never stores P: it recomputes ``P = exp(s - LSE)``, and when its matrix product sums in
    another order than the forward's (Triton's interpreter runs ``tl.dot`` as numpy/OpenBLAS ``matmul``,
    whose order changes with tile shape and operand layout) each ``s_ij`` moves by up to a few fp32 ulps of
    ``scale * sum_d |q_id k_jd|``, and P by that relative amount. Eager attention keeps P and has no such
    term, so with large logits in fp32 it alone would set a yardstick no recomputing kernel can meet.
    Returns {"dq", "dk", "dv": max over elements of the root-sum-square of the propagated changes} (fp64;
    negligible next to ATOL for unit-scale logits).

    ``out_eps``: the machine epsilon of the stored output. A flash backward takes ``D_i = dO_i . O_i`` from the
    output as stored, rounded to the input dtype (FlashAttention does the same), while eager's softmax backward
    uses its fp32 P; ``D_i`` then moves by about ``out_eps / 2 * sqrt(sum_d (dO_id O_id)^2)`` (independent
    roundings, root-sum-square like the rest), every ``dS_ij`` of the row by ``P_ij`` times that, and ``dQ_i`` by
    their coherent sum over ``j``. With bf16 inputs and large logits (P
    nearly one-hot, ``dP_ij - D_i`` a difference of two large numbers) this term sets the floor."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    q, k, v = (t.detach().double() for t in (q, k, v))
    kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    allowed = allowed_keys(T, kpm, seg, q.device)
    s = (q @ kr.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)
    dprob = p * (ulps * torch.finfo(torch.float32).eps / 2 * scale * (q.abs() @ kr.abs().transpose(-1, -2)))
    a = (adj[:, None] & allowed).double() if adj is not None else torch.zeros_like(p)
    g = w_mass.double()[..., None] if adj is not None else torch.zeros_like(p[..., :1])
    out = p @ vr
    big_d = (w_out * out).sum(-1, keepdim=True) + g * (p * a).sum(-1, keepdim=True)
    dscore = dprob * (w_out @ vr.transpose(-1, -2) + g * a - big_d).abs()  # change of dS = P (dP_ij - D_i)
    rss = lambda x, y: (x.square() @ y.square()).sqrt()  # noqa: E731  sqrt(sum_i x_ji^2 y_i^2)
    group = lambda t: t.view(B, -1, G, T, D).square().sum(2).sqrt()  # noqa: E731  GQA heads share k, v
    d_moves = out_eps / 2 * (w_out * out).square().sum(-1, keepdim=True).sqrt()  # change of D_i from the stored O
    return {"dq": (rss(dscore, kr.abs() * scale) + d_moves * (p @ kr.abs()) * scale).max().item(),
            "dk": group(rss(dscore.transpose(-1, -2), q.abs() * scale)
                        + rss((p * d_moves).transpose(-1, -2), q.abs() * scale)).max().item(),
            "dv": group(rss(dprob.transpose(-1, -2), w_out.abs())).max().item()}


ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3, torch.float64: 1e-10}


def check_against_oracle(run, q, k, v, adj, kpm, seed, scale=None, failures=None, seg=None, slack=None):
    """Compare ``run(q, k, v) -> (out, mass)`` with the fp64 oracle and eager in the same dtype
    (``seg``: packed segment ids, given to both; ``slack``: {quantity: extra absolute allowance}).

    Returns {quantity: (our error, eager error)}. Every quantity is checked; broken rules raise one
    AssertionError naming all of them, or, with a ``failures`` list, are appended to it instead."""
    dtype = q.dtype
    g = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(q.shape, generator=g, dtype=torch.float64).to(q.device)
    w_mass = torch.randn(q.shape[:3], generator=g, dtype=torch.float64).to(q.device)
    exact = outputs_and_grads(lambda a, b, c: oracle_attention(a, b, c, adj, kpm, scale, seg), q, k, v, w_out, w_mass)
    eager = outputs_and_grads(lambda a, b, c: eager_low_precision(a, b, c, adj, kpm, scale, seg), q, k, v, w_out,
                              w_mass)
    ours = outputs_and_grads(run, q, k, v, w_out, w_mass)
    _check_output_types(ours, q, adj)
    extra = slack or {}
    slack = recompute_slack(q, k, v, adj, kpm, w_out, w_mass, scale, seg=seg, out_eps=torch.finfo(dtype).eps)
    flat = lambda r: [r[0], r[1], *r[2]]  # noqa: E731

    def atol(name):  # gradients sum over up to T terms of magnitude ~|w|: scale the absolute slack with T
        grad_scale = 1 if name in ("out", "mass") else max(4.0, q.shape[2] ** 0.5)
        return ATOL[dtype] * grad_scale + slack.get(name, 0.0) + extra.get(name, 0.0)

    return _apply_rule(["out", "mass", "dq", "dk", "dv"], flat(ours), flat(eager), flat(exact), atol, seed, failures)


def _check_output_types(ours, q, adj):
    assert ours[0].dtype == q.dtype and ours[0].shape == q.shape
    if adj is None:
        assert ours[1] is None
    else:
        assert ours[1].dtype == torch.float32 and ours[1].shape == q.shape[:3]


def _apply_rule(names, ours, eager, exact, atol, seed, failures):
    """FlashAttention's rule per quantity (``atol(name)``); raise one AssertionError naming every broken rule, or
    append them to ``failures``. Returns {name: (our error, eager's error)}."""
    errs, problems = {}, []
    for name, o, e, x in zip(names, ours, eager, exact):
        if x is None:
            continue
        e_ours, e_eager, problem = fa_rule_violation(name, o, e, x, atol(name), seed)
        errs[name] = (e_ours, e_eager)
        if problem:
            problems.append(problem)
    if failures is not None:
        failures += problems
    else:
        assert not problems, "; ".join(problems)
    return errs


def lse_difference_slack(q, k, kpm, scale=None, seg=None, ulps=4.0):
    """Allowance for a mass computed as ``exp(LSE_S - LSE_all)`` from two fp32 log-sum-exps (backend "flex").

    Each LSE is rounded at its own magnitude, so ``mass_i`` moves by about ``mass_i * ulps * eps32 / 2 *
    |LSE_i|``: with 30x logits |LSE| reaches ~100 and the mass error ~1e-5, where eager, which normalises P
    before summing, stays near 1e-6. A property of the recipe, not of a kernel. Returns {"mass": max over rows}."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    kr = k.detach().double().repeat_interleave(G, 1)
    s = (q.detach().double() @ kr.transpose(-1, -2) * scale).masked_fill(~allowed_keys(T, kpm, seg, q.device),
                                                                          float("-inf"))
    lse = torch.logsumexp(s, -1)
    worst = lse[torch.isfinite(lse)].abs().max().item() if torch.isfinite(lse).any() else 0.0
    return {"mass": ulps * torch.finfo(torch.float32).eps / 2 * worst}


def check_forward_against_oracle(run, q, k, v, adj, kpm, seed, scale=None, failures=None, seg=None, slack=None):
    """:func:`check_against_oracle` for the outputs only, on detached inputs and without autograd (a backend
    with no backward on this device, e.g. FlexAttention on CPU). ``slack``: {quantity: extra absolute
    allowance} (e.g. :func:`lse_difference_slack`). Returns {"out"/"mass": (ours, eager)}."""
    q, k, v = (t.detach() for t in (q, k, v))
    with torch.no_grad():
        exact = oracle_attention(q, k, v, adj, kpm, scale, seg)
        eager = eager_low_precision(q, k, v, adj, kpm, scale, seg)
        ours = run(q, k, v)
    _check_output_types(ours, q, adj)
    extra = slack or {}
    return _apply_rule(["out", "mass"], ours, eager, exact, lambda name: ATOL[q.dtype] + extra.get(name, 0.0), seed,
                       failures)


# Packed-sequence cases (B, Hq, Hkv, T, D, padding, segments, logit_scale), shared by the CPU backends'
# tests and the Triton interpreter tests: one segment, length-1 segments, random layouts crossing the
# 64/32-row tiles, GQA, trailing padding of a packed row, large logits.
SEGMENT_CASES = [
    (2, 2, 1, 70, 16, "none", "random", 1.0),
    (3, 4, 2, 129, 32, "right", "random", 1.0),
    (1, 2, 2, 45, 16, "none", "ones", 1.0),
    (2, 2, 1, 33, 64, "none", "one", 1.0),
    (2, 4, 1, 97, 16, "none", "random", 30.0),
]
