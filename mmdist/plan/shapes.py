"""Step 1 of the plan: every module's parameter count, from configs alone (meta-device builds and a built-in table).

No weight is read and the hub is not needed: the backbones' configs come from
mmdist.plan.backbones, the trainable connector is counted from its settings. The
model's training FLOPs are counted by the model code itself (mmdist.models.align /
mmdist.models.fused ``*_flop_count`` on the meta-device modules: what the progress bar
counts) and ride on the last entry (:func:`model_flops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from mmdist.config.run import RunConfig
from mmdist.models.align import align_flop_count
from mmdist.models.build import resamples_before_projector
from mmdist.models.connectors import Projector, ResampledProjector, build_stage1_module
from mmdist.models.flops import FlopCount
from mmdist.models.fused import fused_flop_count
from mmdist.models.vision import tower_flop_count
from mmdist.plan.backbones import (  # noqa: F401  (DTYPE_BYTES, GiB, builtin_config: the package's names, kept here)
    DTYPE_BYTES,
    GiB,
    ModuleShape,
    builtin_config,
    count_parameters,
    hf_config,
    meta_model,
    param_modules,
)
from mmdist.plan.images import sample_images
from mmdist.plan.towers import vision_shape


def _text_dims(config: Any) -> dict:
    c = getattr(config, "text_config", None) or config
    heads = getattr(c, "num_attention_heads", 1)
    return dict(
        hidden=c.hidden_size,
        layers=c.num_hidden_layers,
        intermediate=getattr(c, "intermediate_size", 4 * c.hidden_size),
        heads=heads,
        kv_heads=getattr(c, "num_key_value_heads", None) or heads,
        vocab=getattr(c, "vocab_size", 0),
    )


def _lora_params(model: Any, cfg: RunConfig) -> int:
    import torch

    lora = cfg.model.llm.lora
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in lora.target_modules:
            total += lora.r * (module.in_features + module.out_features)
    return total


def model_shapes(cfg: RunConfig) -> list[ModuleShape]:
    """Every top-level module of the configured stage, with parameter counts, trainability and dtype."""
    vision, vision_model = vision_shape(cfg)
    out: list[ModuleShape] = [vision]
    vdims = vision.dims

    conn = cfg.model.connector
    vision_dim = vdims["hidden"]
    image_tokens = vdims["tokens"]
    text_dim = 0
    text_model = None
    if cfg.stage.builds("text") or conn.type == "qformer":
        text = cfg.model.text
        tconf = hf_config("model.text", text.name_or_path, text.init_config)
        if cfg.stage.builds("text"):
            text_model = meta_model(tconf, causal_lm=False).requires_grad_(not text.freeze)
            params, largest = count_parameters(text_model)
            if not text.freeze and text.freeze_word_embeddings:  # a frozen table inside the trained encoder
                table = text_model.get_input_embeddings().requires_grad_(False).weight.numel()
                out.append(ModuleShape("text_word_embeddings", table, False, "fp32", table))
                params -= table
            out.append(ModuleShape("text_encoder", params, not text.freeze, text.dtype, largest, _text_dims(tconf)))
        text_dim = tconf.hidden_size

    stage1_module, stage1_params = _stage1_module(cfg, vision_dim, text_dim, image_tokens, text_model)
    stage1_out, image_tokens = int(stage1_module.out_dim), int(stage1_module.num_tokens)
    vision_flops = _vision_flops(cfg, vision, vision_model)
    if not cfg.stage.builds("llm"):
        dims = {"tokens": image_tokens, "width": stage1_out, **_resampler_dims(cfg, conn.type == "resampler", vdims)}
        out.append(ModuleShape("stage1", stage1_params, True, "fp32", stage1_params, dims,
                               flops=align_flop_count(vision_flops, text_model, stage1_module,
                                                        caption_len=cfg.model.text.max_length)))
        return _count_modules(cfg, out, vision_model, text_model, stage1_module, None, None)

    llm = cfg.model.llm
    lconf = hf_config("model.llm", llm.name_or_path, llm.init_config, llm.gguf_file, llm.trust_remote_code)
    lmodel = meta_model(lconf, causal_lm=True).requires_grad_(not llm.freeze)
    params, largest = count_parameters(lmodel)
    ldims = _text_dims(lconf)
    out.append(ModuleShape("llm", params, not llm.freeze, llm.dtype, largest, ldims))
    if llm.lora.enabled:
        out.append(ModuleShape("lora", _lora_params(lmodel, cfg), True, "fp32"))
    stage1 = None
    if conn.stage1_weights is not None:
        stage1 = ModuleShape(
            "stage1",
            stage1_params,
            conn.train_stage1_module,
            "fp32",
            stage1_params,
            {"tokens": image_tokens, "width": stage1_out, **_resampler_dims(cfg, conn.type == "resampler", vdims)},
        )
        out.append(stage1)
        proj_in = stage1_out
    else:
        proj_in = vision_dim
        image_tokens = conn.image_tokens or vdims["tokens"]
    projector, projector_module = _projector_shape(cfg, proj_in, ldims["hidden"], image_tokens)
    stage1_module.requires_grad_(conn.train_stage1_module)
    projector.flops = fused_flop_count(lmodel, projector_module, vision=vision_flops, vision_trains=vision.trainable,
                                       stage1=stage1_module if stage1 else None, stage1_tokens=image_tokens)
    per_sample = sample_images(cfg, projector.dims["tokens_per_image"])
    vdims["images"] = per_sample.images
    projector.dims.update(tokens=per_sample.image_tokens, images=per_sample.images, positions=per_sample.positions,
                          separator_tokens=per_sample.separator_tokens, separator_note=per_sample.separator_note)
    if stage1 is not None:
        stage1.dims["images"] = per_sample.images
    out.append(projector)
    return _count_modules(cfg, out, vision_model, text_model, stage1_module if stage1 else None, lmodel,
                          projector_module)


def _count_modules(cfg: RunConfig, shapes: list[ModuleShape], *modules: Any) -> list[ModuleShape]:
    """``shapes`` with each entry's :attr:`ModuleShape.modules` (ZeRO-3's fetch units) from its meta-device module,
    in the order vision, text, stage1, llm, projector; a tower the run does not run (cached features) fetches none."""
    by_name = {s.name: s for s in shapes}
    names = ("vision_encoder", "text_encoder", "stage1", "llm", "projector")
    for name, module in zip(names, modules):
        shape = by_name.get(name)
        if shape is None or module is None:
            continue
        if name == "vision_encoder" and cfg.data.feature_cache and not shape.trainable:
            continue
        shape.modules = param_modules(module)
    return shapes


def _projector_shape(cfg: RunConfig, proj_in: int, llm_dim: int, image_tokens: int) -> tuple[ModuleShape, Any]:
    """(the stage-2 projector as FusedVLM builds it, its meta-device module): an MLP, or a new resampler and then the
    MLP (ResampledProjector) when mmdist.models.build puts one before it; trainable, fp32.
    ``dims["tokens_per_image"]``: LLM tokens per image."""
    import torch

    conn = cfg.model.connector
    manifest = {} if conn.stage1_weights is not None else None  # its contents do not decide whether a resampler comes
    if resamples_before_projector(cfg.model, manifest):
        with torch.device("meta"):
            module = ResampledProjector(conn.resampler, proj_in, llm_dim, conn.projector_layers)
        params, largest = count_parameters(module)
        dims = {"tokens_per_image": module.num_tokens, "in": conn.resampler.hidden_size,
                **_resampler_dims(cfg, True, {"tokens": image_tokens, "hidden": proj_in})}
        return ModuleShape("projector", params, True, "fp32", largest, dims), module
    with torch.device("meta"):
        module = Projector(proj_in, llm_dim, conn.projector_layers)
    params = _mlp_params(proj_in, llm_dim, llm_dim, conn.projector_layers)
    return ModuleShape("projector", params, True, "fp32", _mlp_largest(proj_in, llm_dim, conn.projector_layers),
                       {"tokens_per_image": image_tokens, "in": proj_in}), module


def _resampler_dims(cfg: RunConfig, present: bool, source: dict) -> dict:
    """``{"resampler": ...}`` for a module that holds a resampler reading ``source``'s tokens (else nothing):
    its input tokens and width per image, queries, width and layers (mmdist.plan.memory sizes its activations)."""
    if not present:
        return {}
    r = cfg.model.connector.resampler
    return {"resampler": dict(in_tokens=source["tokens"], in_width=source["hidden"], queries=r.num_queries,
                              hidden=r.hidden_size, layers=r.num_layers)}


def _vision_flops(cfg: RunConfig, vision: ModuleShape, model: Optional[Any]) -> FlopCount:
    """The tower's count per image as VisionTower counts it (mmdist.models.vision.tower_flop_count); nothing when
    the run reads cached features of a frozen tower, or for a custom encoder (not built here: counted low)."""
    if model is None or (cfg.data.feature_cache and not vision.trainable):
        return FlopCount()
    d = vision.dims
    return tower_flop_count(model.requires_grad_(vision.trainable), d["kind"], d["image_size"], d["has_cls"],
                            d["tokens"])


def model_flops(shapes: Sequence[ModuleShape]) -> FlopCount:
    """The model's training FLOP rates (the progress bar's count), carried by the last entry of :func:`model_shapes`."""
    return next((s.flops for s in reversed(shapes) if s.flops is not None), FlopCount())


def _mlp_params(d_in: int, d_hidden: int, d_out: int, layers: int) -> int:
    if layers == 1:
        return d_in * d_out + d_out
    return d_in * d_hidden + d_hidden + (layers - 2) * (d_hidden * d_hidden + d_hidden) + d_hidden * d_out + d_out


def _mlp_largest(d_in: int, d_out: int, layers: int) -> int:
    return max(d_in * d_out + d_out, (d_out * d_out + d_out) if layers > 1 else 0)


def _stage1_module(cfg: RunConfig, vision_dim: int, text_dim: int, image_tokens: int,
                   text_model: Optional[Any]) -> tuple[Any, int]:
    """(the stage-1 module on the meta device, its parameters), exact: mmdist's own connector code. Stage 2 keeps
    only the image side of linear/mlp heads and of a resampler; stage 1 adds the text head and the temperature (and
    the Q-Former's text parts, from the meta-device ``text_model``).
    """
    import torch

    conn = cfg.model.connector
    text_for_module = text_dim if (cfg.stage.builds("text") or conn.type == "qformer") else None
    text_encoder = None
    if text_model is not None and conn.type == "qformer":  # the Q-Former reads TextEncoder's ``.model`` to build
        text_encoder = torch.nn.Module()
        text_encoder.model = text_model
    with torch.device("meta"):
        module = build_stage1_module(conn, vision_dim, image_tokens, text_for_module or None, text_encoder=text_encoder)
    params = count_parameters(module)[0] + (1 if cfg.stage.builds("text") else 0)  # the contrastive temperature
    return module, params
