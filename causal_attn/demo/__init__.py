"""`causal-attn demo`: both methods on CPU in minutes — CAT on STG_E (part ``cat``) and CAPT on a
generated PrOntoQA-style deduction task (part ``capt``); ``demo pretrained`` (not in ``all``: ~12 min per seed)
fine-tunes a real checkpoint, SmolLM2-135M, on STG_M, vanilla vs CAT (:mod:`.pretrained`).

Subpackage layout: :mod:`.stg` (the CAT part), :mod:`.capt` (the CAPT part) and their shared pieces
:mod:`.model` (tokenizer, tiny Llama), :mod:`.fit` (recipe, training loop, STG scoring), :mod:`.decode`
(batched greedy decoding), :mod:`.runner` (runs in parallel processes) and :mod:`.figures`; :mod:`.pretrained`
reuses them for the real checkpoint.
Writes ``results.json`` (one key per part), ``table.md`` and the figures to ``--out``.
"""
from __future__ import annotations

import json
import os
import time

PARTS = ("cat", "capt")   # what `all` runs
EXTRA_PARTS = ("pretrained",)


def add_parser(subparsers):
    from . import capt, pretrained, stg

    p = subparsers.add_parser("demo", help="vanilla vs CAT on STG_E and vanilla vs CAPT on a deduction task "
                              "(tiny Llama, CPU, minutes)", description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", choices=("all",) + PARTS + EXTRA_PARTS,
                   default="all", help="run both tiny parts (default) or one; `pretrained` (SmolLM2-135M, ~12 min "
                   "per seed) only when named")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument("--quick", action="store_true", help="one seed, a few steps, small test subsets (smoke test)")
    p.add_argument("--steps", type=int, default=None, help=f"CAT / pretrained parts: optimizer steps per run "
                   f"(default {stg.DEFAULT.steps} / {pretrained.DEFAULT.steps})")
    p.add_argument("--alpha", type=float, default=None, help=f"CAT / pretrained parts: Re-Attention margin "
                   f"(default {stg.DEFAULT.alpha:g} / {pretrained.DEFAULT.alpha:g})")
    p.add_argument("--extra-train", type=int, default=None,
                   help=f"CAT part: generated STG_E training records added to STG_M (default {stg.EXTRA_TRAIN})")
    p.add_argument("--capt-steps", type=int, default=None,
                   help=f"CAPT part: optimizer steps per run (default {capt.DEFAULT.steps})")
    p.add_argument("--capt-copies", type=int, default=None,
                   help=f"CAPT part: replicas of the training set with fresh letters (default {capt.COPIES})")
    p.add_argument("--model", default=pretrained.MODEL,
                   help=f"pretrained part: checkpoint for causal_attn.hf.pretrained.load (default {pretrained.MODEL})")
    p.add_argument("--lr", type=float, default=None, help=f"pretrained part: learning rate (default {pretrained.DEFAULT.lr:g})")
    p.add_argument("--lora-r", type=int, default=None,
                   help=f"pretrained part: LoRA rank on q/k/v/o, 0 = full fine-tuning (default {pretrained.DEFAULT.lora_r})")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="pretrained part: score on the released STG_E tests (default) or the validation splits")
    p.add_argument("--jobs", type=int, default=None, help="runs trained in parallel processes (default: 2 CPUs -> 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 with --jobs > 1)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..cli.errors import CliError
    from . import capt, pretrained, stg
    from .runner import run_plans

    t0 = time.perf_counter()
    if args.part == "pretrained":
        args.jobs = 1  # one 135M-parameter model at a time, on every core
    elif args.jobs is None:
        args.jobs = 1 if args.quick else min(2, os.cpu_count() or 1)
    if args.seeds < 1 or args.jobs < 1:
        raise CliError("--seeds and --jobs must be >= 1")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create output directory {args.out!r}: {e}") from e
    parts = PARTS if args.part == "all" else (args.part,)
    modules = {"cat": stg, "capt": capt, "pretrained": pretrained}
    plans = [modules[part].plan(args) for part in parts]
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
