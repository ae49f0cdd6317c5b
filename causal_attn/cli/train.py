"""`causal-attn train` and `causal-attn eval`: CAT / CAPT fine-tuning of a real checkpoint, and scoring it.

train: records (``input``, ``target``, ``important`` for CAT, ``capt`` for CAPT) are tokenised with the
model's tokenizer (prompt tokens masked from the LM loss, EOS appended, adjacency from ``important``
through :func:`causal_attn.data.encode_example`), then trained with :class:`causal_attn.hf.trainer.CATTrainer`
(LM + gamma * Re-Attention for ``cat``; LM only for ``vanilla``), full or LoRA (PEFT), AdamW, warm-up 0.1,
cosine, checkpoints every epoch, ``--resume`` from the last one. CAPT symbolises the events of every
record with fresh random letters (``--capt-copies`` copies). The final model (LoRA merged) and tokenizer
go to ``--out``.

eval: batched greedy decoding with left padding (:func:`causal_attn.hf.decode.greedy_decode`) and
the task scorer; writes ``predictions.jsonl`` and ``metrics.json``.
"""
from __future__ import annotations

import json
import os

from ..data.jsonl import write_jsonl
from ..data.scoring import SCORERS, score
from .errors import CliError
from .records import read_records

STG_TRAIN = {"stg_s": ("stg_e", "train_S"), "stg_m": ("stg_e", "train_M"), "stg_l": ("stg_e", "train_L"),
             "stg_h": ("stg_h", "train")}
METHODS = ("vanilla", "cat", "capt", "cat+capt")
# paper defaults (SPEC §5): lr 1e-4 LoRA / 5e-5 full, warm-up 0.1, cosine, AdamW, 6 epochs, seed 42
DEFAULT_LR = {True: 1e-4, False: 5e-5}
MODEL_HELP = "smollm2-135m (bundled, see docs/pretrained.md), a model directory, a .gguf file or a hub id"


def add_parser(subparsers):
    t = subparsers.add_parser("train", help="fine-tune a causal LM with CAT / CAPT (full or LoRA)",
                              description="Fine-tune a Llama / Qwen / Mistral causal LM with CAT and/or CAPT.")
    t.add_argument("--model", required=True, help=MODEL_HELP)
    t.add_argument("--data", required=True, help="stg_s, stg_m, stg_l, stg_h or a JSONL file (input, target, important)")
    t.add_argument("--method", choices=METHODS, default="cat")
    t.add_argument("--lora", action="store_true", help="train LoRA adapters (PEFT) instead of all weights")
    t.add_argument("--lora-r", type=int, default=8)
    t.add_argument("--alpha", type=float, default=0.2, help="Re-Attention margin (paper: 0.05-0.35)")
    t.add_argument("--gamma", default="exp", help="exp (exp(-epoch), paper), const, linear, "
                   "decay:GAMMA:DECAY (GAMMA * exp(-DECAY * progress), the demo's), or a number")
    t.add_argument("--epochs", type=float, default=6.0)
    t.add_argument("--lr", type=float, default=None, help="default 1e-4 with --lora, 5e-5 otherwise")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-length", type=int, default=1024)
    t.add_argument("--packing", action="store_true",
                   help="padding-free batches: each batch's records end to end in one row (no compute on padding)")
    t.add_argument("--compile", action="store_true",
                   help="torch.compile the model (TrainingArguments(torch_compile=True); see docs/training.md)")
    t.add_argument("--capt-copies", type=int, default=1, help="CAPT: copies of the training set, new letters each")
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (default: every epoch)")
    t.add_argument("--logging-steps", type=int, default=10)
    t.add_argument("--out", required=True, help="output directory (checkpoints, final model, train_summary.json)")
    t.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --out")
    t.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="greedy-decode a test set and score it",
                              description="Batched greedy decoding (left padding) and task scoring.")
    e.add_argument("--model", required=True, help=MODEL_HELP + " (e.g. a `causal-attn train` --out)")
    e.add_argument("--data", required=True, help="stg_s/stg_m/stg_l (STG_E IID + OOD tests), stg_h, or a JSONL file")
    e.add_argument("--task", choices=("auto",) + tuple(SCORERS), default="auto",
                   help="scorer (auto: from --data; exact match for files)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--limit", type=int, default=0, help="score only the first N records of each split")
    e.add_argument("--out", default=None, help="output directory (default: MODEL/eval)")
    e.set_defaults(func=run_eval)
    return t


# ----------------------------------------------------------------------------------------------- data
def _generated_stg(data: str) -> tuple[dict, str] | None:
    """``({split: records}, scorer)`` of a generated STG set (seed 42; the generator's name is the scorer's);
    None when ``data`` names none."""
    if data not in STG_TRAIN:
        return None
    from ..data.stg import generate_stg_e, generate_stg_h

    name = STG_TRAIN[data][0]
    return (generate_stg_e if name == "stg_e" else generate_stg_h)(seed=42), name


def _data_file(data: str) -> str:
    if not data.endswith(".jsonl") and not os.path.exists(data):
        raise CliError(f"--data must be one of {', '.join(STG_TRAIN)} or a .jsonl file; got {data!r}")
    return data


def training_records(data: str, method: str) -> list[dict]:
    if data in STG_TRAIN and "capt" in method:
        raise CliError(f"{data} has no CAPT event estimation; run `causal-attn capt` on a JSONL file first")
    generated = _generated_stg(data)
    if generated:
        return generated[0][STG_TRAIN[data][1]]
    need = ("input", "target") + (("important",) if "cat" in method.split("+") else ()) + \
        (("capt",) if "capt" in method else ())
    return read_records(_data_file(data), need)


def test_splits(data: str) -> tuple[dict, str]:
    """``({split: records}, scorer)`` for ``eval --data``: the IID and OOD tests of an STG set, or the file."""
    generated = _generated_stg(data)
    if generated:
        splits, scorer = generated
        return {"test_iid": splits["test_iid"], "test_ood": splits["test_ood"]}, scorer
    return {os.path.splitext(os.path.basename(data))[0]: read_records(_data_file(data), ("input", "target"))}, "exact"


# ---------------------------------------------------------------------------------------------- model
def load_model(name: str):
    """(model, tokenizer) through :func:`causal_attn.hf.pretrained.load`, as a one-line CliError when that fails."""
    import torch

    from ..hf.pretrained import PretrainedError, load

    try:
        model, tokenizer = load(name)
    except PretrainedError as e:
        raise CliError(str(e)) from e
    if torch.cuda.is_available():  # under torchrun / accelerate each process owns GPU LOCAL_RANK
        model = model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    return model, tokenizer


def gamma_option(text: str):
    """``--gamma``: a schedule of :data:`~causal_attn.hf.trainer.GAMMA_SCHEDULES` (``decay:GAMMA:DECAY`` with its
    numbers) or a number."""
    from .errors import CliError
    from ..hf.trainer import GAMMA_SCHEDULES, make_gamma

    try:
        return float(text)
    except ValueError:
        pass
    try:
        make_gamma(text)
    except ValueError:
        raise CliError(f"--gamma must be one of {', '.join(GAMMA_SCHEDULES)} (decay:GAMMA:DECAY) or a number; "
                       f"got {text!r}") from None
    return text


# ---------------------------------------------------------------------------------------------- train
def run_train(args) -> int:
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from ..data import capt as capt_mod
    from ..data.adjacency import encode_example
    from ..hf.patch import patch_model
    from ..hf.trainer import CATTrainer

    if args.alpha < 0 or args.epochs <= 0 or args.batch_size < 1 or args.grad_accum < 1 or args.capt_copies < 1:
        raise CliError("--alpha must be >= 0; --epochs, --batch-size, --grad-accum, --capt-copies must be positive")
    gamma = gamma_option(args.gamma)
    records = training_records(args.data, args.method)
    last = None
    if args.resume:
        last = get_last_checkpoint(args.out) if os.path.isdir(args.out) else None
        if last is None:
            raise CliError(f"--resume: no checkpoint-* directory in {args.out}")
    model, tokenizer = load_model(args.model)
    if "capt" in args.method:
        records = capt_mod.replicate(records, args.capt_copies, seed=args.seed, mode="random")
    use_graph = "cat" in args.method.split("+")
    encoded, missing = [], 0
    for r in records:
        enc = encode_example(r["input"], r["target"], r.get("important") if use_graph else None, tokenizer,
                             max_length=args.max_length)
        missing += len(enc.pop("missing"))
        if not use_graph:
            enc.pop("edges")
        encoded.append(enc)
    if use_graph and not any(e["edges"] for e in encoded):
        raise CliError("no annotated span of any record was found in its text: the CAT loss would be empty")
    if args.lora:
        from peft import LoraConfig, get_peft_model

        targets = [n for n in ("q_proj", "k_proj", "v_proj", "o_proj")
                   if any(name.endswith(n) for name, _ in model.named_modules())]
        if not targets:
            raise CliError(f"{args.model}: no q/k/v/o_proj modules for LoRA")
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    try:
        handle = patch_model(model, alpha=args.alpha)
    except (TypeError, ValueError) as e:
        raise CliError(f"cannot patch {args.model}: {e}") from e
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    targs = TrainingArguments(
        output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr or DEFAULT_LR[args.lora],
        warmup_steps=0.1, lr_scheduler_type="cosine", optim="adamw_torch", weight_decay=0.0, seed=args.seed,
        save_strategy="steps" if args.save_steps else "epoch", save_steps=args.save_steps or 500,
        logging_steps=args.logging_steps, report_to=[], bf16=bf16, remove_unused_columns=False,
        disable_tqdm=False, use_cpu=not torch.cuda.is_available(), torch_compile=args.compile)
    trainer = CATTrainer(model=model, args=targs, cat_handle=handle, gamma=gamma if use_graph else 0.0,
                         packing=args.packing, train_dataset=encoded, processing_class=tokenizer)
    result = trainer.train(resume_from_checkpoint=last)
    handle.unpatch()
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(args.out)  # sharded weights: every rank helps gather them, one writes (LoRA: the adapter)
    elif trainer.is_world_process_zero():
        final = model.merge_and_unload() if args.lora else model
        final.save_pretrained(args.out)
    if not trainer.is_world_process_zero():  # torchrun / accelerate launch: one process writes the outputs
        return 0
    tokenizer.save_pretrained(args.out)
    summary = {"model": args.model, "data": args.data, "method": args.method, "lora": args.lora,
               "alpha": args.alpha, "gamma": args.gamma, "packing": args.packing, "compile": args.compile, "records": len(encoded), "missing_spans": missing,
               "resumed_from": last, "train_loss": result.training_loss, "global_step": result.global_step,
               "log_history": trainer.state.log_history}
    with open(os.path.join(args.out, "train_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"train: {len(encoded)} records, {result.global_step} steps, loss {result.training_loss:.4f}; "
          f"model saved to {args.out}" + (f" ({missing} annotated spans not found)" if missing else ""))
    return 0


# ----------------------------------------------------------------------------------------------- eval
def run_eval(args) -> int:
    from ..hf.decode import greedy_decode

    if args.batch_size < 1 or args.max_new_tokens < 1 or args.limit < 0:
        raise CliError("--batch-size and --max-new-tokens must be positive, --limit >= 0")
    splits, task = test_splits(args.data)
    task = task if args.task == "auto" else args.task
    model, tokenizer = load_model(args.model)
    out_dir = args.out or os.path.join(args.model, "eval")
    os.makedirs(out_dir, exist_ok=True)
    metrics = {"model": args.model, "data": args.data, "task": task}
    rows = []
    for split, recs in splits.items():
        recs = recs[:args.limit] if args.limit else recs
        preds = greedy_decode(model, tokenizer, [r["input"] for r in recs], batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, progress=True)
        try:
            metrics[split] = score(task, preds, [r["target"] for r in recs])
        except ValueError as e:  # e.g. --task gsm8k on targets without "#### answer"
            raise CliError(f"--task {task}: {e}") from None
        rows += [{"split": split, "input": r["input"], "target": r["target"], "prediction": p}
                 for r, p in zip(recs, preds)]
        print(f"eval {split}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in metrics[split].items()))
    write_jsonl(rows, os.path.join(out_dir, "predictions.jsonl"))
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"eval: wrote {out_dir}/predictions.jsonl and metrics.json")
    return 0
