"""Triton flash attention that also emits the causal mass of every row (SPEC §2); backend "triton".

Forward (:func:`_attn_fwd`, one program per (query block, batch x query head)):
    online softmax in base 2 on ``s = q k^T * scale * log2(e)``; the key loop is split into the
    off-diagonal blocks ``[0, start_m)`` (no causal mask) and the diagonal blocks
    ``[start_m, start_m + BLOCK_M)`` (causal and tail masks). With an adjacency the bit-packed tile of
    the current (query block, key block) is expanded to 0/1 and ``macc += rowsum(p * A)`` is kept beside
    ``l`` with the same rescaling; ``HAS_ADJ`` is a constexpr, so plain attention compiles the mass path
    out. Output: ``O = acc / l`` (input dtype), ``LSE2 = m + log2 l`` (fp32, base 2, +inf on rows without
    keys) and ``mass = macc / l`` (fp32). Rows without keys give O = 0, mass = 0.

Backward (FlashAttention-2 form with the mass term, ``g = dL/dmass``):
    :func:`_attn_bwd_preprocess`  ``D = rowsum(dO * O) + g * mass``
    :func:`_attn_bwd_dkdv`        one program per (key block, batch x kv head); loops over the query
                                  heads of the GQA group and all query blocks at or below the diagonal:
                                  ``dV += P^T dO``, ``dK += dS^T q`` with ``dS = P (dO v^T + g A - D)``
    :func:`_attn_bwd_dq`          one program per (query block, batch x query head): ``dQ += dS k``
Separate dK/dV and dQ passes recompute ``q k^T`` and ``dO v^T`` once more (7 instead of 5 matrix
products) but every output element is owned by exactly one program, so the backward is deterministic
without atomics and dK/dV sum the GQA group in registers; the fused form needs atomic dQ adds in fp32,
whose summation order changes run to run.

Packed sequences (``HAS_SEG``, int32 ``seg_start`` (B, T): the first position of each row's sample): row i
sees keys ``seg_start[i] <= j <= i`` only. The forward and dQ key loops start at the key block holding the
query block's first segment start, the dK/dV query loop stops at the end of its last column's sample, so
the work follows the sum of squared sample lengths, not the packed length squared; inside the visited
tiles keys of earlier samples are masked like padding.

Diagnostics (:func:`_attn_map`, off by default): one program per (query block, batch) recomputes
``P = exp2(s - LSE2)`` for every query head and adds ``weight * sum_h P`` into a (B, T, T) fp32 buffer;
the program owns its rows, so no atomics either.

Blocks: key blocks are multiples of 32 columns (one adjacency word); the forward and dQ passes need
``BLOCK_M % BLOCK_N == 0``, the dK/dV pass ``BLOCK_N % BLOCK_M == 0``, so the diagonal is whole blocks.
Head dims that are not powers of two are padded to the next power of two with masked loads.
On GPU each kernel is autotuned over the configs of its GPU generation (:data:`GPU_CONFIGS`); under
``TRITON_INTERPRET=1`` (CPU tensors, fp16/fp32 only) the pinned :data:`INTERPRETER_CONFIG` is used.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------- helpers
@triton.jit
def _adjacency_tile(adj_row_ptrs, row_ok, start_n, n_words, stride_w,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """0/1 float tile (BLOCK_M, BLOCK_N) of the packed adjacency for columns start_n .. start_n+BLOCK_N.

    ``adj_row_ptrs`` (BLOCK_M,) point at word 0 of each row; column c is bit c % 32 of word c // 32."""
    words_idx = start_n // 32 + tl.arange(0, BLOCK_N // 32)
    words = tl.load(adj_row_ptrs[:, None] + words_idx[None, :] * stride_w,
                    mask=row_ok[:, None] & (words_idx[None, :] < n_words), other=0)
    bits = (words[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_M, BLOCK_N)).to(tl.float32)


@triton.jit
def _load_rows(base, idx, idx_ok, stride_t, stride_d, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    """(len(idx), BLOCK_D) tile of a (T, D) matrix; rows past T and padded head dims read as 0."""
    dims = tl.arange(0, BLOCK_D)
    return tl.load(base + idx[:, None] * stride_t + dims[None, :] * stride_d,
                   mask=idx_ok[:, None] & (dims[None, :] < HEAD_D), other=0.0)


@triton.jit
def _store_rows(base, idx, idx_ok, stride_t, stride_d, value, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    tl.store(base + idx[:, None] * stride_t + dims[None, :] * stride_d, value,
             mask=idx_ok[:, None] & (dims[None, :] < HEAD_D))


@triton.jit
def _key_ok(kpm_base, cols, T, HAS_KPM: tl.constexpr):
    """Key padding for columns ``cols`` (True = real key); all True without a mask."""
    if HAS_KPM:
        ok = tl.load(kpm_base + cols, mask=cols < T, other=0) != 0
    else:
        ok = cols < T
    return ok


@triton.jit
def _segment_starts(seg_base, rows, row_ok, HAS_SEG: tl.constexpr):
    """``seg_start`` of ``rows`` (first allowed key of each row); unused zeros without packed segments."""
    if HAS_SEG:
        starts = tl.load(seg_base + rows, mask=row_ok, other=0)
    else:
        starts = tl.zeros_like(rows)
    return starts


@triton.jit
def _first_key_block(seg_base, start_m, BLOCK_N: tl.constexpr, HAS_SEG: tl.constexpr):
    """Start of the key loop of the query block at ``start_m``: the key block holding the smallest segment
    start of its rows, which is its first row's (starts are non-decreasing); 0 without packed segments."""
    if HAS_SEG:
        lo = tl.load(seg_base + start_m) // BLOCK_N * BLOCK_N
    else:
        lo = 0
    return lo


@triton.jit
def _query_block(Hq, G, T, BLOCK_M: tl.constexpr):
    """Program (query block, batch x query head) -> (bh, b, h, kv head, start_m, rows, row_ok)."""
    bh = tl.program_id(1)
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    return bh, bh // Hq, bh % Hq, (bh % Hq) // G, start_m, rows, rows < T


# ---------------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_step(q, k_base, v_base, adj_row_ptrs, kpm_base, m_i, l_i, acc, macc, rows, row_ok, seg, start_n,
              T, n_words, qk_scale, skt, skd, svt, svd, saw,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DIAGONAL: tl.constexpr, HAS_ADJ: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
              PRECISION: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < T
    k = _load_rows(k_base, cols, col_ok, skt, skd, HEAD_D, BLOCK_D)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if DIAGONAL:
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    if HAS_KPM:
        s = tl.where(_key_ok(kpm_base, cols, T, HAS_KPM)[None, :], s, float("-inf"))
    if HAS_SEG:  # keys of earlier segments (any visited block may hold some: later rows start later)
        s = tl.where(cols[None, :] >= seg[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows without keys so far: no inf - inf
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_ADJ:
        a = _adjacency_tile(adj_row_ptrs, row_ok, start_n, n_words, saw, BLOCK_M, BLOCK_N)
        macc = macc * alpha + tl.sum(p * a, 1)
    v = _load_rows(v_base, cols, col_ok, svt, svd, HEAD_D, BLOCK_D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc, macc


@triton.jit
def _attn_fwd(Q, K, V, Out, Lse, Mass, Adj, Kpm, Seg,
              sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, sod,
              sab, sar, saw, skpb,
              T, Hq, G, n_words, qk_scale,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_ADJ: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    bh, b, h, hk, start_m, rows, row_ok = _query_block(Hq, G, T, BLOCK_M)
    seg = _segment_starts(Seg + b * T, rows, row_ok, HAS_SEG)
    lo = _first_key_block(Seg + b * T, start_m, BLOCK_N, HAS_SEG)
    q = _load_rows(Q + b * sqb + h * sqh, rows, row_ok, sqt, sqd, HEAD_D, BLOCK_D)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    adj_row_ptrs = Adj + b * sab + rows * sar
    kpm_base = Kpm + b * skpb
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    macc = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # off-diagonal key blocks [lo, start_m): no causal mask; lo = 0 unless packed (lo <= start_m always)
    for start_n in range(lo, start_m, BLOCK_N):
        m_i, l_i, acc, macc = _fwd_step(q, k_base, v_base, adj_row_ptrs, kpm_base, m_i, l_i, acc, macc, rows, row_ok,
                                        seg, start_n, T, n_words, qk_scale, skt, skd, svt, svd, saw,
                                        HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_ADJ, HAS_KPM, HAS_SEG, PRECISION)
    # diagonal key blocks [start_m, start_m + BLOCK_M): causal mask
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        m_i, l_i, acc, macc = _fwd_step(q, k_base, v_base, adj_row_ptrs, kpm_base, m_i, l_i, acc, macc, rows, row_ok,
                                        seg, start_n, T, n_words, qk_scale, skt, skd, svt, svd, saw,
                                        HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_ADJ, HAS_KPM, HAS_SEG, PRECISION)
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    _store_rows(Out + b * sob + h * soh, rows, row_ok, sot, sod, out.to(Out.dtype.element_ty), HEAD_D, BLOCK_D)
    stat_off = bh * T + rows
    tl.store(Lse + stat_off, tl.where(has_key, m_i + tl.log2(l_safe), float("inf")), mask=row_ok)
    if HAS_ADJ:
        tl.store(Mass + stat_off, macc / l_safe, mask=row_ok)


# ---------------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess(Out, DO, Mass, Gm, Delta,
                         sob, soh, sot, sod, sdb, sdh, sdt, sdd,
                         T, Hq,
                         HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         HAS_ADJ: tl.constexpr):
    """D = rowsum(dO * O) + g * mass, fp32 (B, Hq, T)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    o = _load_rows(Out + b * sob + h * soh, rows, row_ok, sot, sod, HEAD_D, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + b * sdb + h * sdh, rows, row_ok, sdt, sdd, HEAD_D, BLOCK_D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    stat_off = bh * T + rows
    if HAS_ADJ:
        delta += tl.load(Gm + stat_off, mask=row_ok, other=0.0) * tl.load(Mass + stat_off, mask=row_ok, other=0.0)
    tl.store(Delta + stat_off, delta, mask=row_ok)


@triton.jit
def _probabilities(q, k, lse, rows, cols, key_ok, seg, qk_scale, DIAGONAL: tl.constexpr, HAS_KPM: tl.constexpr,
                   HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """P = exp2(q k^T * scale * log2 e - LSE2) with causal (diagonal blocks), key padding and segment masks.
    LSE2 = +inf on rows without keys (and on rows past T), which gives P = 0 there."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if DIAGONAL:
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    if HAS_KPM:
        s = tl.where(key_ok[None, :], s, float("-inf"))
    if HAS_SEG:
        s = tl.where(cols[None, :] >= seg[:, None], s, float("-inf"))
    return tl.exp2(s - lse[:, None])


@triton.jit
def _adjacency_tile_t(adj_base, rows, row_ok, start_n, n_words, stride_r, stride_w,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Transposed 0/1 tile (BLOCK_N, BLOCK_M): element [c, r] = A[rows[r], start_n + c]."""
    words_idx = start_n // 32 + tl.arange(0, BLOCK_N // 32)
    words = tl.load(adj_base + words_idx[:, None] * stride_w + rows[None, :] * stride_r,
                    mask=(words_idx[:, None] < n_words) & row_ok[None, :], other=0)
    bits = (words[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1
    return tl.reshape(bits, (BLOCK_N, BLOCK_M)).to(tl.float32)


@triton.jit
def _dkdv_step(dk, dv, k, v, q_base, do_base, stat_base, Lse, Delta, Gm, adj_base, col_end, cols, start_m, start_n,
               T, n_words, qk_scale, sqt, sqd, sdt, sdd, sar, saw,
               HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               DIAGONAL: tl.constexpr, HAS_ADJ: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
               PRECISION: tl.constexpr):
    """One query block against this program's key block, in transposed form (keys along dim 0), so P^T
    and dS^T come straight out of the dots: dV += P^T dO, dK += dS^T q."""
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    dims = tl.arange(0, BLOCK_D)
    q_t = tl.load(q_base + rows[None, :] * sqt + dims[:, None] * sqd,
                  mask=row_ok[None, :] & (dims[:, None] < HEAD_D), other=0.0)
    do = _load_rows(do_base, rows, row_ok, sdt, sdd, HEAD_D, BLOCK_D)
    lse = tl.load(Lse + stat_base + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + stat_base + rows, mask=row_ok, other=0.0)
    s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale
    if DIAGONAL:
        s_t = tl.where(cols[:, None] <= rows[None, :], s_t, float("-inf"))
    if HAS_SEG:  # padded keys need no mask here (see _attn_bwd_dkdv), rows of later segments do
        s_t = tl.where(rows[None, :] < col_end[:, None], s_t, float("-inf"))
    p_t = tl.exp2(s_t - lse[None, :])
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    if HAS_ADJ:
        g = tl.load(Gm + stat_base + rows, mask=row_ok, other=0.0)
        dp_t += g[None, :] * _adjacency_tile_t(adj_base, rows, row_ok, start_n, n_words, sar, saw, BLOCK_M, BLOCK_N)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, Lse, Delta, Gm, Adj, Kpm, Seg, SegEnd, DK, DV,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                   sab, sar, saw, skpb,
                   T, Hq, G, n_words, qk_scale, scale,
                   HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_ADJ: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    Hkv = Hq // G
    b = bhk // Hkv
    hk = bhk % Hkv
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < T
    k = _load_rows(K + b * skb + hk * skh, cols, col_ok, skt, skd, HEAD_D, BLOCK_D)
    v = _load_rows(V + b * svb + hk * svh, cols, col_ok, svt, svd, HEAD_D, BLOCK_D)
    key_ok = _key_ok(Kpm + b * skpb, cols, T, HAS_KPM)
    adj_base = Adj + b * sab
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    diag_end = tl.minimum(start_n + BLOCK_N, T)
    if HAS_SEG:
        # col_end: the end of each column's segment (rows from there on cannot see it); rows at or past the
        # last column's segment end start after every column of this block: the query loop stops there
        col_end = tl.load(SegEnd + b * T + cols, mask=col_ok, other=0)
        q_end = tl.load(SegEnd + b * T + diag_end - 1)
    else:
        col_end = cols
        q_end = T
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdb + h * sdh
        stat_base = (b * Hq + h) * T
        # diagonal query blocks [start_n, start_n + BLOCK_N): causal mask
        for start_m in range(start_n, diag_end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, stat_base, Lse, Delta, Gm, adj_base, col_end, cols,
                                start_m, start_n, T, n_words, qk_scale, sqt, sqd, sdt, sdd, sar, saw,
                                HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_ADJ, HAS_KPM, HAS_SEG, PRECISION)
        # off-diagonal query blocks [diag_end, q_end): no causal mask; q_end = T unless packed
        for start_m in range(diag_end, q_end, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, q_base, do_base, stat_base, Lse, Delta, Gm, adj_base, col_end, cols,
                                start_m, start_n, T, n_words, qk_scale, sqt, sqd, sdt, sdd, sar, saw,
                                HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_ADJ, HAS_KPM, HAS_SEG, PRECISION)
    if HAS_KPM:
        # rows of padded keys only ever receive their own (meaningless, possibly inf) P^T and dS^T rows:
        # masking the two accumulators once replaces a mask on every (key, query) tile
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    # dk/dv are (B, Hkv, T, D) contiguous, written once by this program
    out_off = bhk * T * HEAD_D
    _store_rows(DK + out_off, cols, col_ok, HEAD_D, 1, (dk * scale).to(DK.dtype.element_ty), HEAD_D, BLOCK_D)
    _store_rows(DV + out_off, cols, col_ok, HEAD_D, 1, dv.to(DV.dtype.element_ty), HEAD_D, BLOCK_D)


@triton.jit
def _dq_step(dq, q, do, lse, delta, g, k_base, v_base, kpm_base, adj_row_ptrs, rows, row_ok, seg, start_n,
             T, n_words, qk_scale, skt, skd, svt, svd, saw,
             HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DIAGONAL: tl.constexpr, HAS_ADJ: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr,
             PRECISION: tl.constexpr):
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < T
    k = _load_rows(k_base, cols, col_ok, skt, skd, HEAD_D, BLOCK_D)
    v = _load_rows(v_base, cols, col_ok, svt, svd, HEAD_D, BLOCK_D)
    key_ok = _key_ok(kpm_base, cols, T, HAS_KPM)
    p = _probabilities(q, k, lse, rows, cols, key_ok, seg, qk_scale, DIAGONAL, HAS_KPM, HAS_SEG, PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if HAS_ADJ:
        dp += g[:, None] * _adjacency_tile(adj_row_ptrs, row_ok, start_n, n_words, saw, BLOCK_M, BLOCK_N)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, Lse, Delta, Gm, Adj, Kpm, Seg, DQ,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sdb, sdh, sdt, sdd,
                 sab, sar, saw, skpb,
                 T, Hq, G, n_words, qk_scale, scale,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_ADJ: tl.constexpr, HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    bh, b, h, hk, start_m, rows, row_ok = _query_block(Hq, G, T, BLOCK_M)
    seg = _segment_starts(Seg + b * T, rows, row_ok, HAS_SEG)
    lo = _first_key_block(Seg + b * T, start_m, BLOCK_N, HAS_SEG)
    q = _load_rows(Q + b * sqb + h * sqh, rows, row_ok, sqt, sqd, HEAD_D, BLOCK_D)
    do = _load_rows(DO + b * sdb + h * sdh, rows, row_ok, sdt, sdd, HEAD_D, BLOCK_D)
    stat_off = bh * T + rows
    lse = tl.load(Lse + stat_off, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + stat_off, mask=row_ok, other=0.0)
    g = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_ADJ:
        g = tl.load(Gm + stat_off, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    kpm_base = Kpm + b * skpb
    adj_row_ptrs = Adj + b * sab + rows * sar
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # off-diagonal key blocks [lo, start_m), then the diagonal ones, as in the forward
    for start_n in range(lo, start_m, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, g, k_base, v_base, kpm_base, adj_row_ptrs, rows, row_ok, seg, start_n,
                      T, n_words, qk_scale, skt, skd, svt, svd, saw,
                      HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, False, HAS_ADJ, HAS_KPM, HAS_SEG, PRECISION)
    for start_n in range(start_m, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, g, k_base, v_base, kpm_base, adj_row_ptrs, rows, row_ok, seg, start_n,
                      T, n_words, qk_scale, skt, skd, svt, svd, saw,
                      HEAD_D, BLOCK_D, BLOCK_M, BLOCK_N, True, HAS_ADJ, HAS_KPM, HAS_SEG, PRECISION)
    # dq is (B, Hq, T, D) contiguous
    _store_rows(DQ + bh * T * HEAD_D, rows, row_ok, HEAD_D, 1, (dq * scale).to(DQ.dtype.element_ty), HEAD_D, BLOCK_D)


# ---------------------------------------------------------------------------------------- diagnostics
@triton.jit
def _attn_map(Q, K, Lse, Kpm, Seg, Map,
              sqb, sqh, sqt, sqd, skb, skh, skt, skd, smb, smr, smc, skpb,
              T, Hq, G, qk_scale, weight,
              HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_SEG: tl.constexpr, PRECISION: tl.constexpr):
    """Map[b, i, j] += weight * sum_h P[b, h, i, j] for the rows of one query block (no gradient); key blocks
    before the block's first segment start hold P = 0 and are left untouched."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    seg = _segment_starts(Seg + b * T, rows, row_ok, HAS_SEG)
    lo = _first_key_block(Seg + b * T, start_m, BLOCK_N, HAS_SEG)
    for start_n in range(lo, tl.minimum(start_m + BLOCK_M, T), BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < T
        key_ok = _key_ok(Kpm + b * skpb, cols, T, HAS_KPM)
        tile = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for h in range(0, Hq):
            q = _load_rows(Q + b * sqb + h * sqh, rows, row_ok, sqt, sqd, HEAD_D, BLOCK_D)
            k = _load_rows(K + b * skb + (h // G) * skh, cols, col_ok, skt, skd, HEAD_D, BLOCK_D)
            lse = tl.load(Lse + (b * Hq + h) * T + rows, mask=row_ok, other=float("inf"))
            tile += _probabilities(q, k, lse, rows, cols, key_ok, seg, qk_scale, True, HAS_KPM, HAS_SEG, PRECISION)
        ptrs = Map + b * smb + rows[:, None] * smr + cols[None, :] * smc
        ok = row_ok[:, None] & col_ok[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + weight * tile, mask=ok)


# ---------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}"

    def triton(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.num_warps,
                             num_stages=self.num_stages)


C = KernelConfig
# Per GPU generation (compute capability 8.x / 9.x), head-dim class (<= 64, <= 128, <= 256) and kernel.
# Every config obeys the block rules above and compiles without register spills with the mass path and
# key padding on (benchmarks/kernel_resources.py, sm_80 / sm_90, D = 64, 128, 256; see KERNEL_NOTES.md
# for the two plain-attention variants with a 16-24 byte spill); the first entry is the one the quick
# compile check uses (sm_90 D <= 64 dK/dV starts with M16-N128: M32-N128 spills 8 B with packed segments under
# Triton 3.8, the version torch 2.14 pins). dK/dV holds two fp32 (BLOCK_N x D) accumulators, hence
# its narrow query blocks and 8 warps at D = 128.
GPU_CONFIGS: dict[int, dict[int, dict[str, list[KernelConfig]]]] = {
    80: {
        64: {"fwd": [C(128, 64, 8, 2), C(64, 64, 4, 3), C(128, 32, 8, 2), C(64, 32, 4, 3)],
             "dkdv": [C(16, 128, 8, 2), C(16, 64, 4, 2)],
             "dq": [C(128, 32, 8, 2), C(64, 32, 4, 2), C(64, 32, 4, 3)]},
        128: {"fwd": [C(128, 64, 8, 2), C(64, 64, 4, 3), C(64, 32, 4, 3)],
              "dkdv": [C(32, 64, 8, 2), C(16, 64, 8, 2), C(32, 32, 4, 2), C(16, 32, 4, 2)],
              "dq": [C(128, 32, 8, 2), C(64, 32, 4, 2), C(32, 32, 4, 2)]},
        256: {"fwd": [C(32, 32, 4, 2)],
              "dkdv": [C(32, 32, 8, 1)],
              "dq": [C(32, 32, 4, 1), C(64, 32, 8, 1)]},
    },
    90: {
        64: {"fwd": [C(128, 64, 8, 3), C(128, 128, 8, 2), C(64, 64, 4, 3), C(128, 64, 8, 2)],
             "dkdv": [C(16, 128, 8, 2), C(32, 128, 8, 2), C(64, 128, 8, 2), C(32, 64, 4, 2)],
             "dq": [C(128, 64, 8, 2), C(128, 32, 8, 2), C(64, 64, 4, 2), C(64, 32, 4, 3)]},
        128: {"fwd": [C(128, 64, 8, 2), C(128, 64, 8, 3), C(64, 64, 4, 3), C(128, 32, 8, 2)],
              "dkdv": [C(16, 128, 8, 2), C(16, 64, 8, 2)],
              "dq": [C(128, 64, 8, 2), C(128, 32, 8, 2), C(64, 64, 4, 2), C(64, 32, 4, 3)]},
        256: {"fwd": [C(64, 32, 4, 2), C(64, 64, 8, 2)],
              "dkdv": [C(32, 32, 8, 1)],
              "dq": [C(32, 32, 4, 1)]},
    },
}
# fp32 inputs use exact fp32 dot products (no TF32, no tensor cores) whose operands take twice the
# registers: small tiles for every generation and head dim (a correctness path, not a fast one).
FP32_CONFIGS = {"fwd": [C(32, 32, 8, 2)], "dkdv": [C(32, 32, 8, 1), C(16, 32, 8, 1)], "dq": [C(32, 32, 8, 1)]}
# Small blocks keep interpreter tests fast while still crossing block boundaries at T > 64.
INTERPRETER_CONFIG = {"fwd": C(64, 32, 4, 1), "dkdv": C(32, 64, 4, 1), "dq": C(64, 32, 4, 1)}
PREPROCESS_BLOCK_M = 64
MAP_CONFIG = C(64, 32, 4, 1)
KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq}
TUNE_KEY = ["T", "HEAD_D", "HAS_ADJ", "HAS_KPM", "HAS_SEG", "PRECISION"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpu_generation(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


_tuned: dict[tuple[str, int, int], object] = {}


_pin_first = False  # pin_first_config(): every GPU launch uses its config list's first entry, no autotuning


@contextlib.contextmanager
def pin_first_config():
    """Inside: GPU launches use the first config of their list (:data:`GPU_CONFIGS` / :data:`FP32_CONFIGS`)
    instead of autotuning, so each launch variant compiles one binary instead of one per config. For checks of
    correctness that need not pay the autotuner (the GPU kit's correctness section; the CUDA tests take the
    autotuned path). Not thread-safe: a process-wide switch for the duration of the block."""
    global _pin_first
    before, _pin_first = _pin_first, True
    try:
        yield
    finally:
        _pin_first = before


def _launcher(kernel: str, device: torch.device, head_dim: int, fp32: bool):
    """(callable kernel[grid], pinned config or None): autotuned per GPU generation and head-dim class
    (fp32: :data:`FP32_CONFIGS`), pinned in the interpreter and inside :func:`pin_first_config`."""
    if interpreting():
        return KERNELS[kernel], INTERPRETER_CONFIG[kernel]
    key = (kernel, gpu_generation(device), 0 if fp32 else head_dim_class(head_dim))
    if _pin_first:
        return KERNELS[kernel], (FP32_CONFIGS[kernel] if fp32 else GPU_CONFIGS[key[1]][key[2]][kernel])[0]
    if key not in _tuned:
        configs = FP32_CONFIGS[kernel] if fp32 else GPU_CONFIGS[key[1]][key[2]][kernel]
        _tuned[key] = triton.autotune([c.triton() for c in configs], key=TUNE_KEY)(KERNELS[kernel])
    return _tuned[key], None


def autotune_choices() -> dict[str, str]:
    """``{"<kernel> <tuning key>": "BLOCK_MxBLOCK_N w<warps> s<stages>"}`` for every shape autotuned so far
    in this process (the key holds T, HEAD_D, HAS_ADJ, HAS_KPM, HAS_SEG, PRECISION and the argument dtypes)."""
    out = {}
    for (kernel, _gen, _dclass), tuner in _tuned.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            kw = cfg.kwargs
            out[f"{kernel} {key}"] = f"{kw.get('BLOCK_M')}x{kw.get('BLOCK_N')} w{cfg.num_warps} s{cfg.num_stages}"
    return out


# Every distinct launch of this process: (kernel, dtype, T % 16 == 0, HEAD_D, HAS_ADJ, HAS_KPM, HAS_SEG, PRECISION,
# pinned) -> the lengths T it ran at. On a GPU each key is one binary per autotune config, autotuned once per T (one
# binary, no autotuning, where ``pinned``: inside :func:`pin_first_config`): the GPU kit's dry run counts them to
# predict its compile time (benchmarks/gpu_budget.py).
_census: dict[tuple, set] = {}


def _record(kernel: str, dtype, T: int, flags: dict):
    key = (kernel, str(dtype).replace("torch.", ""), T % 16 == 0,
           *(flags.get(k) for k in ("HEAD_D", "HAS_ADJ", "HAS_KPM", "HAS_SEG", "PRECISION")), _pin_first)
    _census.setdefault(key, set()).add(T)


def launch_census() -> dict[tuple, set]:
    """A copy of the launch census (see :data:`_census`)."""
    return {k: set(v) for k, v in _census.items()}


def _run(kernel: str, device, grid_rows: int, grid_cols: int, *args, **constexprs):
    fn, pinned = _launcher(kernel, device, constexprs["HEAD_D"], constexprs["PRECISION"] == "ieee")
    _record(kernel, args[0].dtype, grid_rows, constexprs)

    def grid(meta):
        return (triton.cdiv(grid_rows, meta["BLOCK_N" if kernel == "dkdv" else "BLOCK_M"]), grid_cols)

    if pinned is not None:
        fn[grid](*args, **constexprs, BLOCK_M=pinned.block_m, BLOCK_N=pinned.block_n, num_warps=pinned.num_warps,
                 num_stages=pinned.num_stages)
    else:
        fn[grid](*args, **constexprs)


# ---------------------------------------------------------------------------------------- launchers
def _check(q: torch.Tensor, packed, attn_map=None):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton backend supports float16, bfloat16 and float32, not {q.dtype}; "
                        "use backend='cpu' for float64")
    if interpreting():
        if q.dtype == torch.bfloat16:
            raise TypeError("TRITON_INTERPRET=1 cannot do bfloat16 arithmetic (triton issue 11584); "
                            "use float16/float32 or backend='cpu'")
    elif q.device.type != "cuda":
        raise ValueError(f"the Triton backend needs CUDA tensors (got {q.device}); set TRITON_INTERPRET=1 "
                         "before importing triton to run it on CPU tensors")
    if q.shape[-1] > 256:
        raise ValueError(f"the Triton backend supports head dims up to 256, got {q.shape[-1]}")
    if q.numel() >= 2**31 or (attn_map is not None and attn_map.numel() >= 2**31):
        raise ValueError(f"the Triton kernels index with int32: {tuple(q.shape)} is too large, split the batch")
    T = q.shape[2]
    if packed is not None and (packed.dtype != torch.int32 or packed.shape != (q.shape[0], T, (T + 31) // 32)):
        raise ValueError(f"packed adjacency must be int32 {(q.shape[0], T, (T + 31) // 32)}; got "
                         f"{packed.dtype} {tuple(packed.shape)}")


def _segments(seg_start, dummy):
    """(seg_start, seg_end) int32 (B, T) for the kernels: each position's segment start, and the exclusive end
    of each position's segment (the dK/dV pass stops its query loop there); dummies without segments."""
    if seg_start is None:
        return dummy, dummy
    B, T = seg_start.shape
    pos = torch.arange(T, device=seg_start.device, dtype=seg_start.dtype).expand(B, T).contiguous()
    seg_end = torch.searchsorted(seg_start.contiguous(), pos, right=True).to(torch.int32)
    return seg_start.to(torch.int32).contiguous(), seg_end


def _common(q, packed, key_padding_mask):
    """Shared launch arguments: block head dim, dot precision, adjacency / padding pointers and strides."""
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no TF32 rounding
    dummy = q.new_zeros(1, dtype=torch.int32)
    adj = packed if packed is not None else dummy
    adj_strides = packed.stride() if packed is not None else (0, 0, 0)
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else dummy.to(torch.int8)
    kpm_stride = kpm.stride(0) if key_padding_mask is not None else 0
    n_words = packed.shape[2] if packed is not None else 0
    return dict(HEAD_D=D, BLOCK_D=block_d, PRECISION=precision), adj, (*adj_strides, kpm_stride), kpm, n_words


def forward(q, k, v, packed, key_padding_mask, seg_start, scale, attn_map=None, attn_map_weight=1.0):
    """Backend forward -> (out, lse2, mass); see the module docstring."""
    _check(q, packed, attn_map)
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    const, adj, adj_kpm_strides, kpm, n_words = _common(q, packed, key_padding_mask)
    seg, _ = _segments(seg_start, adj.new_zeros(1))
    out = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device)
    mass = torch.empty(B, Hq, T, dtype=torch.float32, device=q.device) if packed is not None else lse.new_empty(0)
    qk_scale = float(scale) * LOG2E
    _run("fwd", q.device, T, B * Hq, q, k, v, out, lse, mass if packed is not None else lse, adj, kpm, seg,
         *q.stride(), *k.stride(), *v.stride(), *out.stride(), *adj_kpm_strides, T, Hq, G, n_words, qk_scale,
         HAS_ADJ=packed is not None, HAS_KPM=key_padding_mask is not None, HAS_SEG=seg_start is not None, **const)
    if attn_map is not None:
        grid = (triton.cdiv(T, MAP_CONFIG.block_m), B)
        _attn_map[grid](q, k, lse, kpm, seg, attn_map, *q.stride()[:4], *k.stride(), *attn_map.stride(), adj_kpm_strides[3],
                        T, Hq, G, qk_scale, float(attn_map_weight), HAS_KPM=key_padding_mask is not None,
                        HAS_SEG=seg_start is not None,
                        BLOCK_M=MAP_CONFIG.block_m, BLOCK_N=MAP_CONFIG.block_n, num_warps=MAP_CONFIG.num_warps,
                        **const)
    return out, lse, mass


def backward(q, k, v, out, lse, mass, dout, dmass, packed, key_padding_mask, seg_start, scale):
    """Backend backward -> (dq, dk, dv); ``dmass`` None (or no adjacency) drops the mass terms."""
    _check(q, packed)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    use_mass = packed is not None and dmass is not None
    const, adj, adj_kpm_strides, kpm, n_words = _common(q, packed if use_mass else None, key_padding_mask)
    g = dmass.to(torch.float32).contiguous() if use_mass else lse
    seg, seg_end = _segments(seg_start, adj.new_zeros(1))
    mass_arg = mass if use_mass else lse
    delta = torch.empty_like(lse)
    pre_grid = (triton.cdiv(T, PREPROCESS_BLOCK_M), B * Hq)
    _record("preprocess", q.dtype, T, dict(HEAD_D=D, HAS_ADJ=use_mass))
    _attn_bwd_preprocess[pre_grid](out, dout, mass_arg, g, delta, *out.stride(), *dout.stride(), T, Hq,
                                   HEAD_D=D, BLOCK_D=const["BLOCK_D"], BLOCK_M=PREPROCESS_BLOCK_M, HAS_ADJ=use_mass)
    dq = torch.empty(B, Hq, T, D, dtype=q.dtype, device=q.device)
    dk = torch.empty(B, Hkv, T, D, dtype=k.dtype, device=q.device)
    dv = torch.empty(B, Hkv, T, D, dtype=v.dtype, device=q.device)
    qk_scale = float(scale) * LOG2E
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *adj_kpm_strides, T, Hq, G, n_words, qk_scale,
              float(scale))
    flags = dict(HAS_ADJ=use_mass, HAS_KPM=key_padding_mask is not None, HAS_SEG=seg_start is not None, **const)
    _run("dkdv", q.device, T, B * Hkv, q, k, v, dout, lse, delta, g, adj, kpm, seg, seg_end, dk, dv, *common, **flags)
    _run("dq", q.device, T, B * Hq, q, k, v, dout, lse, delta, g, adj, kpm, seg, dq, *common, **flags)
    return dq, dk, dv
