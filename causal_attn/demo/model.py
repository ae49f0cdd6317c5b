"""The demo's tokenizer and model: a word-level tokenizer trained on the corpus, a tiny random Llama.

The tokenizer splits on whitespace and punctuation (``tokenizers`` WordLevel), so every label word
("High", "Risk"), every variable name word and every number ("12") is one token; optional ``phrases``
(the demo passes the instruction sentence and the two-word names) stay whole, and character offsets
are exact — what the adjacency builder needs. It is wrapped as a ``PreTrainedTokenizerFast`` so the rest of
the project (and ``save_pretrained`` / ``AutoTokenizer``) treats it like any Hugging Face tokenizer.
"""
from __future__ import annotations

from typing import Iterable, Sequence

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"


def build_word_tokenizer(texts: Iterable[str], phrases: Sequence[str] = ()):
    """A fast word-level tokenizer whose vocabulary is every word / number / punctuation mark in ``texts``.

    Each string in ``phrases`` (e.g. a fixed instruction sentence, a two-word variable name) is kept whole
    as one token wherever it occurs; everything else splits on whitespace and punctuation."""
    import re

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    if phrases:  # the pattern matches the tokens; the whitespace between them is dropped
        pattern = "|".join([re.escape(p) for p in sorted(phrases, key=len, reverse=True)] + [r"\w+", r"[^\w\s]"])
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=[PAD, UNK, EOS]))
    # decoding joins words with spaces; "High Risk" round-trips, which is all the scorer needs
    from tokenizers import decoders
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=EOS,
                                   padding_side="left")


def tiny_llama(tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 256,
               max_positions: int = 256, init_std: float = 0.02, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` sized for CPU training in seconds; ``init_std`` is the
    standard deviation of its normal initialisation (``initializer_range``, Hugging Face's default 0.02)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True,
                         initializer_range=init_std)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
