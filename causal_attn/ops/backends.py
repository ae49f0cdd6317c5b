"""The registry of attention backends, apart from :mod:`causal_attn.ops.attention`, which dispatches to them.

Two kinds of backend:

- :class:`Backend`, a forward/backward pair of plain functions that ``attention()`` calls through the
  ``causal_attn::attention_fwd`` / ``attention_bwd`` custom ops (see :mod:`causal_attn.ops.attention` for the
  contract). "torch", "cpp" and "triton" are of this kind.
- :class:`DifferentiableBackend`, one function differentiated by plain autograd, called directly (no custom
  op): "reference" (eager maps) and "flex" (FlexAttention, which differentiates through its own LSE)::

      fn(q, k, v, graph, key_padding_mask, seg_start, scale, attn_map, attn_map_weight) -> (out, mass)

The built-in backends do not import this module: the loaders below import them on first use and wrap
their functions, so no backend module imports the registry or the dispatcher back.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

from . import blocked


@dataclass
class Backend:
    forward: Callable
    backward: Callable


@dataclass
class DifferentiableBackend:
    fn: Callable


AnyBackend = Union[Backend, DifferentiableBackend]
BACKENDS: dict[str, AnyBackend] = {"torch": Backend(blocked.forward, blocked.backward)}
_LOADERS: dict[str, Callable[[], Optional[AnyBackend]]] = {}
_warned: set[str] = set()


def register_backend(name: str, backend: AnyBackend | None = None, *,
                     loader: Callable[[], Optional[AnyBackend]] | None = None):
    """Add a backend, either now or lazily through ``loader`` (called on first use; may return None
    when the backend is unavailable, e.g. no compiler for the C++ extension)."""
    if backend is not None:
        BACKENDS[name] = backend
    elif loader is not None:
        _LOADERS[name] = loader
    else:
        raise ValueError("register_backend needs a backend or a loader")


def get_backend(name: str) -> Optional[AnyBackend]:
    if name not in BACKENDS and name in _LOADERS:
        loaded = _LOADERS.pop(name)()
        if loaded is not None:
            BACKENDS[name] = loaded
    return BACKENDS.get(name)


def warn_once(key: str, msg: str):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _triton_loader():
    try:
        from ..kernels import flash_mass
    except Exception as e:  # triton missing or incompatible
        warn_once("triton", f"Triton backend unavailable ({type(e).__name__}: {e})")
        return None
    return Backend(flash_mass.forward, flash_mass.backward)


def _cpp_loader():
    try:
        from . import cpp_backend  # builds or loads the extension
    except Exception as e:
        warn_once("cpp", f"C++ CPU extension unavailable ({type(e).__name__}: {e}); using the PyTorch CPU path")
        return None
    return Backend(cpp_backend.forward, cpp_backend.backward)


def _reference_loader():
    from . import reference

    return DifferentiableBackend(reference.reference_backend)


def _flex_loader():
    try:
        from . import flex
    except Exception as e:  # a torch without FlexAttention
        warn_once("flex", f"FlexAttention backend unavailable ({type(e).__name__}: {e})")
        return None
    return DifferentiableBackend(flex.flex_backend)


register_backend("triton", loader=_triton_loader)
register_backend("cpp", loader=_cpp_loader)
register_backend("reference", loader=_reference_loader)
register_backend("flex", loader=_flex_loader)
