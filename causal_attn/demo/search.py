"""Recipe search for a demo part, scored on the validation splits only
(``python -m causal_attn.demo.search --part cat|pretrained|capt-pretrained --grid grid.json --out search.jsonl``).

``--grid`` (JSON) is a list of ``{"name": ..., **recipe fields}`` (:class:`causal_attn.demo.fit.Recipe` for
``cat``, plus ``"extra"``: generated training records; :class:`causal_attn.demo.pretrained.PretrainedRecipe` for
``pretrained``); each setting is trained vanilla and CAT per seed and scored on the IID / OOD validation sets of
:func:`causal_attn.demo.stg.validation_sets` (generator seed ``VAL_SEED``, never 42, with every released test
prompt removed), the first ``--val-size`` records of each. One JSON line per run (with the ``code`` that trained
it: git revision, dirty flag, source hash) is appended to ``--out`` as it finishes; runs already there are
skipped (resume), and vanilla runs that differ only in CAT-only fields are trained once. ``cat`` runs in ``--jobs`` processes; ``pretrained`` in this one (the checkpoint is loaded once).
``capt-pretrained`` (:class:`causal_attn.demo.capt_pretrained.CaptPretrainedRecipe`) trains ``vanilla`` and
``capt`` per seed and scores them on the deduction task's validation records (generator seed
:data:`causal_attn.demo.capt.VAL_SEED`, every test prompt removed), ``--val-size`` per variant.
``--table`` prints the markdown table of such a file.
"""
from __future__ import annotations

import argparse
import json
import os

# the recipe fields a vanilla run ignores: settings that differ only there share their vanilla runs
NOT_VANILLA = ("alpha", "gamma", "gamma_decay", "patch_layers", "loss_kind", "copies")
METHODS = {"cat": ("vanilla", "cat"), "pretrained": ("vanilla", "cat"), "capt-pretrained": ("vanilla", "capt")}


def run_key(setting: dict, method: str, seed: int) -> str:
    fields = {k: v for k, v in setting.items() if k != "name" and (method != "vanilla" or k not in NOT_VANILLA)}
    return json.dumps(fields, sort_keys=True) + f" {method} {seed}"


def majority_line(val_size: int) -> str:
    """The majority class of STG_M scored on the same validation records: the floor a run must beat."""
    import statistics

    from .stg import load_data

    train, val, _ = load_data(0, False, "val")
    label = statistics.mode(r["target"] for r in train)
    acc = {k: 100 * sum(r["target"] == label for r in v[:val_size]) / len(v[:val_size]) for k, v in val.items()}
    return (f"| majority class ({label}) | – | – | {val_size} | {acc['iid']:.1f} / {acc['ood']:.1f} | – | – | – | – "
            "| – |")


def code_cell(line: dict) -> str:
    """The git revision that trained a search line (7 digits, ``+dirty`` for uncommitted edits; – where the line
    predates the field)."""
    code = line.get("code") or {}
    sha = code.get("git_revision")
    return f"{sha[:7]}{'+dirty' if code.get('git_dirty') else ''}" if sha else "–"


def paired_rows(rows: list[dict], method: str) -> list[tuple[dict, dict | None, dict | None]]:
    """``(row, vanilla, other)`` per table row: each ``method`` run beside the vanilla run of its setting and seed,
    and a vanilla run whose ``method`` run has not finished on its own (``other`` None)."""
    by_key = {run_key(r["setting"], r["method"], r["seed"]): r for r in rows}
    paired = {run_key(r["setting"], "vanilla", r["seed"]) for r in rows if r["method"] == method}
    out = []
    for r in rows:
        vanilla_key = run_key(r["setting"], "vanilla", r["seed"])
        if r["method"] == "vanilla" and vanilla_key in paired:
            continue
        out.append((r, by_key.get(vanilla_key), r if r["method"] == method else None))
    return out


def table(path: str) -> str:
    """Markdown: one row per CAT run, beside the vanilla run of the same setting and seed (a vanilla run whose
    CAT run has not finished gets a row of its own), then the majority class on the same validation records; the
    last column is the revision that trained the row's run (:func:`code_cell`).
    A ``capt-pretrained`` file: :func:`capt_table`."""
    rows = [json.loads(line) for line in open(path)]
    if rows and "accuracy" in rows[0]:
        return capt_table(rows)
    mass = lambda r: " / ".join(f"{r['mass'][k]:.2f}" for k in ("causal", "spurious", "irrelevant"))  # noqa: E731
    lines = ["| setting | recipe fields | seed | val records per split | vanilla val IID / OOD % | CAT val IID / OOD % | "
             "answer-row mass vanilla (causal / spurious / irrelevant) | answer-row mass CAT | CAT wall s | code |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r, v, c in paired_rows(rows, "cat"):
        fields = {k: val for k, val in r["setting"].items() if k != "name"}
        acc = lambda x: f"{100 * x['val_iid']:.1f} / {100 * x['val_ood']:.1f}" if x else "–"  # noqa: E731
        secs = f"{c['seconds']:.0f}" if c else "–"
        n = min(x["val_size"] for x in (v, c) if x)  # a vanilla run shared by settings may have scored more
        lines.append(f"| {r['setting'].get('name', '')} | {json.dumps(fields)} | {r['seed']} | {n} | "
                     f"{acc(v)} | {acc(c)} | {mass(v) if v else '–'} | {mass(c) if c else '–'} | {secs} | "
                     f"{code_cell(r)} |")
    for size in sorted({r["val_size"] for r in rows}):
        lines.append(majority_line(size))
    return "\n".join(lines)


def capt_table(rows: list[dict]) -> str:
    """Markdown for a ``capt-pretrained`` search: one row per CAPT run beside the vanilla run of the same setting
    and seed, accuracy % per validation variant and CAPT's margin over vanilla on the two variants the method is
    for (a vanilla run whose CAPT run has not finished: a row of its own)."""
    from ..data.capt import VARIANTS

    acc = lambda x: " / ".join(f"{100 * x['accuracy'][v]:.1f}" for v in VARIANTS) if x else "–"  # noqa: E731
    lines = ["| setting | recipe fields | seed | val records per variant | vanilla % (" + " / ".join(VARIANTS) + ") | "
             "CAPT % | CAPT - vanilla, anticommonsense / nonsense (points) | CAPT unparsed | CAPT wall s | code |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r, v, c in paired_rows(rows, "capt"):
        margin = (" / ".join(f"{100 * (c['accuracy'][k] - v['accuracy'][k]):+.1f}" for k in ("anticommonsense",
                                                                                            "nonsense"))
                  if c and v else "–")
        fields = {k: val for k, val in r["setting"].items() if k != "name"}
        capt_cells = f"{c['unparsed']} | {c['seconds']:.0f}" if c else "– | –"
        lines.append(f"| {r['setting'].get('name', '')} | {json.dumps(fields)} | {r['seed']} | {r['val_size']} | "
                     f"{acc(v)} | {acc(c)} | {margin} | {capt_cells} | {code_cell(r)} |")
    return "\n".join(lines)


def setting_part(part: str, setting: dict, seeds: list[int], args):
    """The :class:`~causal_attn.demo.part.Part` that trains ``setting`` on the validation splits."""
    fields = {k: (tuple(v) if k in ("patch_layers", "lora_targets") and v else v) for k, v in setting.items()
              if k not in ("name", "extra")}
    if part == "cat":
        from .fit import Recipe
        from .stg import CatPart

        return CatPart(Recipe(**fields), seeds, setting.get("extra", 0), False, "val", val_size=args.val_size)
    if part == "capt-pretrained":
        from .capt_pretrained import CaptPretrainedPart, CaptPretrainedRecipe

        return CaptPretrainedPart(CaptPretrainedRecipe(**fields), seeds, args.model, False, "val",
                                  eval_size=args.val_size)
    from .pretrained import PretrainedPart, PretrainedRecipe

    return PretrainedPart(PretrainedRecipe(**fields), seeds, args.model, False, "val", eval_size=args.val_size,
                          probe=args.probe)


def result_line(res: dict, setting: dict, val_size: int) -> dict:
    if "accuracy" in res:  # capt-pretrained
        return {"setting": setting, "method": res["method"], "seed": res["seed"], "val_size": val_size,
                "accuracy": res["accuracy"], "unparsed": res["unparsed"], "seconds": res["seconds"],
                "train_seconds": res["train_seconds"], "final_lm_loss": res["curve"][-1].get("lm_loss")}
    return {"setting": setting, "method": res["method"], "seed": res["seed"], "val_iid": res["iid_acc"],
            "val_ood": res["ood_acc"], "val_size": val_size, "mass": res["attention_mass"],
            "seconds": res["seconds"], "final": {k: res["curve"][-1].get(k) for k in ("lm_loss", "attn_loss",
                                                                                       "ratio_mean")}}


def main(argv=None) -> int:
    from ..utils.provenance import provenance
    from .pretrained import MODEL
    from .runner import run_tasks

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=tuple(METHODS), default="cat")
    p.add_argument("--grid", help="JSON file: a list of settings")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", required=True, help="JSON lines, appended")
    p.add_argument("--model", default=MODEL, help="pretrained part: the checkpoint")
    p.add_argument("--val-size", type=int, default=200, help="validation records per split (capt-pretrained: per "
                   "variant; default 200)")
    p.add_argument("--probe", type=int, default=40, help="pretrained part: OOD validation records for the attention "
                   "mass (default 40)")
    p.add_argument("--jobs", type=int, default=2, help="cat part: runs in parallel processes (default 2)")
    p.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    if not args.grid:
        p.error("--grid is required unless --table")
    grid = json.load(open(args.grid))
    done = set()
    if os.path.exists(args.out):
        done = {run_key(r["setting"], r["method"], r["seed"]) for r in map(json.loads, open(args.out))}
    parts, tasks = [], []
    for s in grid:
        parts.append(setting_part(args.part, s, args.seeds, args))
        for seed in args.seeds:
            for method in METHODS[args.part]:
                key = run_key(s, method, seed)
                if key not in done:
                    done.add(key)
                    tasks.append((len(parts) - 1, method, seed))
    settings = {id(part): s for part, s in zip(parts, grid)}

    def write(part, res):
        line = result_line(res, settings[id(part)], args.val_size)
        line["code"] = {k: v for k, v in provenance().items() if k != "versions"}  # what trained it
        if args.part == "pretrained":
            line.update(predicted_ood=res["ood_predicted"], train_seconds=res["train_seconds"])
        with open(args.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"{line['setting'].get('name')} {res['method']} seed {res['seed']}: {part.describe(res)} "
              f"({res['seconds']:.0f} s)", flush=True)

    run_tasks(parts, tasks, write, jobs=args.jobs if args.part == "cat" else 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
