"""`causal-attn demo`: both methods on CPU in minutes — CAT on STG_E (part ``cat``) and CAPT on a
generated PrOntoQA-style deduction task (part ``capt``).

Subpackage layout: :mod:`.stg` (the CAT part), :mod:`.capt` (the CAPT part) and their shared pieces
:mod:`.model` (tokenizer, tiny Llama), :mod:`.fit` (recipe, training loop, STG scoring), :mod:`.decode`
(batched greedy decoding), :mod:`.runner` (runs in parallel processes) and :mod:`.figures`.
Writes ``results.json`` (one key per part), ``table.md`` and the figures to ``--out``.
"""
from __future__ import annotations

import json
import os
import time

PARTS = ("cat", "capt")


def add_parser(subparsers):
    from . import capt, stg

    p = subparsers.add_parser("demo", help="vanilla vs CAT on STG_E and vanilla vs CAPT on a deduction task "
                              "(tiny Llama, CPU, minutes)", description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", choices=("all",) + PARTS, default="all",
                   help="run both parts (default) or one")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument("--quick", action="store_true", help="one seed, a few steps, small test subsets (smoke test)")
    p.add_argument("--steps", type=int, default=None, help=f"CAT part: optimizer steps per run (default {stg.DEFAULT.steps})")
    p.add_argument("--alpha", type=float, default=None, help=f"CAT part: Re-Attention margin (default {stg.DEFAULT.alpha})")
    p.add_argument("--extra-train", type=int, default=None,
                   help=f"CAT part: generated STG_E training records added to STG_M (default {stg.EXTRA_TRAIN})")
    p.add_argument("--capt-steps", type=int, default=None,
                   help=f"CAPT part: optimizer steps per run (default {capt.DEFAULT.steps})")
    p.add_argument("--capt-copies", type=int, default=None,
                   help=f"CAPT part: replicas of the training set with fresh letters (default {capt.COPIES})")
    p.add_argument("--jobs", type=int, default=None, help="runs trained in parallel processes (default: 2 CPUs -> 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 with --jobs > 1)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..cli import CliError
    from . import capt, stg
    from .runner import run_plans

    t0 = time.perf_counter()
    if args.jobs is None:
        args.jobs = 1 if args.quick else min(2, os.cpu_count() or 1)
    if args.seeds < 1 or args.jobs < 1:
        raise CliError("--seeds and --jobs must be >= 1")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create output directory {args.out!r}: {e}") from e
    parts = PARTS if args.part == "all" else (args.part,)
    plans = [(stg if part == "cat" else capt).plan(args) for part in parts]
    run_plans(plans, args)  # one pool for both parts: no core idles while the other part finishes
    results, tables = {}, []
    for part, p in zip(parts, plans):
        results[part], table = p.finish(args.out)
        tables.append(f"### {part}\n\n{table}")
        print(table, flush=True)
    results["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n\n".join(tables) + "\n")
    figures = [v for part in parts for v in results[part]["figures"].values()]
    print(f"demo: {results['seconds']:.0f} s; wrote {args.out}/results.json, table.md and " + ", ".join(figures))
    return 0
