"""CATTrainer: ``transformers.Trainer`` with the Re-Attention loss, and its collator.

Loss per micro-batch: ``LM + gamma * share``. Within ``train()`` the Re-Attention term of an optimiser
step is the mean over the eligible rows of all its micro-batches on all ranks, as one process would
compute it on the whole global batch (:mod:`causal_attn.hf.distributed`): ``get_batch_samples`` counts the
rows, and each micro-batch contributes ``world_size * its row sum / that count`` (times the
accumulation steps when the Trainer divides the loss by them, i.e. when the LM loss is not normalised
by ``num_items_in_batch``). A ``training_step`` called on its own (no count) uses the mean of the
micro-batch losses, ``L_attn / s`` with ``s`` the accumulation steps when the LM loss is normalised.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from transformers import Trainer, TrainingArguments

from .distributed import count_loss_rows, data_parallel_share
from ..ops.graph import CausalGraph
from .patch import CATHandle, patch_model

GAMMA_SCHEDULES = {
    "exp": lambda epoch, progress: math.exp(-epoch),  # the paper: exp(-epoch), 0-based epochs
    "const": lambda epoch, progress: 1.0,
    "linear": lambda epoch, progress: 1.0 - progress,  # decays to 0 over the run
}


def make_gamma(gamma) -> Callable[[int, float], float]:
    """``gamma``: a name of :data:`GAMMA_SCHEDULES`, a number (constant) or a callable
    ``f(epoch: int, progress: float) -> float`` (0-based epoch, progress = global_step / max_steps in [0, 1])."""
    if isinstance(gamma, str):
        if gamma not in GAMMA_SCHEDULES:
            raise ValueError(f"unknown gamma schedule {gamma!r}; choose {sorted(GAMMA_SCHEDULES)}, a number or a callable")
        return GAMMA_SCHEDULES[gamma]
    if isinstance(gamma, (int, float)):
        value = float(gamma)
        return lambda epoch, progress: value
    if callable(gamma):
        return gamma
    raise TypeError(f"gamma must be a schedule name, a number or a callable, got {type(gamma).__name__}")


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


def cat_handle_for(model, cat_handle: CATHandle | None, **patch_options) -> CATHandle:
    """The given handle, else ``patch_model(model, **patch_options)``."""
    if model is None or isinstance(model, str):
        raise ValueError("CAT needs the model object (it patches its attention): load it first, e.g. "
                         "AutoModelForCausalLM.from_pretrained(name), and pass that instead of a name")
    return cat_handle if cat_handle is not None else patch_model(model, **patch_options)


def default_collator(model, processing_class, packing: bool = False) -> CATCollator:
    """:class:`CATCollator` with the tokenizer's (else the model config's, else 0) pad id and padding side."""
    pad = getattr(processing_class, "pad_token_id", None)
    if pad is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    side = getattr(processing_class, "padding_side", "right") or "right"
    return CATCollator(0 if pad is None else pad, padding_side=side, packing=packing)


class CATLossMixin:
    """The Re-Attention term of CAT for a ``transformers.Trainer`` subclass (:class:`CATTrainer`, and
    :class:`causal_attn.hf.trl.CATSFTTrainer` over TRL's ``SFTTrainer``): ``compute_loss`` adds ``gamma * L_attn``
    to the parent's loss, with the gradient-accumulation and data-parallel scaling of the module docstring.

    A subclass calls :meth:`_init_cat` after ``super().__init__`` and says where the per-micro-batch values
    (``lm_loss``, ``attn_loss``, ``gamma``, ``ratio_mean``, ``ratio_ge_alpha``: 0-dim tensors, NaN for a ratio of
    a micro-batch without Re-Attention rows, or floats) go in :meth:`_log_cat`.
    ``_outputs_from_parent = False`` when the parent's ``compute_loss(return_outputs=True)`` runs an extra
    forward (it would replace the masses of the forward the loss was computed on): the outputs are then
    computed here, after the Re-Attention loss."""

    _outputs_from_parent = True

    def _init_cat(self, cat_handle: CATHandle, gamma) -> None:
        self.cat = cat_handle
        self.gamma_fn = make_gamma(gamma)
        self._cat_rows = None  # Re-Attention rows of the current optimizer step on all ranks

    def _log_cat(self, key: str, value: float) -> None:
        raise NotImplementedError

    # -------------------------------------------------------------- schedule
    def current_gamma(self) -> float:
        epoch = int(math.floor((self.state.epoch or 0.0) + 1e-9))
        progress = self.state.global_step / self.state.max_steps if self.state.max_steps else 0.0
        return float(self.gamma_fn(epoch, progress))

    def _lm_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Mirror of ``Trainer.training_step``'s decision whether it divides the loss by the GA steps."""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    # -------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        has_graph = inputs.get("adjacency") is not None
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs and self._outputs_from_parent,
                                    num_items_in_batch=num_items_in_batch)
        loss, outputs = loss if isinstance(loss, tuple) else (loss, None)
        training = model.training
        ga_steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scaled = training and self._lm_loss_is_scaled_for_ga(num_items_in_batch)
        if training:
            self._log_cat("lm_loss", loss.detach() * (ga_steps if scaled else 1))
        if has_graph:
            attn, st = self.cat.loss(return_stats=True)
            gamma = self.current_gamma()
            if training and self._cat_rows is not None:
                # mean over the rows of the whole step on all ranks (causal_attn.hf.distributed); training_step
                # divides an unscaled loss by the accumulation steps, so this term is multiplied back
                share = data_parallel_share(attn, st.rows.sum(), reduction=self.cat.reduction,
                                            global_rows=self._cat_rows)
                loss = loss + gamma * (share if scaled else share * ga_steps)
            else:  # training_step called outside train(): mean of the micro-batch losses
                loss = loss + (gamma / ga_steps if scaled else gamma) * attn
            if training:  # tensors: read on the host at logging steps only (NaN = no row in this micro-batch)
                rows = st.rows.sum()
                ratio = torch.where(st.rows, st.ratio.detach(), 0.0)
                per_row = lambda x: torch.where(rows > 0, x.sum() / rows.clamp_min(1), float("nan"))  # noqa: E731
                self._log_cat("attn_loss", attn.detach())
                self._log_cat("gamma", gamma)
                self._log_cat("ratio_mean", per_row(ratio))
                self._log_cat("ratio_ge_alpha", per_row(((ratio >= self.cat.alpha) & st.rows).float()))
        if return_outputs and outputs is None:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also counts the Re-Attention rows of this step's micro-batches, summed over the ranks (one
        all-reduce, like the Trainer's ``num_items_in_batch``)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._cat_rows = count_loss_rows(batch_samples)
        return batch_samples, num_items_in_batch


class CATTrainer(CATLossMixin, Trainer):
    """``Trainer`` whose loss is ``LM + gamma * Re-Attention`` (SPEC §2).

    Args (besides those of ``Trainer``):
        cat_handle: the :class:`CATHandle` of an already patched model; default: ``patch_model(model,
            alpha=alpha, reduction=reduction, kind=kind, layers=layers)``.
        gamma: see :func:`make_gamma`; default ``"exp"`` = ``exp(-epoch)``.
        packing: padding-free batches (the default collator with ``packing=True``): each micro-batch is
            one row holding its records end to end; attention, the LM loss and the Re-Attention loss stay
            within each record.
    ``args.remove_unused_columns`` is set to False (the adjacency is not a model argument the Trainer
    knows). The default collator is :class:`CATCollator` with the tokenizer's (or config's) pad id.
    Logged beside ``loss``: ``lm_loss``, ``attn_loss``, ``gamma``, ``ratio_mean`` (mean R over the
    rows in the loss) and ``ratio_ge_alpha`` (fraction of those rows with R >= alpha), averaged over the
    micro-batches since the last log.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *, cat_handle: CATHandle | None = None,
                 alpha: float = 0.2, reduction: str = "mean", kind: str = "hinge", layers="all", gamma="exp",
                 packing: bool = False, data_collator=None, processing_class=None, **kwargs):
        if model is None:
            raise ValueError("CATTrainer needs a model")
        if args is None:
            args = TrainingArguments(output_dir="cat_trainer_output")
        args.remove_unused_columns = False
        handle = cat_handle_for(model, cat_handle, alpha=alpha, reduction=reduction, kind=kind, layers=layers)
        if data_collator is None:
            data_collator = default_collator(model, processing_class, packing)
        super().__init__(model=model, args=args, data_collator=data_collator, processing_class=processing_class,
                         **kwargs)
        self._init_cat(handle, gamma)
        self._cat_logs: dict[str, list[float]] = defaultdict(list)

    def _log_cat(self, key: str, value) -> None:
        self._cat_logs[key].append(value)

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs and self._cat_logs:  # a training log: add our means and start over
            for key, values in self._cat_logs.items():
                values = [v for v in map(float, values) if not math.isnan(v)]  # the host reads them here, once
                if values:
                    logs[key] = sum(values) / len(values)
            self._cat_logs = defaultdict(list)
        super().log(logs, start_time)
