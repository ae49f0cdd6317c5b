"""Backend "flex": CAT on FlexAttention, the strongest thing a user could write without our kernels (SPEC §2).

An allowed row of P sums to 1, so the causal mass is ``mass_i = exp(LSE_S(i) - LSE_all(i))``: ``LSE_all`` the
row's log-sum-exp over its allowed keys (causal, real, same packed segment), ``LSE_S`` the same over the
allowed keys the adjacency marks. Two FlexAttention calls give both (the second call's output is unused), and
FlexAttention differentiates through its LSE (PyTorch PR 133159), so the backend is plain autograd: a
:class:`causal_attn.ops.backends.DifferentiableBackend`, not a forward/backward pair behind the custom op.

- FlexAttention returns the LSE in natural log (it rescales its base-2 statistics), as the formula needs.
- Rows without an adjacent allowed key have ``LSE_S = -inf``: their mass is 0 through a double ``where``, so
  the gradient into both LSEs is exactly 0 there (never ``exp(-inf - x)`` differentiated). Rows without any
  allowed key (left padding) give out 0 and mass 0, as the other backends do.
- GQA through Flex's own ``enable_gqa``; the adjacency is read in ``mask_mod`` from the bit-packed words
  ``(B, T, ceil(T/32))`` (bit ``j % 32`` of word ``j // 32`` of row ``i``).
- CUDA: the two block-mask builders and the two Flex calls are four small functions, each compiled once with
  ``dynamic=True`` (dynamic batch and length; Flex specialises heads and head dim), so a training run whose lengths vary compiles
  each a bounded number of times, not once per length (:func:`compile_counts`; ``tests/test_flex.py`` counts them over a range of lengths). Padding and
  segments always enter the mask_mods as tensors (all-real, one segment when absent), so batches with and
  without padding share one graph. No process-wide dynamo setting is touched: each function has its own cache
  and torch's default recompile limit (8) per function; every (dtype, head dim, GQA group, grad mode) a process
  uses takes one or two of those entries. Other devices run Flex's eager implementation (it materialises the
  scores), forward only: torch's FlexAttention has no CPU backward, so a call that would need one raises.
- Block masks are cached so the layers of one forward build them once: those of an adjacency belong to its
  :class:`CausalGraph` (a weak-keyed table: they go when the graph goes, never keeping a dropped adjacency
  alive), at most :data:`PER_GRAPH` per graph; those without adjacency in a small LRU (:data:`MAX_PLAIN`). One
  lock guards both, so threads may share them.
"""
from __future__ import annotations

import threading
import warnings
import weakref

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

try:
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # torch before 2.9: return_lse=True
    AuxRequest = None

COMPILE_BACKEND = "inductor"
COMPILE_DEVICES = ("cuda",)  # elsewhere Flex's eager path (its compiled CPU kernel returns no LSE); the GPU kit's
# dry run and the recompile test add "cpu" with COMPILE_BACKEND "eager" to run the compiled path's dynamo part
PER_GRAPH = 2  # mask sets kept per adjacency (one per distinct padding / segments; a forward needs one)
MAX_PLAIN = 4  # mask sets without adjacency (they hold B x T copies of padding and segments only)

_lock = threading.RLock()  # reentrant: building a cached mask set may compile a builder
_compiled: dict = {}
_by_graph: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_plain: list = []  # most recent last


def flex_backend(q, k, v, graph, key_padding_mask, seg_start, scale, attn_map=None, attn_map_weight=1.0):
    """``(out, mass)`` per :mod:`causal_attn.ops.backends`; mass None without a graph."""
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
    mask_all, mask_s = block_masks(graph, key_padding_mask, seg_start, B, T, q.device)
    gqa = Hq != k.shape[1]
    out, lse_all = _call("flex_allowed", q.device, q, k, v, mask_all, scale, gqa)
    if mask_s is None:
        return out, None
    _, lse_s = _call("flex_adjacent", q.device, q, k, v, mask_s, scale, gqa)
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
    ``j`` is real; adjacent iff allowed and bit ``j`` of row ``i`` of the packed adjacency is set. Padding and
    segments are tensors (see :func:`block_masks`): one traced code path whatever the batch holds."""
    def allowed(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & key_padding_mask[b, kv_idx] & (kv_idx >= seg_start[b, q_idx])

    def adjacent(b, h, q_idx, kv_idx):
        word = packed[b, q_idx, kv_idx // 32]
        return allowed(b, h, q_idx, kv_idx) & (((word >> (kv_idx % 32)) & 1) != 0)

    return allowed, adjacent


# ------------------------------------------------------------------------------------------ block masks
def block_masks(graph, key_padding_mask, seg_start, B, T, device):
    """``(BlockMask over allowed keys, BlockMask over adjacent ones or None)``, cached (module docstring).

    The adjacency is matched by its graph, the identity of ``graph.packed`` and its version (an in-place edit
    rebuilds; its mask_mod reads it at run time), padding and segments by value (private copies are captured,
    so a caller's later in-place edit cannot desynchronise a cached block mask from its mask_mod)."""
    device = torch.device(device)
    kpm = key_padding_mask if key_padding_mask is not None else torch.ones(B, T, dtype=torch.bool, device=device)
    seg = seg_start if seg_start is not None else torch.zeros(B, T, dtype=torch.int32, device=device)
    packed = graph.packed if graph is not None else None
    with _lock:
        entries = _by_graph.setdefault(graph, []) if graph is not None else _plain
        for i, e in enumerate(entries):
            if (e["B"], e["T"], e["device"]) == (B, T, device) and e["packed"] is packed and \
                    e["version"] == (packed._version if packed is not None else None) and \
                    _same_value(e["kpm"], kpm) and _same_value(e["seg"], seg):
                entries.append(entries.pop(i))
                return e["masks"]
        kpm, seg = kpm.clone(), seg.int().clone()
        _symbolic(kpm, seg, packed)
        masks = (_build("mask_allowed", device, kpm, seg, B, T),
                 _build("mask_adjacent", device, packed, kpm, seg, B, T) if packed is not None else None)
        entries.append(dict(B=B, T=T, device=device, packed=packed, kpm=kpm, seg=seg, masks=masks,
                            version=packed._version if packed is not None else None))
        del entries[:-(PER_GRAPH if graph is not None else MAX_PLAIN)]
        return masks


def _symbolic(*tensors):
    """The mask_mods' captured tensors enter the compiled Flex calls as closure cells, which dynamic=True leaves
    static on the first call: every dimension is marked dynamic up front (a marker on the tensor, nothing global),
    so the second length does not compile again."""
    for t in tensors:
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, list(range(t.dim())))


def cached_mask_sets() -> int:
    """How many mask sets the cache holds now (graphs already collected are gone from it)."""
    with _lock:
        return len(_plain) + sum(len(v) for v in _by_graph.values())


def _same_value(cached, t) -> bool:
    return cached.shape == t.shape and cached.device == t.device and torch.equal(cached, t.to(cached.dtype))


# The four compiled entry points are separate functions on purpose: dynamo keeps its compiled graphs (and
# counts them against the recompile limit) per code object, so the two mask kinds never share a budget.
def _mask_allowed(kpm, seg, B, T):
    allowed, _ = mask_mods(None, kpm, seg)
    return create_block_mask(allowed, B, None, T, T, device=kpm.device)


def _mask_adjacent(packed, kpm, seg, B, T):
    _, adjacent = mask_mods(packed, kpm, seg)
    return create_block_mask(adjacent, B, None, T, T, device=kpm.device)


def _flex_allowed(q, k, v, block_mask, scale, gqa):
    return _flex_call(q, k, v, block_mask, scale, gqa)


def _flex_adjacent(q, k, v, block_mask, scale, gqa):
    return _flex_call(q, k, v, block_mask, scale, gqa)


_FUNCTIONS = {"mask_allowed": _mask_allowed, "mask_adjacent": _mask_adjacent, "flex_allowed": _flex_allowed,
              "flex_adjacent": _flex_adjacent}


def _compiles(device) -> bool:
    return device.type in COMPILE_DEVICES


def _function(name: str, device):
    if not _compiles(device):
        return _FUNCTIONS[name]
    with _lock:
        if name not in _compiled:
            # dynamic=True: lengths and batch sizes are symbolic from the first call (static-first would compile
            # a second time at the second length); Flex still specialises head counts and head dims, so each of
            # those (and each dtype) is a graph of its own
            _compiled[name] = torch.compile(_FUNCTIONS[name], dynamic=True, backend=COMPILE_BACKEND)
        return _compiled[name]


def _build(name: str, device, *args):
    return _function(name, device)(*args)


def _call(name: str, device, q, k, v, *args):
    """``(out, natural-log LSE (B, Hq, T))`` of one Flex call."""
    if _compiles(device):
        return _function(name, device)(q, k, v, *args)
    with warnings.catch_warnings():  # eager by design here: not the "use torch.compile" advice
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _FUNCTIONS[name](q, k, v, *args)


def compile_counts() -> dict[str, int]:
    """Graphs dynamo holds for each compiled entry point (``mask_allowed``, ``mask_adjacent``, ``flex_allowed``,
    ``flex_adjacent``): how many times each was compiled in this process (0 before first use); {} where this
    torch cannot list them."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return {}
    return {name: len(_debug_get_cache_entry_list(fn.__code__)) for name, fn in _FUNCTIONS.items()}


def _flex_call(q, k, v, block_mask, scale, gqa):
    if AuxRequest is not None:
        out, aux = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                  return_aux=AuxRequest(lse=True))
        return out, aux.lse
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=True)
