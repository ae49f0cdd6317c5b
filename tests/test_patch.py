"""patch_model on tiny random Llama / Qwen2 / Qwen3 / Mistral: equivalence with eager attention (fp64 as the
exact answer, eager in the same dtype as the yardstick), the Re-Attention loss against the authors' construction,
checkpointing, generation, unpatch, save/load and the error paths."""
import threading

import pytest
import torch

from causal_attn import CausalGraph, patch_model
from causal_attn.testing.numerics import fa_rule, fresh_seed
from test_loss import authors_loss
from causal_attn.testing.models import FAMILIES, forward_backward, random_batch, random_graph, tiny_model

KV_HEADS = {"llama": 4, "qwen2": 2, "qwen3": 1, "mistral": 2}  # MHA, GQA, MQA, GQA


def three_models(family, dtype, seed, **cfg):
    """The same random weights as: eager in ``dtype``, fp64 (torch SDPA: fp64 eager turns fully padded rows
    into NaN because ``finfo.min + score`` overflows), and ``dtype`` to be patched."""
    kw = dict(seed=seed % 1000, kv_heads=KV_HEADS[family], **cfg)
    return (tiny_model(family, dtype=dtype, **kw),
            tiny_model(family, dtype=torch.float64, attn_implementation="sdpa", **kw),
            tiny_model(family, dtype=dtype, **kw))


def eager_maps(model, ids, mask):
    """Per-layer attention maps of eager attention (``output_attentions=True``) for a padded batch.

    The additive 4D mask is built here with a finite -1e300 so fully padded query rows stay finite in fp64;
    those rows are excluded from everything compared."""
    T = ids.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    additive = torch.zeros(allowed.shape, dtype=model.dtype).masked_fill(~allowed, -1e300)
    return model(input_ids=ids, attention_mask=additive, output_attentions=True).attentions


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_eager(family, padding):
    seed = fresh_seed()
    eager, exact, ours = three_models(family, torch.float32, seed)
    ids, mask, labels = random_batch(eager.config.vocab_size, 3, 29, padding=padding, seed=seed)
    graph = random_graph(mask, seed=seed + 1)
    handle = patch_model(ours, alpha=0.3)
    ref = forward_backward(eager, ids, mask, labels)
    ex = forward_backward(exact, ids, mask, labels)
    got = forward_backward(ours, ids, mask, labels, adjacency=graph)
    assert len(handle.masses()) == ours.config.num_hidden_layers  # the fused kernel ran in every layer
    real = mask.bool()
    fa_rule("logits", got[0][real], ref[0][real], ex[0][real], seed)
    fa_rule("loss", got[1], ref[1], ex[1], seed)
    assert got[2].keys() == ex[2].keys()
    for name in ex[2]:
        fa_rule(name, got[2][name], ref[2][name], ex[2][name], seed)


def test_patched_matches_eager_bf16():
    seed = fresh_seed()
    eager, exact, ours = three_models("qwen2", torch.bfloat16, seed)
    ids, mask, labels = random_batch(eager.config.vocab_size, 2, 24, padding="left", seed=seed)
    patch_model(ours)
    ref = forward_backward(eager, ids, mask, labels)
    ex = forward_backward(exact, ids, mask, labels)
    got = forward_backward(ours, ids, mask, labels, adjacency=random_graph(mask, seed=seed))
    real = mask.bool()
    fa_rule("logits", got[0][real], ref[0][real], ex[0][real], seed, rel_atol=1e-2)
    fa_rule("loss", got[1], ref[1], ex[1], seed, rel_atol=1e-2)
    for name in ex[2]:
        fa_rule(name, got[2][name], ref[2][name], ex[2][name], seed, rel_atol=1e-2)


@pytest.mark.parametrize("family,padding", [("llama", "left"), ("qwen2", "right"), ("qwen3", "left"),
                                            ("mistral", "none")])
def test_loss_and_gradients_equal_authors_construction(family, padding):
    """Authors' way: eager attention, output_attentions=True, maps averaged over layers and heads, the hinge."""
    seed = fresh_seed()
    kw = dict(seed=seed % 1000, kv_heads=KV_HEADS[family], dtype=torch.float64)
    eager, ours = tiny_model(family, **kw), tiny_model(family, **kw)
    ids, mask, _ = random_batch(eager.config.vocab_size, 3, 21, padding=padding, seed=seed)
    adj = random_graph(mask, seed=seed + 1)
    alpha = 1.3  # a random model sits near R = 1: rows on both sides of the margin
    handle = patch_model(ours, alpha=alpha)
    ours(input_ids=ids, attention_mask=mask, adjacency=adj)
    loss = handle.loss()
    maps = eager_maps(eager, ids, mask)
    ref = authors_loss(list(maps), adj.to_dense(), mask.bool(), alpha, "mean", "hinge")
    assert ref.item() > 0
    # eager attention takes its softmax in fp32 even for fp64 models: fp32-level agreement is the best possible
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-9, msg=f"seed {seed}")
    g_ours = torch.autograd.grad(loss, list(ours.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ref, list(eager.parameters()), allow_unused=True)
    nonzero = 0
    for (name, p), a, b in zip(ours.named_parameters(), g_ours, g_ref):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()) + 1e-12, msg=f"{name} seed {seed}")
        nonzero += int(b.abs().max() > 0)
    assert nonzero > 4


def test_dense_bool_adjacency_and_set_adjacency_equal_graph():
    model = tiny_model("llama")
    ids, mask, _ = random_batch(97, 2, 17, padding="right", seed=3)
    graph = random_graph(mask, seed=4)
    handle = patch_model(model, alpha=1.5)
    model(input_ids=ids, attention_mask=mask, adjacency=graph)
    a = handle.loss()
    model(input_ids=ids, attention_mask=mask, adjacency=graph.to_dense())
    b = handle.loss()
    handle.set_adjacency(graph)
    model(input_ids=ids, attention_mask=mask)
    c = handle.loss()
    assert a.item() > 0 and a.item() == b.item() == c.item()


def test_checkpointing_same_gradients_and_reentrant_error():
    """Non-reentrant checkpointing: same loss and gradients, one mass entry per layer, the same map, also when
    backward (and with it the replay) runs on another thread, as CUDA's autograd does."""
    seed = fresh_seed()
    ids, mask, labels = random_batch(97, 2, 19, padding="right", seed=seed)
    graph = random_graph(mask, seed=seed)
    results = []
    for ckpt in (False, True):
        model = tiny_model("qwen2", seed=seed % 1000, train=True, layers=3)
        if ckpt:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        handle = patch_model(model, alpha=1.5, collect_attention_map=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, adjacency=graph).loss + handle.loss()
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
        assert len(handle.masses()) == 3  # the replay during backward added no entry
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((loss.detach(), grads, handle.attention_map().clone()))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(m1, m0, rtol=0, atol=0)
    for name in g0:
        assert g1[name] is not None, name
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-8, msg=name)

    model = tiny_model("qwen2", train=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    patch_model(model)
    with pytest.raises(RuntimeError, match="reentrant"):
        model(input_ids=ids, attention_mask=mask, labels=labels, adjacency=graph)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_matches_eager_and_unpatch_restores(family):
    seed = fresh_seed()
    eager = tiny_model(family, seed=seed % 1000, kv_heads=2)
    ours = tiny_model(family, seed=seed % 1000, kv_heads=2)
    ids, mask, _ = random_batch(97, 3, 12, padding="left", seed=seed)
    gen = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    before = ours(input_ids=ids, attention_mask=mask).logits
    handle = patch_model(ours, random_graph(mask, seed=seed), alpha=0.5)  # prefill uses the kernel
    expected = eager.generate(ids, **gen)
    got = ours.generate(ids, **gen)
    assert torch.equal(got, expected), f"seed {seed}"
    with pytest.raises(RuntimeError, match="no causal masses"):
        handle.masses()  # the last forward was a KV-cache decode step: plain attention, no mass
    handle.unpatch()
    assert ours.config._attn_implementation == "eager"
    assert torch.equal(ours(input_ids=ids, attention_mask=mask).logits, before)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model("qwen2")
    ids, mask, _ = random_batch(97, 2, 15, padding="right", seed=5)
    graph = random_graph(mask, seed=5)
    handle = patch_model(model, alpha=1.5)
    logits = model(input_ids=ids, attention_mask=mask, adjacency=graph).logits
    loss = handle.loss()
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="eager")
    for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), n
    h2 = patch_model(loaded, alpha=1.5)
    assert torch.equal(loaded(input_ids=ids, attention_mask=mask, adjacency=graph).logits, logits)
    assert h2.loss().item() == loss.item()


def test_attention_map_is_eager_average():
    model = tiny_model("mistral", dtype=torch.float64)
    eager = tiny_model("mistral", dtype=torch.float64)
    ids, mask, _ = random_batch(97, 2, 16, padding="left", seed=6)
    handle = patch_model(model, collect_attention_map=True)
    model(input_ids=ids, attention_mask=mask, adjacency=random_graph(mask, seed=6))
    got = handle.attention_map()
    maps = eager_maps(eager, ids, mask)
    ref = torch.stack(maps).mean(dim=(0, 2))
    real = mask.bool()
    torch.testing.assert_close(got[real].double(), ref[real], rtol=1e-5, atol=1e-6)
    assert got.requires_grad is False


def test_layer_subset_and_two_models_in_two_threads():
    a, b = tiny_model("llama", seed=1, layers=3), tiny_model("qwen2", seed=2)
    ids, mask, _ = random_batch(97, 2, 14, padding="right", seed=7)
    ga, gb = random_graph(mask, seed=8), random_graph(mask, seed=9)
    ha = patch_model(a, alpha=1.5, layers=[0, 2])
    hb = patch_model(b, alpha=1.5)
    a(input_ids=ids, attention_mask=mask, adjacency=ga)
    loss_a = ha.loss().item()
    assert len(ha.masses()) == 2
    thread_loss = []

    def other():  # another thread's forwards of both models leave this thread's records alone
        a(input_ids=ids, attention_mask=mask, adjacency=gb)
        b(input_ids=ids, attention_mask=mask, adjacency=gb)
        thread_loss.append(hb.loss().item())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert ha.loss().item() == loss_a
    with pytest.raises(RuntimeError, match="no causal masses"):
        hb.loss()  # this thread never ran b
    b(input_ids=ids, attention_mask=mask, adjacency=gb)
    assert hb.loss().item() == thread_loss[0]


def test_sliding_window_plain_and_with_adjacency():
    seed = fresh_seed()
    eager = tiny_model("mistral", sliding_window=5, seed=seed % 1000)
    ours = tiny_model("mistral", sliding_window=5, seed=seed % 1000)
    ids, mask, _ = random_batch(97, 2, 13, padding="left", seed=seed)
    handle = patch_model(ours)
    real = mask.bool()
    got = ours(input_ids=ids, attention_mask=mask).logits
    ref = eager(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[real], ref[real], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sliding window"):
        ours(input_ids=ids, attention_mask=mask, adjacency=random_graph(mask))
    handle.unpatch()


def test_clear_errors():
    model = tiny_model("llama", train=True, attention_dropout=0.1)
    ids, mask, _ = random_batch(97, 2, 10, seed=1)
    handle = patch_model(model)
    with pytest.raises(ValueError, match="T=9 but the inputs have B=2, T=10"):
        model(input_ids=ids, attention_mask=mask, adjacency=CausalGraph.from_edges([[], []], 9))
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=ids, attention_mask=mask, adjacency=random_graph(mask))
    model(input_ids=ids, attention_mask=mask)  # plain attention keeps the dropout
    with pytest.raises(RuntimeError, match="no causal masses"):
        handle.loss()
    with pytest.raises(RuntimeError, match="already patched"):
        patch_model(model)
    with pytest.raises(RuntimeError, match="collection is off"):
        handle.attention_map()
    with pytest.raises(TypeError, match="CausalGraph or a bool tensor"):
        handle.set_adjacency([[0, 0]])
    handle.unpatch()
    with pytest.raises(ValueError, match="layers"):
        patch_model(model, layers=[5])


def test_checkpointing_with_map_only():
    """Map collection without an adjacency runs the fused kernel; the replay must take the same path."""
    ids, mask, labels = random_batch(97, 2, 12, padding="left", seed=2)
    model = tiny_model("llama", train=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    handle = patch_model(model, collect_attention_map=True)
    model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    rows = handle.attention_map().sum(-1)[mask.bool()]
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_patched_under_autocast_matches_sdpa_under_autocast():
    """fp32 weights under ``torch.autocast(bfloat16)`` (what Trainer(bf16=True) does): the rotary embedding hands
    the attention fp32 q/k beside a bf16 v. The patched model casts them as SDPA does under autocast and meets
    the rule against fp64 with unpatched SDPA under the same autocast as the yardstick."""
    seed = fresh_seed()
    kw = dict(seed=seed % 1000, kv_heads=KV_HEADS["qwen2"])
    sdpa, exact, ours = (tiny_model("qwen2", dtype=torch.float32, attn_implementation="sdpa", **kw),
                         tiny_model("qwen2", dtype=torch.float64, attn_implementation="sdpa", **kw),
                         tiny_model("qwen2", dtype=torch.float32, **kw))
    ids, mask, labels = random_batch(sdpa.config.vocab_size, 2, 24, padding="left", seed=seed)
    graph = random_graph(mask, seed=seed)
    handle = patch_model(ours, alpha=1.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = forward_backward(sdpa, ids, mask, labels)
        got = forward_backward(ours, ids, mask, labels, adjacency=graph, extra_loss=handle.loss)
    ex = forward_backward(exact, ids, mask, labels)
    assert len(handle.masses()) == ours.config.num_hidden_layers
    assert all(m.dtype == torch.float32 for m in handle.masses())
    real = mask.bool()
    fa_rule("logits", got[0][real], ref[0][real], ex[0][real], seed, rel_atol=1e-2)
    # the Re-Attention loss adds gradient: compare the LM part alone on a second, loss-free forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward_backward(ours, ids, mask, labels, adjacency=graph)
    fa_rule("loss", got[1], ref[1], ex[1], seed, rel_atol=1e-2)
    for name in ex[2]:
        fa_rule(name, got[2][name], ref[2][name], ex[2][name], seed, rel_atol=1e-2)
