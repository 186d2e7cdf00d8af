"""Handing a trained model on, in mmdist's own format or as a Hugging Face LLaVA folder (`mmdist export`).

An mmdist export (the trainable weights + a manifest) is what resuming and the stage hand-off
read, and only mmdist can read it. vLLM and plain transformers read the llava-hf layout, so
``--format hf`` writes a folder that needs no mmdist: the vision tower, the LLM (LoRA merged),
the connector chain in Llava's ``multi_modal_projector`` and a ``LlavaProcessor`` that turns an
image and a prompt into exactly the pixels and token ids mmdist uses (docs/export.md).

Exact or refused. mmdist's image path is ``vision tower -> select layer/tokens -> stage-1 head
-> projector``; Llava's is ``vision tower -> vision_feature_layer/select_strategy -> linear_1 ->
act -> linear_2``. Adjacent Linear layers are multiplied into one (in float64), a chain with one
GELU maps onto ``linear_1 -> gelu -> linear_2`` (a hidden width below the LLM's is padded with
zero units: gelu(0) = 0), a chain without GELU becomes ``linear_1 -> identity -> linear_2 = I``.
Anything else (two nonlinearities, token pooling, the class token alone, a Q-Former, a custom
encoder) has no exact Llava form and is refused with the reason; nothing is approximated.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from mmdist.config.quantization import hf_export_problem
from mmdist.data.preprocess import resolve_template
from mmdist.export import read_export, resolve_fused_export, write_export
from mmdist.generate import prompt_ids
from mmdist.hardware import default_device
from mmdist.materialize import load_inference_model, manifest_config
from mmdist.models.vision import HF_HAS_CLS
from mmdist.precision import precision_lines
from mmdist.stages import manifest_stage

# Vision towers whose tokens are (image_size / patch_size)^2, plus one class token where they have one.
log = logging.getLogger(__name__)

PATCH_GRID_TOWERS = {"vit", "clip_vision_model", "siglip_vision_model"}

QFORMER_REASON = (
    "the Q-Former connector has no exact transformers form: Blip2ForConditionalGeneration layer-norms the query "
    "tokens before the first layer (Blip2QFormerModel.layernorm) where mmdist's Q-Former uses them as trained, it "
    "reads the last, post-layer-normed output of its own Blip2VisionModel where mmdist reads a selected layer of a "
    "CLIP/SigLIP/ViT tower through its own image_norm, and its language_projection is one Linear where mmdist's "
    "projector may be an MLP. Keep the mmdist format (--format mmdist) for Q-Former runs; see docs/export.md"
)

RESAMPLER_REASON = (
    "the resampler connector (learnable queries cross-attending to the image tokens) has no Llava form: Llava's "
    "multi_modal_projector maps every selected vision token on its own through Linear/GELU layers. Keep the mmdist "
    "format (--format mmdist) for resampler runs; see docs/models.md"
)


class ExportRefused(ValueError):
    """The model cannot be written in the requested format without changing what it computes."""


# ---------------------------------------------------------------------------
# the connector chain


@dataclass
class Linear:
    """One Linear layer of the chain: ``y = x W^T + b`` (float64 for folding), named for messages."""

    weight: torch.Tensor
    bias: torch.Tensor
    where: str

    @property
    def shape(self) -> str:
        return f"Linear({self.weight.shape[1]}->{self.weight.shape[0]})"


GELU = "GELU"


def _mlp_layers(state: dict[str, torch.Tensor], prefix: str, where: str) -> list:
    """The Linear/GELU sequence of a `mmdist.models.connectors.mlp` module stored under ``prefix``.

    ``mlp`` is a bare Linear (``prefix.weight``) or a Sequential whose even indices are Linear
    and odd ones GELU (``prefix.0.weight``, ``prefix.2.weight``, ...).
    """
    if f"{prefix}.weight" in state:
        return [Linear(state[f"{prefix}.weight"].double(), state[f"{prefix}.bias"].double(), where)]
    out: list = []
    index = 0
    while f"{prefix}.{index}.weight" in state:
        if index:
            out.append(GELU)
        out.append(Linear(state[f"{prefix}.{index}.weight"].double(), state[f"{prefix}.{index}.bias"].double(), where))
        index += 2
    if not out:
        raise ExportRefused(
            f"the export holds no weights under {prefix!r}; is it a stage-2 (fuse) export of a linear/mlp connector?"
        )
    return out


def connector_chain(state: dict[str, torch.Tensor], manifest: dict) -> list:
    """The image path after the vision tower: stage-1 image head (if any) then the projector, as Linear/GELU items."""
    connector = manifest["config"]["model"]["connector"]
    chain: list = []
    if connector["type"] == "resampler" or (connector.get("resampler") or {}).get("before_projector"):
        raise ExportRefused(RESAMPLER_REASON)
    if any(k.startswith("stage1.") for k in state):
        if connector["type"] == "qformer":
            raise ExportRefused(QFORMER_REASON)
        chain += _mlp_layers(state, "stage1.image_head", f"stage-1 {connector['type']} head")
    return chain + _mlp_layers(state, "projector.net", f"projector ({connector['projector_layers']} layer(s))")


def describe_chain(chain: list) -> str:
    """'stage-1 mlp head Linear(32->32) -> GELU -> Linear(32->32), then projector (...) Linear(32->64) ...'."""
    parts: list[str] = []
    current = None
    for item in chain:
        if isinstance(item, Linear) and item.where != current:
            parts.append(f"{', then ' if parts else ''}{item.where}: {item.shape}")
            current = item.where
        else:
            parts.append(f" -> {item.shape if isinstance(item, Linear) else item}")
    return "".join(parts)


@dataclass
class FoldedProjector:
    """Llava's multi_modal_projector: linear_1 -> act -> linear_2 (float32 tensors)."""

    linear_1: tuple[torch.Tensor, torch.Tensor]
    act: str
    linear_2: tuple[torch.Tensor, torch.Tensor]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"linear_1.weight": self.linear_1[0], "linear_1.bias": self.linear_1[1],
                "linear_2.weight": self.linear_2[0], "linear_2.bias": self.linear_2[1]}


def fold_chain(chain: list, llm_dim: int) -> FoldedProjector:
    """Fold ``chain`` into Llava's projector exactly, or raise ExportRefused naming the shapes."""
    merged: list = []
    for item in chain:  # adjacent Linear layers compose: W = W2 W1, b = W2 b1 + b2
        if isinstance(item, Linear) and merged and isinstance(merged[-1], Linear):
            first = merged.pop()
            item = Linear(item.weight @ first.weight, item.weight @ first.bias + item.bias, first.where)
        merged.append(item)
    described = describe_chain(chain)
    gelus = merged.count(GELU)
    if gelus > 1:
        raise ExportRefused(
            f"the connector chain {described} has {gelus} nonlinearities; Llava's multi_modal_projector "
            "(linear_1 -> act -> linear_2) has one, so it cannot hold this chain exactly"
        )
    f32 = torch.float32
    if gelus == 0:
        (only,) = merged
        eye = torch.eye(llm_dim, dtype=f32)
        return FoldedProjector(
            (only.weight.to(f32), only.bias.to(f32)), "linear", (eye, torch.zeros(llm_dim, dtype=f32))
        )
    first, _, second = merged
    hidden = first.weight.shape[0]
    if hidden > llm_dim:
        raise ExportRefused(f"the connector chain {described} has a hidden width of {hidden} before its GELU; Llava's "
                            f"linear_1 has the LLM's width {llm_dim}, so the {hidden} units do not fit")
    # Zero extra hidden units: gelu(0) = 0 and linear_2 reads them with zero weights, so they add nothing.
    w1 = torch.zeros(llm_dim, first.weight.shape[1], dtype=torch.float64)
    b1 = torch.zeros(llm_dim, dtype=torch.float64)
    w2 = torch.zeros(llm_dim, llm_dim, dtype=torch.float64)
    w1[:hidden], b1[:hidden], w2[:, :hidden] = first.weight, first.bias, second.weight
    return FoldedProjector((w1.to(f32), b1.to(f32)), "gelu", (w2.to(f32), second.bias.to(f32)))


# ---------------------------------------------------------------------------
# what the vision tower hands on


@dataclass
class FeatureSelection:
    """Llava's vision_feature_layer / vision_feature_select_strategy and the processor's token count facts."""

    layer: int
    strategy: str  # "default" drops the class token, "full" keeps every token
    additional_tokens: int  # tokens beyond the patch grid (the class token)
    patch_size: int


def feature_selection(manifest: dict, vision_config: Any = None) -> FeatureSelection:
    """Map select_layer/select_tokens/image_tokens of the manifest onto Llava's settings, or refuse."""

    cfg = manifest["config"]["model"]
    vision = cfg["vision"]
    section = manifest["vision"]
    if vision["source"] != "hf":
        raise ExportRefused(
            f"model.vision.source={vision['source']!r}: a custom encoder ({vision.get('custom_class')}) has no "
            "transformers class for Llava's vision_tower; only Hugging Face towers (CLIP, SigLIP, ViT) export"
        )
    image_tokens = cfg["connector"]["image_tokens"]
    if image_tokens and image_tokens != section["num_tokens"]:
        raise ExportRefused(
            f"model.connector.image_tokens={image_tokens} pools the vision tower's {section['num_tokens']} tokens "
            f"of width {section['hidden_size']} to {image_tokens}; Llava projects every selected token, "
            "so the pooling cannot be expressed"
        )
    model_type = (
        vision_config.model_type
        if vision_config is not None
        else (vision.get("init_config") or {}).get("model_type", "")
    )
    has_cls = HF_HAS_CLS.get(model_type, True)
    if vision["select_tokens"] == "cls":
        raise ExportRefused("model.vision.select_tokens=cls hands on the class token alone; Llava's "
                            "vision_feature_select_strategy is 'default' (patches) or 'full' (all tokens)")
    strategy = "default" if vision["select_tokens"] == "patch" and has_cls else "full"
    patch = (
        getattr(vision_config, "patch_size", None)
        if vision_config is not None
        else (vision.get("init_config") or {}).get("patch_size")
    )
    if vision_config is not None and model_type not in PATCH_GRID_TOWERS:
        raise ExportRefused(
            f"vision tower {model_type!r}: the LlavaProcessor counts image tokens as (size / patch_size)^2 "
            "(+ class token), which holds for CLIP, SigLIP and ViT towers only"
        )
    return FeatureSelection(int(vision["select_layer"]), strategy, 1 if has_cls else 0, int(patch or 0))


# ---------------------------------------------------------------------------
# the processor


def image_processor_of(transform: Any) -> Any:
    """A LlavaImageProcessor (PIL backend) doing what mmdist's ImageTransform
    does: pad?, resize (+ centre crop), rescale, normalise."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}[transform.resample]  # PIL.Image.Resampling values
    square = {"height": transform.size, "width": transform.size}
    crop = transform.resize == "shortest_edge"  # CLIP: shortest edge to size, then the centre square
    return LlavaImageProcessorPil(
        do_resize=True, size={"shortest_edge": transform.size} if crop else square, resample=resample,
        do_center_crop=crop, crop_size=square, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(transform.mean), image_std=list(transform.std), do_pad=transform.pad_to_square,
        do_convert_rgb=True)


def _content_as_text(image_token: str) -> str:
    """Jinja: ``content`` = the message's text, each {'type': 'image'}
    item as '<image>\\n' (as `mmdist generate` places images)."""
    return (
        "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
        "{%- else -%}{%- set parts = namespace(text='') -%}{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{%- set parts.text = parts.text + '" + image_token + "\n' -%}"
        "{%- elif item['type'] == 'text' -%}{%- set parts.text = parts.text + item['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set content = parts.text -%}{%- endif -%}"
    )


def chat_template_of(template: str, tokenizer: Any, image_token: str) -> str:
    """The processor's chat template: mmdist's rendering of a conversation (data/preprocess.py) in Jinja.

    'plain': user/system text, a newline when it holds more than image marks, the answer + EOS.
    'chat': the tokenizer's own template, after list contents are turned into text.
    """
    if template == "plain":
        return (
            "{%- for message in messages -%}"
            + _content_as_text(image_token)
            + "{%- if message['role'] == 'assistant' -%}{{ content }}{{ eos_token or '' }}"
            "{%- else -%}{{ content }}{%- if content | replace('"
            + image_token
            + "', '') | trim -%}{{ '\n' }}{%- endif -%}"
            "{%- endif -%}{%- endfor -%}"
        )
    return (
        "{%- set converted = namespace(messages=[]) -%}{%- for message in messages -%}" + _content_as_text(image_token)
        + "{%- set converted.messages = converted.messages + [{'role': message['role'], 'content': content}] -%}"
        "{%- endfor -%}{%- set messages = converted.messages -%}" + tokenizer.chat_template
    )


def _tokenizer_without_added_specials(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` that adds no BOS/EOS of its own: mmdist encodes with add_special_tokens=False."""
    tok = copy.deepcopy(tokenizer)
    probe = "a"
    if tok(probe)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"]:
        for flag in ("add_bos_token", "add_eos_token"):
            if getattr(tok, flag, False):
                setattr(tok, flag, False)
    if tok(probe)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"]:
        raise ExportRefused(
            f"the tokenizer {type(tok).__name__} adds special tokens {tok(probe)['input_ids']} to every text and "
            "they cannot be switched off; mmdist never adds them, so the processor would not reproduce its prompts"
        )
    return tok


# ---------------------------------------------------------------------------
# the Llava model


def llava_config(model: Any, selection: FeatureSelection, projector: FoldedProjector, vocab_rows: int) -> Any:
    """LlavaConfig for ``model`` (a FusedVLM) with ``vocab_rows`` LLM embedding rows."""
    from transformers import LlavaConfig

    text = model.llm.config.to_dict()
    for key in ("_attn_implementation", "_attn_implementation_internal", "attn_implementation"):
        text.pop(key, None)  # mmdist's packed attention is registered only inside mmdist
    text["vocab_size"] = vocab_rows
    text["dtype"] = str(next(model.llm.parameters()).dtype).removeprefix("torch.")
    vision = model.vision.model.config.to_dict()
    vision.pop("_attn_implementation", None)
    vision["dtype"] = str(model.vision.dtype).removeprefix("torch.")
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=int(model.image_token_id),
        image_seq_length=int(model.num_image_tokens),
        projector_hidden_act=projector.act,
        vision_feature_layer=selection.layer,
        vision_feature_select_strategy=selection.strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(model.llm.config, "tie_word_embeddings", False)),
        dtype=text["dtype"],
    )


def llava_state_dict(model: Any, projector: FoldedProjector, vocab_rows: int) -> dict[str, torch.Tensor]:
    """Weights under LlavaForConditionalGeneration's names; embedding rows beyond the LLM's are zeros."""
    out = {f"model.vision_tower.{k}": v for k, v in model.vision.model.state_dict().items()}
    out.update({f"model.multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    decoder = model.llm.get_decoder()
    out.update({f"model.language_model.{k}": v for k, v in decoder.state_dict().items()})
    head = model.llm.get_output_embeddings()
    tied = bool(getattr(model.llm.config, "tie_word_embeddings", False))
    embedding = decoder.get_input_embeddings()
    embed_key = "model.language_model." + next(n for n, m in decoder.named_modules() if m is embedding) + ".weight"
    if not tied:
        out["lm_head.weight"] = head.weight
    for key in [embed_key] + ([] if tied else ["lm_head.weight"]):
        weight = out[key]
        if weight.shape[0] < vocab_rows:
            pad = torch.zeros(vocab_rows - weight.shape[0], weight.shape[1], dtype=weight.dtype)
            out[key] = torch.cat([weight, pad], 0)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def generation_config_of(model: Any, suppressed: list[int]) -> Any:
    """The LLM's generation settings, greedy as `mmdist generate`, never choosing the added placeholder rows."""
    gen = copy.deepcopy(model.llm.generation_config)
    tok = model.processors.tokenizer
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen.do_sample = False
    gen.temperature = gen.top_p = gen.top_k = None
    if suppressed:
        gen.suppress_tokens = suppressed
    return gen


# ---------------------------------------------------------------------------
# export


def check_hf_exportable(folder: str) -> tuple[FoldedProjector, FeatureSelection, dict]:
    """Decide from the export alone (before loading any backbone) whether it has an exact Llava form.

    Returns the folded projector, the feature selection and the manifest; raises ExportRefused.
    """

    state, manifest = read_export(folder)
    stage = manifest_stage(manifest)
    if stage is None or not stage.builds("llm"):
        raise ExportRefused(
            f"{folder} is a stage-{manifest.get('stage')!r} export; --format hf needs a stage-2 (fuse) export"
        )
    tiling = manifest.get("config", {}).get("data", {}).get("image_tiling", {})
    if tiling.get("enabled"):
        raise ExportRefused(
            "data.image_tiling: this model was trained on any-resolution tiles (base image + a grid of "
            "tiles with row separators), the LLaVA-NeXT layout; llava-hf's LlavaForConditionalGeneration "
            "sees one image per <image>, so its answers would differ. Use the mmdist export "
            "(mmdist generate / mmdist eval tile as in training)"
        )
    selection = feature_selection(manifest)
    llm_dim = int(manifest["projector"]["out_dim"])
    return fold_chain(connector_chain(state, manifest), llm_dim), selection, manifest


def export_hf(
    run: str | Path, out: str | Path, overrides: Optional[list[str]] = None, dequantize: bool = False
) -> Path:
    """Write the stage-2 model of ``run`` as a LlavaForConditionalGeneration folder + LlavaProcessor into ``out``.

    The folder is written beside ``out`` first and its processor is checked against mmdist's own
    image transform and prompt rendering before it is moved into place. A run trained through a
    quantized LLM is refused unless ``dequantize`` (the folder then holds the full-precision LLM).
    """
    from huggingface_hub import save_torch_state_dict
    from transformers import LlavaProcessor

    folder = resolve_fused_export(run)
    projector, _, manifest = check_hf_exportable(str(folder))  # fails fast, before the LLM loads
    problem = hf_export_problem(manifest_config(folder, manifest), dequantize)
    if problem:
        raise ExportRefused(problem)
    # The folder holds the LLM's full-precision weights: load it unquantized.
    overrides = [*(overrides or []), "model.llm.quantize=none", "model.vision.quantize=none"]
    model = load_inference_model(folder, overrides, default_device())
    for line in precision_lines(model.precision):
        if line.startswith("warning:"):
            log.warning("%s", line)
    selection = feature_selection(manifest, model.vision.model.config)
    grid = (model.vision.image_size // selection.patch_size) ** 2 if selection.patch_size else 0
    counted = grid + selection.additional_tokens - (1 if selection.strategy == "default" else 0)
    if counted != model.num_image_tokens:
        raise ExportRefused(
            f"the LlavaProcessor would expand <image> to {counted} tokens ({model.vision.image_size}px images, "
            f"patch {selection.patch_size}), the model uses {model.num_image_tokens}"
        )
    processors = model.processors
    rows = int(model.llm.get_input_embeddings().num_embeddings)
    vocab_rows = max(rows, len(processors.tokenizer), int(model.image_token_id) + 1)
    template = resolve_template(model.run_config.data.template, processors)

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config = llava_config(model, selection, projector, vocab_rows)
        config.save_pretrained(staging)
        generation_config_of(model, list(range(rows, vocab_rows))).save_pretrained(staging)
        save_torch_state_dict(llava_state_dict(model, projector, vocab_rows), staging, max_shard_size="5GB")
        processor = LlavaProcessor(
            image_processor=image_processor_of(processors.image_transform),
            tokenizer=_tokenizer_without_added_specials(processors.tokenizer),
            patch_size=selection.patch_size, vision_feature_select_strategy=selection.strategy,
            chat_template=chat_template_of(template, processors.tokenizer, processors.image_token),
            image_token=processors.image_token, num_additional_image_tokens=selection.additional_tokens,
        )
        processor.save_pretrained(staging)
        verify_processor(model, staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def verify_processor(model: Any, folder: str | Path) -> None:
    """Reload the written processor and compare it with mmdist on a probe image and prompt; raise on any difference."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(folder), backend="pil")
    rng = np.random.default_rng(0)
    size = model.processors.image_transform.size
    image = Image.fromarray(rng.integers(0, 256, (size + 3, size + 7, 3), dtype=np.uint8))
    prompt = "What is in the image?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    ours = prompt_ids(model, prompt)
    if inputs["input_ids"][0].tolist() != ours:
        raise ExportRefused(
            f"the exported processor renders {prompt!r} as {inputs['input_ids'][0].tolist()}, mmdist as {ours}; "
            "the chat template or tokenizer cannot reproduce mmdist's prompt"
        )
    # mmdist resizes with torch's uint8 kernels, the PIL backend with PIL's: the same filters, within 2 levels of 255.
    transform = model.processors.image_transform
    levels = ((inputs["pixel_values"][0] - transform(image)) * torch.tensor(transform.std).view(3, 1, 1) * 255).abs()
    if float(levels.max()) > 2 + 1e-3 or float(levels.mean()) > 0.25:
        raise ExportRefused(
            f"the exported image processor differs from mmdist's image transform by up to "
            f"{float(levels.max()):.1f} levels of 255 (mean {float(levels.mean()):.2f}; 2 and 0.25 allowed)"
        )


def export_mmdist(run: str | Path, out: str | Path) -> Path:
    """Today's format: model.safetensors + manifest.json of ``run``'s export, rewritten into ``out``."""

    state, manifest = read_export(resolve_fused_export(run))
    return Path(write_export(state, manifest, str(out)))
