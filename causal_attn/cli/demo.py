"""`causal-attn demo`: both methods on CPU in minutes — CAT on STG_E (part ``cat``) and CAPT on a
generated PrOntoQA-style deduction task (part ``capt``); ``demo pretrained`` (not in ``all``: ~12 min per seed)
fine-tunes a real checkpoint, SmolLM2-135M, on STG_M, vanilla vs CAT, and ``demo capt-pretrained`` (not in ``all``)
fine-tunes it on the deduction task, vanilla vs CAPT. The parts are :mod:`causal_attn.demo`.

Writes ``results.json`` (one key per part, and the ``provenance`` of the code that ran: git revision, dirty flag,
source hash, package versions), ``table.md`` and the figures to ``--out`` (default: ``demo_out`` for the tiny
parts, ``demo_pretrained_out`` for ``pretrained``, ``demo_capt_pretrained_out`` for ``capt-pretrained``, each with a
``_quick`` suffix under ``--quick``, so a smoke run never overwrites a full one).
"""
from __future__ import annotations

import json
import os
import time

from .errors import CliError


def add_parser(subparsers):
    from ..demo import EXTRA_PARTS, PARTS, capt, capt_pretrained, pretrained, stg

    p = subparsers.add_parser("demo", help="vanilla vs CAT on STG_E and vanilla vs CAPT on a deduction task "
                              "(tiny Llama, CPU, minutes)", description=__doc__.splitlines()[0])
    p.add_argument("part", nargs="?", choices=("all",) + PARTS + EXTRA_PARTS,
                   default="all", help="run both tiny parts (default) or one; `pretrained` and `capt-pretrained` "
                   "(SmolLM2-135M, minutes per seed) only when named")
    p.add_argument("--out", default=None, help="output directory (default: demo_out, demo_pretrained_out for "
                   "`pretrained`, demo_capt_pretrained_out for `capt-pretrained`; with --quick: a _quick_out suffix)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: 3; 5 for `pretrained`)")
    p.add_argument("--first-seed", type=int, default=None, help="the first seed (default: 0; 1 for `pretrained`, "
                   "whose recipe search trained seed 0)")
    p.add_argument("--quick", action="store_true", help="one seed, a few steps, small test subsets (smoke test)")
    p.add_argument("--steps", type=int, default=None, help=f"CAT / pretrained / capt-pretrained parts: optimizer "
                   f"steps per run (default {stg.DEFAULT.steps} / {pretrained.DEFAULT.steps} / "
                   f"{capt_pretrained.DEFAULT.steps})")
    p.add_argument("--alpha", type=float, default=None, help=f"CAT / pretrained parts: Re-Attention margin "
                   f"(default {stg.DEFAULT.alpha:g} / {pretrained.DEFAULT.alpha:g})")
    p.add_argument("--gamma-decay", type=float, default=None, help=f"pretrained part: the Re-Attention weight falls "
                   f"as gamma exp(-D p) over the run's progress p (default D = {pretrained.DEFAULT.gamma_decay:g}; 0: "
                   "constant)")
    p.add_argument("--extra-train", type=int, default=None,
                   help=f"CAT part: generated STG_E training records added to STG_M (default {stg.EXTRA_TRAIN})")
    p.add_argument("--capt-steps", type=int, default=None,
                   help=f"CAPT part: optimizer steps per run (default {capt.DEFAULT.steps})")
    p.add_argument("--capt-copies", type=int, default=None,
                   help=f"CAPT / capt-pretrained parts: replicas of the training set with fresh letters (default "
                   f"{capt.COPIES} / {capt_pretrained.DEFAULT.copies})")
    p.add_argument("--model", default=pretrained.MODEL,
                   help=f"pretrained parts: checkpoint for causal_attn.hf.pretrained.load (default {pretrained.MODEL})")
    p.add_argument("--lr", type=float, default=None, help=f"pretrained parts: learning rate (default "
                   f"{pretrained.DEFAULT.lr:g} / {capt_pretrained.DEFAULT.lr:g})")
    p.add_argument("--lora-r", type=int, default=None, help=f"pretrained parts: LoRA rank on q/k/v/o, 0 = full "
                   f"fine-tuning (default {pretrained.DEFAULT.lora_r} / {capt_pretrained.DEFAULT.lora_r})")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="pretrained parts: score on the tests (default; STG_E's released ones, the deduction "
                   "generator's) or the validation splits (another generator seed)")
    p.add_argument("--jobs", type=int, default=None, help="runs trained in parallel processes (default: 2 CPUs -> 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 with --jobs > 1)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..demo import PARTS, part_classes
    from ..demo.part import DemoError
    from ..demo.runner import run_parts

    from ..utils.provenance import provenance

    t0 = time.perf_counter()
    if args.out is None:
        args.out = default_out(args.part, args.quick)
    if args.part in ("pretrained", "capt-pretrained"):
        args.jobs = 1  # one 135M-parameter model at a time, on every core
    elif args.jobs is None:
        args.jobs = 1 if args.quick else min(2, os.cpu_count() or 1)
    if (args.seeds is not None and args.seeds < 1) or args.jobs < 1 or (args.first_seed or 0) < 0:
        raise CliError("--seeds and --jobs must be >= 1, --first-seed >= 0")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create output directory {args.out!r}: {e}") from e
    classes = part_classes()
    try:
        parts = [classes[name].from_args(args) for name in (PARTS if args.part == "all" else (args.part,))]
    except DemoError as e:
        raise CliError(str(e)) from e
    run_parts(parts, jobs=args.jobs, threads=args.threads)  # one pool for all parts: no core idles
    results, tables = {}, []
    for part in parts:
        results[part.name], table = part.finish(args.out)
        tables.append(f"### {part.name}\n\n{table}")
        print(table, flush=True)
    results["seconds"] = time.perf_counter() - t0
    results["provenance"] = provenance()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write("\n\n".join(tables) + "\n")
    figures = [v for part in parts for v in results[part.name]["figures"].values()]
    print(f"demo: {results['seconds']:.0f} s; wrote {args.out}/results.json, table.md and " + ", ".join(figures))
    return 0


def default_out(part: str, quick: bool) -> str:
    """The output folder when ``--out`` is not given: one per kind of run, so none overwrites another's files."""
    stem = {"pretrained": "demo_pretrained", "capt-pretrained": "demo_capt_pretrained"}.get(part, "demo")
    return stem + ("_quick" if quick else "") + "_out"
