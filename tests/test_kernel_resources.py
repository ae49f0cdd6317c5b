"""Ahead-of-time compile check (no GPU): benchmarks/kernel_resources.py on a reduced set — the first autotune
config of the forward, dK/dV and dQ kernels with the mass path, head dim 64, for sm_80 and sm_90, with and without
packed segments."""
import csv
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


@pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="this Triton build ships no cuobjdump")
def test_reduced_compile_table(tmp_path):
    out = tmp_path / "resources.csv"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "kernel_resources.py"), "--out", str(out),
           "--configs", "first", "--head-dims", "64", "--mass", "on", "--packed", "both", "--kernels", "fwd", "dkdv", "dq"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(out) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["kernel", "arch", "config", "regs", "shared", "spills",
                                     "tensor_core_instructions"]
        rows = list(reader)
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k + seg, a) for k in ("attn_fwd+mass", "attn_bwd_dkdv+mass", "attn_bwd_dq+mass") for a in ("sm_80", "sm_90")
        for seg in ("", "+seg")}
    for r in rows:
        what = f"{r['kernel']} {r['arch']} {r['config']}"
        assert int(r["spills"]) == 0, f"{what}: {r['spills']} spill bytes"
        assert 0 < int(r["shared"]) <= SHARED_LIMIT[r["arch"]], f"{what}: shared memory {r['shared']}"
        assert 0 < int(r["regs"]) <= 255, what
        assert int(r["tensor_core_instructions"]) > 0, f"{what}: no HMMA/HGMMA in the SASS"
