"""``causal-attn stg`` (write the STG datasets) and ``causal-attn annotate`` (assistant-LLM annotation,
or ``--coverage``: how many annotated spans the adjacency builder locates)."""
from __future__ import annotations

import json
import os
import sys

from ..data.jsonl import write_jsonl
from .errors import CliError
from .records import read_records


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("stg", help="write the STG_E / STG_H splits as JSONL",
                              description="Generate STG_E (reproduces the released splits with seed 42) and "
                                          "STG_H, writing OUT/stg_e/<split>.jsonl and OUT/stg_h/<split>.jsonl.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed-e", type=int, default=42, help="STG_E seed (42 = the release)")
    p.add_argument("--seed-h", type=int, default=42, help="STG_H seed")
    p.set_defaults(func=run_stg)

    a = subparsers.add_parser("annotate", help="causal annotation of a JSONL dataset by an assistant LLM",
                              description="Annotate records with {key: [values]} causal spans through any "
                                          "OpenAI-compatible endpoint. The API key is read from the environment "
                                          "variable named by --api-key-env, never from the command line.")
    a.add_argument("input", nargs="+", help="input JSONL file (with --coverage: annotated files to check)")
    a.add_argument("--task", choices=["stg", "svamp", "arc_e", "gsm8k", "mawps"], help="prompt template")
    a.add_argument("--out", help="output JSONL (records with 'important')")
    a.add_argument("--cache", help="resumable cache JSONL (default: OUT.cache.jsonl)")
    a.add_argument("--base-url", default="https://api.openai.com/v1")
    a.add_argument("--model", default="gpt-4o-mini")
    a.add_argument("--api-key-env", default="OPENAI_API_KEY", help="name of the environment variable with the key")
    a.add_argument("--concurrency", type=int, default=4)
    a.add_argument("--max-retries", type=int, default=5, help="HTTP retries per request (429 / 5xx / timeouts)")
    a.add_argument("--max-attempts", type=int, default=3, help="answers per sample before recording a failure")
    a.add_argument("--timeout", type=float, default=60.0)
    a.add_argument("--backoff", type=float, default=1.0, help="first back-off in seconds (doubles, jittered)")
    a.add_argument("--price-prompt", type=float, default=0.0, help="cost per million prompt tokens")
    a.add_argument("--price-completion", type=float, default=0.0, help="cost per million completion tokens")
    a.add_argument("--input-field", default="input")
    a.add_argument("--target-field", default="target")
    a.add_argument("--limit", type=int, help="annotate only the first N records")
    a.add_argument("--no-progress", action="store_true")
    a.add_argument("--coverage", action="store_true", help="measure located spans of annotated files instead")
    a.add_argument("--tokenizer", action="append", help="with --coverage: qwen2, llama3 or a path (repeatable)")
    a.set_defaults(func=run_annotate)


def run_stg(args) -> int:
    from ..data.stg import write_all

    counts = write_all(args.out, seed_e=args.seed_e, seed_h=args.seed_h)
    for name, n in counts.items():
        print(f"{name}: {n} records -> {os.path.join(args.out, name)}.jsonl")
    return 0


def run_annotate(args) -> int:
    return run_coverage(args) if args.coverage else run_annotation(args)


def run_annotation(args) -> int:
    from ..data.annotate import annotate_records
    from ..data.llm import ChatClient, JsonlCache

    if not args.task or not args.out:
        raise CliError("--task and --out are required (or use --coverage)")
    if len(args.input) != 1:
        raise CliError("annotate takes one input file")
    records = read_records(args.input[0])[: args.limit]
    try:
        client = ChatClient(args.base_url, args.model, api_key_env=args.api_key_env,
                            max_concurrency=args.concurrency, max_retries=args.max_retries, timeout=args.timeout,
                            backoff=args.backoff, price_prompt=args.price_prompt,
                            price_completion=args.price_completion)
    except ValueError as e:
        raise CliError(str(e)) from None
    cache = JsonlCache(args.cache or args.out + ".cache.jsonl")
    try:
        out, report = annotate_records(records, args.task, client, cache, input_field=args.input_field,
                                       target_field=args.target_field, max_attempts=args.max_attempts,
                                       progress=not args.no_progress)
    except ValueError as e:
        raise CliError(str(e)) from None
    write_jsonl(out, args.out)  # the output appears whole or not at all; the cache holds the progress
    print(json.dumps({"out": args.out, "records": len(out), **report.as_dict()}), file=sys.stderr)
    return 0 if report.errors == 0 else 1


def run_coverage(args) -> int:
    from ..data.adjacency import MATCH_KINDS, measure_coverage
    from ..data.tokenizers import TokenizerUnavailable, load_tokenizer

    names = args.tokenizer or ["qwen2", "llama3"]
    print("| dataset | tokenizer | spans | exact | case | fuzzy | missing | located |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        try:
            tok = load_tokenizer(name)
        except TokenizerUnavailable as e:
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        for path in args.input:
            c = measure_coverage(read_records(path), tok, prompt_field=args.input_field,
                                 target_field=args.target_field)
            kinds = " | ".join(str(c[k]) for k in MATCH_KINDS)
            print(f"| {os.path.basename(path)} | {name} | {c['spans']} | {kinds} | {c['missing']} | "
                  f"{100 * c['located']:.2f}% |")
    return 0
