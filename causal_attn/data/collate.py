"""The one batch collator of the project: records (``input_ids``, optional ``labels``, ``attention_mask``,
``edges``) padded or packed into tensors with their :class:`~causal_attn.ops.graph.CausalGraph`.
:class:`causal_attn.hf.trainer.CATTrainer` uses it as its default collator; the demo and the benchmarks
call it directly."""
from __future__ import annotations

import torch

from ..ops.graph import CausalGraph


class CATCollator:
    """Pads records into a batch: ``input_ids``, ``labels`` (-100 on padding), ``attention_mask`` and
    ``adjacency`` (a :class:`CausalGraph`, present when any record has ``edges``).

    A record holds ``input_ids`` and optionally ``labels`` (default: a copy of ``input_ids``),
    ``attention_mask`` and ``edges`` (row-aligned ``[row, col]`` pairs for the unpadded sequence);
    other fields are ignored. With ``padding_side="left"`` the edges shift with the tokens.

    ``packing=True`` (padding-free, like ``DataCollatorWithFlattening``): the records are laid end to end
    in one row with ``position_ids`` restarting at 0 per record and no ``attention_mask``; each record's
    first label is -100 so the LM loss never predicts a record from the one before it; the adjacency is
    :meth:`CausalGraph.pack` of the records' graphs (it carries the segments)."""

    def __init__(self, pad_token_id: int, *, padding_side: str = "right", pad_to_multiple_of: int | None = None,
                 packing: bool = False):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if packing and pad_to_multiple_of:
            raise ValueError("packing=True makes one row without padding; pad_to_multiple_of does not apply")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.packing = bool(packing)

    def _pad(self, seqs, value, T):
        out = torch.full((len(seqs), T), value, dtype=torch.long)
        for b, s in enumerate(seqs):
            s = torch.as_tensor(s, dtype=torch.long)
            if self.padding_side == "right":
                out[b, :len(s)] = s
            else:
                out[b, T - len(s):] = s
        return out

    def __call__(self, records: list[dict]) -> dict:
        if not records:
            raise ValueError("CATCollator got an empty batch")
        ids = [list(r["input_ids"]) for r in records]
        for b, (r, s) in enumerate(zip(records, ids)):
            if not s:
                raise ValueError(f"record {b} has no input_ids")
            for key in ("labels", "attention_mask"):
                if key in r and len(r[key]) != len(s):
                    raise ValueError(f"record {b}: {key} has length {len(r[key])} but input_ids has {len(s)}")
        if self.packing:
            return self._packed(records, ids)
        T = max(len(s) for s in ids)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": self._pad(ids, self.pad_token_id, T),
            "labels": self._pad([r.get("labels", s) for r, s in zip(records, ids)], -100, T),
            "attention_mask": self._pad([r.get("attention_mask", [1] * len(s)) for r, s in zip(records, ids)], 0, T),
        }
        if any(r.get("edges") is not None for r in records):
            edges = []
            for r, s in zip(records, ids):
                shift = T - len(s) if self.padding_side == "left" else 0
                edges.append(_record_edges(r, len(s), shift, T))
            batch["adjacency"] = CausalGraph.from_edges(edges, T)
        return batch

    def _packed(self, records, ids) -> dict:
        for b, r in enumerate(records):
            if "attention_mask" in r and not all(r["attention_mask"]):
                raise ValueError(f"record {b} has padding in its attention_mask; packing lays records end to end "
                                 "and needs unpadded records")
        labels = []
        for r, s in zip(records, ids):
            lab = list(r.get("labels", s))
            labels += [-100] + lab[1:]
        batch = {
            "input_ids": torch.tensor([sum(ids, [])], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.cat([torch.arange(len(s)) for s in ids]).unsqueeze(0),
        }
        if any(r.get("edges") is not None for r in records):
            graphs = [CausalGraph.from_edges([_record_edges(r, len(s), 0, len(s))], len(s))
                      for r, s in zip(records, ids)]
            batch["adjacency"] = CausalGraph.pack([graphs])
        return batch


def _record_edges(record, n: int, shift: int, T: int) -> list[tuple[int, int]]:
    edges = [(int(i) + shift, int(j) + shift) for i, j in (record.get("edges") or [])]
    if any(not (shift <= j <= i < T) for i, j in edges):
        raise ValueError(f"record with {n} tokens has an edge outside its sequence or pointing "
                         "to the future (edges are row-aligned (row, col) with col <= row)")
    return edges
