"""The Re-Attention loss of CAT from per-layer causal masses (SPEC §2).

With ``mbar_i`` the mass averaged over layers and heads, ``c_i`` annotated and ``n_i`` allowed keys:
``C_i = mbar_i / c_i``, ``N_i = (1 - mbar_i) / (n_i - c_i)``, ``R_i = C_i / N_i`` and the hinge
``max(0, alpha - R_i)`` over the rows with ``0 < c_i < n_i`` that are not padding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .graph import CausalGraph, as_graph, check_key_padding_mask

EPS = 1e-6


@dataclass
class RatioStats:
    ratio: torch.Tensor      # (B, T) R_i (meaningless outside `rows`)
    causal: torch.Tensor     # (B, T) C_i
    noncausal: torch.Tensor  # (B, T) N_i
    rows: torch.Tensor       # (B, T) bool, rows that enter the loss


def _stack(masses) -> torch.Tensor:
    if isinstance(masses, torch.Tensor):
        m = masses
        if m.dim() == 3:
            m = m.unsqueeze(0)
        if m.dim() != 4:
            raise ValueError(f"masses must be (L, B, H, T) or (B, H, T); got shape {tuple(m.shape)}")
        return m
    masses = list(masses)
    if not masses:
        raise ValueError("masses is empty: no patched layer ran a forward with an adjacency")
    shapes = {tuple(m.shape) for m in masses}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"every layer's mass must have the same shape (B, H, T); got {sorted(shapes)}")
    return torch.stack(masses)


def loss_rows(graph: CausalGraph, key_padding_mask=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, c, n)``: the bool (B, T) rows that enter the loss (``0 < c_i < n_i``, not padding) and
    the int32 counts. Needs only the graph and the padding, so a trainer can count rows before a forward."""
    kpm = None if key_padding_mask is None else check_key_padding_mask(
        key_padding_mask, graph.batch_size, graph.seq_len, graph.device)
    c, n = graph.counts(kpm)
    rows = (c > 0) & (c < n)
    if kpm is not None:
        rows = rows & kpm
    return rows, c, n


def causal_ratio(masses, adjacency, *, key_padding_mask=None, eps: float = EPS, rows=None) -> RatioStats:
    """The per-row statistics behind the loss: ``R_i``, ``C_i``, ``N_i`` and the eligible rows.

    ``rows``: :func:`loss_rows` of this graph and padding when the caller has it already (``patch_model``
    counts once per forward); the graph and padding are then not checked again."""
    m = _stack(masses)
    L, B, H, T = m.shape
    if rows is None:
        rows = loss_rows(as_graph(adjacency, B, T, m.device), key_padding_mask)
    rows, c, n = rows
    c, n = c.float(), n.float()
    mbar = m.float().mean(dim=(0, 2))  # (B, T)
    c_safe = torch.where(rows, c, torch.ones_like(c))
    nc_safe = torch.where(rows, n - c, torch.ones_like(c))
    causal = mbar / c_safe
    noncausal = (1.0 - mbar).clamp_min(eps) / nc_safe
    ratio = causal / noncausal
    return RatioStats(ratio=ratio, causal=causal, noncausal=noncausal, rows=rows)


def re_attention_loss(masses, adjacency, *, alpha: float, key_padding_mask=None, reduction: str = "mean",
                      kind: str = "hinge", eps: float = EPS, return_stats: bool = False, rows=None):
    """CAT's Re-Attention loss.

    Args:
        masses: list over layers of (B, H, T) causal masses, or a stacked (L, B, H, T) tensor.
        adjacency: the :class:`CausalGraph` (or dense bool (B, T, T)) the masses were computed with.
        alpha: hinge margin on the ratio R.
        key_padding_mask: bool (B, T), True = real token; padding rows are excluded.
        reduction: "mean" over eligible rows of the batch (the authors' code) or "sum" (the paper).
        kind: "hinge" (``max(0, alpha - R)``) or "div" (``-log(1+C)/log(1+N)`` where ``R < alpha``).
        return_stats: also return the :class:`RatioStats`.
        rows: the :func:`loss_rows` of ``adjacency`` and ``key_padding_mask`` if already counted.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if kind not in ("hinge", "div"):
        raise ValueError(f"kind must be 'hinge' or 'div', got {kind!r}")
    st = causal_ratio(masses, adjacency, key_padding_mask=key_padding_mask, eps=eps, rows=rows)
    if kind == "hinge":
        per_row = torch.relu(alpha - st.ratio)
    else:
        per_row = -torch.log1p(st.causal) / torch.log1p(st.noncausal)
        per_row = torch.where(st.ratio < alpha, per_row, torch.zeros_like(per_row))
    per_row = torch.where(st.rows, per_row, torch.zeros_like(per_row))
    total = per_row.sum()  # keeps the graph even when no row is eligible (then it is 0)
    loss = total / st.rows.sum().clamp_min(1) if reduction == "mean" else total
    return (loss, st) if return_stats else loss
