"""Compile the Triton kernels ahead of time for A100 (sm_80) and H100 (sm_90) without a GPU and report
their resources: one CSV row per compiled kernel with

    kernel,arch,config,regs,shared,spills,tensor_core_instructions

``kernel`` is the kernel name plus ``+mass`` when the adjacency path is compiled in; ``config`` is
``D<head dim>/M<BLOCK_M>-N<BLOCK_N>-w<warps>-s<stages>``; ``regs`` registers per thread, ``spills``
local-memory bytes per thread (``LOCAL + STACK`` in ``cuobjdump --dump-resource-usage``: current ptxas
puts register spills in the stack frame, the ``STL``/``LDL`` of the SASS, and reports ``LOCAL:0``; the
same number as ptxas -v's "bytes stack frame"), ``shared`` bytes per block (Triton's dynamic shared memory plus the static ``SHARED`` of the cubin);
``tensor_core_instructions`` counts ``HMMA`` / ``HGMMA`` lines in the SASS.

Arguments are specialised the way the runtime does for realistic shapes (T a multiple of 512, head
dims 64/128): pointers and strides divisible by 16, unit head-dim strides as constants, key padding on.

    python -m benchmarks.kernel_resources --out kernel_resources.csv
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from causal_attn.kernels import flash_mass as fm

ARCHS = {"sm_80": 80, "sm_90": 90}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # opt-in max shared memory per block
FIELDS = ["kernel", "arch", "config", "regs", "shared", "spills", "tensor_core_instructions"]
# pointer arguments: None = the input dtype (q, k, v, O and their gradients)
POINTER_TYPES = {"Q": None, "K": None, "V": None, "Out": None, "DO": None, "DQ": None, "DK": None, "DV": None,
                 "Lse": "*fp32", "Mass": "*fp32", "Delta": "*fp32", "Gm": "*fp32", "Map": "*fp32",
                 "Adj": "*i32", "Kpm": "*i8", "Seg": "*i32", "SegEnd": "*i32"}
FLOAT_ARGS = {"qk_scale", "scale", "weight"}
UNIT_STRIDES = {"sqd", "skd", "svd", "sod", "sdd", "smc"}
UNALIGNED_INTS = {"Hq", "G", "n_words"}
KERNEL_NAMES = (*fm.KERNELS, "preprocess")
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def kernel_jobs(head_dims, archs, configs="all", mass_variants=(True, False), kernels=KERNEL_NAMES, dtype="fp16",
                packed_variants=(False,)):
    """Yield (JITFunction, arch, KernelConfig or None, head dim, mass flag, packed-segments flag)."""
    for arch in archs:
        gen = ARCHS[arch]
        for d in head_dims:
            for name, fn in fm.KERNELS.items():
                if name not in kernels:
                    continue
                cfgs = fm.FP32_CONFIGS[name] if dtype == "fp32" else fm.GPU_CONFIGS[gen][fm.head_dim_class(d)][name]
                for cfg in (cfgs if configs == "all" else cfgs[:1]):
                    for mass in mass_variants:
                        for packed in packed_variants:
                            yield fn, arch, cfg, d, mass, packed
            if "preprocess" in kernels:
                yield fm._attn_bwd_preprocess, arch, None, d, True, False


def build_source(fn, io_dtype: str, constexprs: dict) -> ASTSource:
    """ASTSource with a signature and divisibility attributes derived from the parameter names."""
    signature, constants, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr or name in UNIT_STRIDES:
            signature[name] = "constexpr"
            constants[name] = 1 if name in UNIT_STRIDES else constexprs[name]
        elif name in POINTER_TYPES:
            signature[name] = POINTER_TYPES[name] or io_dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in UNALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constants, attrs)


def resource_usage(cubin: bytes) -> dict:
    """regs / static shared / local bytes (cuobjdump) and the tensor-core instruction count (SASS)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", usage))
    mma = sum(1 for line in sass.splitlines() if re.search(r"\bH(G)?MMA\b", line))
    # ptxas puts register spills in the stack frame (STACK, with STL/LDL in the SASS); LOCAL counts .local data
    return {"regs": int(fields["REG"]), "static_shared": int(fields["SHARED"]),
            "spills": int(fields["LOCAL"]) + int(fields["STACK"]),
            "tensor_core_instructions": mma}


def compile_one(fn, arch, cfg, head_dim, mass, packed=False, dtype="fp16") -> dict:
    block_m = cfg.block_m if cfg else fm.PREPROCESS_BLOCK_M
    constexprs = {"HEAD_D": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "BLOCK_M": block_m,
                  "BLOCK_N": cfg.block_n if cfg else 0, "HAS_ADJ": mass, "HAS_KPM": True, "HAS_SEG": packed,
                  "PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    options = {"num_warps": cfg.num_warps if cfg else 4, "num_stages": cfg.num_stages if cfg else 1}
    compiled = triton.compile(build_source(fn, "*" + dtype, constexprs), target=GPUTarget("cuda", ARCHS[arch], 32),
                              options=options)
    use = resource_usage(compiled.asm["cubin"])
    config = f"D{head_dim}/" + (cfg.name if cfg else f"M{block_m}-w4")
    name = fn.__name__.lstrip("_") + ("+mass" if mass else "") + ("+seg" if packed else "")
    return {"kernel": name, "arch": arch, "config": config,
            "regs": use["regs"], "shared": compiled.metadata.shared + use["static_shared"], "spills": use["spills"],
            "tensor_core_instructions": use["tensor_core_instructions"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="CSV file to write")
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--configs", choices=["all", "first"], default="all",
                    help="every autotune config, or only the first of each kernel (quick check)")
    ap.add_argument("--mass", choices=["both", "on", "off"], default="both")
    ap.add_argument("--packed", choices=["both", "on", "off"], default="off",
                    help="packed-sequence variants (HAS_SEG: segment masks and key-range skipping)")
    ap.add_argument("--kernels", nargs="+", default=list(KERNEL_NAMES), choices=list(KERNEL_NAMES))
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16",
                    help="fp32 compiles the FP32_CONFIGS with exact (ieee) dot products")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler")
    variants = {"both": (True, False), "on": (True,), "off": (False,)}[args.mass]
    rows = []
    packed = {"both": (False, True), "on": (True,), "off": (False,)}[args.packed]
    for job in kernel_jobs(args.head_dims, args.arch, args.configs, variants, args.kernels, args.dtype, packed):
        t0 = time.time()
        row = compile_one(*job, dtype=args.dtype)
        rows.append(row)
        print(",".join(str(row[f]) for f in FIELDS), f"({time.time() - t0:.1f}s)", flush=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    over = [r for r in rows if r["spills"] or r["shared"] > SHARED_LIMIT[r["arch"]]]
    print(f"wrote {len(rows)} rows to {args.out}; {len(over)} with spills or shared memory over the limit")


if __name__ == "__main__":
    main()
