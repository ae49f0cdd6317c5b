"""Data side of CAT: token adjacency from annotations, STG benchmarks, scorers, LLM annotation.

Submodules: ``adjacency`` (annotations_to_graph, batched encoder), ``collate`` (the batch collator), ``stg``
(STG_E / STG_H generators and loaders), ``scoring`` (task scorers), ``jsonl`` (the JSONL reader and writer),
``llm`` (OpenAI-compatible client, cache, runner), ``annotate`` (CAT annotation prompts and pipeline),
``tokenizers`` (offline Qwen2 / Llama-3), ``capt`` (CAPT). The commands that use them are in
:mod:`causal_attn.cli`.
Attributes are imported lazily so that ``causal_attn.data.llm`` does not pull in transformers.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "annotations_to_graph": "adjacency",
    "AdjacencyResult": "adjacency",
    "encode_batch": "adjacency",
    "CATCollator": "collate",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
