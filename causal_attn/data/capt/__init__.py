"""CAPT: causality-aware post-training by symbolic intervention on events (SPEC section 6).

Pipeline
--------
1. **Event estimation** (:func:`estimate_events`): an assistant LLM rewrites each sample, replacing
   every event / entity by ``{symbol_1}``, ``{symbol_2}``, ... and returns the mapping symbol ->
   replaced phrase (for binary-event tasks such as CLadder also a ``set`` / ``unset`` description).
   Answers are validated (:func:`validate_estimation`) and re-asked a bounded number of times through
   :func:`causal_attn.data.llm.run_jobs`, which also writes every result to the resumable cache.
2. **Intervention** (:func:`symbolize`, :func:`symbolize_sample`): placeholders become fresh distinct
   letters (``random``), ``A, B, C`` by symbol number (``order``, the paper's ablation), the estimated
   phrases (``original``) or stay as they are (``symbol``). One assignment serves every field of a
   sample (prompt and target / reasoning alike). :func:`replicate` makes ``k`` copies of a training
   set, each with new letters.
3. **Data**: loaders for the CLadder (Yes/No) and PrOntoQA (True/False) record formats, their
   commonsense / anti-commonsense / non-sense variants, the answer parser and accuracy per variant.
4. **CAT composition**: a causal annotation (``important``: ``[{key_span: [value_span, ...]}]`` over
   ``input + target``) is re-located through the substitution by character offsets, so the sample
   still feeds :func:`causal_attn.data.annotations_to_graph` (:func:`capt_graph`).

Symbol names beyond 26 (documented extension): a sample with ``n > 26`` placeholders gets all 26
single letters plus ``n - 26`` distinct two-letter names ``AA .. ZZ`` (then three letters, ...),
drawn uniformly within each length and shuffled over the placeholders. ``order`` mode continues
``Z, AA, AB, ...`` (bijective base 26).
"""

# One module per concern (estimation, intervention, datasets; deduction is the demo's generated task; the
# `causal-attn capt` command is causal_attn/cli/capt.py); every public name (and the private ones the tests use)
# is re-exported here.
from .datasets import *  # noqa: F401,F403
from .datasets import _TAG, _read_rows, _variant_from_path  # noqa: F401
from .estimation import *  # noqa: F401,F403
from .estimation import _DEMOS, _reason_kind, _word_pattern  # noqa: F401
from .intervention import *  # noqa: F401,F403
from .intervention import _BAD_PLACEHOLDER, _OffsetMap, _occurrences, _rng  # noqa: F401
