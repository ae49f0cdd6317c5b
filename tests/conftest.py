import os
import random
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

# Tests draw fresh random inputs. Those with their own seed (numerics.fresh_seed) put it in their assertion
# messages; everything else draws from the global RNGs (random, torch, numpy), which each test gets seeded
# from this run's seed and its own id, reported with any failure. SEED_ENV=<seed> replays a run.
SEED_ENV = "CAUSAL_ATTN_TEST_SEED"
RUN_SEED = int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(2**31))


def pytest_report_header(config):
    from causal_attn.utils.versions import describe

    return [f"causal_attn stack: {describe()}", f"random seed of this run: {SEED_ENV}={RUN_SEED}"]


def _seed_global_rngs(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(scope="session", autouse=True)
def _run_seed():
    _seed_global_rngs(RUN_SEED)  # module- and session-scoped fixtures draw from here


@pytest.fixture(autouse=True)
def _test_seed(request):
    seed = zlib.crc32(f"{RUN_SEED}:{request.node.nodeid}".encode())
    _seed_global_rngs(seed)
    request.node.user_properties.append(("global RNG seed", seed))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that pins torch's thread count (the benchmark CLI's --threads, the demo's --threads) must not
    leave the tests after it running at that count: each test starts at the machine's default."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        seeds = dict(item.user_properties).get("global RNG seed")
        report.sections.append(("random seed", f"global RNGs (random, torch, numpy) seeded with {seeds}; "
                                f"{SEED_ENV}={RUN_SEED} replays this run"))
    return report


def pytest_configure(config):
    """A dependency that no longer imports (a new upstream release) stops the run with one message, before
    every test module fails to collect with its own traceback."""
    from causal_attn.utils.versions import check_stack

    problem = check_stack()
    if problem:
        pytest.exit(problem, returncode=4)


ROOT = Path(__file__).resolve().parents[1]


def run_gen(root: Path, *args: str) -> subprocess.CompletedProcess:
    """``python docs/gen.py ARGS`` of the tree at ``root`` (the checkout or a :func:`docs_copy`)."""
    return subprocess.run([sys.executable, str(root / "docs" / "gen.py"), *args], cwd=root, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def docs_copy(tmp_path):
    """README, docs and the results files in a scratch tree, so the check can be made to fail and runs can be
    published into it."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.png", "__pycache__"))
    shutil.copytree(ROOT / "benchmarks", tmp_path / "benchmarks", ignore=shutil.ignore_patterns(
        "*.png", "*.txt", "gpu", "quick", "tmp", "__pycache__"))
    return tmp_path
