"""`causal-attn demo cat`: vanilla vs CAT on STG_E with a tiny Llama trained from scratch on CPU.

For each seed the same tiny model is trained twice on the same batches (see :mod:`causal_attn.demo.fit`: the
project's ``CATTrainer``),
once with the LM loss only and once with the Re-Attention loss added; both are scored on the IID and OOD
test sets of STG_E and their attention at the answer row is split by factor type; three figures.
The recipe was chosen on validation splits from the generator under :data:`VAL_SEED` (``causal_attn.demo.search``).
"""
from __future__ import annotations

import os
import statistics
import time

from .fit import Recipe
from .part import DemoError, Part, mean_std

METHODS = ("vanilla", "cat")
FACTOR_KINDS = ("causal", "spurious", "irrelevant")
# The default recipe (docs/demo.md): what the demo measured to be robust on 2 CPU cores in ~5 minutes.
DEFAULT = Recipe(steps=800, alpha=10.0)  # chosen on the validation splits (docs/demo.md)
EXTRA_TRAIN = 0        # generated STG_E IID training records added to STG_M (generator seed EXTRA_SEED)
EXTRA_SEED = 1042
VAL_SEED = 7           # generator seed of the IID / OOD validation splits that chose the recipe (never 42)
VAL_SIZE = 400
QUICK_EXTRA = 0
QUICK = Recipe(steps=30, batch_size=16, curve_points=10, alpha=DEFAULT.alpha)


def validation_sets(released_tests: dict) -> dict:
    """IID and OOD validation splits from the generator under :data:`VAL_SEED` (not 42), with every
    record whose prompt is in a released test set removed: what the recipe search scored."""
    from ..data.stg import generate_stg_e

    held_out = {r["input"] for split in released_tests.values() for r in split}
    g = generate_stg_e(seed=VAL_SEED, n_iid=VAL_SIZE, n_ood=VAL_SIZE, n_test=VAL_SIZE)
    return {"iid": [r for r in g["test_iid"] if r["input"] not in held_out],
            "ood": [r for r in g["test_ood"] if r["input"] not in held_out]}


def load_data(extra: int, quick: bool, split: str = "test"):
    """STG_M training records (+ ``extra`` generated IID records in neither the test nor the validation
    sets) and the evaluation sets: the released tests (``split="test"``) or the validation sets (``"val"``)."""
    from ..data.stg import generate_stg_e

    released = generate_stg_e(seed=42)  # reproduces the released files record for record
    train = list(released["train_M"])
    tests = {"iid": released["test_iid"], "ood": released["test_ood"]}
    val = validation_sets(tests)
    if extra:
        held_out = {r["input"] for sets in (tests, val) for split in sets.values() for r in split}
        more = generate_stg_e(seed=EXTRA_SEED, n_iid=extra, n_ood=0, n_test=0)["train_L"]
        train += [r for r in more if r["input"] not in held_out]
    corpus = train + tests["iid"] + tests["ood"]  # the tokenizer's corpus: the same for both splits
    if split == "val":
        tests = val
    if quick:
        tests = {k: v[:48] for k, v in tests.items()}
    return train, tests, corpus


def demo_phrases() -> list[str]:
    """Strings the demo's tokenizer keeps as one token: the fixed instruction and every ``Name: value`` factor.

    A factor token carries its variable and its value together, so a model needs no attention at all to bind
    a number to its name: the only way information moves between tokens is the answer row's attention, which
    is exactly what the Re-Attention loss constrains. With the demo's one-layer model nothing can copy a
    spurious value into a causal position (the leak that made two-layer models drift back to the shortcut on
    the validation OOD split), and a record is 21 tokens instead of 37."""
    from ..data.stg import STG_E_CAUSAL, STG_E_IRRELEVANT, STG_E_PREFIX, STG_E_SPURIOUS

    names = STG_E_CAUSAL + STG_E_SPURIOUS + STG_E_IRRELEVANT
    # values: causal and irrelevant 1..10, spurious int(1.5 v) / int(0.5 v) in IID, 1..10 in OOD
    return [STG_E_PREFIX.strip()] + [f"{n}: {v}" for n in names for v in range(0, 16)]


class Setup:
    """The data, tokenizer and encoded training records every run shares (rebuilt identically per worker)."""

    def __init__(self, extra: int, quick: bool, split: str = "test", eval_size: int | None = None):
        """``eval_size``: score the first records of each evaluation split only (default: all)."""
        from ..data.stg import STG_E_CAUSAL, STG_E_IRRELEVANT, STG_E_SPURIOUS
        from .fit import encode_records
        from .model import build_word_tokenizer

        self.train, self.tests, corpus = load_data(extra, quick, split)
        if eval_size:
            self.tests = {k: v[:eval_size] for k, v in self.tests.items()}
        self.tokenizer = build_word_tokenizer([r["input"] + r["target"] for r in corpus], phrases=demo_phrases())
        self.encoded = encode_records(self.train, self.tokenizer)
        self.factors = {"causal": STG_E_CAUSAL, "spurious": STG_E_SPURIOUS, "irrelevant": STG_E_IRRELEVANT}
        self.probe = self.tests["ood"][: 16 if quick else 100]  # samples for the attention statistics


class CatPart(Part):
    """The STG part (:class:`~causal_attn.demo.part.Part`): vanilla and CAT per seed."""

    name = "cat"
    methods = METHODS
    seconds_per_step = 0.0008  # measured: ~24 ms per step of 32

    def __init__(self, recipe: Recipe, seeds: list[int], extra: int = 0, quick: bool = False, split: str = "test", *,
                 val_size: int | None = None):
        super().__init__(recipe, seeds)
        self.extra, self.quick, self.split, self.val_size = extra, quick, split, val_size

    @classmethod
    def from_args(cls, args) -> "CatPart":
        recipe = QUICK if args.quick else DEFAULT
        overrides = {k: v for k, v in (("steps", args.steps), ("alpha", args.alpha)) if v is not None}
        recipe = Recipe(**{**recipe.__dict__, **overrides})
        extra = (QUICK_EXTRA if args.quick else EXTRA_TRAIN) if args.extra_train is None else args.extra_train
        if recipe.steps < 1 or extra < 0:
            raise DemoError("--steps must be >= 1 and --extra-train >= 0")
        part = cls(recipe, cls.seed_list(args), extra, args.quick)
        print(f"demo cat: {len(part.setup.train)} training records, vocabulary {len(part.setup.tokenizer)}, "
              f"{len(part.seeds)} seed(s) x {METHODS}, {recipe.steps} steps of batch {recipe.batch_size}, "
              f"alpha {recipe.alpha}", flush=True)
        return part

    def setup_key(self) -> tuple:
        return self.extra, self.quick, self.split, self.val_size

    def make_setup(self) -> Setup:
        return Setup(self.extra, self.quick, self.split, self.val_size)

    def one_run(self, method: str, seed: int, setup: Setup, recipe: Recipe) -> dict:
        """Train, score and probe one model; returns a JSON-able record (plus the first probe's map)."""
        from .fit import evaluate, factor_masses, train_run

        t_run = time.perf_counter()
        model, handle, curve = train_run(method, seed, setup.encoded, setup.tokenizer, recipe)
        scores = evaluate(model, setup.tokenizer, setup.tests)
        masses = factor_masses(model, handle, setup.tokenizer, setup.probe, setup.factors)
        res = {"method": method, "seed": seed, "seconds": time.perf_counter() - t_run, "curve": curve,
               "attention_mass": masses["mean"], "attention_mass_samples": masses["per_sample"],
               "sample_map": masses["maps"][0].numpy()}
        res.update({f"{split}_acc": sc["acc"] for split, sc in scores.items()})
        res["ood_examples"] = [{"target": r["target"], "prediction": p}
                               for r, p in zip(setup.tests["ood"][:5], scores["ood"]["predictions"])]
        return res

    def describe(self, res: dict) -> str:
        return describe(res)

    def summarize(self, out_dir: str) -> tuple[dict, str]:
        """Summary, figures and table of the finished runs."""
        from .figures import attention_maps, factor_mass, training_curves

        runs, setup, seeds = self.runs, self.setup, self.seeds
        tokenizer, probe = setup.tokenizer, setup.probe
        sample_maps = {m: runs[m][0]["sample_map"] for m in METHODS}
        for r in (r for rs in runs.values() for r in rs):
            r.pop("sample_map", None)
        results = summarize(runs, setup.train, setup.tests, self.recipe, seeds, self.extra)
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
        results["validation"] = {"seed": VAL_SEED, "size": VAL_SIZE}
        results["run_seconds"] = sum(r["seconds"] for rs in runs.values() for r in rs)  # summed over the runs
        return results, format_table(results)


def describe(res: dict) -> str:
    """Accuracies and answer-row masses of one STG run (the CAT and pretrained parts' console line)."""
    return (f"IID {res['iid_acc']:.3f}  OOD {res['ood_acc']:.3f}  mass causal/spurious/irrelevant "
            + "/".join(f"{res['attention_mass'][k]:.2f}" for k in FACTOR_KINDS))


def summarize(runs, train, tests, recipe, seeds, extra) -> dict:
    """Means and spreads over seeds per method, the majority-class baseline, and the run records."""
    majority = statistics.mode(r["target"] for r in train)
    out = {"seeds": seeds, "recipe": {**recipe.__dict__, "extra_train": extra, "train_records": len(train)},
           "majority": {"label": majority, **{f"{s}_acc": sum(r["target"] == majority for r in recs) / len(recs)
                                              for s, recs in tests.items()}}}
    for m, rs in runs.items():
        entry = {}
        for split in tests:
            mean, std = mean_std(r[f"{split}_acc"] for r in rs)
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
