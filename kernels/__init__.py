"""Triton kernels, installed as ``causal_attn.kernels``."""
