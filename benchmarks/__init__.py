"""Benchmarks of causal_attn: kernel, training-step, thread-scaling, packing, pretrained and compiled sweeps
(``runner``), the GPU evidence kit (``gpu_check``) and a few standalone measurements.

A package: installs carry it as ``causal_attn.benchmarks``, a checkout attaches this folder under the same name
(``causal_attn/utils/layout.py``), and from a checkout's root ``python -m benchmarks.<module>`` runs one module.
Nothing here is imported eagerly: ``import causal_attn`` stays light.
"""
