"""``causal-attn capt``: CAPT event estimation, symbolic intervention and per-variant scoring.

    causal-attn capt estimate  --data cladder-v1-q-commonsense.json --out est.jsonl --base-url URL --model M
    causal-attn capt symbolize --data est.jsonl --out train.jsonl --mode random --copies 4 --seed 42
    causal-attn capt score     --data generations.jsonl [--field generation]

``estimate`` writes the accepted samples (with their ``capt`` estimation) as JSONL and keeps every
answer in a resumable cache beside the output (``--cache``); ``symbolize`` writes the intervened
records (``--copies`` replicas, new letters each); ``score`` prints accuracy per test variant.
"""
from __future__ import annotations

import json
import os
import sys

from ..data.jsonl import JsonlError, write_jsonl
from .errors import CliError
from .records import read_records


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("capt", help="CAPT: event estimation and symbolic intervention of a data set",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="capt_command", metavar="STEP", required=True)

    est = sub.add_parser("estimate", help="estimate events with an OpenAI-compatible assistant LLM")
    _data_args(est)
    est.add_argument("--out", required=True, help="JSONL of accepted samples with their estimation")
    est.add_argument("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1")
    est.add_argument("--model", required=True)
    est.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
    est.add_argument("--cache", help="resumable JSONL cache (default: OUT with .cache.jsonl)")
    est.add_argument("--max-attempts", type=int, default=3, help="answers per sample before rejecting it")
    est.add_argument("--concurrency", type=int, default=4)
    est.add_argument("--binary", choices=["auto", "yes", "no"], default="auto",
                     help="ask for set/unset descriptions (auto: for CLadder samples)")
    est.add_argument("--limit", type=int, help="only the first N samples")
    est.set_defaults(func=run_estimate)

    sym = sub.add_parser("symbolize", help="replace placeholders by letters / phrases")
    _data_args(sym)
    sym.add_argument("--out", required=True)
    sym.add_argument("--mode", choices=["random", "order", "original", "symbol"], default="random")
    sym.add_argument("--copies", type=int, default=1, help="replicas of the set, new letters for each")
    sym.add_argument("--seed", type=int, default=0)
    sym.set_defaults(func=run_symbolize)

    score = sub.add_parser("score", help="accuracy per test variant of generated answers")
    score.add_argument("--data", required=True, help="JSONL records with answer, variant, source and the generation")
    score.add_argument("--field", default="generation", help="field holding the generated text")
    score.set_defaults(func=run_score)


def _data_args(p) -> None:
    p.add_argument("--data", required=True, nargs="+", help="CLadder / PrOntoQA files or prepared JSONL")
    p.add_argument("--kind", choices=["cladder", "prontoqa", "jsonl"], help="record format (default: from the name)")
    p.add_argument("--variant", help="test variant for every file (default: from the file name)")


def _load(args) -> list[dict]:
    from ..data.capt.datasets import load_records

    records = []
    for path in args.data:
        if not os.path.exists(path):
            raise CliError(f"no such file: {path}")
        try:
            loaded = load_records(path, args.kind, args.variant)
        except JsonlError as e:  # names file and line already
            raise CliError(str(e)) from None
        except ValueError as e:  # json.JSONDecodeError is one
            raise CliError(f"{path}: {e}") from None
        if loaded.skipped:
            print(f"{path}: skipped {len(loaded.skipped)} record(s), e.g. {loaded.skipped[0]}", file=sys.stderr)
        records += loaded.records
    if not records:
        raise CliError("no usable records in " + ", ".join(args.data))
    return records


def run_estimate(args) -> int:
    from ..data.capt.estimation import estimate_events
    from ..data.llm import ChatClient, JsonlCache

    records = _load(args)[: args.limit]
    try:
        client = ChatClient(args.base_url, args.model, api_key_env=args.api_key_env,
                            max_concurrency=args.concurrency)
    except ValueError as e:
        raise CliError(str(e)) from None
    cache = JsonlCache(args.cache or os.path.splitext(args.out)[0] + ".cache.jsonl")
    binary = {"auto": None, "yes": True, "no": False}[args.binary]
    estimated, report = estimate_events(records, client, cache, binary=binary,
                                        max_attempts=args.max_attempts, progress=sys.stderr.isatty())
    write_jsonl(estimated, args.out)
    print(report.summary())
    print(json.dumps({k: v for k, v in vars(report).items()}, sort_keys=True))
    return 0 if report.accepted else 1


def run_symbolize(args) -> int:
    from ..data.capt.intervention import replicate

    records = _load(args)
    try:
        out = replicate(records, args.copies, seed=args.seed, mode=args.mode)
    except (ValueError, KeyError) as e:
        raise CliError(f"cannot symbolise: {e}") from None
    write_jsonl(out, args.out)
    print(f"wrote {len(out)} records ({len(records)} samples x {args.copies} copies, mode {args.mode}) to {args.out}")
    return 0


def run_score(args) -> int:
    from ..data.capt.datasets import accuracy_by_variant

    rows = read_records(args.data, ("answer", args.field))
    table = accuracy_by_variant(rows, [r[args.field] for r in rows])
    for variant, row in sorted(table.items()):
        print(f"{variant:16s} n={row['n']:5d} accuracy={row['accuracy']:.4f} unparsed={row['unparsed']}")
    return 0
