"""The offline real tokenizers reproduce the SPEC §8 check values (skip when the package is missing)."""
from __future__ import annotations

import unicodedata

import pytest

from causal_attn.data.tokenizers import (QWEN2_SPECIAL_TOKENS, TokenizerUnavailable, llama3_tokenizer,
                                         load_tokenizer, qwen2_tokenizer)


def _get(fn):
    try:
        return fn()
    except TokenizerUnavailable as e:
        pytest.skip(str(e))


def test_qwen2_check_values():
    tok = _get(qwen2_tokenizer)
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok("Hello, world!")["input_ids"] == [9707, 11, 1879, 0]
    assert len(tok) == 151_665
    assert tok.convert_tokens_to_ids(QWEN2_SPECIAL_TOKENS) == list(range(151_643, 151_665))
    assert tok.eos_token_id == 151_643
    # special tokens stay whole, digits are single tokens, NFC normalises decomposed accents
    assert tok("<|im_start|>user")["input_ids"][0] == 151_644
    assert tok("2024")["input_ids"] == [tok.convert_tokens_to_ids(d) for d in "2024"]
    assert tok(unicodedata.normalize("NFD", "café"))["input_ids"] == tok("café")["input_ids"]
    assert load_tokenizer("qwen2") is tok  # cached per process
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_llama3_check_values():
    tok = _get(llama3_tokenizer)
    enc = tok("Hello world", return_offsets_mapping=True)
    assert enc["input_ids"] == [128000, 9906, 1917]
    assert enc["offset_mapping"][0] == (0, 0)
    assert load_tokenizer("llama3") is tok
