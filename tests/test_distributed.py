"""Data-parallel training: the distributed update equals the single-process update on the global batch.

One ``torchrun --nproc_per_node 2`` launch (gloo, CPU) runs tests/distributed_worker.py for all
scenarios; its float64 single-process step on the whole batch is the reference. Tolerance: the
distributed float32 step may be off the reference by at most twice what the single-process float32
step is off it, plus a tiny absolute term.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from causal_attn import CausalGraph, re_attention_loss
from causal_attn import patch_model
from causal_attn.hf.distributed import (count_loss_rows, data_parallel_handle_loss, data_parallel_re_attention_loss,
                                     scale_for_data_parallel)
from causal_attn.testing.numerics import fresh_seed
from causal_attn.testing.models import random_batch, random_graph, tiny_model

HERE = os.path.dirname(__file__)
TINY = 1e-7


def _fsdp2_available() -> str | None:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as e:
        return f"torch {torch.__version__} has no FSDP2 fully_shard ({e})"
    return None


FSDP_SKIP = _fsdp2_available()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("distributed")
    _cli_workspace(out / "cli")
    scenarios = ["ddp", "ddp_ga", "ddp_packed_ga", "trainer_ddp", "trainer_ddp_checkpointing", "trainer_ddp_packed",
                 "trainer_fsdp", "cli_train"]
    scenarios += [] if FSDP_SKIP else ["fsdp"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(HERE, "distributed_worker.py"), str(out), *scenarios]
    seed = int(os.environ.get("CAT_TEST_SEED") or fresh_seed())  # set it to replay a failure
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=HERE,
                          env={**os.environ, "CAT_TEST_SEED": str(seed)})
    assert proc.returncode == 0, (f"torchrun failed ({proc.returncode}, seed {seed}):\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-5000:]}")
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1], f"ranks disagree on the updated parameters (seed {seed})"
    print(f"distributed results (seed {seed}): {json.dumps(results[0])}")
    return {**results[0], "cli_dir": out / "cli", "seed": seed}


CLI_RECORDS = 16


def _cli_workspace(ws):
    """A tiny Llama with a word-level tokenizer and 16 annotated STG_E training records."""
    from causal_attn.data.stg import generate_stg_e
    from causal_attn.demo.model import build_word_tokenizer, tiny_llama

    ws.mkdir()
    g = generate_stg_e(seed=random.randrange(10**6), n_iid=40, n_ood=8, n_test=8)
    with open(ws / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in g["train_L"][:CLI_RECORDS])
    tok = build_word_tokenizer([r["input"] + r["target"] for recs in g.values() for r in recs])
    model = tiny_llama(tok, hidden=32, layers=2, heads=2, intermediate=64, seed=random.randrange(1000))
    model.save_pretrained(ws / "init")
    tok.save_pretrained(ws / "init")


def _check_matches_single_process(res, scenario):
    err, fp32_err = res[scenario]["dist_err"], res["fp32_single_err"]
    assert res["update_size"] > 1e3 * (2 * fp32_err + TINY), "the step is too small to test anything"
    assert res["attention_term_effect"] > 1e3 * (2 * fp32_err + TINY), "the Re-Attention term barely moves the step"
    assert err <= 2 * fp32_err + TINY, (
        f"{scenario}: distributed update is {err:.3g} off the float64 single-process update "
        f"(float32 single-process: {fp32_err:.3g}; seed {res['seed']})")


def test_ddp_step_equals_single_process_step(distributed_results):
    _check_matches_single_process(distributed_results, "ddp")


def test_ddp_gradient_accumulation_step_equals_single_process_step(distributed_results):
    _check_matches_single_process(distributed_results, "ddp_ga")


def test_ddp_packed_step_equals_padded_single_process_step(distributed_results):
    """Each rank's 4 samples as 2 accumulated padding-free rows of 2 samples (CATCollator(packing=True)) against
    the padded float64 single-process step on the whole batch."""
    res = distributed_results
    assert res["ddp_packed_ga"]["packed_rows"] == [1, 1]  # one row per micro-batch
    _check_matches_single_process(res, "ddp_packed_ga")


@pytest.mark.parametrize("scenario", ["ddp", "ddp_ga"])
def test_ddp_detects_per_rank_mean_averaging(distributed_results, scenario):
    """Negative control: averaging each rank's own Re-Attention mean (the naive rule) is visibly wrong."""
    res = distributed_results
    assert res[scenario]["naive_err"] > 100 * (2 * res["fp32_single_err"] + TINY), f"seed {res['seed']}"


@pytest.mark.skipif(FSDP_SKIP is not None, reason=FSDP_SKIP or "")
def test_fsdp_step_equals_single_process_step(distributed_results):
    _check_matches_single_process(distributed_results, "fsdp")


@pytest.mark.parametrize("scenario", ["trainer_ddp", "trainer_ddp_checkpointing", "trainer_ddp_packed"])
def test_distributed_cat_trainer_ddp_step_equals_single_process_step(distributed_results, scenario):
    """CATTrainer under torchrun: 2 ranks x 2 per device x 2 accumulation steps = the 8-sample batch;
    also with non-reentrant gradient checkpointing, and packed (padding-free rows) against the padded step."""
    assert distributed_results[scenario]["engine"] == "DistributedType.MULTI_CPU"
    _check_matches_single_process(distributed_results, scenario)


def test_distributed_cat_trainer_fsdp_step_equals_single_process_step(distributed_results):
    engine = distributed_results["trainer_fsdp"]["engine"]
    if engine != "DistributedType.FSDP":
        pytest.skip(f"accelerate runs FSDP only on accelerator devices; on CPU it silently used {engine} "
                    "(the raw FSDP2 test covers sharding on CPU)")
    _check_matches_single_process(distributed_results, "trainer_fsdp")


def _random_problem(seed):
    g = torch.Generator().manual_seed(seed)
    B, H, T = 3, 2, 10
    mass = torch.rand(B, H, T, generator=g, dtype=torch.float64, requires_grad=True)
    dense = (torch.rand(B, T, T, generator=g) < 0.3) & torch.ones(T, T, dtype=torch.bool).tril()
    mask = torch.arange(T)[None, :] < torch.randint(T // 2, T + 1, (B, 1), generator=g)
    return mass, dense, mask


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_distributed_loss_without_process_group_is_the_plain_loss(reduction):
    seed = fresh_seed()
    mass, dense, mask = _random_problem(seed)
    graph = CausalGraph.from_dense(dense)
    plain = re_attention_loss([mass], graph, alpha=1.5, key_padding_mask=mask, reduction=reduction)
    dp = data_parallel_re_attention_loss([mass], graph, alpha=1.5, key_padding_mask=mask, reduction=reduction)
    torch.testing.assert_close(dp, plain, rtol=1e-6, atol=0, msg=f"seed {seed}")  # the loss is fp32


def test_distributed_row_count_matches_loss_rows_over_micro_batches():
    seed = fresh_seed()
    batches = []
    expected = 0
    for i in range(3):
        mass, dense, mask = _random_problem(seed + i)
        _, stats = re_attention_loss([mass], dense, alpha=1.0, key_padding_mask=mask, return_stats=True)
        expected += int(stats.rows.sum())
        batches.append({"adjacency": CausalGraph.from_dense(dense) if i else dense, "attention_mask": mask.long()})
    batches.append({"input_ids": torch.zeros(1, 4)})  # no adjacency: 0 rows
    assert int(count_loss_rows(batches)) == expected, f"seed {seed}"
    assert count_loss_rows([{}], across_ranks=False) is None


def test_distributed_accumulated_micro_batches_sum_to_the_whole_batch_loss():
    """Without a process group, summing the scaled micro-batch losses gives the whole-batch mean."""
    seed = fresh_seed()
    mass, dense, mask = _random_problem(seed)
    whole = re_attention_loss([mass], dense, alpha=1.5, key_padding_mask=mask)
    rows = count_loss_rows([{"adjacency": dense[i:i + 1], "attention_mask": mask[i:i + 1]} for i in range(3)])
    parts = sum(data_parallel_re_attention_loss([mass[i:i + 1]], dense[i:i + 1], alpha=1.5,
                                                key_padding_mask=mask[i:i + 1], global_rows=rows) for i in range(3))
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=0, msg=f"seed {seed}")  # the loss is fp32


def test_distributed_scale_rejects_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        scale_for_data_parallel(torch.tensor(1.0), reduction="avg")
    with pytest.raises(ValueError, match="global_rows"):
        scale_for_data_parallel(torch.tensor(1.0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_distributed_handle_loss_without_process_group_is_handle_loss(reduction):
    model = tiny_model("qwen2", train=True)
    handle = patch_model(model, alpha=1.5, reduction=reduction)
    ids, mask, labels = random_batch(model.config.vocab_size, B=3, T=10, padding="left")
    model(input_ids=ids, attention_mask=mask, adjacency=random_graph(mask, density=0.4))
    torch.testing.assert_close(data_parallel_handle_loss(handle), handle.loss(), rtol=1e-6, atol=0)


def test_distributed_train_command_under_torchrun(distributed_results):
    """`causal-attn train` unchanged under torchrun: 16 records, global batch 2 x 4 x 2 = 16, 2 epochs."""
    from safetensors.torch import load_file

    assert distributed_results["cli_train"]["rc"] == 0
    ws = distributed_results["cli_dir"]
    summary = json.loads((ws / "out" / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["records"] == CLI_RECORDS
    assert any("attn_loss" in h for h in summary["log_history"])
    init, trained = load_file(ws / "init" / "model.safetensors"), load_file(ws / "out" / "model.safetensors")
    assert init.keys() == trained.keys() and any(not torch.equal(init[k], trained[k]) for k in init)
