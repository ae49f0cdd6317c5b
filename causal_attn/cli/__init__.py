"""Command line: ``causal-attn <command>``.

Each command lives in its own module and registers a subparser through ``add_parser(subparsers)``
plus a ``run(args) -> int`` function; this file only collects them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import CliError

# command name -> module (relative to causal_attn) providing add_parser(subparsers) and run(args)
COMMANDS = {
    "demo": "cli.demo",
    "train": "cli.train",
    "eval": "cli.train",
    "bench": "cli.bench",
    "gpu-check": "cli.bench",  # bench.py registers both
    "stg": "cli.data",
    "annotate": "cli.data",  # data.py registers both
    "capt": "cli.capt",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="causal-attn", description=__doc__.splitlines()[0] + " Causal Attention "
                                     "Tuning at the cost of flash attention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for name, mod in COMMANDS.items():
        if mod in seen:
            continue
        try:
            module = importlib.import_module(f"causal_attn.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("causal_attn"):
                continue  # command not built yet
            raise
        seen.add(mod)
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except CliError as e:
        print(f"causal-attn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
