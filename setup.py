"""Packaging: `causal_attn/` plus `kernels/` installed as `causal_attn.kernels`.

`kernels` is never installed as a top-level package (another PyPI project owns that name).
"""
from setuptools import setup

packages = ["causal_attn", "causal_attn.data", "causal_attn.kernels"]
package_dir = {"causal_attn": "causal_attn", "causal_attn.kernels": "kernels"}



def cpp_extension():
    """The fused C++ CPU kernel in csrc/ (issue 9) as `causal_attn._cpp_attention`.

    Optional: without torch at build time or without a working compiler the package installs anyway and
    `causal_attn.attention` falls back to the PyTorch CPU path with a one-time warning.
    """
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch missing (e.g. isolated build): pure-Python install
        print(f"causal_attn: not building the C++ kernel ({type(e).__name__}: {e})")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as e:
                print(f"causal_attn: C++ kernel build failed, using the PyTorch CPU path ({e})")

    ext = CppExtension("causal_attn._cpp_attention", ["csrc/attention_cpu.cpp"],
                       extra_compile_args=["-O3", "-fopenmp-simd"])  # no -march: row_ops.h dispatches at load
    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = cpp_extension()
setup(packages=packages, package_dir=package_dir, include_package_data=True, ext_modules=ext_modules,
      cmdclass=cmdclass)
