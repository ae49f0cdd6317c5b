"""Packed (padding-free) rows: attention(..., segment_ids=) per backend vs the fp64 oracle with
block-diagonal causal masks, graph packing, the loss of a packed batch vs the same samples padded."""
import pytest
import torch

import causal_attn
from causal_attn import CausalGraph, re_attention_loss
from causal_attn.ops.attention import get_backend
from causal_attn.testing.numerics import (SEGMENT_CASES, check_against_oracle, cpp_kernel_only, fresh_seed, make_case,
                                          random_segments)

CPU_BACKENDS = ["reference", "torch", "cpp"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _require(backend):
    if backend == "cpp" and get_backend("cpp") is None:
        pytest.skip("C++ CPU extension not built here")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SEGMENT_CASES, ids=lambda s: "B{}-H{}/{}-T{}-D{}-{}-{}-x{:g}".format(*s))
def test_segments_match_fp64_oracle(backend, dtype, case):
    _require(backend)
    B, Hq, Hkv, T, D, padding, layout, logit_scale = case
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, logit_scale=logit_scale)
    seg = random_segments(B, T, layout, seed)

    def run(a, b, c):
        return causal_attn.attention(a, b, c, adj, key_padding_mask=kpm, segment_ids=seg, backend=backend)

    check_against_oracle(run, q, k, v, adj, kpm, seed, seg=seg)


def _segments(lengths):
    return torch.stack([torch.repeat_interleave(torch.arange(len(n)), torch.tensor(n)) for n in lengths])


def test_small_blocks_skip_keys_exactly():
    """The PyTorch path (blocked) with 16-row blocks: segments start inside and at block edges (key ranges
    start at lo > 0); float64 against the reference with the same segments."""
    from causal_attn.ops import blocked, reference

    q, k, v, adj, kpm, seed = make_case(2, 2, 1, 50, 16, torch.float64)
    seg = _segments([[7, 13, 1, 19, 10], [16, 16, 2, 15, 1]])  # starts inside and at block edges
    starts = causal_attn.ops.graph.segment_starts(seg, 2, 50, "cpu")
    assert any(lo > 0 for _, _, lo in blocked.key_ranges(50, 16, starts)), "layout never skips a key block"
    packed = CausalGraph.from_dense(adj).packed
    out, lse, mass = blocked.forward(q, k, v, packed, None, starts, 0.25, block=16)
    ref_out, ref_mass, _ = reference.reference_forward(q, k, v, CausalGraph.from_dense(adj), None, 0.25, starts)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")
    torch.testing.assert_close(mass, ref_mass, rtol=0, atol=1e-12, msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("Hq,Hkv,groups", [(2, 2, 1), (8, 1, 3)])
def test_cpp_tiles_skip_keys_and_match_fp64_oracle(monkeypatch, Hq, Hkv, groups):
    """The C++ kernel (float32) on packed rows whose 64-row query tiles start reading keys after column 0, one of
    them past a whole 256-column key tile: outputs and gradients vs the fp64 oracle, with one query group per
    (batch, kv head) and with three (partial dK, dV that skip keys too, summed at the end)."""
    _require("cpp")
    cpp_kernel_only(monkeypatch)
    T = 300
    assert torch.ops.causal_attn_cpp.plan(2, Hq, Hkv, T)[0] == groups
    q, k, v, adj, kpm, seed = make_case(2, Hq, Hkv, T, 16, torch.float32)
    seg = _segments([[40, 30, 70, 60, 100], [100, 156, 1, 43]])  # sample 1: a segment starts at row 256
    starts = causal_attn.ops.graph.segment_starts(seg, 2, T, "cpu")
    first_keys = [int(starts[b, i0]) & ~31 for b in range(2) for i0 in range(0, T, 64)]
    assert max(first_keys) >= 256, "layout never skips a whole key tile"

    def run(a, b, c):
        return causal_attn.attention(a, b, c, adj, key_padding_mask=kpm, segment_ids=seg, backend="cpp")

    check_against_oracle(run, q, k, v, adj, kpm, seed, seg=seg)


def _samples(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [CausalGraph.from_dense((torch.rand(n, n, generator=g) < 0.3).tril()) for n in lengths]


def test_pack_offsets_edges_and_marks_segments():
    graphs = _samples([5, 3, 7], seed=0)
    packed = CausalGraph.pack([[graphs[0], graphs[1]], [graphs[2]]], seq_len=9)
    assert packed.segment_ids.tolist() == [[0] * 5 + [1] * 3 + [2], [0] * 7 + [1] * 2]
    dense = packed.to_dense()
    assert torch.equal(dense[0, :5, :5], graphs[0].to_dense()[0])
    assert torch.equal(dense[0, 5:8, 5:8], graphs[1].to_dense()[0])
    assert torch.equal(dense[1, :7, :7], graphs[2].to_dense()[0])
    assert packed.num_edges == sum(g.num_edges for g in graphs)
    c, n = packed.counts()
    assert n[0].tolist() == [1, 2, 3, 4, 5, 1, 2, 3, 1]
    with pytest.raises(ValueError, match="shorter than the longest"):
        CausalGraph.pack([graphs], seq_len=10)


def test_decreasing_segment_ids_are_an_error():
    q = torch.randn(1, 1, 6, 8)
    with pytest.raises(ValueError, match="decrease within row 0"):
        causal_attn.attention(q, q, q, segment_ids=torch.tensor([[0, 0, 1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        causal_attn.attention(q, q, q, segment_ids=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        causal_attn.attention(q, q, q, segment_ids=torch.zeros(1, 6))


def test_cross_segment_edges_are_ignored_and_uncounted():
    """An adjacency given beside segment ids may name keys of another sample: not allowed, so neither in the
    mass nor in c_i (SPEC §2: entries outside the allowed set are ignored everywhere)."""
    T = 10
    seg = torch.tensor([[0] * 4 + [1] * 6])
    adj = torch.ones(1, T, T, dtype=torch.bool).tril()
    graph = CausalGraph.from_dense(adj)
    c, n = graph.counts(seg_start=causal_attn.ops.graph.segment_starts(seg, 1, T, "cpu"))
    assert c.tolist() == n.tolist() == [[1, 2, 3, 4, 1, 2, 3, 4, 5, 6]]
    q = torch.randn(1, 2, T, 8)
    _, mass = causal_attn.attention(q, q, q, graph, segment_ids=seg, backend="torch")
    torch.testing.assert_close(mass, torch.ones_like(mass))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_loss_equals_padded_loss(backend, monkeypatch):
    """Same samples packed into one row vs padded into a batch: masses per row and the loss agree (float64 on the
    PyTorch paths; float32 for cpp, whose kernel never sees float64)."""
    _require(backend)
    if backend == "cpp":
        cpp_kernel_only(monkeypatch)
    dtype = torch.float32 if backend == "cpp" else torch.float64
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 1, 17, 5]
    graphs = _samples(lengths, seed=seed)
    Tpad, Tpack = max(lengths), sum(lengths)
    qs = [torch.randn(1, 4, n, 16, generator=g, dtype=dtype) for n in lengths]
    ks = [torch.randn(1, 2, n, 16, generator=g, dtype=dtype) for n in lengths]
    pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, Tpad - x.shape[2]))  # noqa: E731
    qp, kp = torch.cat([pad(x) for x in qs]), torch.cat([pad(x) for x in ks])
    kpm = torch.zeros(len(lengths), Tpad, dtype=torch.bool)
    for b, n in enumerate(lengths):
        kpm[b, :n] = True
    padded_graph = CausalGraph.cat(graphs)
    _, mass_pad = causal_attn.attention(qp, kp, kp, padded_graph, key_padding_mask=kpm, backend=backend)
    packed_graph = CausalGraph.pack([graphs])
    _, mass_pack = causal_attn.attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(ks, 2), packed_graph,
                                         backend=backend)
    msg = lambda m: f"seed {seed}: {m}"  # noqa: E731
    per_row = torch.cat([mass_pad[b, :, :n] for b, n in enumerate(lengths)], 1)
    torch.testing.assert_close(mass_pack[0], per_row, msg=msg)
    for reduction in ("mean", "sum"):
        want = re_attention_loss([mass_pad], padded_graph, alpha=2.0, key_padding_mask=kpm, reduction=reduction)
        got = re_attention_loss([mass_pack], packed_graph, alpha=2.0, reduction=reduction)
        torch.testing.assert_close(got, want, msg=msg)
    assert Tpack == mass_pack.shape[-1]
