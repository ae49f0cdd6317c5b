"""The GPU kit's time budget: what each section made the machine compile and time, and the GPU run's minutes
predicted from the dry run's counts (benchmarks/gpu_check.py writes both into summary.md and budget.csv).

Counted per section, in the dry run and on a GPU alike:

- ``triton_launches``: distinct Triton launches (``flash_mass.launch_census``: kernel, dtype, head dim, flags,
  T % 16). On a GPU each is one binary per autotune config of its GPU generation and head-dim class
  (``triton_binaries``), and autotuning times every config once per length T (``autotune_runs``);
- ``flex_graphs``: graphs dynamo compiled for ``causal_attn.ops.flex``'s four entry points (``flex.compile_counts``).
  The dry run takes the same compiled path on CPU with dynamo's "eager" backend, so these are the graphs a GPU
  compiles with Inductor (which may add guards of its own: a GPU run's own counts show that);
- ``model_graphs``: graphs ``torch.compile(model)`` handed to its backend (:func:`counting_backend`): the compiled
  training step's dynamo graphs, each one Inductor compile of forward and backward on a GPU (the dry run compiles
  them with a cheap backend, ``aot_eager``: the graph count is dynamo's, whichever backend follows);
- ``measurements``: timed cases (a GPU times each with ``do_bench`` of forward and of forward+backward, plus one
  peak-memory run) and ``oracle_cases`` (correctness checks against the fp64 oracle).

Prediction = counts, mapped from the dry plan to the GPU plan (:func:`gpu_counts`), times unit costs
(:data:`UNIT_S`). One unit is measured on every dry run: the seconds of one ahead-of-time Triton compile for sm_90
(:func:`measure_triton_compile_s`, no GPU needed; this CPU, usually slower than a GPU host's). The others are
stated assumptions, replaced by measurements on the first GPU run (the summary sets the predicted beside the
measured wall time of every section). The CUDA tests are capped, not predicted: on CPU they skip, so nothing of
theirs can be counted there.
"""
from __future__ import annotations

# seconds per counted event (assumptions, but triton_binary, which the dry run measures)
UNIT_S = {
    "triton_binary": 3.0,  # replaced by measure_triton_compile_s()
    "autotune_run": 0.15,  # do_bench's 25 ms warm-up + 100 ms of repetitions per config, plus its estimate
    "flex_call_graph": 15.0,  # one Flex call, forward and backward, Inductor (the earlier kit: ~30 s per shape
    "flex_mask_graph": 5.0,   # for both calls and both block-mask builders)
    "measurement": 0.6,  # two do_bench windows and a peak-memory run of a kernel case
    "train_measurement": 4.0,  # the same for a training step (do_bench runs >= 7 steps of up to ~0.5 s)
    "oracle_case": 0.5,  # one case against the fp64 oracle (fp64 reference on the GPU, forward and backward)
    "inductor_graph": 60.0,  # Inductor compiling one dynamo graph of a 16-layer Llama, forward and backward, on an
}                            # H100 host: 40-90 s by experience elsewhere (never measured here: no GPU, no CUDA Inductor)

_model_graphs = 0  # graphs handed to a counting_backend in this process


def model_graphs() -> int:
    """Graphs compiled through :func:`counting_backend` in this process so far."""
    return _model_graphs


def counting_backend(backend: str):
    """A ``torch.compile`` backend that counts the graphs it is handed (``model_graphs`` in :func:`snapshot`) and
    compiles each with the registered backend ``backend`` ("inductor", "aot_eager", ...)."""
    from torch._dynamo import lookup_backend

    inner = lookup_backend(backend)

    def compile_counted(gm, example_inputs):
        global _model_graphs
        _model_graphs += 1
        return inner(gm, example_inputs)

    compile_counted.__name__ = f"counted_{backend}"
    return compile_counted


def snapshot() -> dict:
    """The counters now (Triton launch census, Flex graphs); :func:`section_counts` takes two of these."""
    from causal_attn.ops import flex
    from causal_attn.kernels import flash_mass

    return {"triton": flash_mass.launch_census(), "flex": flex.compile_counts(), "model_graphs": _model_graphs}


def section_counts(before: dict, after: dict, measurements: int, oracle_cases: int, wall_s: float) -> dict:
    """What one section added: launches (new key -> its lengths; a key an earlier section launched compiles nothing
    new, its new lengths are only autotuned: ``retuned``), Flex graphs per entry point, timed cases."""
    launches, retuned = {}, {}
    for key, ts in after["triton"].items():
        new = ts - before["triton"].get(key, set())
        if new:
            (retuned if key in before["triton"] else launches)[key] = new
    flex = {name: n - before["flex"].get(name, 0) for name, n in after["flex"].items()}
    return {"launches": launches, "retuned": retuned, "flex": flex, "model_graphs": after["model_graphs"] - before["model_graphs"],
            "measurements": measurements, "oracle_cases": oracle_cases, "wall_s": wall_s}


def _configs(key: tuple, generation: int = 90) -> int:
    from causal_attn.kernels import flash_mass as fm

    kernel, dtype, _div16, head_dim = key[:4]
    if kernel not in fm.KERNELS or (len(key) > 8 and key[8]):
        return 1  # the preprocess pass, and launches inside flash_mass.pin_first_config(): one config
    if dtype == "float32":
        return len(fm.FP32_CONFIGS[kernel])
    return len(fm.GPU_CONFIGS[generation][fm.head_dim_class(head_dim)][kernel])


def gpu_counts(counts: dict, dtype_copies: dict | None = None, head_dims: int = 1, lengths: int = 1,
               oracle_scale: float = 1.0) -> dict:
    """The section's counts on an H100 (sm_90): each launch key as ``_configs`` binaries, autotuned once per length
    (autotuning is skipped for a single config). ``dtype_copies``: how many GPU dtypes a dry-run dtype stands for
    (the dry run's float16 is the GPU's bfloat16, or its float16 and bfloat16 where it checks both);
    ``head_dims`` / ``lengths``: the GPU plan's head dims and lengths per dry-run one (the kernel section runs 1 x 2
    on the GPU and in the dry run); ``oracle_scale``: GPU oracle cases per dry-run one. ``model_graphs`` (the
    compiled training step) map one to one: the dry run compiles the same models at as many lengths."""
    copies = dtype_copies or {}
    binaries = autotune = 0
    for key, ts in counts["launches"].items():
        n = _configs(key) * copies.get(key[1], 1) * head_dims
        binaries += n
        autotune += n * len(ts) * lengths if _configs(key) > 1 else 0
    for key, ts in counts.get("retuned", {}).items():  # binaries compiled by an earlier section: autotuning only
        n = _configs(key) * copies.get(key[1], 1) * head_dims
        autotune += n * len(ts) * lengths if _configs(key) > 1 else 0
    flex = counts["flex"]
    return {"triton_binaries": round(binaries), "autotune_runs": autotune,
            "flex_call_graphs": (flex.get("flex_allowed", 0) + flex.get("flex_adjacent", 0)) * head_dims,
            "flex_mask_graphs": (flex.get("mask_allowed", 0) + flex.get("mask_adjacent", 0)) * head_dims,
            "inductor_graphs": counts.get("model_graphs", 0),
            "measurements": counts["measurements"] * head_dims * lengths,
            "oracle_cases": round(counts["oracle_cases"] * oracle_scale)}


def predict_s(gpu: dict, train: bool = False) -> float:
    return (gpu["triton_binaries"] * UNIT_S["triton_binary"] + gpu["autotune_runs"] * UNIT_S["autotune_run"]
            + gpu["flex_call_graphs"] * UNIT_S["flex_call_graph"] + gpu["flex_mask_graphs"] * UNIT_S["flex_mask_graph"]
            + gpu["measurements"] * UNIT_S["train_measurement" if train else "measurement"]
            + gpu["oracle_cases"] * UNIT_S["oracle_case"] + gpu.get("inductor_graphs", 0) * UNIT_S["inductor_graph"])


def measure_triton_compile_s() -> float | None:
    """Seconds of one ahead-of-time compile (PTX and cubin for sm_90, no GPU needed) of the dQ kernel with the mass
    path at head dim 128, in a fresh cache; None where this triton cannot compile for CUDA here. Under
    TRITON_INTERPRET=1 (the dry run) kernels cannot be compiled in process: a child process without it does it."""
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = cache
        code = (f"import time; from {__package__} import kernel_resources as kr; "
                "from causal_attn.kernels import flash_mass as fm; "
                "t = time.perf_counter(); kr.compile_one(fm.KERNELS['dq'], 'sm_90', fm.GPU_CONFIGS[90][128]['dq'][0], "
                "128, True); print(time.perf_counter() - t)")
        try:
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
            return float(res.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None
