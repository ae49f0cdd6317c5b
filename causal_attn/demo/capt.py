"""`causal-attn demo capt`: vanilla fine-tuning vs CAPT on a generated PrOntoQA-style deduction task.

The data (:mod:`causal_attn.data.capt.deduction`) carry a spurious correlation between the event
names and the answer in training; the test variants keep it (commonsense), invert it
(anticommonsense) or remove the names (nonsense). Per seed one tiny Llama is trained three ways
with the same budget (steps, batch size, learning rate, initial weights, batch order):

- ``vanilla``: the original records;
- ``capt``: :func:`~causal_attn.data.capt.replicate` ``k`` copies with fresh random letters per
  copy (the generator's event list stands in for the LLM estimator); test prompts symbolised with
  random letters too, as CAPT does at inference;
- ``capt_order``: letters by symbol number (``A, B, C``: the paper's ablation), train and test.

Generations are parsed with :func:`~causal_attn.data.capt.parse_answer` through
:func:`~causal_attn.data.capt.accuracy_by_variant`. One figure: accuracy per variant and method.
"""
from __future__ import annotations

import os
import random
import time

from ..data.capt import VARIANTS
from .fit import Recipe
from .part import DemoError, Part, mean_std

METHODS = ("vanilla", "capt", "capt_order")
MODES = {"vanilla": None, "capt": "random", "capt_order": "order"}
DATA_SEED = 0
N_TRAIN, N_TEST = 2000, 100
COPIES = 16         # CAPT replicas of the training set (fresh letters in each): 1000 x 32 draws ~ one pass
# init_std 0.08 (HF default 0.02) and lr 5e-3: from 0.02 the model first sits ~300 steps on a plateau where it
# cannot copy letters yet; the rule lookup (an induction-style circuit) then came too late on some seeds
DEFAULT = Recipe(steps=1000, batch_size=32, lr=5e-3, weight_decay=0.0, init_std=0.08, curve_points=20)
QUICK = Recipe(steps=20, batch_size=16, curve_points=5)
MAX_NEW_TOKENS = 32


class Setup:
    """Records, tokenizer and encoded training sets of every method (rebuilt identically per worker)."""

    def __init__(self, quick: bool, copies: int):
        from string import ascii_uppercase

        from ..data.capt.deduction import generate
        from .model import build_word_tokenizer

        n_test = 16 if quick else N_TEST
        data = generate(DATA_SEED, n_train=200 if quick else N_TRAIN, n_test=n_test)
        self.train = data["train"]
        self.tests = [r for v in VARIANTS for r in data[v]]
        self.copies = copies
        self._encoded: dict[str, list[dict]] = {}
        corpus = [r["input"] + r["target"] for r in self.train + self.tests] + [" ".join(ascii_uppercase)]
        self.tokenizer = build_word_tokenizer(corpus)

    def encoded(self, method: str) -> list[dict]:
        """The method's encoded training records, built on first use (a process encodes only what it trains).
        No adjacency edges: the CAT loss is off in this part."""
        from .fit import encode_records

        if method not in self._encoded:
            self._encoded[method] = encode_records(self.train_records(method, seed=0), self.tokenizer, edges=False)
        return self._encoded[method]

    def train_records(self, method: str, seed: int) -> list[dict]:
        from ..data import capt

        mode = MODES[method]
        if mode is None:
            return self.train
        return capt.replicate(self.train, self.copies if mode == "random" else 1, seed=seed, mode=mode)

    def test_records(self, method: str, seed: int) -> list[dict]:
        """The test prompts as the method sees them: originals, or symbolised like its training data."""
        from ..data import capt

        mode = MODES[method]
        if mode is None:
            return self.tests
        rng = random.Random(10_000 + seed)
        return [capt.symbolize_sample(r, mode, rng) for r in self.tests]


class CaptPart(Part):
    """The CAPT part (:class:`~causal_attn.demo.part.Part`): three methods per seed, differing only in their data."""

    name = "capt"
    methods = METHODS
    seconds_per_step = 0.0013  # measured: ~42 ms per step of 32

    def __init__(self, recipe: Recipe, seeds: list[int], quick: bool = False, copies: int = COPIES):
        super().__init__(recipe, seeds)
        self.quick, self.copies = quick, copies

    @classmethod
    def from_args(cls, args) -> "CaptPart":
        recipe = QUICK if args.quick else DEFAULT
        if args.capt_steps is not None:
            recipe = Recipe(**{**recipe.__dict__, "steps": args.capt_steps})
        copies = COPIES if args.capt_copies is None else args.capt_copies
        if recipe.steps < 1 or copies < 1:
            raise DemoError("--capt-steps and --capt-copies must be >= 1")
        part = cls(recipe, list(range(1 if args.quick else args.seeds)), args.quick, copies)
        print(f"demo capt: {len(part.setup.train)} training records (CAPT: {copies} copies), vocabulary "
              f"{len(part.setup.tokenizer)}, {len(part.seeds)} seed(s) x {METHODS}, {recipe.steps} steps of batch "
              f"{recipe.batch_size}", flush=True)
        return part

    def setup_key(self) -> tuple:
        return self.quick, self.copies

    def make_setup(self) -> Setup:
        return Setup(self.quick, self.copies)

    def one_run(self, method: str, seed: int, setup: Setup, recipe: Recipe) -> dict:
        """Train one model on the method's records and score it per test variant."""
        from ..data.capt import accuracy_by_variant
        from ..hf.decode import greedy_decode
        from .fit import train_run

        t_run = time.perf_counter()
        # the CAT loss is off (method "vanilla" of the training loop): the three differ only in their data
        model, _, curve = train_run("vanilla", seed, setup.encoded(method), setup.tokenizer, recipe)
        tests = setup.test_records(method, seed)
        gens = greedy_decode(model, setup.tokenizer, [r["input"] for r in tests], max_new_tokens=MAX_NEW_TOKENS,
                             batch_size=200)
        table = accuracy_by_variant(tests, gens)
        return {"method": method, "seed": seed, "seconds": time.perf_counter() - t_run, "curve": curve,
                "accuracy": {v: table[v]["accuracy"] for v in VARIANTS if v in table},
                "unparsed": sum(table[v]["unparsed"] for v in VARIANTS if v in table),
                "examples": [{"variant": r["variant"], "input": r["input"], "target": r["target"], "generation": g}
                             for r, g in list(zip(tests, gens))[::max(1, len(tests) // 3)][:3]]}

    def describe(self, res: dict) -> str:
        return "  ".join(f"{v} {res['accuracy'][v]:.3f}" for v in VARIANTS)

    def summarize(self, out_dir: str) -> tuple[dict, str]:
        """Accuracy per method and variant over seeds, the figure and the table."""
        from .figures import variant_accuracy

        setup, recipe = self.setup, self.recipe
        results = {"seeds": self.seeds,
                   "recipe": {**recipe.__dict__, "copies": self.copies, "train_records": len(setup.train),
                              "data_seed": DATA_SEED, "test_per_variant": len(setup.tests) // 3},
                   "world_agreement": correlations(setup)}
        for m in METHODS:
            rs = self.runs[m]
            entry = {}
            for v in VARIANTS:
                mean, std = mean_std(r["accuracy"][v] for r in rs)
                entry[v] = {"acc": mean, "std": std, "per_seed": [r["accuracy"][v] for r in rs]}
            entry["runs"] = rs
            results[m] = entry
        path = variant_accuracy(os.path.join(out_dir, "demo_capt_accuracy.png"),
                                {m: {v: results[m][v]["per_seed"] for v in VARIANTS} for m in METHODS})
        results["figures"] = {"capt_accuracy": os.path.basename(path)}
        results["run_seconds"] = sum(r["seconds"] for rs in self.runs.values() for r in rs)  # summed over the runs
        return results, format_table(results)


def correlations(setup: Setup) -> dict:
    """Fraction of records whose answer agrees with what the names suggest, per split (None: no names)."""
    out = {}
    for name, recs in (("train", setup.train),) + tuple((v, [r for r in setup.tests if r["variant"] == v])
                                                        for v in VARIANTS):
        flags = [r["world_agrees"] for r in recs if r["world_agrees"] is not None]
        out[name] = sum(flags) / len(flags) if flags else None
    return out


def format_table(results: dict) -> str:
    """Accuracy % per test variant (mean +- sample std over seeds, then the per-seed values)."""
    n = len(results["seeds"])
    lines = [f"| method ({n} seed{'s' if n > 1 else ''}) | " + " | ".join(f"{v} %" for v in VARIANTS) + " |",
             "|---|" + "---|" * len(VARIANTS)]
    for m in METHODS:
        cells = []
        for v in VARIANTS:
            e = results[m][v]
            cells.append(f"{100 * e['acc']:.1f} ± {100 * e['std']:.1f} ("
                         + " / ".join(f"{100 * x:.0f}" for x in e["per_seed"]) + ")")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
