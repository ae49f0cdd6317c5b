"""CATTrainer: ``transformers.Trainer`` with the Re-Attention loss (its collator is :mod:`causal_attn.data.collate`).

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
from ..data.collate import CATCollator
from .patch import CATHandle, patch_model

GAMMA_SCHEDULES = {
    "exp": lambda epoch, progress: math.exp(-epoch),  # the paper: exp(-epoch), 0-based epochs
    "const": lambda epoch, progress: 1.0,
    "linear": lambda epoch, progress: 1.0 - progress,  # decays to 0 over the run
    "decay": lambda epoch, progress: math.exp(-progress),  # "decay:G:D" = G * exp(-D * progress), see decay_gamma
}


def decay_gamma(gamma: float, decay: float) -> str:
    """The schedule ``gamma * exp(-decay * progress)`` by name: ``"decay:GAMMA:DECAY"`` (what
    ``causal-attn train --gamma`` takes too); ``decay = 0`` is the constant ``gamma``."""
    return f"decay:{float(gamma)!r}:{float(decay)!r}"


def _decay_schedule(spec: str) -> Callable[[int, float], float]:
    try:
        gamma, decay = (float(x) for x in spec.split(":")[1:])
    except ValueError:
        raise ValueError(f"gamma schedule {spec!r}: write decay:GAMMA:DECAY (two numbers), e.g. decay:1:2") from None
    return lambda epoch, progress: gamma * math.exp(-decay * progress)


def make_gamma(gamma) -> Callable[[int, float], float]:
    """``gamma``: a name of :data:`GAMMA_SCHEDULES` (``"decay:GAMMA:DECAY"`` with its two numbers, see
    :func:`decay_gamma`), a number (constant) or a callable ``f(epoch: int, progress: float) -> float`` (0-based
    epoch, progress = global_step / max_steps in [0, 1])."""
    if isinstance(gamma, str):
        if gamma.startswith("decay:"):
            return _decay_schedule(gamma)
        if gamma not in GAMMA_SCHEDULES:
            raise ValueError(f"unknown gamma schedule {gamma!r}; choose {sorted(GAMMA_SCHEDULES)} "
                             "(decay:GAMMA:DECAY), a number or a callable")
        return GAMMA_SCHEDULES[gamma]
    if isinstance(gamma, (int, float)):
        value = float(gamma)
        return lambda epoch, progress: value
    if callable(gamma):
        return gamma
    raise TypeError(f"gamma must be a schedule name, a number or a callable, got {type(gamma).__name__}")


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

    def _init_cat(self, cat_handle: CATHandle, gamma, lm_loss: Callable | None = None) -> None:
        self.cat = cat_handle
        self.gamma_fn = make_gamma(gamma)
        self.lm_loss = lm_loss
        if lm_loss is not None:
            self.loss_is_scaled_for_ga = False  # a mean over the micro-batch: the Trainer divides it by the GA steps
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
        if self.lm_loss is not None:  # the caller's LM loss; outputs, when asked for, come from a forward below
            loss = self.lm_loss(model, inputs)
        else:
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
        lm_loss: ``f(model, inputs) -> 0-dim tensor`` in place of the model's own LM loss (e.g. a loss on
            the answer tokens that runs the LM head on the labelled rows only, as ``demo pretrained`` does);
            a mean over the micro-batch. It must run the patched decoder on ``inputs`` (passing
            ``adjacency=inputs.get("adjacency")``), since the Re-Attention term reads that forward.
    ``args.remove_unused_columns`` is set to False (the adjacency is not a model argument the Trainer
    knows). The default collator is :class:`CATCollator` with the tokenizer's (or config's) pad id.
    Logged beside ``loss``: ``lm_loss``, ``attn_loss``, ``gamma``, ``ratio_mean`` (mean R over the
    rows in the loss) and ``ratio_ge_alpha`` (fraction of those rows with R >= alpha), averaged over the
    micro-batches since the last log.
    """

    def __init__(self, model=None, args: TrainingArguments | None = None, *, cat_handle: CATHandle | None = None,
                 alpha: float = 0.2, reduction: str = "mean", kind: str = "hinge", layers="all", gamma="exp",
                 packing: bool = False, lm_loss: Callable | None = None, data_collator=None, processing_class=None,
                 **kwargs):
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
        self._init_cat(handle, gamma, lm_loss)
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
