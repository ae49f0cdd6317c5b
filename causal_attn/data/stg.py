"""The Spurious Token Game (SPEC §5): STG_E and STG_H generators, loaders and JSONL writer.

STG_E (``generate_stg_e(seed=42)``) reproduces the CAT authors' released splits record for record:
one ``random.Random(seed)`` draws 2000 IID samples, then 400 OOD samples. IID sample: per causal
word (Smoking, Weight, Exercise) ``v = randint(1, 10)`` and its spurious partner (Yellow fingers,
Clothing size, Hormones) ``int(v * ratio)`` with ratios 1.5, 1, 0.5; then ``randint(1, 10)`` per
irrelevant word (Certain gene, Room size); the list causal + spurious + irrelevant is shuffled.
OOD sample: ``randint(1, 10)`` for every word in that order, then shuffled. Label from
``x = 1.2 Smoking + 0.7 Weight - Exercise``: ``x > 7.2`` High, ``x == 2.7`` Middle (a quirk of the
release: exact float equality), else Low Risk. Splits: test_iid = IID 0..399 (no ``important``),
train_L = IID 400..1999, train_M / train_S its first 800 / 400, test_ood = the OOD samples.

STG_H (``generate_stg_h(seed)``): six causal factors (uniform + Gaussian noise), AQI =
``round((clip(raw, -20, 30) + 20) / 50 * 100)``, five spurious variables that follow a parent factor
in IID and are drawn uniformly over coefficient x parent range in OOD, three irrelevant ones; the
released files were generated without a seed, so only format and statistics can match.
Splits train 3000, test_iid 1000, test_ood 1000, each with ``important`` naming the causal values.

Records are plain dicts with the released fields (``input``, ``target``, ``important``);
:func:`as_dataset` turns them into a ``datasets.Dataset`` with ``important`` as a JSON string
(its keys vary per record, which Arrow cannot store as a struct); ``annotations_to_graph`` accepts
that string form directly.
"""
from __future__ import annotations

import json
import os
import random
from typing import Iterable

from .jsonl import read_jsonl, write_jsonl  # noqa: F401  (stg.read_jsonl: the benchmarks' name)

STG_E_PREFIX = "Here is the statistical data for a person. Please predict the probability of cancer. "
STG_E_CAUSAL = ("Smoking", "Weight", "Exercise")
STG_E_SPURIOUS = ("Yellow fingers", "Clothing size", "Hormones")
STG_E_RATIOS = (1.5, 1, 0.5)
STG_E_IRRELEVANT = ("Certain gene", "Room size")
STG_E_SPLITS = ("train_L", "train_M", "train_S", "test_iid", "test_ood")
STG_H_SPLITS = ("train", "test_iid", "test_ood")
STG_H_SIZES = {"train": 3000, "test_iid": 1000, "test_ood": 1000}
STG_H_QUESTION = ("Given these diverse conditions, what is the projected Air Quality Index (AQI) on a 0-100 scale?")


# ----------------------------------------------------------------------------- STG_E

def stg_e_label(values: dict) -> str:
    x = 1.2 * values["Smoking"] + 0.7 * values["Weight"] - values["Exercise"]
    if x > 7.2:
        return "High Risk"
    if x == 2.7:  # reproduces the release: only exact float equality gives Middle Risk
        return "Middle Risk"
    return "Low Risk"


def _stg_e_record(items: list[tuple[str, int]], with_important: bool) -> dict:
    values = dict(items)
    label = stg_e_label(values)
    rec = {"input": STG_E_PREFIX + ", ".join(f"{k}: {v}" for k, v in items) + " Answer: ", "target": label}
    if with_important:
        rec["important"] = [{label: [f"{k}: {v}" for k, v in items if k in STG_E_CAUSAL]}]
    return rec


def _stg_e_iid_items(rng: random.Random) -> list[tuple[str, int]]:
    causal, spurious = [], []
    for name, partner, ratio in zip(STG_E_CAUSAL, STG_E_SPURIOUS, STG_E_RATIOS):
        v = rng.randint(1, 10)
        causal.append((name, v))
        spurious.append((partner, int(v * ratio)))
    irrelevant = [(name, rng.randint(1, 10)) for name in STG_E_IRRELEVANT]
    items = causal + spurious + irrelevant
    rng.shuffle(items)
    return items


def _stg_e_ood_items(rng: random.Random) -> list[tuple[str, int]]:
    items = [(name, rng.randint(1, 10)) for name in STG_E_CAUSAL + STG_E_SPURIOUS + STG_E_IRRELEVANT]
    rng.shuffle(items)
    return items


def generate_stg_e(seed: int = 42, n_iid: int = 2000, n_ood: int = 400, n_test: int = 400) -> dict[str, list[dict]]:
    """STG_E splits ``train_L, train_M, train_S, test_iid, test_ood`` as lists of records."""
    rng = random.Random(seed)
    iid = [_stg_e_iid_items(rng) for _ in range(n_iid)]
    ood = [_stg_e_ood_items(rng) for _ in range(n_ood)]
    train_l = [_stg_e_record(items, True) for items in iid[n_test:]]
    return {"train_L": train_l, "train_M": train_l[:800], "train_S": train_l[:400],
            "test_iid": [_stg_e_record(items, False) for items in iid[:n_test]],
            "test_ood": [_stg_e_record(items, False) for items in ood]}


# ----------------------------------------------------------------------------- STG_H

# (low, high, noise sd) of the causal factors f1..f6
STG_H_CAUSAL = ((30, 70, 2), (20, 60, 2), (10, 50, 1.5), (10, 30, 1), (40, 80, 3), (50, 90, 3))
STG_H_WEIGHTS = (0.3, 0.25, 0.2, 0.15, -0.2, -0.3)
# spurious: (parent factor index, coefficient, IID noise sd)
STG_H_SPURIOUS = ((5, 0.4, 2), (3, 0.2, 3), (0, 1.1, 1.5), (1, 0.15, 2), (4, -0.1, 1))
# OOD spurious coefficients over the parent's range (independent of the sample)
STG_H_OOD_COEF = (0.1, 0.2, 0.1, 0.15, -0.1)


def aqi_from_factors(f: Iterable[float]) -> int:
    raw = sum(w * x for w, x in zip(STG_H_WEIGHTS, f))
    clipped = min(max(raw, -20.0), 30.0)
    return round((clipped + 20) / 50 * 100)


def _stg_h_sample(rng: random.Random, ood: bool) -> dict:
    f = [rng.uniform(lo, hi) + rng.normalvariate(0, sd) for lo, hi, sd in STG_H_CAUSAL]
    aqi = aqi_from_factors(f)
    if ood:
        se = []
        for (parent, _, _), c in zip(STG_H_SPURIOUS, STG_H_OOD_COEF):
            lo, hi, _ = STG_H_CAUSAL[parent]
            a, b = sorted((c * lo, c * hi))
            se.append(rng.uniform(a, b))
    else:
        se = [c * f[parent] + rng.normalvariate(0, sd) for parent, c, sd in STG_H_SPURIOUS]
    anniversary = rng.randint(1, 100)
    speed = rng.uniform(80, 120) + rng.normalvariate(0, 3)
    libraries = rng.randint(10, 50)
    causal = [f"{f[0]:.1f}", f"{f[1]:.1f}", f"{f[2]:.1f}%", f"{f[3]:.1f}", f"{f[4]:.1f}%", f"{f[5]:.1f}"]
    text = (f"Industrial Emissions: {causal[0]}; Vehicle Emissions: {causal[1]}; Coal Dependency: {causal[2]}; "
            f"Agricultural Burning: {causal[3]}; Urban Green Coverage: {causal[4]}; "
            f"Meteorological Dispersion: {causal[5]}. "
            f"Ice Cream Sales Index: {se[0]:.1f}; Allergy Complaints Level: {se[1]:.1f}; "
            f"Renewable Stock Index: {se[2]:.0f}; Public Transport Subscriptions (k): {se[3]:.1f}; "
            f"Water Awareness Score: {se[4]:.1f}. "
            f"City Anniversary: {anniversary}th; Average Internet Speed: {speed:.1f}Mbps; "
            f"Number of Libraries: {libraries}. {STG_H_QUESTION}")
    return {"input": text + " Answer: ", "target": aqi, "important": [{f"Answer: {aqi}": causal}]}


def generate_stg_h(seed: int | None = 42, sizes: dict | None = None) -> dict[str, list[dict]]:
    """STG_H splits ``train, test_iid, test_ood`` (``seed=None``: unseeded like the release)."""
    rng = random.Random(seed)
    sizes = {**STG_H_SIZES, **(sizes or {})}
    return {split: [_stg_h_sample(rng, ood=split == "test_ood") for _ in range(sizes[split])]
            for split in STG_H_SPLITS}


# ----------------------------------------------------------------------------- I/O

def as_dataset(records: list[dict]):
    """``datasets.Dataset`` of records; ``important`` stored as a JSON string, ``target`` as given."""
    import datasets

    rows = [{**r, "important": json.dumps(r["important"])} if "important" in r else r for r in records]
    return datasets.Dataset.from_list(rows)


def load_stg(name: str, split: str, root: str | os.PathLike | None = None, *, seed: int = 42):
    """A split as a ``datasets.Dataset``: from ``root/<split>.jsonl`` when ``root`` is given (the
    released files or ``causal-attn stg --out`` output), else freshly generated with ``seed``."""
    splits = {"stg_e": STG_E_SPLITS, "stg_h": STG_H_SPLITS}
    if name not in splits:
        raise ValueError(f"unknown STG dataset {name!r}; expected one of {sorted(splits)}")
    if split not in splits[name]:
        raise ValueError(f"{name} has splits {splits[name]}, not {split!r}")
    if root is not None:
        path = os.path.join(os.fspath(root), f"{split}.jsonl")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found (write the splits with `causal-attn stg --out DIR`)")
        return as_dataset(read_jsonl(path))
    gen = generate_stg_e if name == "stg_e" else generate_stg_h
    return as_dataset(gen(seed=seed)[split])


def write_all(out_dir: str | os.PathLike, *, seed_e: int = 42, seed_h: int = 42) -> dict[str, int]:
    """Write ``stg_e/<split>.jsonl`` and ``stg_h/<split>.jsonl`` under ``out_dir``; returns counts."""
    counts = {}
    for name, splits in (("stg_e", generate_stg_e(seed=seed_e)), ("stg_h", generate_stg_h(seed=seed_h))):
        for split, recs in splits.items():
            counts[f"{name}/{split}"] = write_jsonl(recs, os.path.join(out_dir, name, f"{split}.jsonl"))
    return counts
