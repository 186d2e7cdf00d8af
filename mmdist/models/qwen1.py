"""Qwen1 (model_type ``qwen``, e.g. Qwen/Qwen-14B) loaded natively as transformers' Qwen2, without remote code.

Qwen1's repository code does not run on the pinned stack (its tokenizer fails in
``PreTrainedTokenizer.__init__``, its modeling code needs
``transformers_stream_generator``), and even where it runs it gets none of what
mmdist needs (ZeRO-3 partitioned loading, SDPA, packing, a placeholder token).
Its architecture is exactly the one transformers ships as ``Qwen2ForCausalLM``
(RMSNorm, rotary on the full head, SwiGLU, bias on q/k/v only, untied head), so
this module maps the three Qwen1 artefacts onto it:

* the config (both spellings Qwen1 releases use) -> ``Qwen2Config``
  (:func:`qwen2_config_from_qwen1`);
* the weights, renamed and split *as they stream in* by transformers' own
  load-time conversion (``WeightRenaming``/``WeightConverter`` + ``Chunk``) inside
  ``Qwen2ForCausalLM.from_pretrained`` (:func:`load_qwen1_llm`). That path composes
  with DeepSpeed ZeRO-3: under an ``HfDeepSpeedConfig``, ``from_pretrained``
  builds the model inside ``zero.Init`` and ``_load_state_dict_into_zero3_model``
  applies the same conversion list (``_apply_weight_conversions_to_state_dict``)
  before copying each module's tensors into its gathered, then re-partitioned
  parameters; only rank 0 reads values (safetensors memory-mapped), the others
  read shapes on the meta device. So no hand-written loader is needed;
* ``qwen.tiktoken`` -> a fast tokenizer with Qwen1's split pattern, NFC
  normalisation, byte-level BPE by rank and the 208 special tokens
  (:func:`load_qwen1_tokenizer`), cached under ``~/.cache/mmdist`` by file hash
  because deriving the merges from 151k ranks takes seconds.

Beyond the checkpoint's ``seq_length`` Qwen1 switches on dynamic NTK rotary
scaling and log-n attention scaling at inference, which plain rotary does not
reproduce; :func:`qwen1_max_len_problem` refuses such lengths.

It imports torch/transformers inside functions, so that reading a config stays
fast; what config validation needs (detection, the max_len limit) is
mmdist/config/qwen1.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

from mmdist import console

# Detection and the max_len limit live with config validation, which needs them without torch; re-exported here.
from mmdist.config.qwen1 import (  # noqa: F401
    QWEN1_KNOWN_CONFIGS,
    QWEN1_MODEL_TYPE,
    checkpoint_file,
    first_of,
    is_qwen1_checkpoint,
    known_qwen1_config,
    qwen1_max_len_problem,
    qwen1_max_positions,
    read_qwen1_config,
)

logger = logging.getLogger(__name__)

# Qwen1's tokenizer (tokenization_qwen.py): split pattern, special tokens and their ids.
QWEN1_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
QWEN1_SPECIAL_START = 151643
QWEN1_SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
# The image placeholder: a reserved token whose embedding row already exists, so the vocabulary never grows.
QWEN1_IMAGE_TOKEN = "<|extra_0|>"
TIKTOKEN_FILE = "qwen.tiktoken"

# ChatML, as Qwen-Chat's make_context writes it (a system turn first; "You are a helpful assistant." by default).
QWEN1_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TOKENIZER_CACHE_ENV = "MMDIST_CACHE"


# ---------------------------------------------------------------------------
# detection and config


def qwen2_config_fields(raw: dict, where: str = "config.json") -> dict:
    """Qwen2Config keyword arguments for a Qwen1 config dict (early or later spelling).

    Qwen1's ``intermediate_size``/``ffn_hidden_size`` counts both halves of the
    SwiGLU (w1 and w2 each have half of it), Qwen2's counts one.
    """
    hidden = int(first_of(raw, ("hidden_size", "n_embd"), where))
    heads = int(first_of(raw, ("num_attention_heads", "n_head"), where))
    layers = int(first_of(raw, ("num_hidden_layers", "n_layer"), where))
    ffn = int(first_of(raw, ("intermediate_size", "ffn_hidden_size"), where))
    vocab = int(first_of(raw, ("padded_vocab_size", "vocab_size"), where))
    seq_length = int(first_of(raw, ("seq_length", "max_position_embeddings", "n_positions"), where))
    problems = []
    if hidden % heads:
        problems.append(f"hidden size {hidden} is not divisible by {heads} heads")
    if ffn % 2:
        problems.append(f"intermediate size {ffn} is odd (Qwen1 splits it between w1 and w2)")
    kv_channels = raw.get("kv_channels")
    if kv_channels is not None and heads and int(kv_channels) * heads != hidden:
        problems.append(f"kv_channels={kv_channels} is not hidden/heads={hidden // max(heads, 1)}")
    if float(raw.get("rotary_pct", 1.0)) != 1.0:
        problems.append(f"rotary_pct={raw['rotary_pct']} (Qwen2 rotates the whole head; only 1.0 maps)")
    if raw.get("no_bias") is False:
        problems.append("no_bias=false (c_proj and the MLP would have biases; Qwen2 has none there)")
    if raw.get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=true (Qwen1 releases have an untied lm_head)")
    if problems:
        raise ValueError(f"{where}: this Qwen1 config cannot be mapped onto Qwen2: " + "; ".join(problems))
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn // 2,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": seq_length,
        "rms_norm_eps": float(raw.get("layer_norm_epsilon", 1e-6)),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(raw.get("rotary_emb_base", 10000.0))},
        "initializer_range": float(raw.get("initializer_range", 0.02)),
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        # No pad id: the embedding then has no padding_idx row for _init_weights to zero (a partitioned
        # embedding under ZeRO-3 cannot be indexed).
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": QWEN1_SPECIAL_START,
    }


def qwen2_config_from_qwen1(raw: dict, where: str = "config.json") -> Any:
    """A transformers ``Qwen2Config`` equivalent to the Qwen1 config dict ``raw``."""
    from transformers import Qwen2Config

    return Qwen2Config(**qwen2_config_fields(raw, where))


# ---------------------------------------------------------------------------
# weights


def qwen1_weight_conversions() -> list:
    """transformers load-time transforms from Qwen1 key names to Qwen2's.

    Renamings chain (all that match fire), then at most one converter: the fused
    ``c_attn`` (q, k, v stacked on dim 0, weight and bias) is chunked in three.
    """
    from transformers.core_model_loading import Chunk, WeightConverter, WeightRenaming

    renames = [
        (r"^transformer\.wte\.", "model.embed_tokens."),
        (r"^transformer\.ln_f\.", "model.norm."),
        (r"^transformer\.h\.", "model.layers."),
        (r"\.ln_1\.", ".input_layernorm."),
        (r"\.ln_2\.", ".post_attention_layernorm."),
        (r"\.attn\.c_proj\.", ".self_attn.o_proj."),
        (r"\.mlp\.w1\.", ".mlp.up_proj."),  # w1 is the linear half of the SwiGLU
        (r"\.mlp\.w2\.", ".mlp.gate_proj."),  # SiLU is applied to w2's output
        (r"\.mlp\.c_proj\.", ".mlp.down_proj."),
    ]
    transforms: list = [WeightRenaming(source_patterns=src, target_patterns=dst) for src, dst in renames]
    for kind in ("weight", "bias"):
        transforms.append(
            WeightConverter(
                source_patterns=rf"attn.c_attn.{kind}",
                target_patterns=[f"self_attn.{p}_proj.{kind}" for p in "qkv"],
                operations=[Chunk(dim=0)],
            )
        )
    return transforms


@contextlib.contextmanager
def _conversions_for(class_name: str, transforms: list) -> Iterator[None]:
    """Register ``transforms`` for ``class_name`` only while this block runs.

    ``from_pretrained`` takes renamings (``key_mapping``) but no converters; a
    conversion list reaches it only through transformers' registry, which is
    global. Registered for good it would also apply to every other Qwen2 model of
    the process, and revert *their* keys to Qwen1 names on ``save_pretrained``.
    """
    from transformers import conversion_mapping

    conversion_mapping.register_checkpoint_conversion_mapping(class_name, transforms, overwrite=True)
    cache = conversion_mapping._checkpoint_conversion_mapping_cache
    try:
        yield
    finally:
        cache.pop(class_name, None)
        conversion_mapping.USER_REGISTERED_MAPPINGS.discard(class_name)


def load_qwen1_llm(name_or_path: str, dtype: Any = None, attn_implementation: str = "sdpa") -> Any:
    """A Qwen1 checkpoint (folder or hub id) as ``Qwen2ForCausalLM``, renamed/split as its shards stream in.

    Works for sharded ``.safetensors`` and ``.bin`` checkpoints with their index
    file, and under ZeRO-3 (an ``HfDeepSpeedConfig`` alive): see the module docstring.
    """
    from transformers import Qwen2ForCausalLM

    raw = read_qwen1_config(name_or_path)
    if raw is None:
        raise ValueError(f"{name_or_path}: not a Qwen1 checkpoint (config.json lacks model_type 'qwen')")
    config = qwen2_config_from_qwen1(raw, where=f"{name_or_path}/config.json")
    with _conversions_for(Qwen2ForCausalLM.__name__, qwen1_weight_conversions()), console.quiet_loading():
        model, info = Qwen2ForCausalLM.from_pretrained(
            name_or_path, config=config, dtype=dtype, attn_implementation=attn_implementation,
            output_loading_info=True,
        )
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(
            f"{name_or_path}: the Qwen1 checkpoint does not map onto Qwen2 cleanly: "
            f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    # Saved, the model is a plain Qwen2 checkpoint: do not revert the keys to Qwen1 names next to a Qwen2 config.json.
    model._weight_conversions = []
    model.config.qwen1_source = True
    logger.info(
        console.model_summary(
            "LLM",
            model,
            f"{name_or_path} (Qwen1 checkpoint read as Qwen2)",
            info.get("unexpected_keys", []),
            "rotary inverse frequencies: Qwen2 recomputes them",
        )
    )
    return model


# ---------------------------------------------------------------------------
# tokenizer


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """``base64(token) rank`` lines of a ``.tiktoken`` file as {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: expected 'base64(token) rank', got {line[:60]!r}") from exc
    return ranks


def _tokenizer_cache_dir() -> Path:
    root = os.environ.get(TOKENIZER_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mmdist")
    return Path(root) / "qwen1-tokenizer"


def _build_backend(tiktoken_path: str) -> Any:
    """The ``tokenizers.Tokenizer`` of a qwen.tiktoken file (no cache)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = read_tiktoken_ranks(tiktoken_path)
    if len(set(ranks.values())) != len(ranks) or max(ranks.values()) != len(ranks) - 1:
        raise ValueError(f"{tiktoken_path}: ranks are not 0..{len(ranks) - 1} without gaps")
    if len(ranks) != QWEN1_SPECIAL_START:
        raise ValueError(
            f"{tiktoken_path}: {len(ranks)} ranks, Qwen1 has {QWEN1_SPECIAL_START} (special tokens start there)"
        )

    class _RanksConverter(TikTokenConverter):
        # TikTokenConverter derives the merges from the ranks (each pair that forms a token, ordered by that
        # token's rank) and sets ignore_merges, as tiktoken looks up whole pieces first; it only reads the file
        # through the tiktoken package, which is not a runtime dependency.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    backend = _RanksConverter(vocab_file=tiktoken_path, pattern=QWEN1_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # Qwen1's tokenize() NFC-normalises its input
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN1_SPECIAL_TOKENS])
    for offset, token in enumerate(QWEN1_SPECIAL_TOKENS):
        got = backend.token_to_id(token)
        if got != QWEN1_SPECIAL_START + offset:
            raise ValueError(
                f"{tiktoken_path}: special token {token} got id {got}, expected {QWEN1_SPECIAL_START + offset}"
            )
    return backend


def qwen1_tokenizer_backend(tiktoken_path: str) -> Any:
    """The ``tokenizers.Tokenizer`` of a qwen.tiktoken file,
    cached by the file's SHA-256 (never beside the checkpoint)."""
    from tokenizers import Tokenizer

    digest = hashlib.sha256(Path(tiktoken_path).read_bytes()).hexdigest()[:32]
    cached = _tokenizer_cache_dir() / f"{digest}.json"
    if cached.is_file():
        try:
            return Tokenizer.from_file(str(cached))
        except Exception:  # a torn or foreign file: rebuild it
            pass
    backend = _build_backend(tiktoken_path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        backend.save(str(tmp))
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return backend


def _is_chat_checkpoint(name_or_path: str) -> bool:
    """Qwen-Chat releases say ``chat_format: chatml`` in generation_config.json (base models say 'raw')."""
    path = checkpoint_file(name_or_path, "generation_config.json")
    if path is None:
        return False
    try:
        return json.loads(Path(path).read_text()).get("chat_format") == "chatml"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def qwen1_tokenizer_from_file(tiktoken_path: str, chat: bool = False) -> Any:
    """A ``PreTrainedTokenizerFast`` for a qwen.tiktoken file with the ChatML template.

    eos is ``<|endoftext|>`` for base models (it ends documents) and ``<|im_end|>``
    for chat models (it ends turns); pad is ``<|endoftext|>``, as Qwen1 pads.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=qwen1_tokenizer_backend(tiktoken_path),
        eos_token=IM_END if chat else ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        model_max_length=int(1e30),
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN1_CHAT_TEMPLATE
    return tokenizer


def load_qwen1_tokenizer(name_or_path: str, chat: Optional[bool] = None) -> Any:
    """The fast tokenizer of a Qwen1 folder or hub id (its qwen.tiktoken), without remote code.

    ``chat`` None: a chat model when generation_config.json says ``chat_format: chatml``.
    """
    path = checkpoint_file(name_or_path, TIKTOKEN_FILE)
    if path is None:
        raise FileNotFoundError(f"{name_or_path}: a Qwen1 checkpoint needs its {TIKTOKEN_FILE} for the tokenizer")
    return qwen1_tokenizer_from_file(path, chat=_is_chat_checkpoint(name_or_path) if chat is None else chat)
