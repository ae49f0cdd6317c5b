"""`causal-attn demo`: both methods on CPU in minutes — CAT on STG_E (part ``cat``) and CAPT on a
generated PrOntoQA-style deduction task (part ``capt``); ``demo pretrained`` (not in ``all``: ~12 min per seed)
fine-tunes a real checkpoint, SmolLM2-135M, on STG_M, vanilla vs CAT (:mod:`.pretrained`); ``demo capt-pretrained``
(not in ``all`` either) fine-tunes it on the deduction task, vanilla vs CAPT (:mod:`.capt_pretrained`).

Subpackage layout: :mod:`.stg` (the CAT part), :mod:`.capt` (the CAPT part), :mod:`.pretrained` (CAT on the real
checkpoint), :mod:`.capt_pretrained` (CAPT on it), each a :class:`.part.Part`, and their shared pieces :mod:`.part`
(the skeleton, :class:`.part.DemoError`), :mod:`.model` (tokenizer, tiny Llama), :mod:`.fit` (recipe, training
through ``CATTrainer``, STG scoring), :mod:`.runner` (runs in parallel processes), :mod:`.search` (recipe search on
the validation splits) and :mod:`.figures`. The command (``causal-attn demo``) is :mod:`causal_attn.cli.demo`; it
writes ``results.json`` (one key per part), ``table.md`` and the figures to ``--out``.
"""
from __future__ import annotations

PARTS = ("cat", "capt")   # what `all` runs
EXTRA_PARTS = ("pretrained", "capt-pretrained")  # run only when named


def part_classes() -> dict:
    """Part name -> its :class:`~causal_attn.demo.part.Part` class."""
    from .capt import CaptPart
    from .capt_pretrained import CaptPretrainedPart
    from .pretrained import PretrainedPart
    from .stg import CatPart

    return {"cat": CatPart, "capt": CaptPart, "pretrained": PretrainedPart, "capt-pretrained": CaptPretrainedPart}
