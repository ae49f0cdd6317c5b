"""Run one attention forward+backward in this fresh process and print the RSS growth in MiB.

usage: python memory_probe.py BACKEND T H D   (BACKEND: a causal_attn backend name, or "eager" for the
authors' way: explicit maps via the reference backend)."""
import sys

import torch

import causal_attn
from causal_attn.benchmarks.common import measure_peak  # resettable VmHWM: the set-up's own peak does not hide ours


def main(backend, T, H, D):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, T, D, generator=g, requires_grad=True) for _ in range(3))
    adj = (torch.rand(1, T, T, generator=g) < 0.1) & torch.ones(T, T, dtype=torch.bool).tril()
    graph = causal_attn.CausalGraph.from_dense(adj)
    del adj
    # warm-up on a tiny problem so allocator / kernels are initialised outside the measurement
    small = [t[:, :, :64].detach().clone().requires_grad_() for t in (q, k, v)]
    o, m = causal_attn.attention(*small, causal_attn.CausalGraph.from_dense(torch.zeros(1, 64, 64, dtype=torch.bool)),
                                 backend="reference" if backend == "eager" else backend)
    (o.sum() + m.sum()).backward()

    def work():
        out, mass = causal_attn.attention(q, k, v, graph, backend="reference" if backend == "eager" else backend)
        (out.sum() + mass.sum()).backward()

    print(f"{measure_peak(work):.1f}")


if __name__ == "__main__":
    main(sys.argv[1], *(int(x) for x in sys.argv[2:5]))
