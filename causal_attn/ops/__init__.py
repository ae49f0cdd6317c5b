"""The op and its backends: ``attention`` (attention + causal mass per row, custom autograd ops), the
``CausalGraph`` it reads, the Re-Attention loss, and the torch / blocked / C++ / Flex / Triton backends.
Imports torch only: never transformers (tests/test_layout.py checks)."""
