"""Install paths and the Python-started-from-the-checkout case (issue 14).

* From the repository root the folder ``kernels/`` must not shadow the PyPI package ``kernels`` (transformers
  >= 5.25 imports it), and ``causal_attn.kernels`` must still import.
* A dependency that stops importing fails the run with one readable message.
* Isolated installs into a fresh virtual environment (``pip install .`` and the wheel of ``python -m build``,
  which builds it from the sdist) get the fused C++ kernel on first use, compiled once into the cache, with
  two processes starting the build at once, and later processes loading the cached library.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env=None, timeout=600, check=True):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"{' '.join(map(str, cmd))} -> {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def inside(path, folder) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(Path(folder).resolve())


def test_python_started_at_the_repository_root_imports_transformers_and_causal_attn_kernels():
    script = textwrap.dedent("""
        import importlib.util, json
        import transformers
        from transformers import AttentionInterface
        import transformers.integrations.hub_kernels  # imports the PyPI `kernels` when it is installed
        import causal_attn, causal_attn.kernels.flash_mass as fm
        spec = importlib.util.find_spec("kernels")
        print(json.dumps({"kernels": spec.origin if spec else None, "flash_mass": fm.__file__}))
    """)
    res = run([sys.executable, "-c", script], cwd=ROOT)
    found = json.loads(res.stdout.strip().splitlines()[-1])
    assert not inside(found["kernels"], ROOT / "kernels"), f"`import kernels` resolves into the checkout: {found}"
    assert Path(found["flash_mass"]).name == "flash_mass.py"


def test_pytest_collects_from_the_repository_root():
    res = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT)
    last = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ tests collected in [\d.]+s", last), res.stdout[-2000:]


def test_a_broken_dependency_stops_the_run_with_one_readable_message(tmp_path):
    """The failure of issue 14, recreated: a `kernels` package without what transformers imports from it."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("# not Hugging Face's kernels\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    res = run([sys.executable, "-m", "causal_attn.utils.versions"], cwd=tmp_path, env=env, check=False)
    assert res.returncode == 1
    assert "import transformers.integrations.hub_kernels" in res.stderr and "CUDAProperties" in res.stderr, res.stderr
    assert "torch " in res.stdout and "transformers " in res.stdout  # the versions come first
    res = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_graph.py"], cwd=ROOT,
              env=env, check=False)
    out = res.stdout + res.stderr
    assert res.returncode == 4 and "CUDAProperties" in out and "ERROR collecting" not in out, out[-3000:]


CHECK = textwrap.dedent("""
    import importlib.util, json, sys, time
    t0 = time.perf_counter()
    import torch, causal_attn
    from causal_attn.ops.attention import resolve_backend
    name = resolve_backend("cpu", torch.device("cpu"))
    from causal_attn.ops import cpp_backend
    import causal_attn.kernels.flash_mass as fm
    g = torch.Generator().manual_seed(int(sys.argv[1]))
    q, k, v = (torch.randn(2, 4 if i == 0 else 2, 77, 16, generator=g) for i in range(3))
    adj = torch.rand(2, 77, 77, generator=g) < 0.2
    fused = causal_attn.attention(q, k, v, adj.tril(), backend="cpu")
    plain = causal_attn.attention(q, k, v, adj.tril(), backend="torch")
    spec = importlib.util.find_spec("kernels")
    print(json.dumps({"backend": name, "library": str(cpp_backend.LIBRARY_PATH), "prebuilt": cpp_backend.PREBUILT_SKIPPED,
                      "package": causal_attn.__file__, "flash_mass": fm.__file__,
                      "kernels": spec.origin if spec else None, "seconds": time.perf_counter() - t0,
                      "diff": max((a - b).abs().max().item() for a, b in zip(fused, plain))}))
""")


def _check(python, cwd, env, seed):
    return subprocess.Popen([str(python), "-c", CHECK, str(seed)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def _copy_checkout(dest: Path) -> Path:
    """The tracked sources only (no venv, no prebuilt library, no build folders), as a fresh clone has them."""
    files = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file() and not f.startswith(".venv/"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


@pytest.mark.slow
def test_isolated_installs_get_the_fused_cpu_kernel_built_once_on_first_use(tmp_path):
    src = _copy_checkout(tmp_path / "src")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "CAUSAL_ATTN_DISABLE_CPP")}
    env.update(CAUSAL_ATTN_CACHE_DIR=str(tmp_path / "cache"), PIP_DISABLE_PIP_VERSION_CHECK="1")
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], cwd=tmp_path, env=env)
    run([py, "-m", "pip", "install", "-q", str(src)], cwd=tmp_path, env=env)  # build isolation: no torch there
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    # first use: two processes at once; one compiles, the other waits for it (or finds it done)
    t0 = time.perf_counter()
    first = [_result(p) for p in [_check(py, outside, env, seed) for seed in (1, 2)]]
    build_s = time.perf_counter() - t0
    compiles = sum("compiling the fused C++ CPU kernel" in err for _, err in first)
    assert compiles == 1, [err[-1000:] for _, err in first]
    for found, _ in first:
        assert found["backend"] == "cpp" and found["prebuilt"] == "not built at install time", found
        assert inside(found["library"], tmp_path / "cache"), found
        assert inside(found["package"], venv) and inside(found["flash_mass"], venv), found
        assert not inside(found["kernels"], src / "kernels") and not inside(found["kernels"], ROOT / "kernels"), found
        assert found["diff"] < 1e-4, found  # which library ran, not its numerics (test_cpp_backend checks those)
    later, err = _result(_check(py, outside, env, 3))  # cached across processes: no second compile
    assert later["backend"] == "cpp" and later["library"] == first[0][0]["library"] and "compiling" not in err

    # the wheel, built from the sdist by `python -m build`, installed over it
    run([py, "-m", "pip", "install", "-q", "build"], cwd=tmp_path, env=env)
    run([py, "-m", "build", "--outdir", str(tmp_path / "dist"), str(src)], cwd=tmp_path, env=env)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = run([py, "-m", "zipfile", "-l", str(wheel)], cwd=tmp_path).stdout
    assert "causal_attn/kernels/flash_mass.py" in names and "causal_attn/csrc/attention_cpu.cpp" in names
    assert "causal_attn/benchmarks/__init__.py" in names and "causal_attn/testing/oracle.py" in names
    assert not any(line.startswith("kernels/") for line in names.splitlines()), names
    run([py, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)], cwd=tmp_path, env=env)
    from_wheel, err = _result(_check(py, outside, env, 4))
    assert from_wheel["backend"] == "cpp" and from_wheel["diff"] < 1e-4 and "compiling" not in err, from_wheel
    assert inside(from_wheel["package"], venv), from_wheel

    # `causal-attn bench` runs from the installed package
    res = run([venv / "bin" / "causal-attn", "bench", "--help"], cwd=outside, env=env)
    assert "--scaling-threads" in res.stdout
    # ... and its memory children run as `python -m causal_attn.benchmarks.<section>` of the installed package
    code = ("from causal_attn.benchmarks import bench_kernels as b, common as c; print(b.__file__, "
            "c.run_child(b.__spec__.name, [64, 16, 2, 2, 1, 'auto', 'float32', 1, 'cat'], 300))")
    child = run([py, "-c", code], cwd=outside, env=env).stdout
    assert inside(child.split()[0], venv) and "'cat':" in child and "error" not in child, child
    print(f"first-use build (two processes at once): {build_s:.1f} s; cached load: {later['seconds']:.1f} s")
