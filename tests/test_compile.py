"""torch.compile traces through `attention` as one custom op (fake impls + registered autograd): no graph
breaks, and the compiled forward and backward match eager on CPU (backend "torch" behind the op)."""
import pytest
import torch

import causal_attn
from causal_attn import patch_model
from causal_attn.testing.numerics import fresh_seed, make_case, max_err
from step_probes import graph_breaks, host_syncs, plain_batch, step_batch, step_loss
from causal_attn.testing.models import tiny_model


def _layer(q, k, v, adj, kpm):
    out, mass = causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend="torch")
    return out.float().square().mean() + mass.mean()


def test_explain_reports_no_graph_breaks():
    q, k, v, adj, kpm, seed = make_case(2, 4, 2, 24, 16, torch.float32, padding="left")
    graph = causal_attn.CausalGraph.from_dense(adj)
    explanation = torch._dynamo.explain(_layer)(q, k, v, graph, kpm)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    ops = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("causal_attn.attention_fwd" in op for op in ops), ops


def test_fullgraph_compile_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    q, k, v, adj, kpm, seed = make_case(2, 4, 1, 33, 16, torch.float32, padding="right")
    graph = causal_attn.CausalGraph.from_dense(adj)
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager")
    eager_loss = _layer(q, k, v, graph, kpm)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    loss = compiled(q, k, v, graph, kpm)
    grads = torch.autograd.grad(loss, (q, k, v))
    assert max_err(loss, eager_loss) < 1e-6, f"seed {seed}"
    for name, a, b in zip("qkv", grads, eager_grads):
        assert max_err(a, b) < 1e-6, f"d{name} (seed {seed})"


# ---------------------------------------------------------------------------------------------- the model step
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("layers", [2, 4])
def test_patched_step_has_no_graph_break_beyond_plain(layers, layout):
    """torch._dynamo.explain of forward + LM loss + Re-Attention loss: as many graphs and breaks as the same model
    with plain SDPA on the same batch (one graph, no break, today)."""
    model = tiny_model("llama", layers=layers, train=True, attn_implementation="sdpa")
    batch = step_batch(model, layout, seed=fresh_seed())
    plain = graph_breaks(model, plain_batch(batch))
    handle = patch_model(model, alpha=0.3)
    cat = graph_breaks(model, batch, handle)
    assert cat == plain == (1, 0), f"CAT (graphs, breaks) {cat} vs plain SDPA {plain}"


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_host_syncs_per_step_do_not_grow_with_depth(layout):
    """Eager forward + backward: the graph is checked once per forward, never per layer."""
    seed = fresh_seed()
    counts = {}
    for layers in (2, 32):
        model = tiny_model("llama", layers=layers, hidden=32, heads=2, kv_heads=1, train=True,
                           attn_implementation="sdpa")
        batch = step_batch(model, layout, T=40, seed=seed)
        plain = host_syncs(model, plain_batch(batch))
        cat = host_syncs(model, batch, patch_model(model, alpha=0.3))
        assert sum(cat.values()) <= sum(plain.values()) + 2, f"{layers} layers: CAT {dict(cat)}, plain {dict(plain)}"
        counts[layers] = cat
    assert counts[2] == counts[32], f"host syncs grow with depth: {counts}"


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compiled_equals_eager(family, layout, device="cpu"):
    seed = fresh_seed()
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = tiny_model(family, seed=seed % 1000, layers=2, train=True, attn_implementation="sdpa").to(device)
        handle = patch_model(model, alpha=5.0)
        batch = {k: v.to(device) for k, v in step_batch(model, layout, T=37, seed=seed).items()}
        out = (torch.compile(model) if compiled else model)(**batch)
        loss = out.loss + handle.loss()
        loss.backward()
        assert float(handle.loss().detach()) > 0  # the Re-Attention term is in the loss
        results.append((out.logits.detach(), loss.detach(), _grads(model)))
    (lg0, l0, g0), (lg1, l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6, msg=f"loss (seed {seed})")
    torch.testing.assert_close(lg1, lg0, rtol=1e-5, atol=1e-5, msg=f"logits (seed {seed})")
    assert g1.keys() == g0.keys()
    for name in g0:
        scale = float(g0[name].abs().max()) or 1.0
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-5 * scale, msg=f"{name} (seed {seed})")


# every family once and both layouts (llama both): the layout is handled by the patch, the same for every family
@pytest.mark.parametrize("family,layout", [("llama", "padded"), ("llama", "packed"), ("qwen2", "packed"),
                                           ("qwen3", "padded"), ("mistral", "padded")])
def test_compiled_patched_model_matches_eager(family, layout):
    """torch.compile (Inductor) of a patched model, forward and backward: loss, logits and every gradient equal the
    eager patched model's (fp32, rel 1e-5). Mistral's sliding window (4096) covers the sequence: plain causal."""
    _compiled_equals_eager(family, layout)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton backend under Inductor)")
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_compiled_patched_model_matches_eager_on_cuda(layout):
    _compiled_equals_eager("llama", layout, "cuda")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_another_length_recompiles_once_not_per_layer(layout):
    """The first batch of a new length recompiles the whole model once with the length dynamic; later lengths reuse
    it (lengths past 32 tokens: a graph of at most 32 tokens, one bit word per row, is a size-1 dimension, which
    Dynamo specialises, so short batches add one more graph)."""
    model = tiny_model("llama", layers=2, train=True, attn_implementation="sdpa")  # a per-layer recompile would add 2
    handle = patch_model(model, alpha=0.5)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    before = counters["stats"]["unique_graphs"]
    run = torch.compile(model, backend="aot_eager")
    for T in (40, 57, 45, 64):
        out = run(**step_batch(model, layout, T=T, seed=fresh_seed()))
        (out.loss + handle.loss()).backward()
    assert counters["stats"]["unique_graphs"] - before == 2


def test_compiled_with_checkpointing_matches_eager():
    """Non-reentrant gradient checkpointing under torch.compile: the same loss and gradients as eager. Dynamo breaks
    the plain model's graph around checkpointed layers already; the patched model adds two breaks at any depth
    (docs/training.md says so)."""
    seed = fresh_seed()
    results, extra = [], {}
    for layers, compiled in ((2, False), (2, True), (4, None)):
        torch._dynamo.reset()
        model = tiny_model("qwen2", seed=seed % 1000, layers=layers, train=True, attn_implementation="sdpa")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        batch = step_batch(model, "padded", T=37, seed=seed)
        if compiled is not False:
            plain = graph_breaks(model, plain_batch(batch))[1]
        handle = patch_model(model, alpha=5.0)
        if compiled is not False:
            extra[layers] = graph_breaks(model, batch, handle)[1] - plain
        if compiled is not None:
            torch._dynamo.reset()
            loss = step_loss(torch.compile(model, backend="aot_eager") if compiled else model, batch, handle)
            loss.backward()
            results.append((loss.detach(), _grads(model)))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7, msg=f"seed {seed}")
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=f"{name} (seed {seed})")
    assert extra[2] == extra[4] <= 2, f"graph breaks beyond plain SDPA with checkpointing, by depth: {extra}"
