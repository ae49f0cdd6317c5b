"""Packed (padding-free) batches through patch_model and CATTrainer's collator: the same samples packed and
padded give the same per-sample logits, LM loss, Re-Attention loss and parameter gradients."""
import pytest
import torch

from causal_attn import CausalGraph, patch_model
from causal_attn.data.collate import CATCollator
from causal_attn.testing.numerics import fresh_seed
from step_probes import step_records
from causal_attn.testing.models import PAD_ID, forward_backward, tiny_model


def _run(model, handle, batch, **kw):
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "labels", "attention_mask")}
    return forward_backward(model, batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                            extra_loss=handle.loss, **kwargs, **kw)


def _per_sample(logits_padded, logits_packed, lengths):
    starts = torch.tensor([0] + lengths).cumsum(0)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(logits_packed[0, starts[b]:starts[b] + n], logits_padded[b, :n],
                                   rtol=1e-5, atol=1e-5, msg=f"sample {b}")


@pytest.mark.parametrize("family,checkpointing", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_packed_equals_padded(family, checkpointing):
    seed = fresh_seed()
    lengths = [11, 1, 26, 7, 19]
    records = step_records(lengths, 97, seed)
    padded = CATCollator(PAD_ID)(records)
    packed = CATCollator(PAD_ID, packing=True)(records)
    assert packed["adjacency"].segment_ids is not None and "attention_mask" not in packed
    results = []
    for batch in (padded, packed):
        model = tiny_model(family, seed=seed % 1000, train=True, layers=3)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        handle = patch_model(model, alpha=2.0, backend="cpu")
        results.append(_run(model, handle, batch))
        results[-1] += (handle.loss().detach(),)
    (lg0, loss0, g0, attn0), (lg1, loss1, g1, attn1) = results
    _per_sample(lg0, lg1, lengths)
    assert float(attn0) > 0
    torch.testing.assert_close(attn1, attn0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("kind", ["position_ids", "seq_idx", "cu_seq_lens_q"])
def test_packing_detected_with_and_without_cache(use_cache, kind):
    """Without an adjacency too: transformers skips its own detection when a cache object exists (use_cache=True),
    the patched model does not."""
    seed = fresh_seed()
    lengths = [9, 4, 13]
    records = step_records(lengths, 97, seed)
    padded = CATCollator(PAD_ID)(records)
    packed = CATCollator(PAD_ID, packing=True)(records)
    model = tiny_model("qwen2", seed=seed % 1000)
    patch_model(model)
    ref = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    extra = {"position_ids": packed["position_ids"]}
    offsets = torch.tensor([0] + lengths).cumsum(0)
    if kind == "seq_idx":
        extra["seq_idx"] = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths)).unsqueeze(0)
    elif kind == "cu_seq_lens_q":
        extra.update(cu_seq_lens_q=offsets.int(), cu_seq_lens_k=offsets.int(), max_length_q=max(lengths),
                     max_length_k=max(lengths))
    got = model(input_ids=packed["input_ids"], use_cache=use_cache, **extra).logits
    _per_sample(ref, got, lengths)


def test_packed_errors():
    seed = fresh_seed()
    records = step_records([6, 5], 97, seed)
    packed = CATCollator(PAD_ID, packing=True)(records)
    model = tiny_model("llama", seed=seed % 1000)
    patch_model(model)
    with pytest.raises(ValueError, match="decrease within row"):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
              seq_idx=torch.tensor([[0] * 6 + [1] * 3 + [0] * 2]))
    # an edge from the second sample into the first
    bad = CausalGraph.from_edges([[(7, 2)]], 11)
    with pytest.raises(ValueError, match="crosses from one packed sample"):
        model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], adjacency=bad)
    with pytest.raises(ValueError, match="crosses from one packed sample"):
        CausalGraph(bad.packed, 11, segment_ids=torch.tensor([[0] * 6 + [1] * 5]))
    mistral = tiny_model("mistral", sliding_window=4, seed=seed % 1000)
    patch_model(mistral)
    with pytest.raises(ValueError, match="sliding window of 4 tokens but a packed sample is longer.*longest packed sample has 6"):
        mistral(input_ids=packed["input_ids"], position_ids=packed["position_ids"], adjacency=packed["adjacency"])
