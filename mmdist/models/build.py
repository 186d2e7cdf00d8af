"""Build a model from its settings: `build_model(settings, stage=...)` -> the model that takes the stage's batches.

This is the one place where backbones are loaded, the tokenizer gets its image
placeholder and LoRA is attached. It takes the model's own settings and the few
facts of the run it needs as arguments (the stage, the chat template, whether
batches carry cached features), never the run config. Reading exports (the
stage-1 weights of stage 2, a trained model for inference) is mmdist/export.py's
job, which calls this. ``gather`` wraps every read or write of parameter data
outside a forward (a no-op unless the engine runs ZeRO-3, see
mmdist/models/gather.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmdist.models.align import AlignModel
from mmdist.models.connectors import ResampledProjector, build_stage1_module
from mmdist.models.freeze import freeze
from mmdist.models.fused import FusedVLM
from mmdist.models.gather import Gather, null_gather
from mmdist.models.llm import add_image_token, load_llm, load_tokenizer, resolve_image_token
from mmdist.models.lora import add_lora
from mmdist.models.processors import ImageTransform, Processors
from mmdist.models.settings import ModelConfig
from mmdist.models.text import TextEncoder, load_text_tokenizer
from mmdist.models.vision import VisionTower, vision_fingerprint
from mmdist.stages import Batch, Stage


def build_model(settings: ModelConfig, *, stage: Stage, template: str = "auto", uses_feature_cache: bool = False,
                gather: Gather = null_gather, stage1_manifest: Optional[dict] = None) -> nn.Module:
    """The model of ``stage`` with its ``processors``: AlignModel for caption batches, FusedVLM for conversations.

    ``template`` is the chat template the processors render (data.template);
    ``uses_feature_cache`` tells stage 2 that batches hold cached vision features
    instead of pixels. ``stage1_manifest`` (stage 2 only) is the manifest of a
    stage-1 export: the stage-1 module is then built as it describes, to receive
    that export's weights (see mmdist.export.load_stage1).
    """
    vision = VisionTower(settings.vision, gather)
    transform = vision.image_transform()
    if stage.batch is Batch.CAPTIONS:
        return _build_align(settings, vision, transform, template, gather)
    return _build_fused(settings, vision, transform, template, uses_feature_cache, gather, stage1_manifest)


def _build_align(
    settings: ModelConfig, vision: VisionTower, transform: ImageTransform, template: str, gather: Gather
) -> AlignModel:
    text = TextEncoder(settings.text, gather)
    processors = Processors(
        image_transform=transform,
        num_image_tokens=0,
        text_tokenizer=load_text_tokenizer(settings.text),
        template=template,
        text_max_length=settings.text.max_length,
        identity=_identity(settings),
    )
    model = AlignModel(settings, processors, vision, text, gather)
    processors.num_image_tokens = model.stage1.num_tokens
    return model


def _identity(settings: ModelConfig) -> dict:
    v = settings.vision
    out = {"vision": vision_fingerprint(v), "select_layer": v.select_layer, "select_tokens": v.select_tokens}
    # Only when set, so the keys (and feature caches) of runs that do not use them stay as they were.
    for key in ("feature_stage", "feature_grid"):
        if getattr(v, key) is not None:
            out[key] = getattr(v, key)
    if v.quantize != "none":  # a quantized tower's features differ
        out["quantize"] = v.quantize
    return out


def resamples_before_projector(settings: ModelConfig, stage1_manifest: Optional[dict]) -> bool:
    """Stage 2 puts a new resampler in front of the projector: when asked (resampler.before_projector), and for
    type=resampler without a stage-1 export (the resampler then reads the tower directly)."""
    conn = settings.connector
    return conn.resampler.before_projector or (conn.type == "resampler" and stage1_manifest is None)


def _build_fused(
    settings: ModelConfig,
    vision: VisionTower,
    transform: ImageTransform,
    template: str,
    uses_feature_cache: bool,
    gather: Gather,
    stage1_manifest: Optional[dict],
) -> FusedVLM:
    llm_cfg = settings.llm
    tokenizer = load_tokenizer(llm_cfg)
    image_token = resolve_image_token(tokenizer, llm_cfg.image_token)
    image_token_id = add_image_token(tokenizer, image_token)
    llm = load_llm(llm_cfg, gather)
    rows = llm.get_input_embeddings().num_embeddings  # not weight.shape: empty under ZeRO-3 partitioning
    if not llm_cfg.freeze and len(tokenizer) > rows:
        # A trainable LLM may learn the new row; a frozen one never looks it up (see fused.py).
        llm.resize_token_embeddings(len(tokenizer))

    stage1 = None
    if stage1_manifest is not None:
        text_dim = (stage1_manifest.get("text") or {}).get("hidden_size")
        stage1 = build_stage1_module(settings.connector, vision.hidden_size, vision.num_tokens,
                                     None if settings.connector.type != "qformer" else text_dim)
    processors = Processors(image_transform=transform, num_image_tokens=0, tokenizer=tokenizer,
                            image_token=image_token, image_token_id=image_token_id,
                            template=template, identity=_identity(settings))
    model = FusedVLM(settings, processors, vision, llm, stage1, uses_feature_cache=uses_feature_cache)
    if resamples_before_projector(settings, stage1_manifest):
        # Trainable like the projector it is part of (fp32, new weights); the LLM gets num_queries tokens per image.
        old = model.projector
        model.projector = ResampledProjector(settings.connector.resampler, old.in_dim, old.out_dim, old.layers)
        model.num_image_tokens = model.projector.num_tokens
    model.stage1_manifest = stage1_manifest
    model.gather = gather  # for reads outside forward (merged LoRA export)
    processors.num_image_tokens = model.num_image_tokens
    if llm_cfg.lora.enabled:
        add_lora(model, llm_cfg.lora, gather)
    return model


class ImageEncoder(nn.Module):
    """The frozen vision tower of a stage and its processors, without the rest (``mmdist cache`` of a stage-2 run:
    the cached features are the tower's output, so the LLM is never loaded to compute them)."""

    def __init__(self, vision: VisionTower, processors: Processors):
        super().__init__()
        self.vision = vision
        self.processors = processors

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision features [N, tokens, D], as FusedVLM.encode_images computes them."""
        return self.vision(pixel_values)


def build_image_encoder(
    settings: ModelConfig, *, template: str = "auto", stage1_manifest: Optional[dict] = None
) -> ImageEncoder:
    """Stage 2's vision tower and processors (the LLM's tokenizer, not its weights): the same features and the same
    preprocessing fingerprint as the FusedVLM that :func:`build_model` would build, for a feature cache."""
    vision = VisionTower(settings.vision, null_gather)
    freeze(vision, settings.vision.dtype)
    tokenizer = load_tokenizer(settings.llm)
    image_token_id = add_image_token(tokenizer, settings.llm.image_token)
    conn = settings.connector
    num_tokens = vision.num_tokens
    if stage1_manifest is not None:  # as FusedVLM: the stage-1 module decides how many tokens an image becomes
        text_dim = (stage1_manifest.get("text") or {}).get("hidden_size")
        num_tokens = build_stage1_module(conn, vision.hidden_size, vision.num_tokens,
                                         None if conn.type != "qformer" else text_dim).num_tokens
    else:
        num_tokens = conn.image_tokens or vision.num_tokens
    if resamples_before_projector(settings, stage1_manifest):
        num_tokens = conn.resampler.num_queries
    processors = Processors(image_transform=vision.image_transform(), num_image_tokens=num_tokens, tokenizer=tokenizer,
                            image_token=settings.llm.image_token, image_token_id=image_token_id,
                            template=template, identity=_identity(settings))
    return ImageEncoder(vision, processors)
