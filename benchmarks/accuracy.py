"""Accuracy table: max error vs float64 per backend and dtype, next to PyTorch eager's own error.

    python -m benchmarks.accuracy [--backends torch cpp] [--out benchmarks/results/accuracy.csv]

Uses the independent fp64 oracle of the test suite (causal_attn/testing/oracle.py) on fresh random inputs with GQA, left
padding and an x30 logit case. Errors are relative: max |x - x64| / max |x64|.
"""
import argparse
import csv
import os

import torch

import causal_attn
from causal_attn.ops.attention import get_backend
from causal_attn.testing.numerics import eager_low_precision, make_case, outputs_and_grads
from causal_attn.testing.oracle import oracle_attention

CASES = [(2, 8, 2, 257, 64, "left", 1.0), (2, 4, 4, 128, 128, "right", 30.0), (1, 4, 1, 77, 16, "none", 1.0)]
NAMES = ["out", "mass", "dq", "dk", "dv"]


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def table(backends, dtypes, device="cpu"):
    rows = []
    for backend in backends:
        for dtype in dtypes:
            worst = {n: [0.0, 0.0] for n in NAMES}
            for B, Hq, Hkv, T, D, pad, ls in CASES:
                q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, D, dtype, padding=pad, logit_scale=ls, device=device)
                w_o = torch.randn(q.shape, dtype=torch.float64, device=device)
                w_m = torch.randn(q.shape[:3], dtype=torch.float64, device=device)
                ex = outputs_and_grads(lambda a, b, c: oracle_attention(a, b, c, adj, kpm), q, k, v, w_o, w_m)
                ea = outputs_and_grads(lambda a, b, c: eager_low_precision(a, b, c, adj, kpm), q, k, v, w_o, w_m)
                ou = outputs_and_grads(lambda a, b, c: causal_attn.attention(a, b, c, adj, key_padding_mask=kpm,
                                                                             backend=backend), q, k, v, w_o, w_m)
                for i, n in enumerate(NAMES):
                    get = (lambda r: r[i]) if i < 2 else (lambda r: r[2][i - 2])  # noqa: E731
                    worst[n][0] = max(worst[n][0], rel(get(ou), get(ex)))
                    worst[n][1] = max(worst[n][1], rel(get(ea), get(ex)))
            for n in NAMES:
                rows.append({"backend": backend, "dtype": str(dtype).replace("torch.", ""), "quantity": n,
                             "ours_rel_err": f"{worst[n][0]:.2e}", "eager_rel_err": f"{worst[n][1]:.2e}",
                             "ratio": f"{worst[n][0] / max(worst[n][1], 1e-30):.2f}"})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=[b for b in ("torch", "cpp") if get_backend(b)])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = table(args.backends, [getattr(torch, d) for d in args.dtypes])
    print(f"{'backend':8} {'dtype':9} {'qty':5} {'ours':>9} {'eager':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['backend']:8} {r['dtype']:9} {r['quantity']:5} {r['ours_rel_err']:>9} {r['eager_rel_err']:>9} {r['ratio']:>6}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
