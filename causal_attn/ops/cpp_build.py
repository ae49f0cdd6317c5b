"""How the fused C++ CPU kernel (``csrc/``) is compiled, and its first-use build.

One set of flags serves both builds:

* setup.py compiles ``causal_attn._cpp_attention`` at install time when torch is importable there (the
  Makefile's ``pip install --no-build-isolation -e .``). setup.py runs this file with ``runpy``, so nothing at
  module level may import torch or the package.
* Every other install path (``pip install .`` / ``-e .`` with build isolation, a wheel, the sdist) has no
  prebuilt library, and a prebuilt one may belong to another torch. :func:`build_and_load` then compiles the
  same sources once with ``torch.utils.cpp_extension.load`` into the user's cache, keyed by the sources, the
  flags, torch and Python, and later processes load the cached library directly.

Concurrency: builders take an exclusive ``flock`` on the cache folder (released by the kernel if a process
dies), publish a ``complete`` stamp only after the library is written, and load only a stamped library, so a
process started while another compiles waits for it and never loads a half-written file.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

SOURCES = ("attention_cpu.cpp",)
HEADERS = ("gemm.h", "row_ops.h")
JIT_NAME = "causal_attn_cpp"
MARKER = b"causal_attn_cpp built with torch "  # + TORCH_VERSION + ";" inside the library (attention_cpu.cpp)
SOURCES_MARKER = b"; sources "  # + sources_hash + ";" right after it


def default_source_dir() -> Path | None:
    """csrc/ as causal_attn.utils.layout.folder finds it (installed copy inside the package, else the checkout's),
    located from this file alone: setup.py runs this module before the package is importable."""
    here = Path(__file__).resolve().parents[1]  # causal_attn/
    for candidate in (here / "csrc", here.parent / "csrc"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    return None


def sources_hash(source_dir: Path | None = None) -> str | None:
    """Short hash of the kernel's sources (SOURCES + HEADERS): compiled into the library, so a prebuilt library
    from other sources (an edited checkout not rebuilt: another operator schema) is recognised and not loaded."""
    source_dir = default_source_dir() if source_dir is None else Path(source_dir)
    if source_dir is None:
        return None
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (source_dir / name).read_bytes())
    return "h" + h.hexdigest()[:16]


def compile_args(platform: str = sys.platform, source_dir: Path | None = None) -> list[str]:
    # -fopenmp: ATen's at::parallel_for is header-inlined, so only an OpenMP build of this file runs its
    # range on torch's intra-op threads; without it every loop is serial. No -march: row_ops.h dispatches
    # its SIMD clones at load time, so the library runs on any x86-64 CPU. -fno-trapping-math (torch's own
    # flag): with trapping math GCC keeps the clamps of fast_exp as branches, and on AVX2 / SSE2 (no mask
    # registers) the exp loops then stay scalar; measured: the AVX2 forward spent as long in exp as in sgemm.
    # -DCAUSAL_ATTN_SOURCES: the sources' hash, embedded in the library (built_from_sources); an identifier
    # (no quotes, which a shell in torch's ninja build would strip), stringified in attention_cpu.cpp.
    digest = sources_hash(source_dir)
    return ["-O3", "-fopenmp-simd", "-fno-trapping-math", "-fno-math-errno"] + \
        (["-fopenmp"] if platform.startswith("linux") else []) + \
        ([f"-DCAUSAL_ATTN_SOURCES={digest}"] if digest else [])


def link_args(platform: str = sys.platform) -> list[str]:
    # Links libgomp.so.1 by soname; the copy torch loaded first (torch/lib/libgomp.so.1) satisfies it, so
    # kernel and torch share one OpenMP runtime and torch.set_num_threads governs both.
    return ["-fopenmp"] if platform.startswith("linux") else []


def built_with_torch(library: str | os.PathLike) -> str | None:
    """The torch version (``major.minor.patch``) a compiled library was built against, read from its bytes
    without loading it (a library, once loaded, cannot be unloaded)."""
    data = Path(library).read_bytes()
    at = data.find(MARKER)
    if at < 0:
        return None
    end = data.find(b";", at)
    return data[at + len(MARKER):end].decode("ascii", "replace") if end > 0 else None


def built_from_sources(library: str | os.PathLike) -> str | None:
    """The sources hash (:func:`sources_hash`) compiled into a library, or None (a library from before the hash
    was embedded, or one built without it)."""
    data = Path(library).read_bytes()
    at = data.find(MARKER)
    if at < 0:
        return None
    at = data.find(SOURCES_MARKER, at, at + 200)
    if at < 0:
        return None
    end = data.find(b";", at + len(SOURCES_MARKER))
    value = data[at + len(SOURCES_MARKER):end].decode("ascii", "replace") if end > 0 else None
    return None if value in (None, "unknown") else value


def torch_release(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0`` (TORCH_VERSION in the headers carries no local suffix)."""
    return version.split("+")[0]


def build_folder(source_dir: Path, torch_version: str) -> Path:
    """One folder per (sources, flags, torch, Python): a changed input never reuses an old library."""
    from ..utils.cache import cache_root

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (source_dir / name).read_bytes())
    h.update(repr((compile_args(source_dir=source_dir), link_args(), torch_version, sys.version,
                   sys.platform)).encode())
    tag = f"cpp-torch{torch_release(torch_version)}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / f"{tag}-{h.hexdigest()[:16]}"


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def build_and_load(source_dir: Path) -> Path:
    """Load the cached library for these sources and this torch, compiling it first if needed.

    Raises ImportError with the reason when it cannot be built (no compiler, compile error, no writable cache).
    """
    import torch
    from torch.utils import cpp_extension

    from ..utils.cache import FileLock

    folder = build_folder(source_dir, torch.__version__)
    library = folder / f"{JIT_NAME}.so"
    stamp = folder / "complete"
    if stamp.is_file():  # built before, by any process
        torch.ops.load_library(str(library))
        return library
    if compiler() is None:
        raise ImportError("no C++ compiler found to build the fused CPU kernel (install g++ or clang++, or set CXX)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ImportError(f"cannot create the build cache {folder} ({e}); set CAUSAL_ATTN_CACHE_DIR") from e
    with FileLock(folder / "build.lock", "compiling the C++ CPU kernel"):
        if not stamp.is_file():  # nobody finished it while this process waited for the lock
            (folder / "lock").unlink(missing_ok=True)  # torch's own build baton, stale if a builder died
            print(f"causal_attn: compiling the fused C++ CPU kernel for torch {torch.__version__} (once, 10-60 s) "
                  f"into {folder}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            _with_ninja_on_path()
            try:
                cpp_extension.load(name=JIT_NAME, sources=[str(source_dir / s) for s in SOURCES],
                                   extra_cflags=compile_args(source_dir=source_dir), extra_ldflags=link_args(),
                                   extra_include_paths=[str(source_dir)], build_directory=str(folder),
                                   is_python_module=False, verbose=False)
            except Exception as e:
                raise ImportError(f"compiling {source_dir / SOURCES[0]} failed ({type(e).__name__}: "
                                  f"{str(e).strip()[-500:]})") from e
            stamp.write_text(f"{time.perf_counter() - t0:.1f} s\n")
            return library  # load() has loaded it into this process
    torch.ops.load_library(str(library))
    return library


def _with_ninja_on_path():
    """torch's load() runs ``ninja`` from PATH; the PyPI ``ninja`` package's binary sits in the environment's
    bin folder, which is not on PATH when the environment's python is run without activating it."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja

        candidates.insert(0, Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    for c in candidates:
        if (c / "ninja").is_file():
            os.environ["PATH"] = f"{c}{os.pathsep}{os.environ.get('PATH', '')}"
            return
