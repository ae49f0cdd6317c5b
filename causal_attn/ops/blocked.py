"""Flash-style attention with causal mass in plain PyTorch (any device; the CPU fallback).

Forward, per block of ``block`` query rows (SPEC §2):
    s = scale * q_blk k[:end]^T          (B, Hkv, G, bq, end), fp32; keys past the block are never read
    P = softmax(s) over allowed keys     allowed = causal & key padding; rows without keys give P = 0
    O = P v,  mass = rowsum(P * A),  LSE = logsumexp(s)   (LSE = +inf on rows without keys)
A query block's whole key range fits in memory, so the row softmax is exact in one pass; the peak
extra memory is O(B * Hq * block * T), never a (T x T) stack per head. Packed rows (``seg_start``) narrow
the key range of a block to ``[lo, end)`` with ``lo`` the smallest segment start of its rows (over the
batch): keys before it are never read, so the work follows the sum of squared sample lengths.

Backward recomputes P = exp(s - LSE) per block and applies
    dP = dO v^T + g * A,   D = rowsum(dO * O) + g * mass,   dS = P (dP - D)
    dQ = scale dS k,  dK += scale dS^T q,  dV += P^T dO       (dK, dV summed over the G query heads)
Grouped-query attention views q as (B, Hkv, G, T, D) so K/V are broadcast, never repeated.
"""
from __future__ import annotations

import torch

from .graph import unpack_bits

TILE_BYTES = 4 * 2**20  # target size of one fp32 score tile (B, Hq, block, T); bounds the extra memory


def block_rows(B: int, Hq: int, T: int, block: int | None = None) -> int:
    """Query rows per block: the given ``block``, or as many as keep one score tile near TILE_BYTES."""
    if block is not None:
        return block
    rows = TILE_BYTES // (4 * B * Hq * max(T, 1))
    return int(min(256, max(16, rows)))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def key_ranges(T: int, block: int, seg_start) -> list[tuple[int, int, int]]:
    """``(start, stop, lo)`` per query block: rows ``[start, stop)`` read keys ``[lo, stop)``."""
    starts = list(range(0, T, block))
    if seg_start is None:
        return [(a, min(a + block, T), 0) for a in starts]
    # segment starts are non-decreasing along a row, so a block's smallest is its first row's
    lows = seg_start[:, starts].amin(0).tolist()
    return [(a, min(a + block, T), int(lo)) for a, lo in zip(starts, lows)]


def _block_masks(start, stop, lo, packed, kpm, seg_start, device):
    """allowed (B|1, 1, 1, bq, stop - lo) and adjacency tile (B, 1, 1, bq, stop - lo) or None."""
    rows = torch.arange(start, stop, device=device)
    cols = torch.arange(lo, stop, device=device)
    allowed = (cols[None, :] <= rows[:, None])[None]
    if kpm is not None:
        allowed = allowed & kpm[:, None, lo:stop]
    if seg_start is not None:
        allowed = allowed & (cols[None, None, :] >= seg_start[:, start:stop, None])
    allowed = allowed[:, None, None]
    adj = None
    if packed is not None:
        w0 = lo // 32
        adj = unpack_bits(packed[:, start:stop, w0: (stop + 31) // 32], stop - w0 * 32)[..., lo - w0 * 32:]
        adj = adj[:, None, None] & allowed
    return allowed, adj


def forward(q, k, v, packed=None, key_padding_mask=None, seg_start=None, scale=None, attn_map=None,
            attn_map_weight=1.0, block: int | None = None):
    """Returns ``(out, lse, mass)``; ``mass`` is an empty tensor when ``packed`` is None.
    With ``attn_map`` (B, T, T) fp32, adds ``attn_map_weight * sum over heads of P`` into it."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    acc = _acc_dtype(q)
    scale = D ** -0.5 if scale is None else scale
    qg = q.reshape(B, Hkv, G, T, D)
    kf, vf = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)  # (B, Hkv, 1, T, D)
    out = torch.empty(B, Hkv, G, T, D, dtype=q.dtype, device=q.device)
    stat = torch.float32 if acc == torch.float32 else acc  # float64 inputs keep float64 statistics (gradcheck)
    lse = torch.empty(B, Hkv, G, T, dtype=stat, device=q.device)
    mass = torch.empty(B, Hkv, G, T, dtype=stat, device=q.device) if packed is not None else None
    block = block_rows(B, Hq, T, block)
    for start, stop, lo in key_ranges(T, block, seg_start):
        allowed, adj = _block_masks(start, stop, lo, packed, key_padding_mask, seg_start, q.device)
        # in-place from here on: one (B, Hq, block, stop - lo) tile alive at a time
        s = torch.matmul(qg[:, :, :, start:stop].to(acc), kf[:, :, :, lo:stop].transpose(-1, -2)).mul_(scale)
        s.masked_fill_(~allowed, float("-inf"))
        m = s.amax(-1, keepdim=True)
        has_key = m > float("-inf")
        m = torch.where(has_key, m, torch.zeros_like(m))
        p = s.sub_(m).exp_()
        l = p.sum(-1, keepdim=True)
        l_safe = torch.where(has_key, l, torch.ones_like(l))
        p.div_(l_safe)
        out[:, :, :, start:stop] = torch.matmul(p, vf[:, :, :, lo:stop]).to(q.dtype)
        lse[:, :, :, start:stop] = torch.where(has_key, m + torch.log(l_safe), torch.full_like(m, float("inf"))).squeeze(-1)
        if adj is not None:
            mass[:, :, :, start:stop] = (p * adj).sum(-1)
        if attn_map is not None:
            attn_map[:, start:stop, lo:stop] += attn_map_weight * p.sum((1, 2)).to(attn_map.dtype)
    out = out.reshape(B, Hq, T, D)
    lse = lse.reshape(B, Hq, T)
    mass = mass.reshape(B, Hq, T) if mass is not None else lse.new_empty(0)
    return out, lse, mass


def backward(q, k, v, out, lse, mass, dout, dmass, packed=None, key_padding_mask=None, seg_start=None, scale=None,
             block: int | None = None):
    """Returns ``(dq, dk, dv)`` in the input dtypes; ``dmass`` may be None (no mass gradient)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    acc = _acc_dtype(q)
    scale = D ** -0.5 if scale is None else scale
    use_mass = packed is not None and dmass is not None
    qg = q.reshape(B, Hkv, G, T, D)
    kf, vf = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    dog = dout.reshape(B, Hkv, G, T, D)
    og = out.reshape(B, Hkv, G, T, D)
    lseg = lse.reshape(B, Hkv, G, T, 1)
    if use_mass:
        gg = dmass.reshape(B, Hkv, G, T, 1).to(acc)
        mg = mass.reshape(B, Hkv, G, T, 1).to(acc)
    dq = torch.empty(B, Hkv, G, T, D, dtype=q.dtype, device=q.device)
    dk = torch.zeros(B, Hkv, T, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, Hkv, T, D, dtype=acc, device=q.device)
    block = block_rows(B, Hq, T, block)
    for start, stop, lo in key_ranges(T, block, seg_start):
        allowed, adj = _block_masks(start, stop, lo, packed, key_padding_mask, seg_start, q.device)
        qb = qg[:, :, :, start:stop].to(acc)
        dob = dog[:, :, :, start:stop].to(acc)
        s = torch.matmul(qb, kf[:, :, :, lo:stop].transpose(-1, -2)).mul_(scale)
        s.masked_fill_(~allowed, float("-inf"))
        p = s.sub_(lseg[:, :, :, start:stop].to(acc)).exp_()  # +inf LSE (no keys) -> 0
        dv[:, :, lo:stop] += torch.matmul(p.transpose(-1, -2), dob).sum(2)
        dp = torch.matmul(dob, vf[:, :, :, lo:stop].transpose(-1, -2))
        d = (dob * og[:, :, :, start:stop].to(acc)).sum(-1, keepdim=True)
        if use_mass:
            g = gg[:, :, :, start:stop]
            dp.addcmul_(adj.to(acc), g)
            d = d + g * mg[:, :, :, start:stop]
        ds = p.mul_(dp.sub_(d))
        del dp
        dq[:, :, :, start:stop] = (torch.matmul(ds, kf[:, :, :, lo:stop]) * scale).to(q.dtype)
        dk[:, :, lo:stop] += torch.matmul(ds.transpose(-1, -2), qb).sum(2).mul_(scale)
    return dq.reshape(B, Hq, T, D), dk.to(k.dtype), dv.to(v.dtype)
