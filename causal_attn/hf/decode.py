"""Batched greedy decoding with left padding, for scoring with the task scorers.

Prompts are sorted by length so a batch pads little, left-padded (the last column is every prompt's
last token, so one ``argmax`` of the last logits gives each next token), and decoded with
``model.generate(do_sample=False)``; the generated ids after the prompt are decoded, stripped, and cut
at the first newline. Results come back in the input order.
"""
from __future__ import annotations

from typing import Sequence

import torch


def greedy_decode(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 8, batch_size: int = 64,
                  progress: bool = False) -> list[str]:
    """Greedy completions of ``prompts`` (no special tokens added), in input order."""
    from tqdm.auto import tqdm

    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="decode", disable=not progress, leave=False):
        idx = order[s:s + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]
        for i, row in zip(idx, new):
            out[i] = tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip()
    model.train(was_training)
    return out

