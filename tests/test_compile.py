"""torch.compile traces through `attention` as one custom op (fake impls + registered autograd): no graph
breaks, and the compiled forward and backward match eager on CPU (backend "torch" behind the op)."""
import torch

import causal_attn
from numerics import make_case, max_err


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
