"""Averaging the Re-Attention loss across data-parallel ranks and gradient-accumulation micro-batches.

Rule (SPEC §2, issue 10): with ``reduction="mean"`` the loss is the mean over the eligible rows of
the *global* batch, i.e. the rows of every micro-batch of one optimizer step on every rank, each row
weighted equally; averaging each rank's own mean would weight a row by ``1 / rows on its rank``.
DDP and FSDP average gradients over the ``W`` data-parallel ranks, and the Hugging Face Trainer does
not divide a loss by the accumulation steps once it is normalised by a global count, so each
micro-batch contributes::

    W * (sum of its rows' hinge terms) / (eligible rows of the whole step on all ranks)

Summed over the micro-batches and averaged over the ranks this is exactly the single-process loss on
the whole global batch, so the update is the same. ``reduction="sum"`` (the paper's formula)
contributes ``W * local sum``. This is the same scheme the Trainer uses for the language-model loss
(``num_items_in_batch`` gathered across devices, loss multiplied by the number of processes).

The eligible rows depend only on the adjacency and the padding, so they are counted from the
batches before the forward (:func:`count_loss_rows`), like ``num_items_in_batch``.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.distributed as dist

from ..ops.graph import as_graph
from ..ops.loss import loss_rows, re_attention_loss


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def data_parallel_size(group=None) -> int:
    """Number of ranks whose gradients DDP / FSDP average (1 outside torch.distributed)."""
    return dist.get_world_size(group) if is_distributed() else 1


def all_reduce_sum(value: torch.Tensor, group=None) -> torch.Tensor:
    """Sum a tensor over the ranks (a copy; unchanged outside torch.distributed). Every rank must call it."""
    value = value.detach().clone()
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def count_loss_rows(batches: Iterable[Mapping], *, adjacency_key: str = "adjacency",
                    mask_key: str = "attention_mask", group=None, across_ranks: bool = True) -> torch.Tensor | None:
    """Eligible Re-Attention rows over micro-batches (one optimizer step), summed over ranks.

    ``batches`` are the collated micro-batches (dicts) of this rank; a batch without ``adjacency_key``
    counts 0 rows. Returns an int64 scalar tensor. With ``across_ranks`` (a collective: every rank must
    call it) the count is summed over the ranks; without it, the local count is returned, or None when
    no batch carries an adjacency."""
    total, seen = None, False
    for batch in batches:
        adjacency = batch.get(adjacency_key)
        if adjacency is None:
            continue
        seen = True
        graph = as_graph(adjacency)
        mask = batch.get(mask_key)
        if mask is not None:
            mask = mask.to(graph.device).bool()
        rows = loss_rows(graph, mask)[0].sum(dtype=torch.int64)
        total = rows if total is None else total + rows.to(total.device)
    if not across_ranks:
        return total if seen else None
    if total is None:
        total = torch.zeros((), dtype=torch.int64)
    return all_reduce_sum(total.to(_collective_device(group)), group)


def _collective_device(group=None) -> torch.device:
    """gloo reduces CPU tensors, nccl CUDA tensors."""
    if is_distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def scale_for_data_parallel(local_sum: torch.Tensor, *, reduction: str = "mean",
                            global_rows: torch.Tensor | int | None = None, local_rows: torch.Tensor | int | None = None,
                            world_size: int | None = None, group=None) -> torch.Tensor:
    """Turn this rank's sum of per-row loss terms into its share of the global loss (module docstring).

    ``global_rows``: eligible rows of the whole optimizer step on all ranks (:func:`count_loss_rows`).
    Without it, ``local_rows`` is summed over the ranks here (a collective: every rank must call it),
    which is right when there is no gradient accumulation. ``world_size`` defaults to the
    data-parallel size of ``group``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    W = data_parallel_size(group) if world_size is None else int(world_size)
    if reduction == "sum":
        return local_sum * W
    if global_rows is None:
        if local_rows is None:
            raise ValueError("reduction='mean' needs global_rows (rows of the whole step on all ranks) or local_rows")
        local_rows = torch.as_tensor(local_rows, dtype=torch.int64)
        global_rows = all_reduce_sum(local_rows.to(_collective_device(group)), group)
    global_rows = torch.as_tensor(global_rows).to(local_sum.device, local_sum.dtype).clamp_min(1)
    return local_sum * W / global_rows


def data_parallel_re_attention_loss(masses, adjacency, *, alpha: float, key_padding_mask=None,
                                    reduction: str = "mean", kind: str = "hinge",
                                    global_rows: torch.Tensor | int | None = None, group=None) -> torch.Tensor:
    """:func:`causal_attn.re_attention_loss` for one micro-batch of a data-parallel step, scaled so that
    DDP/FSDP gradient averaging (and summing over accumulation steps, with ``global_rows`` counted over
    them) gives the gradient of the single-process loss on the global batch. Outside
    torch.distributed and without accumulation it equals ``re_attention_loss``."""
    local_sum, stats = re_attention_loss(masses, adjacency, alpha=alpha, key_padding_mask=key_padding_mask,
                                         reduction="sum", kind=kind, return_stats=True)
    return scale_for_data_parallel(local_sum, reduction=reduction, global_rows=global_rows,
                                   local_rows=stats.rows.sum(), group=group)


def data_parallel_share(loss: torch.Tensor, local_rows: torch.Tensor, *, reduction: str = "mean",
                        global_rows: torch.Tensor | int | None = None, group=None) -> torch.Tensor:
    """This rank's share of the global loss from a micro-batch's Re-Attention ``loss`` as
    :func:`causal_attn.re_attention_loss` or ``handle.loss()`` return it, and its ``local_rows`` (the
    ``stats.rows.sum()`` of ``return_stats=True``). See :func:`scale_for_data_parallel`."""
    local_rows = torch.as_tensor(local_rows)
    # a "mean" loss is the local sum divided by max(local rows, 1) (a 0-row batch has loss 0): undo it
    local_sum = loss * local_rows.clamp_min(1).to(loss.dtype) if reduction == "mean" else loss
    return scale_for_data_parallel(local_sum, reduction=reduction, global_rows=global_rows, local_rows=local_rows,
                                   group=group)


def data_parallel_handle_loss(handle, *, global_rows: torch.Tensor | int | None = None, group=None) -> torch.Tensor:
    """``handle.loss()`` of the last forward of a :func:`causal_attn.patch_model` model, scaled as
    :func:`data_parallel_re_attention_loss` (the handle's ``reduction`` decides mean or sum)."""
    loss, stats = handle.loss(return_stats=True)
    return data_parallel_share(loss, stats.rows.sum(), reduction=handle.reduction, global_rows=global_rows,
                               group=group)
