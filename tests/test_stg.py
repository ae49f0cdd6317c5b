"""STG_E reproduces the release; STG_H matches its format and statistics; loaders and the CLI."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from causal_attn.data import stg

RELEASE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cat")


def _release(name, split):
    path = os.path.join(RELEASE, name, f"{split}.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"released data not found at {path}")
    return path


@pytest.fixture(scope="module")
def stg_e():
    return stg.generate_stg_e(seed=42)


@pytest.fixture(scope="module")
def stg_h():
    return stg.generate_stg_h(seed=7)


@pytest.mark.parametrize("split", stg.STG_E_SPLITS)
def test_stg_e_reproduces_release_record_for_record_and_byte_for_byte(stg_e, split):
    path = _release("stg_e", split)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == len(stg_e[split])
    for line, rec in zip(lines, stg_e[split]):
        assert json.loads(line) == rec
        assert line == json.dumps(rec)


def test_stg_e_other_seed_differs_but_keeps_rules(stg_e):
    other = stg.generate_stg_e(seed=1)
    assert other["train_L"] != stg_e["train_L"]
    for rec in other["train_L"][:200]:
        vals = dict((k, int(v)) for k, v in re.findall(r"([A-Z][a-z]+(?: [a-z]+)?): (\d+)", rec["input"]))
        assert rec["target"] == stg.stg_e_label(vals)
        assert vals["Yellow fingers"] == int(vals["Smoking"] * 1.5) and vals["Hormones"] == int(vals["Exercise"] * 0.5)
        (label, causal), = rec["important"][0].items()
        assert label == rec["target"] and [c.split(":")[0] for c in causal] == [
            w for w in re.findall(r"(Smoking|Weight|Exercise):", rec["input"])]


def _values(records):
    rows = []
    for r in records:
        nums = re.findall(r": (-?\d+(?:\.\d+)?)", r["input"])
        assert len(nums) == 14, r["input"]
        rows.append([float(x) for x in nums] + [r["target"]])
    return np.array(rows)


# spurious column -> parent causal column (Ice Cream <- f6, Allergy <- f4, Renewable <- f1,
# Public Transport <- f2, Water Awareness <- f5)
PAIRS = [(6, 5), (7, 3), (8, 0), (9, 1), (10, 4)]


def _corr(a):
    return np.array([np.corrcoef(a[:, s], a[:, p])[0, 1] for s, p in PAIRS])


def test_stg_h_statistics_and_release_comparison(stg_h):
    assert {k: len(v) for k, v in stg_h.items()} == stg.STG_H_SIZES
    iid, ood = _corr(_values(stg_h["train"])), _corr(_values(stg_h["test_ood"]))
    # the strongly coupled spurious variables (Ice Cream / f6, Renewable Stock / f1) exceed 0.85 in IID
    assert iid[0] > 0.85 and iid[2] > 0.85
    assert np.all(np.abs(ood) < 0.1)
    released = _corr(_values(stg.read_jsonl(_release("stg_h", "train"))))
    assert np.allclose(iid, released, atol=0.08), (iid, released)
    for split, recs in stg_h.items():
        t = np.array([r["target"] for r in recs])
        assert t.min() >= 0 and t.max() <= 100 and 35 < t.mean() < 50


def test_stg_h_field_formats(stg_h):
    pattern = re.compile(
        r"Industrial Emissions: -?\d+\.\d; Vehicle Emissions: -?\d+\.\d; Coal Dependency: -?\d+\.\d%; "
        r"Agricultural Burning: -?\d+\.\d; Urban Green Coverage: -?\d+\.\d%; Meteorological Dispersion: -?\d+\.\d\. "
        r"Ice Cream Sales Index: -?\d+\.\d; Allergy Complaints Level: -?\d+\.\d; Renewable Stock Index: -?\d+; "
        r"Public Transport Subscriptions \(k\): -?\d+\.\d; Water Awareness Score: -?\d+\.\d\. "
        r"City Anniversary: \d+th; Average Internet Speed: -?\d+\.\dMbps; Number of Libraries: \d+\. "
        + re.escape(stg.STG_H_QUESTION) + " Answer: $")
    released = stg.read_jsonl(_release("stg_h", "test_ood"))[:50]
    for rec in released + stg_h["train"][:200] + stg_h["test_ood"][:200]:
        assert list(rec) == ["input", "target", "important"]
        assert pattern.match(rec["input"]), rec["input"]
        assert isinstance(rec["target"], int)
        (key, vals), = rec["important"][0].items()
        assert key == f"Answer: {rec['target']}" and len(vals) == 6
        assert all(v in rec["input"] for v in vals)
    # the label follows from the printed causal values up to their rounding
    for rec in stg_h["test_iid"][:200]:
        f = _values([rec])[0, :6]
        assert abs(stg.aqi_from_factors(f) - rec["target"]) <= 1


def test_stg_h_seed_is_reproducible():
    a = stg.generate_stg_h(seed=3, sizes={"train": 5, "test_iid": 5, "test_ood": 5})
    b = stg.generate_stg_h(seed=3, sizes={"train": 5, "test_iid": 5, "test_ood": 5})
    assert a == b and a != stg.generate_stg_h(seed=4, sizes={"train": 5, "test_iid": 5, "test_ood": 5})


def test_loaders_return_datasets_and_roundtrip(tmp_path, stg_e):
    import datasets

    ds = stg.load_stg("stg_e", "train_S")
    assert isinstance(ds, datasets.Dataset) and len(ds) == 400
    assert json.loads(ds[0]["important"]) == stg_e["train_S"][0]["important"]
    counts = stg.write_all(tmp_path, seed_h=5)
    assert counts["stg_e/train_L"] == 1600 and counts["stg_h/test_ood"] == 1000
    again = stg.load_stg("stg_h", "test_ood", tmp_path / "stg_h")
    assert len(again) == 1000 and isinstance(again[0]["target"], int)
    released = stg.load_stg("stg_e", "test_ood", os.path.dirname(_release("stg_e", "test_ood")))
    assert released.column_names == ["input", "target"]
    with pytest.raises(ValueError, match="splits"):
        stg.load_stg("stg_h", "train_L")
    with pytest.raises(FileNotFoundError):
        stg.load_stg("stg_e", "train_L", tmp_path / "nowhere")


def test_cli_stg_writes_all_splits(tmp_path, capsys):
    from causal_attn.cli import main

    assert main(["stg", "--out", str(tmp_path)]) == 0
    with open(_release("stg_e", "train_L")) as f:
        assert (tmp_path / "stg_e" / "train_L.jsonl").read_text() == f.read()
    assert len((tmp_path / "stg_h" / "train.jsonl").read_text().splitlines()) == 3000
    assert "stg_h/test_ood: 1000 records" in capsys.readouterr().out
