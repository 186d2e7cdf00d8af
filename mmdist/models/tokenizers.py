"""The built-in tiny tokenizers, built in code so the tiny recipes need no downloads.

A config names them by the special values ``mmdist:tiny-bytes`` (a byte-level
BPE with no merges, for the tiny LLM of configs/tiny_fuse.yaml) and
``mmdist:tiny-wordpiece`` (a character WordPiece, for the tiny BERT text encoder
of configs/tiny_*.yaml), so every process (data workers, other ranks) rebuilds
the identical tokenizer without shared files. ``builtin_tokenizer`` is what
the LLM and text-encoder loaders ask first.

A leaf module: it imports nothing from mmdist, and tokenizers/transformers only
when a tokenizer is built.
"""

from __future__ import annotations

import string
from typing import Any, Optional

TINY_BYTES = "mmdist:tiny-bytes"
TINY_WORDPIECE = "mmdist:tiny-wordpiece"

# ChatML, as SmolLM2/Qwen use, so chat-template code paths run on the tiny tokenizer too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_byte_tokenizer() -> Any:
    """Byte-level tokenizer: 256 byte tokens + <|im_start|>, <|im_end|>, <|pad|> (259 ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_wordpiece_tokenizer() -> Any:
    """Character WordPiece tokenizer with BERT's special tokens (lower-cased ASCII text, 87 ids)."""
    from transformers import BertTokenizer

    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(chars + ".,!?'-:;()") + ["##" + c for c in chars]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})


def builtin_tokenizer(name: str) -> Optional[Any]:
    """The tokenizer for a ``mmdist:`` name, or None if ``name`` is not one."""
    if name == TINY_BYTES:
        return tiny_byte_tokenizer()
    if name == TINY_WORDPIECE:
        return tiny_wordpiece_tokenizer()
    if name.startswith("mmdist:"):
        raise ValueError(f"unknown built-in tokenizer {name!r}; known: {TINY_BYTES}, {TINY_WORDPIECE}")
    return None
