"""`causal-attn demo capt-pretrained`: vanilla fine-tuning vs CAPT of a real checkpoint (SmolLM2-135M) on the
generated deduction task.

The tiny CAPT part (:mod:`.capt`) on the pretrained checkpoint of :mod:`.pretrained`: the same data (the
deduction generator's training split and its commonsense / anticommonsense / nonsense test variants, real
category names), the same three methods (``vanilla``: the original records; ``capt``: replicas with fresh random
letters, test prompts symbolised the same way at inference; ``capt_order``: letters by symbol number, train and
test) and the same scoring (greedy generations through :func:`causal_attn.hf.decode.greedy_decode`, parsed by
:func:`causal_attn.data.capt.accuracy_by_variant`). Per seed the checkpoint gets the same LoRA adapters
(initialised under the seed, :func:`.pretrained.build_model`) and is trained once per method with the same
recipe (:class:`CaptPretrainedRecipe`) and the same batch order, through ``CATTrainer``
(:func:`causal_attn.demo.fit.train`) with gamma 0: no Re-Attention loss, the methods differ only in their data.
The LM loss is the answer-only one of :func:`.pretrained.answer_loss` (the target: the relevant rule, the
conclusion and the tagged answer). The untuned checkpoint (``zero_shot``) is scored once on the original prompts:
what it knows before training.

Not part of ``causal-attn demo`` / ``all``. ``--split val`` scores on validation records (the generator under
:data:`.capt.VAL_SEED`, every prompt that is also a test prompt removed): the recipe is to be chosen there.
The defaults (:data:`DEFAULT`) were chosen there (docs/demo_pretrained.md).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from . import capt
from .part import DemoError
from .pretrained import MODEL, PretrainedPart, PretrainedRecipe

N_TRAIN = 1000          # generated training records (the CAPT methods train on replicas of these)
N_TEST = 200            # test (or validation) records per variant
QUICK_TEST = 3          # per variant with --quick
MAX_NEW_TOKENS = 32     # the targets: at most 28 SmolLM2 tokens (rule, conclusion, tagged answer) + EOS
QUICK_NEW_TOKENS = 8    # --quick: the decoding and parsing path only (a trained model's answer tag comes later)
DECODE_BATCH = 64
SECONDS_PER_RECORD_STEP = 0.16  # as STG_M's (both ~60-70 tokens: 1.3-1.5 s per step of 8, 2 cores); the ETA only


@dataclass
class CaptPretrainedRecipe(PretrainedRecipe):
    """Everything a run depends on besides the method and the seed: LoRA r 8 on q/k/v/o, lr 1e-3, batch 8, 120
    steps (setting C2 of the validation search, docs/demo_pretrained.md: the shortest budget at which both methods
    are at their ceiling, so a seed of three methods fits 20 minutes on 2 cores); gamma 0 (no Re-Attention loss)."""
    steps: int = 120
    gamma: float = 0.0
    gamma_decay: float = 0.0
    train_records: int = N_TRAIN
    copies: int = 4             # CAPT replicas of the training set: 120 x 8 draws from 4 x 1000 lettered records
    cot: bool = True            # False: targets are the tagged answer alone (the rule lookup happens inside the model)


DEFAULT = CaptPretrainedRecipe()  # setting C2 of the validation search
QUICK = CaptPretrainedRecipe(steps=2, batch_size=2, curve_points=2, train_records=40, copies=2)


class Setup:
    """The checkpoint, tokenizer, the records and every method's encoded training set (built on first use)."""

    def __init__(self, model_name: str = MODEL, quick: bool = False, split: str = "test", eval_size: int | None = None,
                 recipe: CaptPretrainedRecipe = DEFAULT):
        """``eval_size``: test (validation) records per variant (default :data:`N_TEST`; :data:`QUICK_TEST` with
        ``quick``)."""
        from ..hf import pretrained

        self.model_name, self.copies = model_name, recipe.copies
        self.base, self.tokenizer = pretrained.load(model_name)
        n_test = eval_size or (QUICK_TEST if quick else N_TEST)
        self.train, self.tests = capt.load_data(recipe.train_records, n_test, split, recipe.cot)
        self._encoded: dict[str, list[dict]] = {}

    def encoded(self, method: str) -> list[dict]:
        """The method's encoded training records (no adjacency edges: gamma is 0)."""
        from .fit import encode_records

        if method not in self._encoded:
            self._encoded[method] = encode_records(capt.train_records(self.train, method, self.copies, seed=0),
                                                   self.tokenizer, edges=False)
        return self._encoded[method]


class CaptPretrainedPart(PretrainedPart):
    """The CAPT part on the pretrained checkpoint, run in this process: the untuned checkpoint once, then the
    three methods per seed; every finished run goes to the run log (:class:`.pretrained.RunLog`) in ``out``."""

    name = "capt-pretrained"
    methods = ("zero_shot",) + capt.METHODS
    seconds_per_step = SECONDS_PER_RECORD_STEP
    default_seeds, first_seed = 3, 0   # the recipe search trains seeds from 10 on
    run_log = "capt_pretrained_runs.jsonl"
    default_recipe, quick_recipe = DEFAULT, QUICK

    @classmethod
    def recipe_overrides(cls, args) -> dict:
        if args.capt_copies is not None and args.capt_copies < 1:
            raise DemoError("--capt-copies must be >= 1")
        return {"steps": args.steps, "lr": args.lr, "lora_r": args.lora_r, "copies": args.capt_copies}

    def banner(self) -> str:
        setup = self.setup
        return (f"demo capt-pretrained: {self.model_name}, {len(setup.train)} training records (CAPT: "
                f"{self.recipe.copies} copies), scored on {self.split} ({len(setup.tests) // len(capt.VARIANTS)} "
                f"records per variant, greedy decoding), {len(self.seeds)} seed(s) x {capt.METHODS}, "
                f"{self.recipe_line()}; training about {self.eta_minutes():.0f} min on 2 CPU cores")

    def setup_key(self) -> tuple:
        return (self.model_name, self.quick, self.split, self.eval_size, self.recipe.train_records, self.recipe.copies,
                self.recipe.cot)

    def make_setup(self) -> Setup:
        return Setup(self.model_name, self.quick, self.split, self.eval_size, self.recipe)

    def one_run(self, method: str, seed: int, setup: Setup, recipe: CaptPretrainedRecipe) -> dict:
        """Train (``zero_shot``: no training) and score one model: a JSON-able record."""
        from ..hf.patch import patch_model
        from .fit import train
        from .pretrained import answer_loss, build_model, lm_and_head

        if method not in self.methods:
            raise ValueError(f"method must be one of {self.methods}, got {method!r}")
        t0 = time.perf_counter()
        model, _ = build_model(method, seed, recipe, setup.base)
        curve = []
        if method != "zero_shot":
            handle = patch_model(model, alpha=recipe.alpha,
                                 layers="all" if recipe.patch_layers is None else list(recipe.patch_layers))
            decoder, head = lm_and_head(handle)
            # gamma 0 (method "vanilla" of the training loop): the three methods differ only in their data
            curve = train(model, handle, "vanilla", seed, setup.encoded(method), setup.tokenizer.pad_token_id, recipe,
                          progress=True, lm_loss=lambda _model, batch: answer_loss(decoder, head, batch))
            handle.unpatch()
        train_seconds = time.perf_counter() - t0
        scores = capt.score(model, setup.tokenizer, capt.test_records(setup.tests, method, seed),
                            max_new_tokens=self.new_tokens, batch_size=DECODE_BATCH)
        return {"method": method, "seed": seed, "curve": curve, "train_seconds": train_seconds, **scores,
                "seconds": time.perf_counter() - t0}

    @property
    def new_tokens(self) -> int:
        """Greedy decoding's new tokens per test prompt."""
        return QUICK_NEW_TOKENS if self.quick else MAX_NEW_TOKENS

    def describe(self, res: dict) -> str:
        return capt.describe(res) + f"  (unparsed {res['unparsed']})"

    def summarize(self, out_dir: str) -> tuple[dict, str]:
        """The tiny CAPT part's summary (:func:`.capt.summarize`) with the untuned checkpoint's row, figure, table."""
        import os

        setup = self.setup
        recipe = {**self.recipe.__dict__, "data_seed": capt.DATA_SEED,
                  "test_per_variant": {v: sum(r["variant"] == v for r in setup.tests) for v in capt.VARIANTS}}
        results, table = capt.summarize({m: self.runs[m] for m in capt.METHODS}, self.seeds, recipe, setup.train,
                                        setup.tests, os.path.join(out_dir, "capt_pretrained_accuracy.png"),
                                        zero_shot=self.runs["zero_shot"][0])
        results.update(model=setup.model_name, split=self.split,
                       scoring=f"greedy decoding ({self.new_tokens} new tokens), CAPT answer parser")
        return results, table
