"""Independent float64 oracle for the tests and benchmarks (deliberately not the package's reference code).

Loops over heads with explicit index arithmetic for GQA, builds the mask from scratch and takes the
adjacency as a dense bool tensor.
"""
import math

import torch


def oracle_attention(q, k, v, adj=None, key_padding_mask=None, scale=None, segment_ids=None):
    """q (B,Hq,T,D), k/v (B,Hkv,T,D), adj dense bool (B,T,T) or None -> (out, mass) in float64.
    ``segment_ids`` (B,T): a key is allowed only within the query's own segment (equal id).

    Differentiable (float64 autograd). Rows without an allowed key give out = 0, mass = 0."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    idx = torch.arange(T)
    causal = idx[None, :] <= idx[:, None]
    outs, masses = [], []
    for b in range(B):
        allowed = causal.clone()
        if key_padding_mask is not None:
            allowed &= key_padding_mask[b].cpu().bool()[None, :]
        if segment_ids is not None:
            seg = segment_ids[b].cpu()
            allowed &= seg[None, :] == seg[:, None]
        allowed = allowed.to(q.device)
        o_b, m_b = [], []
        for h in range(Hq):
            kv = h // (Hq // Hkv)
            logits = (q[b, h] @ k[b, kv].T) * scale
            logits = torch.where(allowed, logits, torch.full_like(logits, -math.inf))
            rowmax = torch.where(allowed.any(1, keepdim=True), logits.max(1, keepdim=True).values,
                                 torch.zeros(T, 1, dtype=torch.float64, device=q.device))
            e = torch.exp(logits - rowmax) * allowed
            z = e.sum(1, keepdim=True)
            p = e / torch.where(z > 0, z, torch.ones_like(z))
            o_b.append(p @ v[b, kv])
            if adj is not None:
                m_b.append((p * (adj[b].to(q.device) & allowed)).sum(1))
        outs.append(torch.stack(o_b))
        if adj is not None:
            masses.append(torch.stack(m_b))
    out = torch.stack(outs)
    return out, (torch.stack(masses) if adj is not None else None)
