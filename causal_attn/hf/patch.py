"""`patch_model`: CAT attention inside Hugging Face Llama / Qwen2 / Qwen3 / Mistral models.

How it plugs in (transformers 5.x, SPEC §8):

* One attention function and one mask function are registered under :data:`ATTN_NAME` with
  ``AttentionInterface`` / ``AttentionMaskInterface``; the model is switched to that name with
  ``set_attn_implementation`` (``unpatch`` switches back).
* The mask function hands the model's own 2D padding mask through (bool (B, T), True = real token, or
  None without padding) when the forward is a plain causal full-sequence pass; anything else (KV-cache
  decode steps, sliding windows shorter than the sequence, packed sequences) gets the materialised 4D
  bool mask of ``sdpa_mask``.
* The attention function runs :func:`causal_attn.attention` (attention + causal mass per row) on
  full-sequence passes with an adjacency, and ``torch`` SDPA otherwise (no mass, no overhead).
* Per forward, a forward pre-hook on the decoder opens a fresh record in the handle (thread-local),
  checks the adjacency against the sequence and puts it into the forward's keyword arguments, so
  non-reentrant checkpointing replays the layer with the very same graph. Each patched layer stores
  its mass in the record once: replays during backward store nothing and compute exactly what the
  first pass computed (same saved tensors). Reentrant checkpointing runs the layer under ``no_grad``,
  which would silently cut the loss's gradient, so it raises.
* Packed (padding-free) batches, as ``DataCollatorWithFlattening`` makes them: the pre-hook reads the
  segments from ``seq_idx``, ``cu_seq_lens_q`` or ``position_ids`` restarting inside a row (without a
  padding mask), also when a (still empty) cache object exists, where transformers itself stops looking
  and lets packed samples attend to each other. Every patched layer then runs
  :func:`causal_attn.attention` with those segments, with or without an adjacency, and the handle's
  loss counts each row's keys within its own sample.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ..ops.attention import attend, autocast_inputs, check_inputs
from ..ops.graph import CausalGraph, as_graph, require, starts_of
from ..ops.loss import loss_rows, re_attention_loss

ATTN_NAME = "causal_attn"  # must not contain "flash", "sdpa" or "flex" (transformers treats those specially)
_HANDLE_ATTR = "_causal_attn_handle"


# ---------------------------------------------------------------------------------------------- mask
def cat_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
             attention_mask=None, **kwargs):
    """Mask function for ``AttentionMaskInterface``.

    Plain causal full-sequence pass -> the 2D padding mask (bool (B, T)) or None when nothing is padded.
    Otherwise -> the 4D bool mask (B, 1, T, S) that ``sdpa_mask`` materialises (True = attend)."""
    full = (not isinstance(q_offset, torch.Tensor) and q_offset == 0 and kv_offset == 0 and q_length == kv_length
            and (attention_mask is None or attention_mask.shape[-1] == kv_length))
    pad = attention_mask.bool() if attention_mask is not None else None
    if full and mask_function is causal_mask_function:
        return _padding_or_none(pad)
    kwargs.pop("allow_is_causal_skip", None)
    mask4 = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                      allow_is_causal_skip=False, **kwargs)
    if full and torch.compiler.is_compiling():  # no host read: a sliding window (`local_size`) covering the sequence
        window = kwargs.get("local_size")
        if window is not None and window >= kv_length:
            return pad
    elif full:  # e.g. a sliding window at least as long as the sequence
        plain = torch.ones(q_length, kv_length, dtype=torch.bool, device=mask4.device).tril()[None, None]
        if pad is not None:
            plain = plain & pad[:, None, None, :]
        if torch.equal(mask4.expand_as(plain), plain.expand_as(mask4)):
            return _padding_or_none(pad)
    return mask4


def _padding_or_none(pad):
    """The padding mask, or None where nothing is padded. Only eager mode looks (one host read, as transformers'
    own SDPA mask does); a compiled forward keeps the mask and never reads it back."""
    if pad is None or (not torch.compiler.is_compiling() and bool(pad.all())):
        return None
    return pad


def plain_attention(q, k, v, mask, scale, dropout=0.0):
    """torch SDPA for the unpatched cases; ``mask`` None, 2D padding (B, S) or 4D (B, 1, T, S).

    The query block is the last ``T`` of the ``S`` key positions. A row without any allowed key attends
    to every key uniformly, as eager attention with an additive mask does."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, dropout_p=dropout, enable_gqa=gqa)
    if mask is None or mask.dim() == 2:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, -S:].bool()
    elif mask.dtype == torch.bool:
        allowed = mask
    else:  # an additive float mask the caller prepared
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout, enable_gqa=gqa)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, dropout_p=dropout, enable_gqa=gqa)


# ---------------------------------------------------------------------------------------------- attention
def cat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function for ``AttentionInterface``: q (B, Hq, T, D), k/v (B, Hkv, S, D) -> (B, T, Hq, D).

    The path taken depends only on the inputs and the handle's settings, never on the per-forward
    record, so a checkpoint replay (possibly on another thread: CUDA runs backward on its own) repeats
    the first pass exactly; only storing the mass and the map is skipped then."""
    handle = getattr(module, _HANDLE_ATTR, None)
    graph = kwargs.get("adjacency") if handle is not None else None
    seg_start = kwargs.get(SEGMENTS_KW) if handle is not None else None
    if seg_start is not None:
        if query.shape[2] != key.shape[2]:
            raise ValueError("packed sequences (position_ids restarting inside a row) are supported for full-sequence "
                             "forwards only, not for KV-cache decoding")
        attention_mask = None  # the block-diagonal causal mask transformers built (if it detected the packing)
    full = query.shape[2] == key.shape[2] and (attention_mask is None or attention_mask.dim() == 2)
    want_map = handle is not None and handle.collect_attention_map and full
    if graph is None and not want_map and seg_start is None:
        out = plain_attention(query, key, value, attention_mask, scaling, dropout)
        return out.transpose(1, 2).contiguous(), None
    if not full:
        if query.shape[2] == key.shape[2]:
            raise ValueError("CAT attention needs plain causal attention over the full sequence, but this model's "
                             "mask is not (a sliding window shorter than the sequence, or packed sequences)")
        out = plain_attention(query, key, value, attention_mask, scaling, dropout)  # KV-cache decode: no mass
        return out.transpose(1, 2).contiguous(), None
    if dropout > 0:
        raise ValueError(f"attention dropout {dropout} is not supported with a CAT adjacency (the CAT recipe "
                         "uses none); set config.attention_dropout = 0.0")
    # non-reentrant checkpointing recomputes inside backward; a compiled graph recomputes without running this
    replay = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
    rec = None
    if not replay:
        rec = handle._record()
        if rec is None:
            raise RuntimeError("a patched attention layer ran outside a forward of the patched model's decoder")
        if graph is not None and rec.grad_enabled and not torch.is_grad_enabled():
            raise RuntimeError("reentrant gradient checkpointing runs each layer under no_grad, which silently "
                               "drops the Re-Attention loss's gradient; enable it with "
                               "gradient_checkpointing_kwargs={'use_reentrant': False}")
        if module.layer_idx in rec.masses:
            rec = None  # a second call of the same layer in one forward: keep the first entry
    attn_map = None
    if want_map and rec is not None:
        if rec.attn_map is None:
            B, _, T, _ = query.shape
            rec.attn_map = torch.zeros(B, T, T, dtype=torch.float32, device=query.device)
        attn_map = rec.attn_map
    query, key, value = autocast_inputs(query, key, value)
    check_inputs(query, key, value)  # shapes only: the graph, padding and segments were checked in the pre-hook
    out, mass = attend(query, key, value, graph, attention_mask, seg_start, scale=scaling, backend=handle.backend,
                       attn_map=attn_map, attn_map_weight=1.0 / (len(handle.layers) * query.shape[1]))
    if mass is not None and rec is not None:
        rec.masses[module.layer_idx] = mass
    return out.transpose(1, 2).contiguous(), None


def packed_segment_ids(kwargs, x, known: bool) -> torch.Tensor | None:
    """Segment ids (B, T) of a packed forward from the decoder's keyword arguments, or None.

    ``seq_idx`` (B, T) wins, then ``cu_seq_lens_q`` (offsets, one packed row), then ``position_ids`` that
    restart inside a row (a step other than +1 starts a sample, as transformers' own detection), read only
    without a padding mask (with padding, position ids may be anything). Where ``known`` (the adjacency is packed
    already) or under ``torch.compile``, position ids give segments even when none restarts (one sample per
    row), so nothing is read on the host; eager mode otherwise looks once whether any restarts."""
    B, T = x.shape[0], x.shape[1]
    seq_idx = kwargs.get("seq_idx")
    if seq_idx is not None:
        return seq_idx.to(x.device).expand(B, T)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu = cu.to(x.device).long()
        if B != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row, but the batch has B={B} rows")
        require(cu[-1] == T, f"cu_seq_lens_q does not end at the packed row's length {T}")
        return (torch.bucketize(torch.arange(T, device=x.device), cu[1:], right=True)).unsqueeze(0)
    mask, pos = kwargs.get("attention_mask"), kwargs.get("position_ids")
    if pos is None:
        return None
    compiling = torch.compiler.is_compiling()
    pos = pos.to(x.device).expand(B, T)
    restart = torch.diff(pos, dim=-1) != 1
    if mask is not None:
        if mask.dim() != 2:
            return None
        if compiling:  # transformers' rule under compile: packing only without a mask; eager reads the mask
            require(~(mask.bool().all() & restart.any()), "position_ids restart inside a row (packed samples) "
                    "beside an attention_mask without padding: under torch.compile pass packed batches without "
                    "attention_mask, as DataCollatorWithFlattening and CATCollator(packing=True) make them")
            return None
        if not bool(mask.bool().all()):
            return None
    if not (known or compiling) and not bool(restart.any()):
        return None
    return torch.nn.functional.pad(restart.cumsum(-1), (1, 0))


SEGMENTS_KW = "cat_segment_starts"  # the decoder's keyword argument: a packed forward's int32 (B, T) segment starts

AttentionInterface.register(ATTN_NAME, cat_attention)
AttentionMaskInterface.register(ATTN_NAME, cat_mask)


# ---------------------------------------------------------------------------------------------- handle
@dataclass
class _Forward:
    """What one forward of the patched model prepared (once, in the pre-hook) and collected."""
    grad_enabled: bool
    graph: CausalGraph | None
    key_padding_mask: torch.Tensor | None = None
    loss_rows: tuple | None = None  # (rows, c, n) of causal_attn.ops.loss.loss_rows
    masses: dict = field(default_factory=dict)  # layer index -> mass (B, Hq, T) fp32
    attn_map: torch.Tensor | None = None


def _sliding_window(attn_module) -> int | None:
    """A layer's sliding window: its own attribute (Qwen2 / Qwen3: None on full-attention layers), else the
    config's that the layer hands the attention function (Mistral)."""
    if hasattr(attn_module, "sliding_window"):
        return attn_module.sliding_window
    return getattr(getattr(attn_module, "config", None), "sliding_window", None)


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class CATHandle:
    """Returned by :func:`patch_model`; see there."""

    def __init__(self, model, attn_modules: dict, *, adjacency, alpha, reduction, kind, collect_attention_map,
                 backend):
        self.model = model
        self.base = _base_model(model)
        self.layers = sorted(attn_modules)
        self.alpha, self.reduction, self.kind, self.backend = float(alpha), reduction, kind, backend
        self.collect_attention_map = bool(collect_attention_map)
        self._modules = attn_modules
        windows = [w for w in map(_sliding_window, attn_modules.values()) if w is not None]
        self._window = min(windows) if windows else None  # checked against packed samples once per forward
        self._local = threading.local()
        self._adjacency = None
        self.set_adjacency(adjacency)
        self._previous = self.base.config._attn_implementation
        decoder = self.base.get_decoder() if hasattr(self.base, "get_decoder") else self.base
        self._hook = decoder.register_forward_pre_hook(self._start_forward, with_kwargs=True)
        for m in attn_modules.values():
            setattr(m, _HANDLE_ATTR, self)
        self.base.set_attn_implementation(ATTN_NAME)
        self.patched = True

    # -------------------------------------------------------------- per forward
    def _record(self) -> _Forward | None:
        return getattr(self._local, "record", None)

    def _start_forward(self, module, args, kwargs):
        """Prepares the forward once for every layer and the loss: the graph on the inputs' device with the
        forward's segments, the segment starts, the padding mask and the loss rows. Checks that need tensor
        values go through :func:`causal_attn.ops.graph.require` (device-side under torch.compile)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        # the KV cache's keyword is `past_key_values`, `cache` in transformers 5.24's Llama / Qwen3
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        full = cache is None or cache.get_seq_length() == 0
        adjacency = kwargs.get("adjacency", self._adjacency) if full else None
        if isinstance(adjacency, (CausalGraph, torch.Tensor)):
            adjacency = adjacency.to(x.device)  # e.g. a collator's CPU graph for a CUDA model
        graph = as_graph(adjacency, x.shape[0], x.shape[1], x.device)  # type, B and T checks
        seg_start = None
        known = graph is not None and graph.segment_ids is not None
        segment_ids = packed_segment_ids(kwargs, x, known=known) if full else None
        if segment_ids is not None:
            if kwargs.get("seq_idx") is not None:  # the caller's ids: check they do not decrease
                require((segment_ids[:, 1:] >= segment_ids[:, :-1]).all(), "seq_idx decrease within row; packed "
                        "samples must lie end to end with non-decreasing ids")
            seg_start = starts_of(segment_ids)
            if graph is not None:
                graph = graph.with_segments(segment_ids, seg_start)
            if self._window is not None:
                longest = (torch.arange(x.shape[1], device=x.device) - seg_start).max() + 1
                require(longest <= self._window, f"the model uses a sliding window of {self._window} tokens but a "
                        "packed sample is longer; CAT attention computes full causal attention per sample: pack "
                        "samples no longer than the window or disable the sliding window",
                        lambda: f" (the longest packed sample has {int(longest)})")
        elif graph is not None and graph.segment_ids is not None:
            seg_start = graph.segment_starts()
        mask = kwargs.get("attention_mask") if full else None
        kpm = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 and seg_start is None else None
        rows = loss_rows(graph, kpm) if graph is not None else None
        self._local.record = _Forward(grad_enabled=torch.is_grad_enabled(), graph=graph, key_padding_mask=kpm,
                                      loss_rows=rows)
        kwargs = dict(kwargs)
        kwargs.pop("adjacency", None)
        kwargs.pop(SEGMENTS_KW, None)
        if graph is not None:
            kwargs["adjacency"] = graph
        if seg_start is not None:
            kwargs[SEGMENTS_KW] = seg_start
        return args, kwargs

    # -------------------------------------------------------------- public
    def set_adjacency(self, adjacency):
        """Adjacency for the following forwards that do not pass ``adjacency=``; None = plain attention."""
        if adjacency is not None and not isinstance(adjacency, (CausalGraph, torch.Tensor)):
            raise TypeError(f"adjacency must be a CausalGraph or a bool tensor (B, T, T); got {type(adjacency).__name__}")
        self._adjacency = adjacency

    def masses(self) -> list:
        """Per patched layer (in layer order) the causal mass (B, Hq, T) of the last forward."""
        rec = self._record()
        if rec is None or not rec.masses:
            raise RuntimeError("no causal masses: the last forward had no adjacency (pass model(..., adjacency=...) "
                               "or handle.set_adjacency(...)) or no forward ran yet")
        return [rec.masses[i] for i in sorted(rec.masses)]

    def loss(self, *, return_stats: bool = False):
        """Re-Attention loss of the last forward (differentiable), averaged over patched layers and heads."""
        masses = self.masses()
        rec = self._record()
        return re_attention_loss(masses, rec.graph, alpha=self.alpha, key_padding_mask=rec.key_padding_mask,
                                 reduction=self.reduction, kind=self.kind, return_stats=return_stats,
                                 rows=rec.loss_rows)

    def attention_map(self) -> torch.Tensor:
        """(B, T, T) fp32 attention averaged over patched layers and heads of the last forward (no gradient)."""
        if not self.collect_attention_map:
            raise RuntimeError("attention map collection is off: patch_model(..., collect_attention_map=True)")
        rec = self._record()
        if rec is None or rec.attn_map is None:
            raise RuntimeError("no attention map: no full-sequence forward ran since patching")
        return rec.attn_map

    def unpatch(self):
        """Restore the previous attention implementation and remove every hook and attribute."""
        if not self.patched:
            return
        self._hook.remove()
        for m in self._modules.values():
            if getattr(m, _HANDLE_ATTR, None) is self:
                delattr(m, _HANDLE_ATTR)
        self.base.set_attn_implementation(self._previous)
        self._local = threading.local()
        self.patched = False

    def __repr__(self):
        return (f"CATHandle(layers={self.layers}, alpha={self.alpha}, reduction={self.reduction!r}, kind={self.kind!r}, "
                f"patched={self.patched})")


def patch_model(model, adjacency=None, *, alpha: float = 0.2, reduction: str = "mean", kind: str = "hinge",
                layers="all", collect_attention_map: bool = False, backend: str = "auto") -> CATHandle:
    """Switch a Llama / Qwen2 / Qwen3 / Mistral causal LM (bare or PEFT-wrapped) to CAT attention.

    Args:
        model: the ``...ForCausalLM`` or a PEFT model wrapping one.
        adjacency: default :class:`CausalGraph` / dense bool (B, T, T) (row-aligned) for the following
            forwards; a per-call ``model(..., adjacency=...)`` wins. Without one, attention is plain SDPA.
        alpha, reduction, kind: the Re-Attention loss (:func:`causal_attn.re_attention_loss`).
        layers: "all" or the decoder layer indices to patch (the loss averages over these).
        collect_attention_map: accumulate the layer- and head-averaged map for :meth:`CATHandle.attention_map`.
        backend: passed to :func:`causal_attn.attention`.

    Returns the :class:`CATHandle`: ``loss()``, ``masses()``, ``set_adjacency()``, ``attention_map()``,
    ``unpatch()``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if kind not in ("hinge", "div"):
        raise ValueError(f"kind must be 'hinge' or 'div', got {kind!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    base = _base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    blocks = getattr(decoder, "layers", None)
    if blocks is None or not all(hasattr(b, "self_attn") for b in blocks):
        raise TypeError(f"{type(base).__name__} is not a supported decoder (expected .layers[i].self_attn as in "
                        "Llama, Qwen2, Qwen3, Mistral)")
    n = len(blocks)
    chosen = range(n) if layers == "all" else sorted({int(i) for i in layers})
    if not chosen or any(not 0 <= i < n for i in chosen):
        raise ValueError(f"layers must be 'all' or indices in [0, {n}); got {layers!r}")
    modules = {i: blocks[i].self_attn for i in chosen}
    for m in modules.values():
        if getattr(m, _HANDLE_ATTR, None) is not None:
            raise RuntimeError("this model is already patched; call handle.unpatch() first")
    return CATHandle(model, modules, adjacency=adjacency, alpha=alpha, reduction=reduction, kind=kind,
                     collect_attention_map=collect_attention_map, backend=backend)

