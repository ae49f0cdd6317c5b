"""`causal-attn demo`: the two methods on CPU in minutes (STG part: vanilla vs CAT; CAPT part: symbolic intervention).

Subpackage layout: :mod:`.stg` (CAT on STG_E), :mod:`.capt` (CAPT on a generated deduction task),
and the shared pieces :mod:`.model` (tokenizer, tiny Llama), :mod:`.fit` (training loop, recipe),
:mod:`.decode` (batched greedy decoding) and :mod:`.figures`.
"""
from .stg import add_parser, format_table, run  # noqa: F401
