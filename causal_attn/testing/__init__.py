"""What the tests and the benchmarks share: the independent fp64 oracle (:mod:`.oracle`), random cases and the
FlashAttention tolerance rule (:mod:`.numerics`), tiny random Hugging Face models (:mod:`.models`, which imports
transformers; the other two need torch only).

Nothing is imported here: ``import causal_attn.testing`` stays as light as ``import causal_attn``.
"""
