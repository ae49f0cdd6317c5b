"""Tiny randomly initialised Llama / Qwen2 / Qwen3 / Mistral models for tests, benchmarks and demos.

No weights are downloaded: every model is built from a small config with a fixed seed.

    from causal_attn.testing.models import FAMILIES, tiny_model, random_batch, random_graph
    model = tiny_model("qwen2", kv_heads=2)                  # GQA: 4 query heads share 2 kv heads
    ids, mask, labels = random_batch(model.config.vocab_size, B=2, T=24, padding="left")
    graph = random_graph(mask)                                # CausalGraph over the real tokens

Defaults: hidden 48, 2 layers, 4 heads (head_dim 12), 2 kv heads, vocab 97, fp32, eager attention,
``eval()`` mode, pad token 0. Any other config field can be overridden by keyword.
"""
from __future__ import annotations

import random

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from causal_attn import CausalGraph

def _fresh() -> int:
    return random.SystemRandom().randrange(2**31)


FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
PAD_ID = 0


def tiny_config(family: str, *, hidden: int = 48, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                vocab: int = 97, intermediate: int | None = None, attn_implementation: str = "eager", **overrides):
    """A small config of ``family`` (one of :data:`FAMILIES`); ``kv_heads < heads`` gives GQA."""
    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    fields = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab,
                  intermediate_size=intermediate or 2 * hidden, max_position_embeddings=4096,
                  pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    fields.update(overrides)
    config = _CLASSES[family][0](**fields)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, train: bool = False,
               **config_kwargs):
    """A randomly initialised ``<Family>ForCausalLM`` (seeded; ``eval()`` unless ``train``)."""
    config = tiny_config(family, **config_kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _CLASSES[family][1](config)
    model = model.to(dtype)
    return model.train(train)


def random_batch(vocab: int, B: int, T: int, *, padding: str = "none", seed: int | None = None):
    """Random ``input_ids``, ``attention_mask`` (1 = real) and ``labels`` (-100 on padding), all (B, T).

    ``padding``: "none", "left" or "right"; with padding, sample 0 keeps all T tokens and the others
    lose a random number of positions (at most T // 2). A label counts only where the position before it
    is real: a left-padded sample's first token would be predicted from a padding row, whose output is
    arbitrary (eager attention spreads it uniformly, fused kernels give zeros)."""
    if padding not in ("none", "left", "right"):
        raise ValueError(f"padding must be 'none', 'left' or 'right', got {padding!r}")
    g = torch.Generator().manual_seed(_fresh() if seed is None else seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding != "none":
        for b in range(1, B):
            p = int(torch.randint(1, T // 2 + 1, (1,), generator=g))
            if padding == "left":
                mask[b, :p] = 0
            else:
                mask[b, T - p:] = 0
    ids = ids.masked_fill(mask == 0, PAD_ID)
    prev_real = torch.cat([torch.ones(B, 1, dtype=torch.long), mask[:, :-1]], dim=1)
    labels = ids.masked_fill((mask == 0) | (prev_real == 0), -100)
    return ids, mask, labels


def random_edges(attention_mask: torch.Tensor, *, density: float = 0.3, seed: int | None = None):
    """Per sample a list of row-aligned ``(row, col)`` edges between real tokens with ``col <= row``."""
    g = torch.Generator().manual_seed(_fresh() if seed is None else seed)
    real = attention_mask.bool()
    B, T = real.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & real[:, None, :] & real[:, :, None]
    dense = (torch.rand(B, T, T, generator=g) < density) & allowed
    return [[(int(i), int(j)) for i, j in dense[b].nonzero()] for b in range(B)]


def random_graph(attention_mask: torch.Tensor, *, density: float = 0.3, seed: int | None = None) -> CausalGraph:
    """A random :class:`CausalGraph` for a padded batch (edges only between real tokens)."""
    return CausalGraph.from_edges(random_edges(attention_mask, density=density, seed=seed),
                                  attention_mask.shape[1])


def forward_backward(model, ids, mask, labels, *, extra_loss=None, **model_kwargs):
    """One forward + backward of the LM loss (plus ``extra_loss()`` if given, called after the forward).

    Returns ``(logits, loss, {name: grad})`` detached; parameters without a gradient are left out."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **model_kwargs)
    loss = out.loss if extra_loss is None else out.loss + extra_loss()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), loss.detach(), grads
