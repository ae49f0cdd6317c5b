"""`causal-attn demo`: vanilla vs CAT on STG_E with a tiny Llama trained from scratch on CPU.

For each seed the same tiny model is trained twice on the same batches (see :mod:`causal_attn.demo_fit`),
once with the LM loss only and once with the Re-Attention loss added; both are scored on the IID and OOD
test sets of STG_E and their attention at the answer row is split by factor type. Writes
``results.json``, ``table.md`` and three figures to ``--out`` and prints the table.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from .fit import Recipe

METHODS = ("vanilla", "cat")
FACTOR_KINDS = ("causal", "spurious", "irrelevant")
# The default recipe (README, "Demo"): what the demo measured to be robust on 2 CPU cores in ~5 minutes.
DEFAULT = Recipe(steps=1600, alpha=3.0)
EXTRA_TRAIN = 0        # generated STG_E IID training records added to STG_M (generator seed EXTRA_SEED)
EXTRA_SEED = 1042
QUICK = Recipe(steps=30, batch_size=16, curve_points=10, alpha=DEFAULT.alpha)


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="vanilla vs CAT on STG_E with a tiny Llama (CPU, minutes)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument("--quick", action="store_true", help="one seed, a few steps, small test subsets (smoke test)")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer steps per run (default {DEFAULT.steps})")
    p.add_argument("--alpha", type=float, default=None, help=f"Re-Attention margin (default {DEFAULT.alpha})")
    p.add_argument("--extra-train", type=int, default=None,
                   help=f"generated STG_E training records added to STG_M (default {EXTRA_TRAIN})")
    p.add_argument("--jobs", type=int, default=None, help="runs trained in parallel processes (default: 2 CPUs -> 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: 1 with --jobs > 1)")
    p.set_defaults(func=run)
    return p


def _mean_std(xs):
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def load_data(extra: int, quick: bool):
    """STG_M training records (+ ``extra`` generated IID records not in the test sets) and the test sets."""
    from ..data.stg import generate_stg_e

    released = generate_stg_e(seed=42)  # reproduces the released files record for record
    train = list(released["train_M"])
    tests = {"iid": released["test_iid"], "ood": released["test_ood"]}
    if extra:
        held_out = {r["input"] for split in tests.values() for r in split}
        more = generate_stg_e(seed=EXTRA_SEED, n_iid=extra, n_ood=0, n_test=0)["train_L"]
        train += [r for r in more if r["input"] not in held_out]
    if quick:
        tests = {k: v[:48] for k, v in tests.items()}
    return train, tests


def demo_phrases() -> list[str]:
    """Strings the demo's tokenizer keeps as one token: the fixed instruction and the multi-word names.

    The instruction carries no information and the names are one variable each; as single tokens a
    record is 37 tokens instead of 56, so the same CPU budget trains ~1.5x more steps."""
    from ..data.stg import STG_E_IRRELEVANT, STG_E_PREFIX, STG_E_SPURIOUS

    return [STG_E_PREFIX.strip()] + [n for n in STG_E_SPURIOUS + STG_E_IRRELEVANT if " " in n]


class Setup:
    """The data, tokenizer and encoded training records every run shares (rebuilt identically per worker)."""

    def __init__(self, extra: int, quick: bool):
        from ..data.stg import STG_E_CAUSAL, STG_E_IRRELEVANT, STG_E_SPURIOUS
        from .fit import encode_records
        from .model import build_word_tokenizer

        self.train, self.tests = load_data(extra, quick)
        self.tokenizer = build_word_tokenizer([r["input"] + r["target"]
                                               for r in self.train + self.tests["iid"] + self.tests["ood"]],
                                              phrases=demo_phrases())
        self.encoded = encode_records(self.train, self.tokenizer)
        self.factors = {"causal": STG_E_CAUSAL, "spurious": STG_E_SPURIOUS, "irrelevant": STG_E_IRRELEVANT}
        self.probe = self.tests["ood"][: 16 if quick else 100]  # samples for the attention statistics


_SETUP: Setup | None = None


def _init_worker(extra: int, quick: bool, threads: int):
    import torch

    global _SETUP
    torch.set_num_threads(threads)
    _SETUP = Setup(extra, quick)


def one_run(method: str, seed: int, recipe: Recipe, setup: Setup | None = None) -> dict:
    """Train, score and probe one model; returns a JSON-able record (plus the first probe's map)."""
    from .fit import evaluate, factor_masses, train_run

    s = setup or _SETUP
    t_run = time.perf_counter()
    model, handle, curve = train_run(method, seed, s.encoded, s.tokenizer, recipe)
    scores = evaluate(model, s.tokenizer, s.tests)
    masses = factor_masses(model, handle, s.tokenizer, s.probe, s.factors)
    res = {"method": method, "seed": seed, "seconds": time.perf_counter() - t_run, "curve": curve,
           "attention_mass": masses["mean"], "attention_mass_samples": masses["per_sample"],
           "sample_map": masses["maps"][0].numpy()}
    res.update({f"{split}_acc": sc["acc"] for split, sc in scores.items()})
    res["ood_examples"] = [{"target": r["target"], "prediction": p}
                           for r, p in zip(s.tests["ood"][:5], scores["ood"]["predictions"])]
    return res


def run(args) -> int:
    import torch

    from ..cli import CliError
    from .figures import attention_maps, ensure_dir, factor_mass, training_curves

    t0 = time.perf_counter()
    recipe = QUICK if args.quick else DEFAULT
    overrides = {k: v for k, v in (("steps", args.steps), ("alpha", args.alpha)) if v is not None}
    recipe = Recipe(**{**recipe.__dict__, **overrides})
    seeds = list(range(1 if args.quick else args.seeds))
    extra = (0 if args.quick else EXTRA_TRAIN) if args.extra_train is None else args.extra_train
    jobs = args.jobs or (1 if args.quick else min(2, os.cpu_count() or 1))
    if not seeds or recipe.steps < 1 or extra < 0 or jobs < 1:
        raise CliError("--seeds, --steps and --jobs must be >= 1 and --extra-train >= 0")
    try:
        out_dir = ensure_dir(args.out)
    except OSError as e:
        raise CliError(f"cannot create output directory {args.out!r}: {e}") from e

    setup = Setup(extra, args.quick)
    train, tests, tokenizer, probe = setup.train, setup.tests, setup.tokenizer, setup.probe
    print(f"demo: {len(train)} training records, vocabulary {len(tokenizer)}, {len(seeds)} seed(s) x {METHODS}, "
          f"{recipe.steps} steps of batch {recipe.batch_size}, alpha {recipe.alpha}, {jobs} process(es)", flush=True)

    tasks = [(m, seed) for seed in seeds for m in METHODS]
    runs = {m: [] for m in METHODS}

    def report(res):
        runs[res["method"]].append(res)
        print(f"  seed {res['seed']} {res['method']:7s}: IID {res['iid_acc']:.3f}  OOD {res['ood_acc']:.3f}  "
              "mass causal/spurious/irrelevant " + "/".join(f"{res['attention_mass'][k]:.2f}" for k in FACTOR_KINDS)
              + f"  ({res['seconds']:.0f} s)", flush=True)

    if jobs == 1:
        if args.threads:
            torch.set_num_threads(args.threads)
        for m, seed in tasks:
            report(one_run(m, seed, recipe, setup))
    else:  # one process per run, each on `threads` threads: tiny models scale badly across threads
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(extra, args.quick, args.threads or 1)) as pool:
            for res in pool.map(one_run, *zip(*tasks), [recipe] * len(tasks)):
                report(res)
    for m in METHODS:
        runs[m].sort(key=lambda r: r["seed"])
    sample_maps = {m: runs[m][0].pop("sample_map") for m in METHODS}
    for m in METHODS:
        for r in runs[m]:
            r.pop("sample_map", None)

    results = summarize(runs, train, tests, recipe, seeds, extra)
    figures = {
        "attention_map": attention_maps(
            os.path.join(out_dir, "demo_attention_map.png"), sample_maps,
            tokenizer.convert_ids_to_tokens(tokenizer(probe[0]["input"], add_special_tokens=False)["input_ids"]),
            f"OOD sample 0 (target {probe[0]['target']}), seed {seeds[0]}"),
        "factor_mass": factor_mass(os.path.join(out_dir, "demo_factor_mass.png"),
                                   {m: {k: sum((r["attention_mass_samples"][k] for r in runs[m]), [])
                                        for k in FACTOR_KINDS} for m in METHODS}),
        "training_curves": training_curves(os.path.join(out_dir, "demo_curves.png"),
                                           {m: [r["curve"] for r in runs[m]] for m in METHODS}),
    }
    results["figures"] = {k: os.path.basename(v) for k, v in figures.items()}
    results["seconds"] = time.perf_counter() - t0
    table = format_table(results)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"demo: {results['seconds']:.0f} s; wrote {out_dir}/results.json, table.md and "
          + ", ".join(results["figures"].values()))
    return 0


def summarize(runs, train, tests, recipe, seeds, extra) -> dict:
    """Means and spreads over seeds per method, the majority-class baseline, and the run records."""
    majority = statistics.mode(r["target"] for r in train)
    out = {"seeds": seeds, "recipe": {**recipe.__dict__, "extra_train": extra, "train_records": len(train)},
           "majority": {"label": majority, **{f"{s}_acc": sum(r["target"] == majority for r in recs) / len(recs)
                                              for s, recs in tests.items()}}}
    for m, rs in runs.items():
        entry = {}
        for split in tests:
            mean, std = _mean_std(r[f"{split}_acc"] for r in rs)
            entry.update({f"{split}_acc": mean, f"{split}_std": std, f"{split}_per_seed": [r[f"{split}_acc"] for r in rs]})
        entry["attention_mass"] = {k: statistics.fmean(r["attention_mass"][k] for r in rs) for k in FACTOR_KINDS}
        entry["runs"] = [{k: v for k, v in r.items() if k != "attention_mass_samples"} for r in rs]
        out[m] = entry
    return out


def format_table(results: dict) -> str:
    """The markdown table the demo prints (accuracy in %, mean +- sample std over seeds)."""
    n = len(results["seeds"])
    lines = [f"| model ({n} seed{'s' if n > 1 else ''}) | IID acc % | OOD acc % | attention mass at answer row: "
             "causal / spurious / irrelevant |", "|---|---|---|---|"]
    for m in METHODS:
        r = results[m]
        mass = " / ".join(f"{r['attention_mass'][k]:.2f}" for k in FACTOR_KINDS)
        lines.append(f"| {m} | {100 * r['iid_acc']:.1f} ± {100 * r['iid_std']:.1f} | "
                     f"{100 * r['ood_acc']:.1f} ± {100 * r['ood_std']:.1f} | {mass} |")
    maj = results["majority"]
    lines.append(f"| majority class ({maj['label']}) | {100 * maj['iid_acc']:.1f} | {100 * maj['ood_acc']:.1f} | – |")
    return "\n".join(lines)
