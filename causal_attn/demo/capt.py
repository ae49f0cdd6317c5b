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
DATA_SEED = 0       # the training and test records' generator seed
VAL_SEED = 1        # the validation records' (--split val of the pretrained variant)
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

        from .model import build_word_tokenizer

        self.train, self.tests = load_data(200 if quick else N_TRAIN, 16 if quick else N_TEST)
        self.copies = copies
        self._encoded: dict[str, list[dict]] = {}
        corpus = [r["input"] + r["target"] for r in self.train + self.tests] + [" ".join(ascii_uppercase)]
        self.tokenizer = build_word_tokenizer(corpus)

    def encoded(self, method: str) -> list[dict]:
        """The method's encoded training records, built on first use (a process encodes only what it trains).
        No adjacency edges: the CAT loss is off in this part."""
        from .fit import encode_records

        if method not in self._encoded:
            self._encoded[method] = encode_records(train_records(self.train, method, self.copies, seed=0),
                                                   self.tokenizer, edges=False)
        return self._encoded[method]

    def test_records(self, method: str, seed: int) -> list[dict]:
        return test_records(self.tests, method, seed)


def load_data(n_train: int, n_test: int, split: str = "test", cot: bool = True) -> tuple[list[dict], list[dict]]:
    """``(train, tests)``: the deduction generator's training split under :data:`DATA_SEED` and its test records
    of every variant (variant by variant), or (``split="val"``) the validation records: the variants drawn under
    :data:`VAL_SEED`, every record whose prompt is also a test prompt removed (what a recipe is chosen on).
    ``cot=False``: targets without the chain of thought (:func:`causal_attn.data.capt.deduction.generate`)."""
    from ..data.capt.deduction import generate

    data = generate(DATA_SEED, n_train=n_train, n_test=n_test, cot=cot)
    tests = [r for v in VARIANTS for r in data[v]]
    if split == "val":
        held_out = {r["input"] for r in tests}
        val = generate(VAL_SEED, n_train=0, n_test=n_test, cot=cot)
        tests = [r for v in VARIANTS for r in val[v] if r["input"] not in held_out]
    elif split != "test":
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    return data["train"], tests


def train_records(train: list[dict], method: str, copies: int, seed: int) -> list[dict]:
    """The method's training records: the originals (``vanilla``), ``copies`` replicas with fresh random letters
    (``capt``) or one copy with letters by symbol number (``capt_order``)."""
    from ..data import capt

    mode = MODES[method]
    if mode is None:
        return train
    return capt.replicate(train, copies if mode == "random" else 1, seed=seed, mode=mode)


def test_records(tests: list[dict], method: str, seed: int) -> list[dict]:
    """The test prompts as the method sees them: originals (``vanilla``; any method not in :data:`MODES`, such as
    an untuned model), or symbolised like its training data (as CAPT does at inference)."""
    from ..data import capt

    mode = MODES.get(method)
    if mode is None:
        return tests
    rng = random.Random(10_000 + seed)
    return [capt.symbolize_sample(r, mode, rng) for r in tests]


def score(model, tokenizer, tests: list[dict], *, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 200) -> dict:
    """Greedy generations of the test prompts (:func:`~causal_attn.hf.decode.greedy_decode`) parsed by the CAPT
    scorer (:func:`~causal_attn.data.capt.accuracy_by_variant`): accuracy per variant, the unparsed count and
    three examples."""
    from ..data.capt import accuracy_by_variant
    from ..hf.decode import greedy_decode

    gens = greedy_decode(model, tokenizer, [r["input"] for r in tests], max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    table = accuracy_by_variant(tests, gens)
    return {"accuracy": {v: table[v]["accuracy"] for v in VARIANTS if v in table},
            "unparsed": sum(table[v]["unparsed"] for v in VARIANTS if v in table),
            "examples": [{"variant": r["variant"], "input": r["input"], "target": r["target"], "generation": g}
                         for r, g in list(zip(tests, gens))[::max(1, len(tests) // 3)][:3]]}


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
        part = cls(recipe, cls.seed_list(args), args.quick, copies)
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
        from .fit import train_run

        t_run = time.perf_counter()
        # the CAT loss is off (method "vanilla" of the training loop): the three differ only in their data
        model, _, curve = train_run("vanilla", seed, setup.encoded(method), setup.tokenizer, recipe)
        scores = score(model, setup.tokenizer, setup.test_records(method, seed))
        return {"method": method, "seed": seed, "seconds": time.perf_counter() - t_run, "curve": curve, **scores}

    def describe(self, res: dict) -> str:
        return describe(res)

    def summarize(self, out_dir: str) -> tuple[dict, str]:
        """Accuracy per method and variant over seeds, the figure and the table."""
        setup = self.setup
        recipe = {**self.recipe.__dict__, "copies": self.copies, "train_records": len(setup.train),
                  "data_seed": DATA_SEED, "test_per_variant": len(setup.tests) // 3}
        return summarize(self.runs, self.seeds, recipe, setup.train, setup.tests,
                         os.path.join(out_dir, "demo_capt_accuracy.png"))


def describe(res: dict) -> str:
    """A run's accuracy per variant, for its console line."""
    return "  ".join(f"{v} {res['accuracy'][v]:.3f}" for v in VARIANTS)


def summarize(runs: dict, seeds: list[int], recipe: dict, train: list[dict], tests: list[dict], figure: str, *,
              zero_shot: dict | None = None) -> tuple[dict, str]:
    """``(results, table)``: per method of :data:`METHODS` and variant the accuracy over seeds (``acc``, ``std``,
    ``per_seed``) and the method's ``runs``; with ``zero_shot`` (an untuned model's run) its accuracy per variant
    too. Draws the accuracy figure to ``figure``."""
    from .figures import variant_accuracy

    results = {"seeds": seeds, "recipe": recipe, "world_agreement": correlations(train, tests)}
    per_seed = {}
    if zero_shot is not None:
        results["zero_shot"] = {**{v: {"acc": zero_shot["accuracy"][v]} for v in VARIANTS},
                                "unparsed": zero_shot["unparsed"], "examples": zero_shot["examples"],
                                "seconds": zero_shot["seconds"]}
        per_seed["zero_shot"] = {v: [zero_shot["accuracy"][v]] for v in VARIANTS}
    for m in METHODS:
        entry = {}
        for v in VARIANTS:
            mean, std = mean_std(r["accuracy"][v] for r in runs[m])
            entry[v] = {"acc": mean, "std": std, "per_seed": [r["accuracy"][v] for r in runs[m]]}
        entry["runs"] = runs[m]
        results[m] = entry
        per_seed[m] = {v: entry[v]["per_seed"] for v in VARIANTS}
    results["figures"] = {"capt_accuracy": os.path.basename(variant_accuracy(figure, per_seed))}
    # summed over the runs (the untuned model's scoring included)
    results["run_seconds"] = sum(r["seconds"] for m in METHODS for r in runs[m]) + (
        zero_shot["seconds"] if zero_shot is not None else 0.0)
    return results, format_table(results)


def correlations(train: list[dict], tests: list[dict]) -> dict:
    """Fraction of records whose answer agrees with what the names suggest, per split (None: no names)."""
    out = {}
    for name, recs in (("train", train),) + tuple((v, [r for r in tests if r["variant"] == v]) for v in VARIANTS):
        flags = [r["world_agrees"] for r in recs if r["world_agrees"] is not None]
        out[name] = sum(flags) / len(flags) if flags else None
    return out


def format_table(results: dict) -> str:
    """Accuracy % per test variant (mean +- sample std over seeds, then the per-seed values; the untuned model's
    row first where there is one)."""
    n = len(results["seeds"])
    lines = [f"| method ({n} seed{'s' if n > 1 else ''}) | " + " | ".join(f"{v} %" for v in VARIANTS) + " |",
             "|---|" + "---|" * len(VARIANTS)]
    if "zero_shot" in results:  # an untuned model: one value per variant
        lines.append("| untuned checkpoint (zero-shot) | "
                     + " | ".join(f"{100 * results['zero_shot'][v]['acc']:.1f}" for v in VARIANTS) + " |")
    for m in METHODS:
        cells = []
        for v in VARIANTS:
            e = results[m][v]
            cells.append(f"{100 * e['acc']:.1f} ± {100 * e['std']:.1f} ("
                         + " / ".join(f"{100 * x:.0f}" for x in e["per_seed"]) + ")")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
