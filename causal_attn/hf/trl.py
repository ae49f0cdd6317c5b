"""CAT with TRL: :class:`CATSFTTrainer`, TRL's ``SFTTrainer`` with the Re-Attention loss (docs/trl.md).

Needs the optional extra (``pip install causal_attn[trl]``); ``import causal_attn`` never imports TRL.
It is :class:`causal_attn.hf.trainer.CATLossMixin` over ``SFTTrainer``: the same loss, scaling and schedule as
:class:`causal_attn.CATTrainer`, with the two loss terms (and ``gamma``, ``ratio_mean``, ``ratio_ge_alpha``)
logged through TRL's own metrics (``self._metrics``) beside its ``entropy`` and ``mean_token_accuracy``.
"""
from __future__ import annotations

import math

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("causal_attn.hf.trl needs TRL: pip install 'causal_attn[trl]' (or pip install trl)") from e

from .patch import CATHandle
from .trainer import CATLossMixin, cat_handle_for, default_collator

# the columns the collator reads; TRL keeps only input_ids / labels / seq_lengths otherwise
CAT_COLUMNS = ("input_ids", "labels", "attention_mask", "edges")


class CATSFTTrainer(CATLossMixin, SFTTrainer):
    """``SFTTrainer`` whose loss is ``LM + gamma * Re-Attention`` (SPEC §2).

    Takes what ``SFTTrainer`` takes, plus ``cat_handle`` / ``alpha`` / ``reduction`` / ``kind`` / ``layers`` /
    ``gamma`` as :class:`causal_attn.CATTrainer` does. ``model`` must be the model object (it is patched).
    The training set holds tokenised records as the data pipeline writes them (``input_ids``, optional
    ``labels`` / ``attention_mask``, and ``edges``: row-aligned ``[row, col]`` pairs, e.g. from
    :func:`causal_attn.data.adjacency.encode_example`). The default collator is :class:`CATCollator`; the
    ``edges`` column is kept through TRL's column removal, and records longer than ``args.max_length`` have
    their edges truncated with the tokens (``truncation_mode`` ``keep_start`` or ``keep_end``).

    Refused, with the reason: TRL's ``packing`` / ``padding_free`` (rows rebuilt without the adjacency; TRL
    documents padding-free for FlashAttention-2/3 only and refuses a custom collator there: use
    ``CATTrainer(packing=True)`` for padding-free CAT), and ``compute_loss_func`` / label smoothing (TRL then
    runs a second, gradient-free forward that would replace the masses the Re-Attention loss reads).
    """

    _outputs_from_parent = False  # SFTTrainer's return_outputs=True runs an extra forward

    def __init__(self, model=None, args: SFTConfig | None = None, *, cat_handle: CATHandle | None = None,
                 alpha: float = 0.2, reduction: str = "mean", kind: str = "hinge", layers="all", gamma="exp",
                 data_collator=None, processing_class=None, compute_loss_func=None, **kwargs):
        if args is None:
            args = SFTConfig(output_dir="cat_sft_output")
        check_sft_config(args, compute_loss_func)
        handle = cat_handle_for(model, cat_handle, alpha=alpha, reduction=reduction, kind=kind, layers=layers)
        if data_collator is None:
            data_collator = default_collator(model, processing_class)
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         **kwargs)
        self._init_cat(handle, gamma)

    def _log_cat(self, key: str, value) -> None:
        value = float(value)  # TRL averages (and gathers) floats
        if not math.isnan(value):
            self._metrics["train" if self.model.training else "eval"][key].append(value)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *CAT_COLUMNS]))

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        columns = getattr(dataset, "column_names", None)  # None: not known before iterating (IterableDataset)
        if args.max_length is not None and (columns is None or {"edges", "input_ids"} <= set(columns)):
            # TRL truncates input_ids and labels only; cut the edges (and attention_mask) the same way first
            dataset = dataset.map(truncate_record, fn_kwargs={"max_length": args.max_length,
                                                               "keep_end": args.truncation_mode == "keep_end"})
        return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)


def check_sft_config(args, compute_loss_func=None) -> None:
    """Raise ValueError for ``SFTConfig`` settings CAT cannot train with, saying what to use instead."""
    if args.packing or args.padding_free or args.eval_packing:
        raise ValueError("CATSFTTrainer needs SFTConfig(packing=False, padding_free=False): TRL's packing and "
                         "padding-free rows are rebuilt from the token columns without the adjacency, and TRL "
                         "supports padding-free only for FlashAttention-2/3 with its own collator. For padding-free "
                         "CAT use causal_attn.CATTrainer(packing=True).")
    if compute_loss_func is not None or args.label_smoothing_factor > 0:
        raise ValueError("CATSFTTrainer does not support compute_loss_func or label_smoothing_factor: TRL then runs a "
                         "second, gradient-free forward for its metrics, which replaces the attention masses the "
                         "Re-Attention loss is computed from")


def truncate_record(record: dict, max_length: int, keep_end: bool = False) -> dict:
    """``record`` cut to ``max_length`` tokens as TRL cuts ``input_ids`` (the first tokens, or the last with
    ``keep_end``), with its ``labels`` / ``attention_mask`` and its row-aligned ``edges`` re-indexed: an edge
    stays when both ends are kept."""
    if record.get("input_ids") is None or record.get("edges") is None:
        return record
    n = len(record["input_ids"])
    if n <= max_length:
        return record
    start = n - max_length if keep_end else 0
    out = dict(record)
    for key in ("input_ids", "labels", "attention_mask"):
        if record.get(key) is not None:
            out[key] = list(record[key])[start:start + max_length]
    out["edges"] = [[i - start, j - start] for i, j in record["edges"]
                    if j >= start and i < start + max_length]
    return out
