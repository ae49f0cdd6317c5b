"""The CPU backward never holds per-head T x T tensors: RSS growth measured in a fresh subprocess.

At T=2048, H=8 one (H, T, T) fp32 stack is 128 MiB; the eager (authors') way keeps several."""
import os
import subprocess
import sys

import pytest

from causal_attn.ops.attention import get_backend

PROBE = os.path.join(os.path.dirname(__file__), "memory_probe.py")
STACK_MIB = 8 * 2048 * 2048 * 4 / 2**20  # 128


def growth_mib(backend: str) -> float:
    res = subprocess.run([sys.executable, PROBE, backend, "2048", "8", "64"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return float(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_cpu_path_peak_memory_well_under_one_head_stack(backend):
    if backend == "cpp" and get_backend("cpp") is None:
        pytest.skip("C++ CPU extension not built here")
    ours = growth_mib(backend)
    assert ours < STACK_MIB / 2, f"{backend}: fwd+bwd grew RSS by {ours:.1f} MiB (one head stack = {STACK_MIB:.0f})"


def test_eager_way_is_measured_to_need_the_maps():
    """Shows the probe can see T x T stacks: the reference (eager) path must exceed one head stack."""
    assert growth_mib("eager") > STACK_MIB
