"""Where the package's top-level folders live: ``kernels/`` (the Triton kernels, imported as
``causal_attn.kernels``), ``csrc/`` (the C++ CPU kernel's sources) and ``benchmarks/`` (a package of its own,
imported as ``causal_attn.benchmarks``; ``python -m benchmarks.runner`` from the checkout's root also runs it).

A wheel or sdist install carries them inside the package (``causal_attn/kernels/`` ...; setup.py maps them
there). A source checkout (editable install, or the checkout on ``sys.path``) keeps them at the top level,
beside ``causal_attn/``. The top-level ``kernels/`` deliberately has no ``__init__.py``: Python started from the
checkout's root would otherwise import it as the top-level package ``kernels`` and shadow the PyPI package of
that name, which transformers >= 5.25 imports. So in a checkout ``causal_attn.kernels`` is attached here by
hand, as a namespace package whose only location is that folder, and ``causal_attn.benchmarks`` likewise as the
regular package ``benchmarks/`` is. Neither folder is ever put on ``sys.path``.
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


def attach_folders() -> None:
    """Make ``causal_attn.kernels`` and ``causal_attn.benchmarks`` importable in a source checkout (installed
    copies are found as ordinary subpackages)."""
    attach("kernels", marker="flash_mass.py")
    attach("benchmarks", marker="__init__.py")


def attach(name: str, marker: str) -> None:
    """Register the checkout's top-level ``<name>/`` as the subpackage ``causal_attn.<name>``: a regular package
    when the folder has an ``__init__.py`` (run here), else a namespace package. No-op when the package holds
    its own ``causal_attn/<name>`` (an install), when it is already imported, or when ``<name>/<marker>`` is
    not there (a checkout without that folder)."""
    full = f"causal_attn.{name}"
    if full in sys.modules or (PACKAGE / name).is_dir():
        return
    source = PACKAGE.parent / name
    if not (source / marker).is_file():
        return
    init = source / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[str(source)])
    else:
        spec = importlib.machinery.ModuleSpec(full, None, is_package=True)
        spec.submodule_search_locations = [str(source)]
    module = sys.modules[full] = importlib.util.module_from_spec(spec)
    if spec.loader is not None:
        spec.loader.exec_module(module)
    setattr(sys.modules["causal_attn"], name, module)
