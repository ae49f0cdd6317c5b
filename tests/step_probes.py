"""What one training step of a (patched) model costs beyond its arithmetic: graph breaks under ``torch.compile``
and host syncs in eager mode. Shared by the tests and the compiled-step benchmark.

    batch = step_batch(model, "padded", T=48)               # or "packed" (CATCollator(packing=True))
    breaks = graph_breaks(model, batch, handle)            # torch._dynamo.explain of forward + loss
    syncs = host_syncs(model, batch, handle)               # aten ops that wait for the device, fwd + bwd
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from causal_attn.data.collate import CATCollator

# aten ops that read a tensor's value on the host (on a GPU: wait for the queue to drain). Boolean-mask indexing
# and masked_select size their output from the data; _assert_async does not wait (it is how checks avoid waiting).
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "unique_consecutive",
            "_unique2", "unique_dim", "repeat_interleave", "allclose"}


class HostSyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in SYNC_OPS or (name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                                        for i in (args[1] if len(args) > 1 else ()) if i is not None)):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def step_records(lengths, vocab: int, seed: int, density: float = 0.3) -> list[dict]:
    """Records with random tokens and random row-aligned edges, as a dataset hands them to CATCollator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        dense = (torch.rand(n, n, generator=g) < density).tril()
        out.append({"input_ids": torch.randint(3, vocab, (n,), generator=g).tolist(),
                    "edges": [(int(i), int(j)) for i, j in dense.nonzero()]})
    return out


def step_batch(model, layout: str, T: int = 48, *, seed: int = 0) -> dict:
    """A collated batch of ~T tokens per row: "padded" (3 records, right padding) or "packed" (one row)."""
    lengths = [T, T - T // 3, T // 2] if layout == "padded" else [T // 2, T // 4, T - T // 2 - T // 4]
    records = step_records(lengths, model.config.vocab_size, seed)
    return CATCollator(model.config.pad_token_id or 0, packing=layout == "packed")(records)


def step_loss(model, batch, handle=None):
    """LM loss of one forward, plus the Re-Attention loss when ``handle`` is given."""
    out = model(**batch)
    return out.loss + handle.loss() if handle is not None else out.loss


def plain_batch(batch) -> dict:
    return {k: v for k, v in batch.items() if k != "adjacency"}


def graph_breaks(model, batch, handle=None) -> tuple[int, int]:
    """``(graphs, graph breaks)`` that Dynamo finds in forward + loss (``torch._dynamo.explain``)."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step_loss)(model, batch, handle)
    return explanation.graph_count, explanation.graph_break_count


def host_syncs(model, batch, handle=None) -> Counter:
    """The host-reading aten ops of one eager forward + backward, by name."""
    model.zero_grad(set_to_none=True)
    with HostSyncCounter() as counter:
        step_loss(model, batch, handle).backward()
    return counter.ops
