"""CausalGraph: packing, counts, validation, padding and batching."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causal_attn import CausalGraph
from causal_attn.ops.graph import as_graph, pack_bits, popcount, unpack_bits


def random_dense(B, T, p=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, T, T, generator=g) < p) & torch.ones(T, T, dtype=torch.bool).tril()


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 100), p=st.floats(0, 1), seed=st.integers(0, 10**6))
def test_dense_round_trip_and_counts(B, T, p, seed):
    dense = random_dense(B, T, p, seed)
    g = CausalGraph.from_dense(dense)
    assert g.packed.dtype == torch.int32 and g.packed.shape == (B, T, (T + 31) // 32)
    assert torch.equal(g.to_dense(), dense)
    # bit j % 32 of word j // 32 (checked independently of pack_bits for one set entry)
    if dense.any():
        b, i, j = (int(x) for x in dense.nonzero()[-1])
        word = int(g.packed[b, i, j // 32]) & 0xFFFFFFFF
        assert (word >> (j % 32)) & 1 == 1
    kpm = torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < 0.7
    c, n = g.counts(kpm)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & kpm[:, None, :]
    assert torch.equal(c, (dense & allowed).sum(-1).int())
    assert torch.equal(n, allowed.sum(-1).int())
    c0, n0 = g.counts()
    assert torch.equal(c0, dense.sum(-1).int()) and torch.equal(n0[0], torch.arange(1, T + 1).int())


def test_sign_bit_and_popcount():
    dense = torch.zeros(1, 1, 64, dtype=torch.bool)
    dense[0, 0, [0, 31, 32, 63]] = True
    words = pack_bits(dense)
    assert words.tolist() == [[[1 - 2**31, 1 - 2**31]]]  # bits 0 and 31 -> 0x80000001 as int32
    assert popcount(words).item() == 4
    assert torch.equal(unpack_bits(words, 64), dense)


def test_from_edges_matches_dense_and_validates():
    T = 40
    edges = [[(5, 0), (5, 5), (39, 38)], [], [(10, 3), (10, 3)]]
    g = CausalGraph.from_edges(edges, T)
    dense = torch.zeros(3, T, T, dtype=torch.bool)
    dense[0, 5, 0] = dense[0, 5, 5] = dense[0, 39, 38] = dense[2, 10, 3] = True
    assert torch.equal(g.to_dense(), dense)
    assert g.num_edges == 4
    with pytest.raises(ValueError, match=r"sample 1: edge \(row=3, col=4\) points to the future"):
        CausalGraph.from_edges([[(1, 0)], [(3, 4)]], T)
    with pytest.raises(ValueError, match=r"sample 0: edge \(row=40, col=1\) outside \[0, 40\)"):
        CausalGraph.from_edges([[(40, 1)]], T)
    with pytest.raises(ValueError, match=r"sample 0: edge \(row=2, col=-1\) outside"):
        CausalGraph.from_edges([[(2, -1)]], T)
    with pytest.raises(ValueError, match="not a \\(row, col\\) pair"):
        CausalGraph.from_edges([[(1, 2, 3)]], T)
    lenient = CausalGraph.from_edges([[(3, 4), (3, 1), (50, 0)]], T, strict=False)
    assert lenient.dropped == 2 and lenient.num_edges == 1


def test_from_dense_validation():
    with pytest.raises(TypeError, match="torch.bool"):
        CausalGraph.from_dense(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(B, T, T\)"):
        CausalGraph.from_dense(torch.zeros(1, 4, 5, dtype=torch.bool))
    bad = torch.zeros(2, 4, 4, dtype=torch.bool)
    bad[1, 0, 3] = True
    with pytest.raises(ValueError, match=r"sample 1: edge \(row=0, col=3\)"):
        CausalGraph.from_dense(bad)
    g = CausalGraph.from_dense(bad, strict=False)
    assert g.dropped == 1 and g.num_edges == 0
    assert CausalGraph.from_dense(torch.eye(3, dtype=torch.bool)).batch_size == 1


def test_pad_cat_index_and_device():
    a = random_dense(1, 10, seed=1)
    b = random_dense(2, 37, seed=2)
    ga, gb = CausalGraph.from_dense(a), CausalGraph.from_dense(b)
    right = ga.pad_to(37)
    assert torch.equal(right.to_dense()[:, :10, :10], a) and right.to_dense()[:, 10:].sum() == 0
    left = ga.pad_to(37, side="left")
    assert torch.equal(left.to_dense()[:, 27:, 27:], a) and left.num_edges == ga.num_edges
    both = CausalGraph.cat([ga, gb])
    assert both.batch_size == 3 and both.seq_len == 37
    assert torch.equal(both.to_dense()[1:], b) and torch.equal(both[0].to_dense(), right.to_dense())
    assert torch.equal(both.row_counts, both.to_dense().sum(-1).int())
    assert both.to("cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="cannot pad"):
        gb.pad_to(5)
    with pytest.raises(ValueError, match="side"):
        ga.pad_to(40, side="middle")


def test_as_graph_coerces_and_checks_only_what_it_is_given():
    dense = random_dense(2, 5, seed=3)
    g = as_graph(dense)
    assert torch.equal(g.to_dense(), dense) and as_graph(g) is g and as_graph(None) is None
    assert as_graph(dense, 2, 5, "cpu").num_edges == g.num_edges
    with pytest.raises(ValueError, match="B=2, T=5 but the inputs have B=2, T=6"):
        as_graph(g, 2, 6)
    with pytest.raises(ValueError, match="is on cpu"):
        as_graph(g, 2, 5, "meta")
    with pytest.raises(TypeError, match="adj.bool"):  # 0/1 integers: the hint, not a silent cast
        as_graph(dense.long())
    with pytest.raises(TypeError, match="CausalGraph or a bool tensor"):
        as_graph([[(1, 0)]])
