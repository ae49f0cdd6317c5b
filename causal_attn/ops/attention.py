"""`attention(q, k, v, adjacency)`: causal attention that also returns the causal mass per row.

All fast backends sit behind one pair of ``torch.library`` custom ops,
``causal_attn::attention_fwd`` / ``causal_attn::attention_bwd``, with fake (meta) implementations and a
registered autograd formula, so ``torch.compile`` sees a single op and non-reentrant checkpointing
recomputes it like any other op. The op takes the backend name as an argument and looks it up in
:data:`BACKENDS`; a backend is a pair of plain functions::

    forward(q, k, v, packed, key_padding_mask, seg_start, scale, attn_map, attn_map_weight) -> (out, lse, mass)
    backward(q, k, v, out, lse, mass, dout, dmass, packed, key_padding_mask, seg_start, scale) -> (dq, dk, dv)

``seg_start`` (packed sequences) is None or int32 (B, T), non-decreasing along a row with
``seg_start[b, i] <= i``: row ``i`` may attend only to keys ``seg_start[b, i] <= j <= i`` (its own segment),
so a backend may skip key blocks that end before the first row's ``seg_start`` of a query block.

``lse`` (B, Hq, T) fp32 is private to the backend (its own log base, +inf on rows without keys);
``mass`` is an empty tensor when ``packed`` is None; ``dmass`` may be None.

Backends "reference" and "flex" are differentiable functions instead (plain autograd, no custom op); the
registry and both kinds are described in :mod:`causal_attn.ops.backends`.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .backends import BACKENDS, Backend, DifferentiableBackend, get_backend, register_backend  # noqa: F401
from .graph import CausalGraph, as_graph, check_key_padding_mask, segment_starts

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------- ops
@torch.library.custom_op("causal_attn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, packed: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  seg_start: Optional[Tensor], scale: float, backend: str,
                  want_map: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out, lse, mass, head-summed P (B, T, T) fp32 if want_map else empty).

    ``out`` is a (B, Hq, T, D) view of (B, T, Hq, D) storage: a model's ``out.transpose(1, 2)`` before o_proj is
    then contiguous already, so the tensor saved here for backward and the one o_proj saves are one buffer
    (a (B, Hq, T, D)-contiguous ``out`` costs a second copy per layer: 4.6 % of a SmolLM2-135M LoRA step's peak)."""
    B, _, T, _ = q.shape
    pmap = q.new_zeros(B, T, T, dtype=torch.float32) if want_map else None
    out, lse, mass = BACKENDS[backend].forward(q, k, v, packed, key_padding_mask, seg_start, scale, pmap, 1.0)
    out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out, lse, mass, (pmap if want_map else q.new_empty(0, dtype=torch.float32))


@attention_fwd.register_fake
def _(q, k, v, packed, key_padding_mask, seg_start, scale, backend, want_map):
    B, Hq, T, D = q.shape
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(B, T, Hq, D).transpose(1, 2)
    lse = q.new_empty(B, Hq, T, dtype=stat)
    mass = q.new_empty(B, Hq, T, dtype=stat) if packed is not None else q.new_empty(0, dtype=stat)
    pmap = q.new_empty(B, T, T, dtype=torch.float32) if want_map else q.new_empty(0, dtype=torch.float32)
    return out, lse, mass, pmap


@torch.library.custom_op("causal_attn::attention_bwd", mutates_args=())
def attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mass: Tensor, dout: Tensor,
                  dmass: Optional[Tensor], packed: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  seg_start: Optional[Tensor], scale: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = BACKENDS[backend].backward(q, k, v, out, lse, mass, dout, dmass, packed, key_padding_mask,
                                            seg_start, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # the layout the fake promises, whatever q's strides


@attention_bwd.register_fake
def _(q, k, v, out, lse, mass, dout, dmass, packed, key_padding_mask, seg_start, scale, backend):
    # contiguous, not empty_like: a model hands q/k/v as transposed views of (B, T, H, D) storage
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, packed, kpm, seg_start, scale, backend, _want_map = inputs
    out, lse, mass, _pmap = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, out, lse, mass, packed, kpm, seg_start)
    ctx.scale, ctx.backend = scale, backend


def _backward(ctx, dout, dlse, dmass, dpmap):
    q, k, v, out, lse, mass, packed, kpm, seg_start = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    if packed is None or mass.numel() == 0:
        dmass = None
    dq, dk, dv = attention_bwd(q, k, v, out, lse, mass, dout.contiguous() if dout.dtype == out.dtype else dout.to(out.dtype),
                               dmass, packed, kpm, seg_start, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- API
def check_inputs(q, k, v, key_padding_mask=None):
    """Validate shapes, dtypes and devices; returns the checked key padding mask (or None)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (B, H, T, D); got shape {tuple(t.shape)}")
    B, Hq, T, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}")
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch size or head dim")
    if Tk != T:
        raise ValueError(f"q has T={T} but k/v have T={Tk}; attention() is full-sequence causal attention "
                         "(for KV-cache decoding use the model's own attention)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"number of query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {q.dtype}; use float16, bfloat16, float32 or float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if T == 0 or B == 0:
        raise ValueError(f"empty input: B={B}, T={T}")
    if key_padding_mask is not None:
        key_padding_mask = check_key_padding_mask(key_padding_mask, B, T, q.device)
    return key_padding_mask


def segments_for(graph: CausalGraph | None, segment_ids, B: int, T: int, device) -> Tensor | None:
    """The int32 (B, T) segment starts of ``segment_ids``, else of the graph's own segments; None = one
    segment per row. Passing both is fine when they agree."""
    if segment_ids is None:
        return graph.segment_starts() if graph is not None else None
    seg_start = segment_starts(segment_ids, B, T, device)
    if graph is not None and graph.segment_ids is not None and not torch.equal(graph.segment_starts(), seg_start):
        raise ValueError("segment_ids disagree with the packed adjacency's own segments (CausalGraph.pack)")
    return seg_start


# Evaluated eagerly under torch.compile: the first call may load a backend (mutating BACKENDS), which
# Dynamo cannot trace ("Guard failed on the same frame it was created").
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """Map the public backend names to an implementation name in :data:`BACKENDS`."""
    if backend == "auto":
        if device.type == "cuda" and get_backend("triton") is not None:
            return "triton"
        backend = "cpu"
    if backend == "cpu":
        if device.type == "cpu" and os.environ.get("CAUSAL_ATTN_DISABLE_CPP") != "1" and get_backend("cpp") is not None:
            return "cpp"
        return "torch"
    if backend in ("triton", "cpp", "torch", "reference", "flex"):
        if get_backend(backend) is None:
            raise RuntimeError(f"backend {backend!r} is not available here (see the warning above); "
                               "use backend='auto'")
        return backend
    raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton', 'cpu', 'torch', 'flex' or 'reference'")


def autocast_inputs(q, k, v):
    """Under ``torch.autocast`` q, k, v in the autocast dtype, as SDPA takes them there (float64 stays): a Hugging
    Face rotary embedding hands attention fp32 q/k beside a low-precision v (``Trainer(bf16=True)``)."""
    device_type = q.device.type
    if not torch.is_autocast_enabled(device_type):
        return q, k, v
    low = torch.get_autocast_dtype(device_type)
    return tuple(x.to(low) if x.is_floating_point() and x.dtype != torch.float64 else x for x in (q, k, v))


def attention(q, k, v, adjacency=None, *, key_padding_mask=None, segment_ids=None, scale=None, backend="auto",
              attn_map=None, attn_map_weight=1.0):
    """Causal attention with the causal mass of each row (SPEC §2, §3).

    Args:
        q: (B, Hq, T, D); k, v: (B, Hkv, T, D) with Hq % Hkv == 0 (any strides).
        adjacency: :class:`CausalGraph` or bool (B, T, T), row-aligned; None for plain attention.
        key_padding_mask: bool (B, T), True = real token.
        segment_ids: packed (padding-free) rows: integer (B, T), non-decreasing along a row, one id per
            sample; a row attends only to earlier keys of its own sample. Defaults to the adjacency's own
            segments (:meth:`CausalGraph.pack`).
        scale: softmax scale, default ``D ** -0.5``.
        backend: "auto" (Triton on CUDA, CPU implementation otherwise), "triton", "cpu", "torch"
            (the pure-PyTorch blocked path), "flex" (two FlexAttention calls, mass from their LSEs; forward only
            on CPU) or "reference" (eager, materialises the maps).
        attn_map: optional (B, T, T) float32 buffer (diagnostics, no gradient); receives
            ``attn_map_weight * sum over heads of P``.

    Returns:
        ``(out, mass)``: out (B, Hq, T, D) in q's dtype; mass (B, Hq, T) float32 (float64 for float64
        inputs) or None.
    """
    q, k, v = autocast_inputs(q, k, v)
    kpm = check_inputs(q, k, v, key_padding_mask)
    B, Hq, T, D = q.shape
    graph = as_graph(adjacency, B, T, q.device)
    seg_start = segments_for(graph, segment_ids, B, T, q.device)
    if attn_map is not None:
        if attn_map.shape != (B, T, T) or attn_map.dtype != torch.float32 or attn_map.device != q.device:
            raise ValueError(f"attn_map must be a float32 ({B}, {T}, {T}) tensor on {q.device}; got "
                             f"{attn_map.dtype} {tuple(attn_map.shape)} on {attn_map.device}")
    return attend(q, k, v, graph, kpm, seg_start, scale=scale, backend=backend, attn_map=attn_map,
                  attn_map_weight=attn_map_weight)


def attend(q, k, v, graph: CausalGraph | None, key_padding_mask: Tensor | None, seg_start: Tensor | None, *,
           scale=None, backend="auto", attn_map=None, attn_map_weight=1.0):
    """:func:`attention` on a graph, padding mask (bool) and segment starts that were checked already, once per
    forward (``patch_model``'s pre-hook), and q, k, v already in the autocast dtype (:func:`autocast_inputs`):
    nothing here reads a tensor's values on the host."""
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    name = resolve_backend(backend, q.device)
    impl = BACKENDS[name]
    if isinstance(impl, DifferentiableBackend):
        out, mass = impl.fn(q, k, v, graph, key_padding_mask, seg_start, scale, attn_map, attn_map_weight)
        return out, (mass if graph is not None else None)
    packed = graph.packed if graph is not None else None
    out, _lse, mass, pmap = attention_fwd(q, k, v, packed, key_padding_mask, seg_start, scale, name,
                                          attn_map is not None)
    if attn_map is not None:
        attn_map += attn_map_weight * pmap.detach()
    return out, (mass if graph is not None else None)


def reference_attention(q, k, v, adjacency=None, *, key_padding_mask=None, segment_ids=None, scale=None,
                        backend="reference"):
    """Same contract as :func:`attention`, computed eagerly (backend "reference")."""
    return attention(q, k, v, adjacency, key_padding_mask=key_padding_mask, segment_ids=segment_ids, scale=scale,
                     backend="reference")
