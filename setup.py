"""Packaging: `causal_attn/` plus `kernels/` installed as `causal_attn.kernels`.

`kernels` is never installed as a top-level package (another PyPI project owns that name).
"""
from setuptools import setup

packages = ["causal_attn", "causal_attn.data", "causal_attn.kernels"]
package_dir = {"causal_attn": "causal_attn", "causal_attn.kernels": "kernels"}

setup(packages=packages, package_dir=package_dir, include_package_data=True)
