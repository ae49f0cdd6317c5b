"""Eager statement of SPEC §2: causal attention plus the causal mass of every row.

Materialises the full (B, Hq, T, T) map; the readable definition, a fallback, and what the
fast backends are compared with. Differentiable through plain autograd.
"""
from __future__ import annotations

import torch

from .graph import CausalGraph


def allowed_mask(T: int, key_padding_mask: torch.Tensor | None, device,
                 seg_start: torch.Tensor | None = None) -> torch.Tensor:
    """bool (B or 1, T, T): key j is allowed for row i iff seg_start[i] <= j <= i and key j is real."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril().unsqueeze(0)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    if seg_start is not None:
        allowed = allowed & (torch.arange(T, device=device) >= seg_start[:, :, None])
    return allowed


def reference_forward(q, k, v, graph: CausalGraph | None, key_padding_mask, scale: float, seg_start=None):
    """(out, mass, P) with P the (B, Hq, T, T) attention map in float32 (float64 for float64 input)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kr = k.repeat_interleave(G, dim=1).to(acc)
    vr = v.repeat_interleave(G, dim=1).to(acc)
    s = torch.matmul(q.to(acc), kr.transpose(-1, -2)) * scale
    allowed = allowed_mask(T, key_padding_mask, q.device, seg_start).unsqueeze(1)  # (B|1, 1, T, T)
    s = s.masked_fill(~allowed, float("-inf"))
    row_has_key = allowed.any(-1, keepdim=True)
    # rows with no allowed key (left padding) get P = 0: softmax of a finite dummy, then zeroed
    p = torch.softmax(s.masked_fill(~row_has_key, 0.0), dim=-1) * row_has_key
    out = torch.matmul(p, vr).to(q.dtype)
    mass = None
    if graph is not None:
        a = graph.to_dense().unsqueeze(1) & allowed
        mass = (p * a).sum(-1)
    return out, mass, p


def reference_backend(q, k, v, graph: CausalGraph | None, key_padding_mask, seg_start, scale: float, attn_map=None,
                      attn_map_weight=1.0):
    """Backend "reference" (a :class:`causal_attn.ops.backends.DifferentiableBackend`): ``(out, mass)``; adds
    ``attn_map_weight`` times the head-summed map to ``attn_map`` when given."""
    out, mass, p = reference_forward(q, k, v, graph, key_padding_mask, scale, seg_start)
    if attn_map is not None:
        attn_map += attn_map_weight * p.detach().sum(1).float()
    return out, mass
