"""backend="flex" (CAT on FlexAttention, mass from two LSEs): forward (out, mass) against the fp64 oracle on CPU
with FlashAttention's rule, the gradient-safe mass formula, the refusals, patch_model on Flex, the backend
registry's import layering, and the backward against the oracle on CUDA (the only device Flex differentiates on)."""
import ast
import math
import os
import weakref

import pytest
import torch

import causal_attn
from causal_attn import CausalGraph, patch_model
from causal_attn.ops.attention import get_backend
from causal_attn.testing.numerics import (SEGMENT_CASES, check_against_oracle, check_forward_against_oracle, fresh_seed,
                                          lse_difference_slack, make_case, random_segments)

pytestmark = pytest.mark.skipif(get_backend("flex") is None, reason="this torch has no FlexAttention")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, Hq, Hkv, T, D, padding, adjacency, logit_scale): T 1 / 33 / 45 / 70 / 129 (odd, past Flex's 128-blocks),
# GQA 2:1 and 4:1, left padding with an all-padding sample (B=3), right padding, empty / full / random / no
# adjacency, logits 30x the unit scale
CASES = [
    (1, 1, 1, 1, 16, "none", "random", 1.0),
    (3, 4, 2, 45, 16, "left", "random", 1.0),
    (2, 4, 1, 70, 32, "right", "full", 1.0),
    (2, 2, 2, 33, 64, "none", "empty", 1.0),
    (3, 2, 1, 129, 16, "left", "random", 30.0),
    (2, 4, 2, 64, 16, "right", "none", 1.0),
]
ids = lambda s: "B{}-H{}/{}-T{}-D{}-{}-{}-x{:g}".format(*s)  # noqa: E731


def _flex(adj, kpm, seg=None):
    return lambda q, k, v: causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, segment_ids=seg, backend="flex")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_forward_matches_fp64_oracle(dtype, case):
    B, Hq, Hkv, T, D, padding, adjacency, logit_scale = case
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, adjacency=adjacency,
                                        logit_scale=logit_scale)
    check_forward_against_oracle(_flex(adj, kpm), q, k, v, adj, kpm, seed, slack=lse_difference_slack(q, k, kpm))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SEGMENT_CASES[:2] + SEGMENT_CASES[4:], ids=ids)
def test_packed_segments_match_fp64_oracle(dtype, case):
    B, Hq, Hkv, T, D, padding, layout, logit_scale = case
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, logit_scale=logit_scale)
    seg = random_segments(B, T, layout, seed)
    check_forward_against_oracle(_flex(adj, kpm, seg), q, k, v, adj, kpm, seed, seg=seg,
                                 slack=lse_difference_slack(q, k, kpm, seg=seg))


def test_rows_without_keys_or_adjacency_give_zero():
    q, k, v, adj, kpm, seed = make_case(3, 4, 2, 50, 16, torch.bfloat16, padding="left", logit_scale=900.0)
    with torch.no_grad():
        out, mass = causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend="flex")
    assert torch.isfinite(out.float()).all() and torch.isfinite(mass).all(), f"seed {seed}"
    allowed = torch.ones(50, 50, dtype=torch.bool).tril() & kpm[:, None, :]
    no_key = ~allowed.any(-1)
    no_adj = ~(adj & allowed).any(-1)
    assert no_key.any() and (no_adj & ~no_key).any(), f"the case lacks the rows under test (seed {seed})"
    assert (out.float().abs().sum(-1)[no_key[:, None].expand(-1, 4, -1)] == 0).all(), f"seed {seed}"
    assert (mass[no_adj[:, None].expand(-1, 4, -1)] == 0).all(), f"seed {seed}"


def test_mass_from_lse_is_zero_with_a_finite_gradient_where_lse_s_is_minus_inf():
    from causal_attn.ops.flex import mass_from_lse

    inf = math.inf
    lse_all = torch.tensor([1.5, 0.3, -inf, 2.0], requires_grad=True)
    lse_s = torch.tensor([0.5, -inf, -inf, 2.0], requires_grad=True)
    mass = mass_from_lse(lse_all, lse_s)
    mass.backward(torch.ones(4))
    assert torch.equal(mass.detach(), torch.tensor([math.exp(-1.0), 0.0, 0.0, 1.0]))
    assert torch.equal(lse_s.grad, torch.tensor([math.exp(-1.0), 0.0, 0.0, 1.0]))
    assert torch.equal(lse_all.grad, -lse_s.grad)


def test_refuses_cpu_backward_and_attention_maps_with_a_fix():
    q, k, v, adj, kpm, seed = make_case(2, 2, 1, 20, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="no backward on cpu.*torch.no_grad"):
        causal_attn.attention(q, k, v, adj, backend="flex")
    with torch.no_grad(), pytest.raises(ValueError, match="cannot collect the attention map"):
        causal_attn.attention(q, k, v, adj, backend="flex", attn_map=torch.zeros(2, 20, 20))


def test_block_masks_are_reused_for_one_adjacency_and_rebuilt_after_an_edit():
    from causal_attn.ops import flex

    q, k, v, adj, kpm, seed = make_case(2, 2, 1, 40, 16, torch.float32, padding="left")
    graph = CausalGraph.from_dense(adj)
    first = flex.block_masks(graph, kpm, None, 2, 40, q.device)
    assert flex.block_masks(graph, kpm.clone(), None, 2, 40, q.device) is first  # equal padding: reused
    graph.packed[0, 30] ^= 1  # an in-place edit bumps the version: rebuilt, and the mass follows the edit
    assert flex.block_masks(graph, kpm, None, 2, 40, q.device) is not first
    check_forward_against_oracle(_flex(graph, kpm), q, k, v, graph.to_dense(), kpm, seed)


def test_mask_cache_is_bounded_thread_safe_and_lets_adjacencies_go():
    """Threads share the cache (each result equals a single-threaded one); an adjacency's block masks go with its
    graph, at most PER_GRAPH per graph; those without adjacency stay within MAX_PLAIN."""
    import gc
    from concurrent.futures import ThreadPoolExecutor

    from causal_attn.ops import flex

    cases = [make_case(2, 2, 1, T, 16, torch.float32, padding="left") for T in (24, 40, 57)]
    graphs = [CausalGraph.from_dense(c[3]) for c in cases]

    def run(i):
        q, k, v, _, kpm, _ = cases[i % 3]
        with torch.no_grad():
            return causal_attn.attention(q, k, v, graphs[i % 3], key_padding_mask=kpm, backend="flex")

    expected = [run(i) for i in range(3)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(24)))
    for i, (out, mass) in enumerate(got):
        assert torch.equal(out, expected[i % 3][0]) and torch.equal(mass, expected[i % 3][1]), i
    for T in range(20, 30):  # distinct paddings of one graph, then graph-less calls: both kinds stay bounded
        flex.block_masks(graphs[0], torch.rand(2, 24) > 0.2, None, 2, 24, "cpu")
        flex.block_masks(None, None, None, 1, T, "cpu")
    with flex._lock:
        assert len(flex._by_graph[graphs[0]]) == flex.PER_GRAPH and len(flex._plain) == flex.MAX_PLAIN
    packed = weakref.ref(graphs[1].packed)
    del graphs[1], got, expected, cases[1]
    gc.collect()
    assert packed() is None  # nothing kept the adjacency alive


def test_flex_compiles_a_bounded_number_of_times_over_a_range_of_lengths(monkeypatch):
    """The compiled path (CUDA's) over lengths 40..515, with and without padding: one graph per entry point for
    lengths within one Flex block (<= 128), one more for all longer ones, none per length. Run on CPU with dynamo's
    "eager" backend (FlexAttention's compiled CPU kernel returns no LSE): the guards, and so the recompiles, are
    dynamo's; Inductor on CUDA may add its own, which the GPU kit counts (docs/gpu.md)."""
    from causal_attn.ops import flex

    monkeypatch.setattr(flex, "COMPILE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(flex, "COMPILE_BACKEND", "eager")
    monkeypatch.setattr(flex, "_compiled", {})
    start = flex.compile_counts()
    if not start:
        pytest.skip("this torch cannot list dynamo's cache entries")
    counts = []
    for i, T in enumerate((40, 77, 129, 200, 333, 515)):
        q, k, v, adj, kpm, seed = make_case(2, 4, 2, T, 16, torch.float32, padding="left" if i % 2 else "none")
        graph = CausalGraph.from_dense(adj)
        with torch.no_grad():
            for _layer in range(2):
                out, mass = causal_attn.attention(q, k, v, graph, key_padding_mask=kpm, backend="flex")
        if i == 3:
            check_forward_against_oracle(_flex(graph, kpm), q, k, v, adj, kpm, seed)
        counts.append({n: c - start[n] for n, c in flex.compile_counts().items()})
    assert counts[0] == dict.fromkeys(start, 1), counts
    assert counts[-1] == counts[2] == dict.fromkeys(start, 2), counts  # 129 .. 515: one graph for them all
    print("flex compiles per entry point after lengths 40, 77, 129, 200, 333, 515:", counts)


def test_patch_model_trains_nothing_but_matches_the_cpu_backend_forward():
    """patch_model(backend="flex") forward (no grad: CPU) gives the CPU kernels' logits and Re-Attention loss."""
    from causal_attn.testing.models import random_batch, random_graph, tiny_model

    seed = fresh_seed()
    models = [tiny_model("qwen2", seed=seed % 1000, kv_heads=2) for _ in range(2)]
    ids, mask, _ = random_batch(models[0].config.vocab_size, 3, 37, padding="left", seed=seed)
    graph = random_graph(mask, seed=seed + 1)
    results = []
    for model, backend in zip(models, ("flex", "cpu")):
        handle = patch_model(model, alpha=0.3, backend=backend)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, adjacency=graph).logits
        results.append((logits[mask.bool()], handle.loss()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6, msg=f"seed {seed}")


def test_backend_modules_do_not_import_the_dispatcher():
    """The registry sits apart from attention(): no backend module imports causal_attn.ops.attention, and the
    registry imports no backend at module level (it loads them on first use)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    backends = ["causal_attn/ops/cpp_backend.py", "causal_attn/ops/reference.py", "causal_attn/ops/flex.py",
                "causal_attn/ops/blocked.py", "kernels/flash_mass.py", "causal_attn/ops/backends.py"]
    for path in backends:
        tree = ast.parse(open(os.path.join(root, path)).read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                imported |= {f"{module}.{a.name}".lstrip(".") for a in node.names} | {module}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not {m for m in imported if m in ("attention", "causal_attn.ops.attention")}, (path, imported)
    top = ast.parse(open(os.path.join(root, "causal_attn/ops/backends.py")).read()).body
    own = {a.name for n in top if isinstance(n, ast.ImportFrom) and n.level > 0 for a in n.names}
    assert own == {"blocked"}, own  # the "torch" backend; every other one is loaded by name on first use


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention differentiates on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES + [(2, 8, 2, 300, 128, "left", "random", 1.0)], ids=ids)
def test_backward_matches_fp64_oracle_on_cuda(dtype, case):
    B, Hq, Hkv, T, D, padding, adjacency, logit_scale = case
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=padding, adjacency=adjacency,
                                        logit_scale=logit_scale, device="cuda")
    check_against_oracle(_flex(adj, kpm), q, k, v, adj, kpm, seed, slack=lse_difference_slack(q, k, kpm))
