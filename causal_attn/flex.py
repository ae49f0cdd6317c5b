"""Backend "flex": CAT on FlexAttention, the strongest thing a user could write without our kernels (SPEC §2).

An allowed row of P sums to 1, so the causal mass is ``mass_i = exp(LSE_S(i) - LSE_all(i))``: ``LSE_all`` the
row's log-sum-exp over its allowed keys (causal, real, same packed segment), ``LSE_S`` the same over the
allowed keys the adjacency marks. Two FlexAttention calls give both (the second call's output is unused), and
FlexAttention differentiates through its LSE (PyTorch PR 133159), so the backend is plain autograd: a
:class:`causal_attn.backends.DifferentiableBackend`, not a forward/backward pair behind the custom op.

- FlexAttention returns the LSE in natural log (it rescales its base-2 statistics), as the formula needs.
- Rows without an adjacent allowed key have ``LSE_S = -inf``: their mass is 0 through a double ``where``, so
  the gradient into both LSEs is exactly 0 there (never ``exp(-inf - x)`` differentiated). Rows without any
  allowed key (left padding) give out 0 and mass 0, as the other backends do.
- GQA through Flex's own ``enable_gqa``; the adjacency is read in ``mask_mod`` from the bit-packed words
  ``(B, T, ceil(T/32))`` (bit ``j % 32`` of word ``j // 32`` of row ``i``).
- CUDA: ``flex_attention`` and ``create_block_mask`` are compiled (one cached ``torch.compile`` wrapper each).
  Other devices run Flex's eager implementation (it materialises the scores), forward only: torch's
  FlexAttention has no CPU backward, so a call that would need one raises.
- The block masks of the latest adjacency / padding / segments are cached, so the layers of one forward
  (same adjacency) build them once per batch, as a user writing this by hand would.
"""
from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch before 2.9: return_lse=True
    AuxRequest = None

_COMPILED: dict = {}
_cache: dict = {}


def flex_backend(q, k, v, graph, key_padding_mask, seg_start, scale, attn_map=None, attn_map_weight=1.0):
    """``(out, mass)`` per :mod:`causal_attn.backends`; mass None without a graph."""
    if attn_map is not None:
        raise ValueError("backend='flex' cannot collect the attention map (FlexAttention never forms it); "
                         "use backend='auto' with collect_attention_map / attn_map")
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type != "cuda":
        if grad:
            raise NotImplementedError(
                f"backend='flex' has no backward on {q.device.type}: torch {torch.__version__}'s FlexAttention "
                "differentiates on CUDA only. Run the forward under torch.no_grad() (or on detached tensors), or "
                "use backend='auto' to train on this device")
        q, k, v = q.detach(), k.detach(), v.detach()  # Flex refuses CPU inputs that require grad, even in no_grad
    B, Hq, T, _ = q.shape
    packed = graph.packed if graph is not None else None
    mask_all, mask_s = block_masks(packed, key_padding_mask, seg_start, B, T, q.device)
    fn = _flex_function(q.device)
    gqa = Hq != k.shape[1]
    out, lse_all = _flex_with_lse(fn, q, k, v, mask_all, scale, gqa)
    if mask_s is None:
        return out, None
    _, lse_s = _flex_with_lse(fn, q, k, v, mask_s, scale, gqa)
    mass = mass_from_lse(lse_all, lse_s)
    return out, mass.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def mass_from_lse(lse_all, lse_s):
    """``exp(lse_s - lse_all)``, 0 where ``lse_s = -inf`` (no adjacent allowed key), with a gradient that is 0,
    not NaN, on those rows."""
    has = torch.isfinite(lse_s)
    diff = torch.where(has, lse_s, 0.0) - torch.where(has, lse_all, 0.0)
    return torch.where(has, torch.exp(diff), 0.0)


def mask_mods(packed, key_padding_mask, seg_start):
    """``(allowed, adjacent)`` mask_mods: key ``j`` allowed for row ``i`` iff ``seg_start[i] <= j <= i`` and key
    ``j`` is real; adjacent iff allowed and bit ``j`` of row ``i`` of the packed adjacency is set."""
    def allowed(b, h, q_idx, kv_idx):
        ok = q_idx >= kv_idx
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[b, kv_idx]
        if seg_start is not None:
            ok = ok & (kv_idx >= seg_start[b, q_idx])
        return ok

    def adjacent(b, h, q_idx, kv_idx):
        word = packed[b, q_idx, kv_idx // 32]
        return allowed(b, h, q_idx, kv_idx) & (((word >> (kv_idx % 32)) & 1) != 0)

    return allowed, adjacent


def block_masks(packed, key_padding_mask, seg_start, B, T, device):
    """``(BlockMask over allowed keys, BlockMask over adjacent ones or None)``, cached for the latest inputs.

    The packed adjacency is matched by identity and version (it may be large; its mask_mod reads it at run
    time), padding and segments by value (private copies are captured, so a caller's later in-place edit
    cannot desynchronise a cached block mask from its mask_mod)."""
    key = (B, T, str(device))
    if (_cache.get("key") == key and _same_tensor(_cache.get("packed"), packed)
            and _same_value(_cache.get("kpm"), key_padding_mask) and _same_value(_cache.get("seg"), seg_start)):
        return _cache["masks"]
    kpm = key_padding_mask.clone() if key_padding_mask is not None else None
    seg = seg_start.clone() if seg_start is not None else None
    allowed, adjacent = mask_mods(packed, kpm, seg)
    create = _compiled("create_block_mask") if device.type == "cuda" else create_block_mask
    per_sample = B if (kpm is not None or seg is not None) else None  # causal alone: one mask for the batch
    mask_all = create(allowed, per_sample, None, T, T, device=device)
    mask_s = create(adjacent, B, None, T, T, device=device) if packed is not None else None
    _cache.clear()
    _cache.update(key=key, packed=(packed, packed._version) if packed is not None else None, kpm=kpm, seg=seg,
                  masks=(mask_all, mask_s))
    return _cache["masks"]


def _same_tensor(cached, t) -> bool:
    if cached is None or t is None:
        return cached is None and t is None
    return cached[0] is t and cached[1] == t._version


def _same_value(cached, t) -> bool:
    if cached is None or t is None:
        return cached is None and t is None
    return cached.shape == t.shape and cached.device == t.device and torch.equal(cached, t)


def _flex_function(device):
    return _compiled("flex_attention") if device.type == "cuda" else flex_attention


def _compiled(name: str):
    """``torch.compile`` of ``flex_attention`` (static shapes: Flex's kernels specialise on them) or of
    ``create_block_mask`` (materialises no (T, T) mask), made once. Each new shape or mask structure
    recompiles, so the recompile limit is raised above the default 8."""
    if name not in _COMPILED:
        config = torch._dynamo.config
        if hasattr(config, "recompile_limit"):
            config.recompile_limit = max(config.recompile_limit, 64)
        fn = {"flex_attention": flex_attention, "create_block_mask": create_block_mask}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=False if name == "flex_attention" else None)
    return _COMPILED[name]


def _flex_with_lse(fn, q, k, v, block_mask, scale, gqa):
    """``(out, natural-log LSE (B, Hq, T))`` through whichever LSE API this torch has."""
    if q.device.type != "cuda":
        with warnings.catch_warnings():  # eager by design here: not the "use torch.compile" advice
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return _flex_call(fn, q, k, v, block_mask, scale, gqa)
    return _flex_call(fn, q, k, v, block_mask, scale, gqa)


def _flex_call(fn, q, k, v, block_mask, scale, gqa):
    if AuxRequest is not None:
        out, aux = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
