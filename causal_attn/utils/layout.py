"""Where the package's non-Python-package folders live: ``kernels/`` (the Triton kernels, imported as
``causal_attn.kernels``), ``csrc/`` (the C++ CPU kernel's sources) and ``benchmarks/``.

A wheel or sdist install carries them inside the package (``causal_attn/kernels/`` ...; setup.py maps them
there). A source checkout (editable install, or the checkout on ``sys.path``) keeps them at the top level,
beside ``causal_attn/``. The top-level ``kernels/`` deliberately has no ``__init__.py``: Python started from the
checkout's root would otherwise import it as the top-level package ``kernels`` and shadow the PyPI package of
that name, which transformers >= 5.25 imports. So in a checkout ``causal_attn.kernels`` is attached here by
hand, as a namespace package whose only location is that folder.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # causal_attn/


def folder(name: str) -> Path | None:
    """The installed copy ``causal_attn/<name>`` if there is one, else the checkout's ``<name>/``, else None."""
    for candidate in (PACKAGE / name, PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    return None


def attach_kernels() -> None:
    """Make ``causal_attn.kernels`` importable in a source checkout (no-op for installed copies)."""
    name = "causal_attn.kernels"
    if name in sys.modules or (PACKAGE / "kernels").is_dir():
        return
    source = PACKAGE.parent / "kernels"
    if not (source / "flash_mass.py").is_file():
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(source)]
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    setattr(sys.modules["causal_attn"], "kernels", module)
