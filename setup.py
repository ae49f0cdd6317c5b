"""Packaging: `causal_attn/` plus three top-level folders installed inside it:

    kernels/     -> causal_attn.kernels     (Triton kernels; never a top-level `kernels`, a name another PyPI
                                              project owns, and no __init__.py: see causal_attn/utils/layout.py)
    csrc/        -> causal_attn/csrc        (C++ sources, for the first-use build when nothing was prebuilt)
    benchmarks/  -> causal_attn.benchmarks  (a package: `causal-attn bench` runs from an installed package)

The fused C++ CPU kernel is prebuilt as `causal_attn._cpp_attention` when torch is importable here (a build
without isolation, as the Makefile does). Otherwise, or when the build fails, the package installs without it
and causal_attn/ops/cpp_build.py compiles the same sources with the same flags on first use.
"""
import runpy
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
cpp_build = runpy.run_path(str(HERE / "causal_attn" / "ops" / "cpp_build.py"))

packages = ["causal_attn", "causal_attn.ops", "causal_attn.hf", "causal_attn.cli", "causal_attn.utils", "causal_attn.data",
            "causal_attn.data.capt", "causal_attn.demo", "causal_attn.testing", "causal_attn.kernels",
            "causal_attn.csrc", "causal_attn.benchmarks"]
package_dir = {"causal_attn": "causal_attn", "causal_attn.kernels": "kernels", "causal_attn.csrc": "csrc",
               "causal_attn.benchmarks": "benchmarks"}
package_data = {"causal_attn.csrc": ["*.cpp", "*.h", "README.md"]}


def cpp_extension():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing (e.g. isolated build): compiled on first use instead
        print(f"causal_attn: not prebuilding the C++ kernel ({type(e).__name__}: {e}); it is compiled on first use")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:
                print(f"causal_attn: C++ kernel prebuild failed ({e}); it is compiled on first use instead")

    ext = CppExtension("causal_attn._cpp_attention", [f"csrc/{s}" for s in cpp_build["SOURCES"]],
                       extra_compile_args=cpp_build["compile_args"](), extra_link_args=cpp_build["link_args"]())
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = cpp_extension()
setup(packages=packages, package_dir=package_dir, package_data=package_data, include_package_data=True,
      ext_modules=ext_modules, cmdclass=cmdclass)
