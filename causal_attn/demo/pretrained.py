"""`causal-attn demo pretrained`: vanilla vs CAT fine-tuning of a real checkpoint (SmolLM2-135M) on STG_M.

Not part of ``causal-attn demo`` / ``all`` (the tiny job): about 12 minutes per seed on 2 free CPU cores.

Per seed the checkpoint gets the same LoRA adapters (initialised under the seed) and is trained twice on the
same batches with the same recipe (:class:`PretrainedRecipe`), once with the LM loss on the answer tokens only
and once with the Re-Attention loss added (:func:`causal_attn.demo.fit.train`: ``CATTrainer``, as for the tiny
parts). The LM loss (``CATTrainer``'s ``lm_loss`` hook) computes logits only at the labelled positions (decoder,
then the LM head on those rows: at a 49k vocabulary the head is a large share of a step). Scoring: the **first answer token**, restricted to the first
tokens of the three labels (" High", " Middle", " Low" for SmolLM2), after the prompt ``... Answer:`` tokenised
exactly as in training; accuracy on all 400 + 400 released STG_E IID / OOD test records. The untuned checkpoint
("zero_shot") is scored the same way, and the answer row's attention mass by factor type (paper fig. 3) is
measured before (zero_shot) and after training. The recipe was chosen on the validation splits of
:func:`causal_attn.demo.stg.validation_sets` (``python -m causal_attn.demo.search --part pretrained``;
docs/demo_pretrained.md).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch

from .fit import TrainRecipe
from .part import DemoError, Part
from .stg import FACTOR_KINDS, METHODS

MODEL = "smollm2-135m"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PROBE = 100              # OOD records whose answer-row attention is split by factor type
QUICK_EVAL = 6           # records per evaluation split with --quick
QUICK_PROBE = 2
SECONDS_PER_RECORD_STEP = 0.17  # a LoRA step on 8 STG_M records: 1.2-1.4 s on 2 quiet cores (2026-12-06; the ETA only)


@dataclass
class PretrainedRecipe(TrainRecipe):
    """Everything a pretrained run depends on besides the method and the seed (defaults: the chosen recipe)."""
    steps: int = 250
    batch_size: int = 8
    weight_decay: float = 0.0
    alpha: float = 5.0
    gamma_decay: float = 3.0       # gamma 1 falling to e^-3 = 0.05 by the last step (search setting K)
    curve_points: int = 30
    lora_r: int = 8                # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple = LORA_TARGETS   # the modules LoRA adapts (the CAT authors': q/k/v/gate/up/down_proj)
    loss_kind: str = "hinge"       # "hinge" or the authors' "div" (causal_attn.re_attention_loss)


DEFAULT = PretrainedRecipe()  # chosen on the validation splits: setting K of docs/demo_pretrained.md's search
QUICK = PretrainedRecipe(steps=2, batch_size=2, curve_points=2)


def label_first_tokens(tokenizer, encoded_by_target: dict) -> dict:
    """label -> id of its first answer token (as tokenised after the prompt); the labels must differ there."""
    first = {}
    for label, enc in encoded_by_target.items():
        first[label] = enc["input_ids"][enc["labels"].index(next(x for x in enc["labels"] if x != -100))]
    if len(set(first.values())) < len(first):
        raise ValueError(f"labels share a first token under this tokenizer ({first}): first-token scoring cannot "
                         "tell them apart")
    return first


class Setup:
    """The checkpoint, tokenizer, encoded training records, scoring prompts and probe every run shares."""

    def __init__(self, model_name: str = MODEL, quick: bool = False, split: str = "test", eval_size: int | None = None,
                 probe: int | None = None):
        """``eval_size``: score the first records of each split only (default: all; 6 with ``quick``);
        ``probe``: OOD records for the attention mass (default 100; 2 with ``quick``)."""
        from ..hf import pretrained
        from ..data.adjacency import encode_example
        from ..data.stg import STG_E_CAUSAL, STG_E_IRRELEVANT, STG_E_SPURIOUS
        from .fit import encode_records
        from .stg import load_data

        self.model_name = model_name
        self.base, self.tokenizer = pretrained.load(model_name)
        self.train, tests, _ = load_data(0, False, split)
        eval_size = QUICK_EVAL if quick and eval_size is None else eval_size
        self.tests = {k: v[:eval_size] for k, v in tests.items()} if eval_size else tests
        self.encoded = encode_records(self.train, self.tokenizer)
        missing = sum(bool(e["missing"]) for e in self.encoded)
        if missing:
            raise ValueError(f"{missing} STG_M records have annotated spans the tokenizer's offsets do not cover")
        enc = lambda r: encode_example(r["input"], r["target"], None, self.tokenizer, add_special_tokens=False)  # noqa: E731
        by_target = {r["target"]: enc(r) for r in self.train + [x for v in tests.values() for x in v]}
        self.label_tokens = label_first_tokens(self.tokenizer, by_target)
        self.prompts = {}
        for name, records in self.tests.items():  # the ids before the first answer token, as in training
            encoded = [enc(r) for r in records]
            self.prompts[name] = [e["input_ids"][:next(i for i, x in enumerate(e["labels"]) if x != -100)]
                                  for e in encoded]
        self.factors = {"causal": STG_E_CAUSAL, "spurious": STG_E_SPURIOUS, "irrelevant": STG_E_IRRELEVANT}
        # prompts without the trailing space: their last token is the answer row of training
        probe = (QUICK_PROBE if quick else PROBE) if probe is None else probe
        self.probe = [{**r, "input": r["input"].rstrip()} for r in self.tests["ood"][:probe]]


def lm_and_head(handle):
    """The patched model's decoder (``LlamaModel``) and LM head, through any PEFT wrapper."""
    return handle.base.get_decoder(), handle.base.lm_head


def answer_loss(decoder, head, batch) -> torch.Tensor:
    """Next-token cross-entropy on the labelled positions only: the LM head runs on those rows alone. The batch's
    adjacency (if any) goes to the patched decoder, whose forward the Re-Attention loss reads."""
    h = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], adjacency=batch.get("adjacency"),
                use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    rows = targets != -100
    return torch.nn.functional.cross_entropy(head(h[:, :-1][rows]), targets[rows])


@torch.no_grad()
def first_token_predictions(decoder, head, prompts: list[list[int]], label_tokens: dict, pad_id: int, *,
                            batch_size: int = 32, desc: str = "scoring") -> list[str]:
    """For each prompt, the label whose first token has the largest logit after it."""
    from tqdm.auto import tqdm

    labels = list(label_tokens)
    ids = torch.tensor([label_tokens[lab] for lab in labels])
    preds = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        chunk = prompts[i:i + batch_size]
        lengths = torch.tensor([len(p) for p in chunk])
        x = torch.full((len(chunk), int(lengths.max())), pad_id, dtype=torch.long)
        mask = torch.zeros_like(x)
        for b, p in enumerate(chunk):
            x[b, :len(p)] = torch.tensor(p)
            mask[b, :len(p)] = 1
        h = decoder(input_ids=x, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(h[torch.arange(len(chunk)), lengths - 1])[:, ids]
        preds += [labels[j] for j in logits.argmax(-1).tolist()]
    return preds


def build_model(method: str, seed: int, recipe: PretrainedRecipe, base):
    """A copy of ``base`` with LoRA adapters initialised under ``seed`` (the same for both methods), all weights
    trainable with ``lora_r == 0``, untouched for ``zero_shot``; and its trainable parameters."""
    model = copy.deepcopy(base)
    if method == "zero_shot":
        return model, []
    if recipe.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(recipe.lora_targets)))
    return model, [p for p in model.parameters() if p.requires_grad]


class PretrainedPart(Part):
    """The pretrained part (:class:`~causal_attn.demo.part.Part`), run in this process: the untuned checkpoint
    once, then vanilla and CAT per seed; every finished run goes to the run log (:class:`RunLog`) in ``out``."""

    name = "pretrained"
    methods = ("zero_shot",) + METHODS
    seconds_per_step = SECONDS_PER_RECORD_STEP
    default_seeds, first_seed = 5, 1   # seed 0 trained the recipe search (docs/pretrained_search.jsonl)

    run_log = "pretrained_runs.jsonl"   # the run log's file name in ``out``
    default_recipe, quick_recipe = DEFAULT, QUICK

    def __init__(self, recipe: PretrainedRecipe, seeds: list[int], model_name: str = MODEL, quick: bool = False,
                 split: str = "test", *, eval_size: int | None = None, probe: int | None = None,
                 out: str | None = None):
        super().__init__(recipe, seeds)
        self.model_name, self.quick, self.split, self.eval_size, self.probe = model_name, quick, split, eval_size, probe
        self.log = None if out is None else RunLog(os.path.join(out, self.run_log), model_name, quick, split, recipe)

    @classmethod
    def from_args(cls, args) -> "PretrainedPart":
        """The part for ``causal-attn demo``'s arguments: the quick or the default recipe with the options that were
        given (:meth:`recipe_overrides`) applied, the setup loaded (the checkpoint and the data), one line printed."""
        recipe = cls.quick_recipe if args.quick else cls.default_recipe
        overrides = {k: v for k, v in cls.recipe_overrides(args).items() if v is not None}
        recipe = type(recipe)(**{**recipe.__dict__, **overrides})
        if recipe.steps < 1 or recipe.lr <= 0 or recipe.lora_r < 0 or recipe.gamma_decay < 0:
            raise DemoError("--steps must be >= 1, --lr > 0, --lora-r >= 0 (0: full fine-tuning) and "
                            "--gamma-decay >= 0")
        try:
            part = cls(recipe, cls.seed_list(args), args.model, args.quick, args.split,
                       out=args.out)
            part.setup  # noqa: B018 -- loaded here: a bad --model is a one-line error, not a traceback mid-run
        except (ValueError, OSError) as e:
            raise DemoError(str(e)) from e
        print(part.banner(), flush=True)
        return part

    @classmethod
    def recipe_overrides(cls, args) -> dict:
        """Recipe field -> the command-line value (None: not given)."""
        return {"steps": args.steps, "alpha": args.alpha, "lr": args.lr, "lora_r": args.lora_r,
                "gamma_decay": args.gamma_decay}

    def banner(self) -> str:
        """The line printed before training: data, methods, recipe, estimated time."""
        setup, recipe = self.setup, self.recipe
        return (f"demo pretrained: {self.model_name}, {len(setup.train)} training records, scored on {self.split} "
                f"({' + '.join(str(len(v)) for v in setup.tests.values())} records, first answer token), "
                f"{len(self.seeds)} seed(s) x {METHODS}, {self.recipe_line()}, alpha {recipe.alpha:g}, gamma "
                f"{recipe.gamma:g}" + (f" x exp(-{recipe.gamma_decay:g} p)" if recipe.gamma_decay else "")
                + f"; training about {self.eta_minutes():.0f} min on 2 CPU cores")

    def recipe_line(self) -> str:
        recipe = self.recipe
        return (f"{recipe.steps} steps of batch {recipe.batch_size}, lr {recipe.lr:g}, "
                + (f"LoRA r {recipe.lora_r}" if recipe.lora_r else "full fine-tuning"))

    def eta_minutes(self) -> float:
        """Estimated training minutes of all runs (:attr:`seconds_per_step` per record-step)."""
        return self.seconds_per_run * len(self.seeds) * (len(self.methods) - 1) / 60

    def setup_key(self) -> tuple:
        return self.model_name, self.quick, self.split, self.eval_size, self.probe

    def make_setup(self) -> Setup:
        return Setup(self.model_name, self.quick, self.split, self.eval_size, self.probe)

    def tasks(self) -> list[tuple[str, int]]:
        """The untuned checkpoint once, then every trained method per seed."""
        return [("zero_shot", 0)] + [(m, seed) for seed in self.seeds for m in self.methods if m != "zero_shot"]

    def saved(self, method: str, seed: int) -> dict | None:
        return None if self.log is None else self.log.get(method, seed)

    def save(self, res: dict) -> None:
        if self.log is not None:
            self.log.add(res)

    def one_run(self, method: str, seed: int, setup: Setup, recipe: PretrainedRecipe) -> dict:
        """Train (``vanilla`` / ``cat``; ``zero_shot`` = no training), score and probe one model: a JSON-able
        record (plus the first probe's attention map)."""
        from ..hf.patch import patch_model
        from .fit import check_method, factor_masses, train

        if method != "zero_shot":
            check_method(method)
        t0 = time.perf_counter()
        model, _ = build_model(method, seed, recipe, setup.base)
        handle = patch_model(model, alpha=recipe.alpha, kind=recipe.loss_kind,
                             layers="all" if recipe.patch_layers is None else list(recipe.patch_layers))
        decoder, head = lm_and_head(handle)
        curve = []
        if method != "zero_shot":
            curve = train(model, handle, method, seed, setup.encoded, setup.tokenizer.pad_token_id, recipe,
                          progress=True, lm_loss=lambda _model, batch: answer_loss(decoder, head, batch))
        model.eval()
        train_seconds = time.perf_counter() - t0
        res = {"method": method, "seed": seed, "curve": curve, "train_seconds": train_seconds}
        for split, prompts in setup.prompts.items():
            preds = first_token_predictions(decoder, head, prompts, setup.label_tokens, setup.tokenizer.pad_token_id,
                                            desc=f"{method} seed {seed}: scoring {split}")
            targets = [r["target"] for r in setup.tests[split]]
            res[f"{split}_acc"] = sum(p == t for p, t in zip(preds, targets)) / len(targets)
            res[f"{split}_predicted"] = {lab: preds.count(lab) for lab in setup.label_tokens}
        masses = factor_masses(model, handle, setup.tokenizer, setup.probe, setup.factors)
        res.update({"attention_mass": masses["mean"], "attention_mass_samples": masses["per_sample"],
                    "sample_map": masses["maps"][0].numpy(), "seconds": time.perf_counter() - t0})
        handle.unpatch()
        return res

    def describe(self, res: dict) -> str:
        from .stg import describe

        return describe(res)

    def summarize(self, out_dir: str) -> tuple[dict, str]:
        """Summary (the CAT part's :func:`~causal_attn.demo.stg.summarize` plus the untuned checkpoint), figures,
        table."""
        from .figures import attention_maps, factor_mass, training_curves
        from .stg import summarize

        setup, seeds = self.setup, self.seeds
        runs = {m: self.runs[m] for m in METHODS}
        zero = self.runs["zero_shot"][0]
        maps = {"zero_shot": zero["sample_map"], **{m: runs[m][0]["sample_map"] for m in METHODS}}
        for r in (r for rs in self.runs.values() for r in rs):
            r.pop("sample_map", None)
        results = summarize(runs, setup.train, setup.tests, self.recipe, seeds, 0)
        results["zero_shot"] = {k: zero[k] for k in ("iid_acc", "ood_acc", "iid_predicted", "ood_predicted",
                                                     "attention_mass", "seconds")}
        results.update(model=setup.model_name, split=self.split,
                       scoring="first answer token among the labels' first tokens", label_tokens=setup.label_tokens,
                       run_seconds=sum(r["seconds"] for rs in self.runs.values() for r in rs))
        probe = setup.probe[0]
        tokens = setup.tokenizer.convert_ids_to_tokens(
            setup.tokenizer(probe["input"], add_special_tokens=False)["input_ids"])
        per_sample = {"before (zero_shot)": zero["attention_mass_samples"]}
        per_sample.update({m: {k: sum((r["attention_mass_samples"][k] for r in runs[m]), []) for k in FACTOR_KINDS}
                           for m in METHODS})
        figures = {
            "attention_map": attention_maps(
                os.path.join(out_dir, "pretrained_attention_map.png"), maps, tokens,
                f"{setup.model_name}: OOD record 0 (target {probe['target']}), seed {seeds[0]}"),
            "factor_mass": factor_mass(os.path.join(out_dir, "pretrained_factor_mass.png"), per_sample),
            "training_curves": training_curves(os.path.join(out_dir, "pretrained_curves.png"),
                                               {m: [r["curve"] for r in runs[m]] for m in METHODS}),
        }
        results["figures"] = {k: os.path.basename(v) for k, v in figures.items()}
        return results, format_table(results)


RUN_LOG = PretrainedPart.run_log


class RunLog:
    """Every finished run of ``demo pretrained`` (and ``demo capt-pretrained``, in its own file), one JSON line each
    in ``--out`` (the annotation pipeline's :class:`~causal_attn.data.llm.JsonlCache`: fsynced per line, a torn last
    line skipped), written as it
    finishes: a run that was cut off (or a seed added later) resumes without retraining what is there. A line
    counts only for the same checkpoint (name and content hash), code (:func:`~causal_attn.utils.provenance.code_hash`
    of the package's sources: a code change retrains), test split, quick flag and recipe."""

    def __init__(self, path: str, model: str, quick: bool, split: str, recipe: PretrainedRecipe):
        import json

        from ..data.llm import JsonlCache
        from ..hf.pretrained import checkpoint_hash
        from ..utils.provenance import code_hash

        self.cache = JsonlCache(path)
        self.context = json.dumps({"model": model, "checkpoint": checkpoint_hash(model), "code": code_hash(),
                                   "quick": quick, "split": split, "recipe": recipe.__dict__},
                                  sort_keys=True, default=list)

    def _key(self, method: str, seed: int) -> str:
        return f"{self.context} {method} {seed}"

    def get(self, method: str, seed: int) -> dict | None:
        entry = self.cache.get(self._key(method, seed))
        if entry is None:
            return None
        import numpy as np

        result = entry["result"]
        if "sample_map" in result:  # an attention map (an array in a run's record)
            result = {**result, "sample_map": np.asarray(result["sample_map"], dtype=np.float32)}
        return result

    def add(self, res: dict):
        if "sample_map" in res:
            res = {**res, "sample_map": res["sample_map"].tolist()}
        self.cache.put({"key": self._key(res["method"], res["seed"]), "result": res})


def format_table(results: dict) -> str:
    """The CAT part's table with the untuned checkpoint's row ("before") added."""
    from .stg import format_table as stg_table

    lines = stg_table(results).splitlines()
    z = results["zero_shot"]
    mass = " / ".join(f"{z['attention_mass'][k]:.2f}" for k in FACTOR_KINDS)
    lines.insert(2, f"| untuned checkpoint (before) | {100 * z['iid_acc']:.1f} | {100 * z['ood_acc']:.1f} | {mass} |")
    return "\n".join(lines)
