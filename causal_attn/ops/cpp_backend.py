"""Backend "cpp": the fused C++ CPU kernel of csrc/ (flash-style attention with causal mass).

The compiled library registers the operators ``torch.ops.causal_attn_cpp.forward`` / ``backward`` through
``TORCH_LIBRARY``; this module loads it, and the registry (:mod:`causal_attn.ops.backends`) wraps its
:func:`forward` / :func:`backward` as backend "cpp" on first use. The library is the one setup.py prebuilt
(``causal_attn._cpp_attention``) when that exists and was built against the running torch, otherwise the
first-use build of :mod:`causal_attn.ops.cpp_build` (compiled once into the user's cache). When neither works (no
compiler) importing this module raises ImportError and ``attention()`` falls back to the PyTorch CPU path
with a one-time warning.

float32, bfloat16 and float16 run in the kernel (fp32 accumulation); float64 is routed to the
PyTorch blocked path, which computes in float64.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from . import blocked, cpp_build
from ..utils.layout import folder

LIBRARY = "causal_attn._cpp_attention"


def _load() -> Path:
    """Load the library; returns its path. The reason a prebuilt one was passed over is kept in PREBUILT_SKIPPED."""
    global PREBUILT_SKIPPED
    spec = importlib.util.find_spec(LIBRARY)
    if spec is None or spec.origin is None:
        PREBUILT_SKIPPED = "not built at install time"
    else:
        built = cpp_build.built_with_torch(spec.origin)
        sources = folder("csrc")
        want = cpp_build.sources_hash(sources) if sources is not None and (sources / cpp_build.SOURCES[0]).is_file() \
            else None
        have = cpp_build.built_from_sources(spec.origin)
        if built != cpp_build.torch_release(torch.__version__):
            PREBUILT_SKIPPED = f"{spec.origin} was built against torch {built}, this is {torch.__version__}"
        elif want is not None and have != want:
            # an edited checkout whose prebuilt library was not rebuilt: its operators may have another schema
            PREBUILT_SKIPPED = (f"{spec.origin} was built from other sources than {sources} (sources {have}, "
                                f"these are {want}; rebuild it with `python setup.py build_ext --inplace`)")
        else:
            torch.ops.load_library(spec.origin)
            return Path(spec.origin)
    sources = folder("csrc")
    if sources is None or not (sources / cpp_build.SOURCES[0]).is_file():
        raise ImportError(f"the C++ sources (csrc/) are not part of this install ({PREBUILT_SKIPPED})")
    return cpp_build.build_and_load(sources)


PREBUILT_SKIPPED: str | None = None
LIBRARY_PATH = _load()


def _check_cpu(*tensors):
    for t in tensors:
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"the C++ backend runs on CPU tensors only; got a tensor on {t.device}")


def forward(q, k, v, packed=None, key_padding_mask=None, seg_start=None, scale=None, attn_map=None,
            attn_map_weight=1.0):
    """``(out, lse, mass)`` per the backend contract of :mod:`causal_attn.ops.attention`."""
    _check_cpu(q, k, v, packed, key_padding_mask, seg_start, attn_map)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.dtype == torch.float64:
        return blocked.forward(q, k, v, packed, key_padding_mask, seg_start, scale, attn_map, attn_map_weight)
    out, lse, mass = torch.ops.causal_attn_cpp.forward(
        q, k, v, _contiguous(packed), _contiguous(key_padding_mask), _contiguous(seg_start), float(scale), attn_map,
        float(attn_map_weight))
    return out, lse, mass


def backward(q, k, v, out, lse, mass, dout, dmass, packed=None, key_padding_mask=None, seg_start=None, scale=None):
    """``(dq, dk, dv)`` in the input dtypes; ``dmass`` may be None."""
    _check_cpu(q, k, v, dout, packed, key_padding_mask, seg_start)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.dtype == torch.float64:
        return blocked.backward(q, k, v, out, lse, mass, dout, dmass, packed, key_padding_mask, seg_start, scale)
    dq, dk, dv = torch.ops.causal_attn_cpp.backward(
        q, k, v, out, lse, mass, dout, dmass, _contiguous(packed), _contiguous(key_padding_mask),
        _contiguous(seg_start), float(scale))
    return dq, dk, dv


def _contiguous(t):
    return None if t is None else t.contiguous()
