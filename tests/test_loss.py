"""re_attention_loss vs the authors' construction: explicit averaged maps and two row means."""
import pytest
import torch

import causal_attn
from causal_attn import CausalGraph, re_attention_loss
from causal_attn.testing.oracle import oracle_attention


def authors_loss(maps, adj, kpm, alpha, reduction, kind):
    """maps: list over layers of (B, H, T, T) attention maps. Mean over layers and heads, then per row the
    mean attention on annotated keys (C) and on the other allowed keys (N)."""
    abar = torch.stack(maps).mean(dim=(0, 2))  # (B, T, T)
    B, T, _ = abar.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & kpm[:, None, :]
    causal, other = adj & allowed, ~adj & allowed
    terms = []
    for b in range(B):
        for i in range(T):
            c, o = int(causal[b, i].sum()), int(other[b, i].sum())
            if not kpm[b, i] or c == 0 or o == 0:
                continue
            C = abar[b, i][causal[b, i]].mean()
            N = abar[b, i][other[b, i]].mean()
            R = C / N
            if kind == "hinge":
                terms.append(torch.relu(alpha - R))
            else:
                terms.append(-torch.log1p(C) / torch.log1p(N) if R < alpha else R * 0)
    if not terms:
        return abar.sum() * 0
    t = torch.stack(terms)
    return t.mean() if reduction == "mean" else t.sum()


def maps_and_masses(L, B, H, T, D, adj, kpm, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(3, B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(L)]
    maps, masses = [], []
    for p in params:
        q, k, v = p
        _, mass = causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend="torch")
        masses.append(mass)
        # explicit map from the oracle, row by row: P = d out / d v is awkward; rebuild P directly
        s = (q @ k.transpose(-1, -2)) / D ** 0.5
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & kpm[:, None, None, :]
        maps.append(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0))
    return params, maps, masses


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["hinge", "div"])
def test_loss_and_gradient_match_authors_construction(reduction, kind):
    L, B, H, T, D = 3, 2, 2, 23, 8
    seed = int(torch.randint(0, 2**31, (1,)))
    g = torch.Generator().manual_seed(seed)
    adj = (torch.rand(B, T, T, generator=g) < 0.3) & torch.ones(T, T, dtype=torch.bool).tril()
    adj[0, 5] = torch.arange(T) <= 5  # a row with c = n: excluded
    kpm = torch.ones(B, T, dtype=torch.bool)
    kpm[1, :4] = False
    params, maps, masses = maps_and_masses(L, B, H, T, D, adj, kpm, seed)
    alpha = 1.5  # random maps sit near R = 1: some rows above, some below
    ours = re_attention_loss(masses, CausalGraph.from_dense(adj), alpha=alpha, key_padding_mask=kpm,
                             reduction=reduction, kind=kind)
    ref = authors_loss(maps, adj, kpm, alpha, reduction, kind)
    assert ours.item() != 0
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7, msg=f"seed {seed}")
    g_ours = torch.autograd.grad(ours, params)
    g_ref = torch.autograd.grad(ref, params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7, msg=f"seed {seed}")


def test_stacked_tensor_equals_list_and_stats():
    B, H, T = 2, 3, 9
    adj = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T).clone()
    adj[:, :, 0] = False  # row 0 then has c = 0
    masses = [torch.rand(B, H, T) * 0.5 for _ in range(4)]
    a = re_attention_loss(masses, adj, alpha=5.0)
    b, st = re_attention_loss(torch.stack(masses), adj, alpha=5.0, return_stats=True)
    assert torch.equal(a, b)
    assert not st.rows[:, 0].any() and st.rows[:, 1:].all()


def test_no_eligible_row_gives_zero_with_gradient_path_and_no_nan():
    B, H, T = 1, 2, 5
    mass = torch.rand(B, H, T, requires_grad=True)
    empty = torch.zeros(B, T, T, dtype=torch.bool)
    loss = re_attention_loss([mass], empty, alpha=1.0)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(mass.grad, torch.zeros_like(mass))
    # mass of exactly 1 (all attention on causal keys): clamp keeps it finite
    adj = torch.zeros(B, T, T, dtype=torch.bool)
    adj[0, 3, 1] = True
    one = torch.ones(B, H, T, requires_grad=True)
    for kind in ("hinge", "div"):
        loss = re_attention_loss([one], adj, alpha=1.0, kind=kind)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(one.grad).all()


def test_loss_argument_errors():
    m = torch.rand(1, 2, 4)
    adj = torch.zeros(1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="reduction"):
        re_attention_loss([m], adj, alpha=1, reduction="avg")
    with pytest.raises(ValueError, match="kind"):
        re_attention_loss([m], adj, alpha=1, kind="ratio")
    with pytest.raises(ValueError, match="empty"):
        re_attention_loss([], adj, alpha=1)
    with pytest.raises(ValueError, match="same shape"):
        re_attention_loss([m, torch.rand(1, 2, 5)], adj, alpha=1)
    with pytest.raises(ValueError, match="T=4"):
        re_attention_loss([torch.rand(1, 2, 6)], adj, alpha=1)


def test_explicit_maps_agree_with_oracle_mass():
    """Ties the loss test's explicit maps to the independent oracle used elsewhere."""
    B, H, T, D = 1, 2, 11, 4
    adj = (torch.rand(B, T, T) < 0.5) & torch.ones(T, T, dtype=torch.bool).tril()
    kpm = torch.ones(B, T, dtype=torch.bool)
    params, maps, masses = maps_and_masses(1, B, H, T, D, adj, kpm, 0)
    _, oracle_mass = oracle_attention(*params[0], adj, kpm)
    torch.testing.assert_close((maps[0] * adj[:, None]).sum(-1), oracle_mass)
    torch.testing.assert_close(masses[0], oracle_mass)
