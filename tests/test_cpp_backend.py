"""The C++ CPU kernel (backend "cpp") beyond the shared oracle suite of test_attention.py:
several key blocks (the shared shapes fit in one 256-column tile), thread-count invariance, the
diagnostic map, and the one-time fallback warning when the extension cannot load."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import causal_attn
from causal_attn.ops import cpp_build
from causal_attn.ops.attention import get_backend
from causal_attn.testing.numerics import check_against_oracle, fresh_seed, make_case

needs_cpp = pytest.mark.skipif(get_backend("cpp") is None, reason="C++ CPU extension not built here")


def _cpp(adj, kpm):
    return lambda q, k, v: causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend="cpp")


def _query_groups(B, Hq, Hkv, T):
    return torch.ops.causal_attn_cpp.plan(B, Hq, Hkv, T)[0]


@needs_cpp
@pytest.mark.parametrize("B,Hq,Hkv,groups", [(2, 2, 2, 1), (4, 6, 2, 2), (1, 8, 1, 4)])
def test_several_key_blocks_match_fp64_oracle(B, Hq, Hkv, groups):
    """T = 521: three 256-column key tiles (the last one ragged) and nine 64-row query tiles, so the online
    softmax rescales O, l and the mass accumulator across tiles; GQA and left padding included, with one query
    group per (batch, kv head) (dK, dV summed in one task) and with 2 and 4 (partial dK, dV added at the end).
    (Other dtypes are converted to fp32 before the tiles; test_attention.py covers them.)"""
    assert _query_groups(B, Hq, Hkv, 521) == groups
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, 521, 32, torch.float32, padding="left", logit_scale=4.0)
    check_against_oracle(_cpp(adj, kpm), q, k, v, adj, kpm, seed)


def _outputs_and_grads(q, k, v, adj, kpm, threads, seg=None):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        out, mass = causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, segment_ids=seg, backend="cpp")
        g = torch.Generator().manual_seed(0)
        (out * torch.randn(out.shape, generator=g)).sum().add((mass * torch.randn(mass.shape, generator=g)).sum()).backward()
        return [out.detach(), mass.detach(), q.grad, k.grad, v.grad]
    finally:
        torch.set_num_threads(previous)


def _packed_segments(B, T, seed):
    """int64 (B, T) segment ids of random lengths (10 to T / 3) laid end to end."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths = []
        while sum(lengths) < T:
            lengths.append(int(torch.randint(10, T // 3, (1,), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:T])
    return torch.stack(rows)


@needs_cpp
@pytest.mark.parametrize("B,Hq,Hkv,T,padding,packed,groups", [
    (1, 6, 2, 600, "left", False, 2), (2, 4, 1, 600, "right", False, 3), (4, 6, 2, 600, "left", False, 2),
    (2, 2, 2, 300, "right", False, 1), (1, 8, 1, 1999, "left", False, 16), (2, 8, 2, 777, "none", True, 4)])
def test_outputs_and_grads_are_bitwise_identical_at_1_2_4_and_7_threads(B, Hq, Hkv, T, padding, packed, groups):
    """Every output row is written by one task, and the decomposition (query groups, the order of each task's
    units, the order of the final dK, dV sum) depends on the shape only, so the thread count changes nothing, not
    even the last bit (issues 27, 33). GQA, padding, packed segments, odd T and the mass gradient included, with
    1 to 16 query groups. torch.set_num_threads governs the kernel's at::parallel_for (one OpenMP runtime,
    test_kernel_work_runs_on_every_torch_thread)."""
    assert _query_groups(B, Hq, Hkv, T) == groups
    q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, 32, torch.float32, padding=padding, logit_scale=3.0)
    seg = _packed_segments(B, T, seed) if packed else None
    one = _outputs_and_grads(q, k, v, adj, kpm, 1, seg)
    for threads in (2, 4, 7):
        other = _outputs_and_grads(q, k, v, adj, kpm, threads, seg)
        for name, a, b in zip(["out", "mass", "dq", "dk", "dv"], one, other):
            assert torch.equal(a, b), (f"{name} at {threads} threads differs from 1 thread by "
                                       f"{(a - b).abs().max().item():.3g} (seed {seed})")


@needs_cpp
def test_the_reused_partial_buffer_carries_nothing_between_calls():
    """The partial dK, dV memory is kept between calls (Workspace in attention_cpu.cpp) and zeroed lazily, tile by
    tile: a backward after one on other data (and another shape) gives the same bits as before it."""
    q, k, v, adj, kpm, seed = make_case(1, 8, 1, 1000, 32, torch.float32, padding="left")
    assert _query_groups(1, 8, 1, 1000) > 1
    first = _outputs_and_grads(q, k, v, adj, kpm, 2)
    other = make_case(1, 8, 1, 1200, 32, torch.float32, logit_scale=9.0)
    _outputs_and_grads(*other[:5], 2)
    again = _outputs_and_grads(q, k, v, adj, kpm, 2)
    for name, a, b in zip(["out", "mass", "dq", "dk", "dv"], first, again):
        assert torch.equal(a, b), f"{name} changed after a call on other data (seed {seed})"


@needs_cpp
def test_few_kv_heads_get_query_groups_for_32_threads_and_the_kernel_runs_the_plan():
    """The query groups per (batch, kv head) come from the shape: about 32 tasks in all, an even number, at most
    one extra group per 1024 query rows of the GQA group (each costs a partial dK, dV and its sum), one group from
    32 (batch, kv head) pairs on. SmolLM2-135M (9 query / 3 kv heads) on one sequence: 6 groups at T = 2048 (18
    tasks), 10 at T = 8192 (30); 8 heads at T = 4096: 4 (32). The timing op runs exactly the planned tasks."""
    plan = torch.ops.causal_attn_cpp.plan
    assert plan(1, 9, 3, 2048) == (6, [9 * 32, 18, 3 * 32])  # forward, backward, sum of the partials
    assert plan(1, 9, 3, 8192) == (10, [9 * 128, 30, 3 * 128])
    assert plan(1, 8, 8, 4096) == (4, [8 * 64, 32, 8 * 64])
    assert plan(4, 32, 8, 4096) == (1, [4 * 32 * 64, 32])  # 32 pairs: one task each, nothing to sum
    assert plan(1, 4, 4, 1000) == (1, [4 * 16, 4])  # short: an extra group would cost more than it gives
    assert plan(1, 1, 1, 64) == (1, [1, 1])
    for B, Hq, Hkv, T in [(1, 9, 3, 2048), (3, 4, 1, 5000), (1, 2, 1, 777), (5, 5, 1, 3000), (2, 16, 4, 9000)]:
        groups, (fwd, bwd, *rest) = plan(B, Hq, Hkv, T)
        assert bwd == B * Hkv * groups and (groups == 1 or bwd % 2 == 0) and bwd <= max(32, B * Hkv)
        assert groups <= 1 + Hq // Hkv * T // 1024 and rest == ([B * Hkv * -(-T // 64)] if groups > 1 else [])
    for B, Hq, Hkv, T in [(1, 6, 2, 700), (4, 6, 2, 200), (1, 3, 3, 100)]:
        q, k, v, adj, kpm, seed = make_case(B, Hq, Hkv, T, 16, torch.float32, padding="right")
        _check_timed_tasks_follow_the_plan(q, k, v, adj, kpm, seed)


def _check_timed_tasks_follow_the_plan(q, k, v, adj, kpm, seed):
    """The planner drives the kernel: task_seconds (the plan's query groups) times one entry per planned task of
    each pass, and with query_groups = n it runs n groups."""
    B, Hq, T, _ = q.shape
    graph = causal_attn.CausalGraph.from_dense(adj)
    args = (q, k, v, torch.randn_like(q), torch.randn(B, Hq, T), graph.packed, kpm, None, 0.25)
    fwd, passes = torch.ops.causal_attn_cpp.task_seconds(*args)
    _, counts = torch.ops.causal_attn_cpp.plan(B, Hq, k.shape[1], T)
    assert [t.numel() for t in [fwd, *passes]] == counts, f"seed {seed}"
    assert all(bool((t >= 0).all()) for t in [fwd, *passes])
    _, forced = torch.ops.causal_attn_cpp.task_seconds(*args, 3)
    assert [t.numel() for t in forced] == [B * k.shape[1] * 3, B * k.shape[1] * -(-T // 64)]
    with pytest.raises(RuntimeError, match="query_groups must be >= 0"):
        torch.ops.causal_attn_cpp.task_seconds(*args, -1)


@needs_cpp
def test_attention_map_matches_torch_backend():
    q, k, v, adj, kpm, seed = make_case(2, 4, 2, 290, 16, torch.float32, padding="right")
    maps = {}
    for backend in ("torch", "cpp"):
        maps[backend] = torch.full((2, 290, 290), 0.5)
        with torch.no_grad():
            causal_attn.attention(q, k, v, adj, key_padding_mask=kpm, backend=backend, attn_map=maps[backend],
                                  attn_map_weight=0.25)
    assert torch.allclose(maps["cpp"], maps["torch"], atol=1e-6), f"seed {seed}"


def test_fallback_warns_once_when_the_extension_is_missing_and_no_compiler_exists(tmp_path):
    """A clean interpreter in which the prebuilt library cannot be found, nothing is cached and no compiler is
    on PATH: backend "auto" on CPU runs the PyTorch path and warns exactly once, naming the missing compiler."""
    script = textwrap.dedent(f"""
        import importlib.util, warnings
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "causal_attn._cpp_attention" else real_find_spec(name, *a)
        import torch, causal_attn
        from causal_attn.ops.attention import resolve_backend
        torch.manual_seed({fresh_seed()})
        q = torch.randn(1, 2, 9, 8)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out1, _ = causal_attn.attention(q, q, q)
            out2, _ = causal_attn.attention(q, q, q, backend="cpu")
        msgs = [str(w.message) for w in caught if "C++ CPU extension unavailable" in str(w.message)]
        assert len(msgs) == 1 and "no C++ compiler found" in msgs[0], [str(w.message) for w in caught]
        assert resolve_backend("auto", torch.device("cpu")) == "torch"
        ref, _ = causal_attn.attention(q, q, q, backend="reference")
        assert torch.allclose(out1, ref, atol=1e-5) and torch.equal(out1, out2)
        print("ok")
    """)
    env = dict(os.environ, CAUSAL_ATTN_DISABLE_CPP="0", CAUSAL_ATTN_CACHE_DIR=str(tmp_path / "cache"),
               PATH=str(tmp_path), CXX="no-such-compiler")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@needs_cpp
def test_torch_compile_sees_one_op_and_loads_the_backend_lazily():
    """In a fresh interpreter (the extension not yet loaded) torch.compile(fullgraph=True) traces
    attention(backend="auto") to one causal_attn::attention_fwd call that runs the C++ kernel."""
    script = textwrap.dedent(f"""
        import torch, causal_attn
        from causal_attn.ops.attention import BACKENDS
        torch.manual_seed({fresh_seed()})
        q, k, v = (torch.randn(2, 4, 70, 16, requires_grad=True) for _ in range(3))
        graph = causal_attn.CausalGraph.from_dense((torch.rand(2, 70, 70) < 0.2).tril())
        targets = []
        def counting_backend(gm, example_inputs):
            targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return gm.forward
        def f(q, k, v):
            out, mass = causal_attn.attention(q, k, v, graph)
            return out.square().sum() + mass.sum()
        loss = torch.compile(f, backend=counting_backend, fullgraph=True)(q, k, v)
        loss.backward()
        grads = [t.grad.clone() for t in (q, k, v)]
        assert "cpp" in BACKENDS and sum("attention_fwd" in t for t in targets) == 1, targets
        for t in (q, k, v):
            t.grad = None
        f(q, k, v).backward()
        assert all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@needs_cpp
@pytest.mark.parametrize("phase", ["forward", "backward", "map"])
def test_kernel_work_runs_on_every_torch_thread(phase):
    """With torch.set_num_threads(2) both OS threads of torch's pool do kernel work: each gains at least a
    fifth of the process's CPU time during the call (per-thread CPU time from /proc/self/task). A kernel
    whose loops run serially (built without OpenMP) leaves all of it on one thread."""
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs Linux /proc")
    script = textwrap.dedent(f"""
        import os, torch, causal_attn
        torch.set_num_threads(2)
        torch.manual_seed({fresh_seed()})
        T = 1536
        q, k, v = (torch.randn(1, 8, T, 64, requires_grad=True) for _ in range(3))
        graph = causal_attn.CausalGraph.from_dense((torch.rand(1, T, T) < 0.05).tril())

        def cpu_ticks():
            ticks = {{}}
            for tid in os.listdir("/proc/self/task"):
                try:
                    fields = open(f"/proc/self/task/{{tid}}/stat").read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
            return ticks

        def work():
            if "{phase}" == "forward":
                with torch.no_grad():
                    causal_attn.attention(q, k, v, graph, backend="cpp")
            elif "{phase}" == "map":
                with torch.no_grad():
                    causal_attn.attention(q, k, v, graph, backend="cpp", attn_map=torch.zeros(1, T, T))
            else:
                out.backward(gout, retain_graph=True)

        out, mass = causal_attn.attention(q, k, v, graph, backend="cpp")
        out = out + mass[..., None]
        gout = torch.randn_like(out)
        work()  # warm-up: thread pool started
        before = cpu_ticks()
        for _ in range(40):  # until about 0.4 s of CPU time (ticks are 10 ms) is measured
            work()
            after = cpu_ticks()
            gained = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
            total = sum(gained)
            if total >= 40:
                break
        assert total >= 20, f"too little work measured: {{gained}} ticks"
        assert gained[1] >= 0.2 * total, f"one thread did the work: CPU ticks per thread {{gained}}"
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-500:] + res.stderr[-2000:]


def test_a_prebuilt_library_of_another_torch_is_passed_over_for_the_first_use_build(tmp_path):
    """The prebuilt library carries the torch version it was compiled against; one built against another torch
    is not loaded (loading it could crash) and the library is built for this torch instead."""
    fake = tmp_path / "_cpp_attention.so"
    fake.write_bytes(b"\0ELF..." + cpp_build.MARKER + b"1.0.0;" + b"\0" * 64)
    assert cpp_build.built_with_torch(fake) == "1.0.0"
    script = textwrap.dedent(f"""
        import importlib.machinery, importlib.util
        real_find_spec = importlib.util.find_spec
        def find_spec(name, *a):
            if name == "causal_attn._cpp_attention":
                return importlib.machinery.ModuleSpec(name, None, origin={str(fake)!r})
            return real_find_spec(name, *a)
        importlib.util.find_spec = find_spec
        import torch, causal_attn
        from causal_attn.ops.attention import resolve_backend
        assert resolve_backend("cpu", torch.device("cpu")) == "cpp"
        from causal_attn.ops import cpp_backend
        assert "built against torch 1.0.0" in cpp_backend.PREBUILT_SKIPPED, cpp_backend.PREBUILT_SKIPPED
        assert cpp_backend.LIBRARY_PATH.name == "{cpp_build.JIT_NAME}.so", cpp_backend.LIBRARY_PATH
        q = torch.randn(1, 2, 40, 8)
        a = (torch.rand(1, 40, 40) < 0.3).tril()
        out, mass = causal_attn.attention(q, q, q, a, backend="cpu")
        ref, ref_mass = causal_attn.attention(q, q, q, a, backend="torch")
        # what is checked here is which library ran; the numerics have their oracle tests (two fp32 summation
        # orders: 1e-5 failed once in a fresh-clone CI run)
        err = max((out - ref).abs().max().item(), (mass - ref_mass).abs().max().item())
        assert err < 1e-4, err
        print("ok")
    """)
    env = dict(os.environ, CAUSAL_ATTN_DISABLE_CPP="0")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@needs_cpp
def test_the_loaded_library_was_built_against_the_running_torch():
    from causal_attn.ops import cpp_backend

    assert cpp_build.built_with_torch(cpp_backend.LIBRARY_PATH) == cpp_build.torch_release(torch.__version__)
    if os.path.exists("/proc/self/maps"):  # one OpenMP runtime, torch's: a second would ignore set_num_threads
        gomp = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
        assert len(gomp) <= 1, gomp


@pytest.mark.skipif(cpp_build.compiler() is None or not sys.platform.startswith("linux"),
                    reason="needs the C++ compiler the first-use build uses")
def test_row_kernels_vectorise_without_avx512(tmp_path):
    """With the project's flags GCC vectorises every row loop for AVX2 too: with trapping math (GCC's default)
    the clamps in fast_exp stayed branches and the AVX2 / SSE2 exp loop ran scalar (measured: the forward
    spent as long in exp as in sgemm on an AVX2-only CPU)."""
    src = tmp_path / "row_ops_probe.cpp"
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "row_ops.h")
    src.write_text(f'#include "{csrc}"\n')
    res = subprocess.run([cpp_build.compiler(), "-std=c++17", *cpp_build.compile_args(), "-march=x86-64-v3",
                          "-fopt-info-vec-missed", "-c", str(src), "-o", str(tmp_path / "probe.o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    scalar = sorted({line.split(": missed")[0] for line in res.stderr.splitlines()
                     if "row_ops.h" in line and "control flow in loop" in line})
    assert scalar == [], f"row loops left scalar by control flow: {scalar}"
