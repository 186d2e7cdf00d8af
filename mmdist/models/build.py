"""Build the model of a run: `build_model(cfg, gather)` -> AlignModel (stage align) or FusedVLM (stage fuse).

This is the one place where backbones are loaded, the tokenizer gets its image
placeholder, the stage-1 export is loaded into stage 2 (`load_stage1`) and LoRA
is attached. ``gather`` wraps every read or write of parameter data outside a
forward (a no-op unless the engine runs ZeRO-3, see docs/design.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any, Optional

import torch
from torch import nn

from mmdist.models.align import AlignModel, null_gather
from mmdist.models.connectors import build_stage1_module
from mmdist.models.fused import FusedVLM
from mmdist.models.llm import add_image_token, load_llm, load_tokenizer
from mmdist.models.manifest import compare_stage1, module_shapes, read_export, resolve_export_dir
from mmdist.models.processors import ImageTransform, Processors
from mmdist.models.text import TextEncoder, load_text_tokenizer
from mmdist.models.vision import VisionTower

log = logging.getLogger(__name__)
Gather = Callable[[list], ContextManager]


def image_transform_for(cfg: Any, vision: VisionTower) -> ImageTransform:
    return vision.image_transform()


def build_model(cfg: Any, gather: Gather = null_gather, *, stage1_manifest: Optional[dict] = None) -> nn.Module:
    """The model of ``cfg.stage`` with its ``processors``.

    ``stage1_manifest`` (inference from a stage-2 export) rebuilds the stage-1 module
    from a manifest instead of reading ``model.connector.stage1_weights``.
    """
    vision = VisionTower(cfg.model.vision, gather)
    transform = image_transform_for(cfg, vision)
    if cfg.stage == "align":
        return _build_align(cfg, vision, transform, gather)
    return _build_fused(cfg, vision, transform, gather, stage1_manifest)


def _build_align(cfg: Any, vision: VisionTower, transform: ImageTransform, gather: Gather) -> AlignModel:
    text = TextEncoder(cfg.model.text)
    processors = Processors(image_transform=transform, num_image_tokens=0, text_tokenizer=load_text_tokenizer(cfg.model.text),
                            template=cfg.data.template, text_max_length=cfg.model.text.max_length,
                            identity=_identity(cfg))
    model = AlignModel(cfg, processors, vision, text, gather)
    processors.num_image_tokens = model.stage1.num_tokens
    return model


def _identity(cfg: Any) -> dict:
    from mmdist.models.vision import vision_fingerprint

    v = cfg.model.vision
    return {"vision": vision_fingerprint(v), "select_layer": v.select_layer, "select_tokens": v.select_tokens}


def _build_fused(cfg: Any, vision: VisionTower, transform: ImageTransform, gather: Gather,
                 stage1_manifest: Optional[dict]) -> FusedVLM:
    llm_cfg = cfg.model.llm
    source = None
    if stage1_manifest is None and cfg.model.connector.stage1_weights:
        # Before the LLM loads: a wrong path should fail in seconds, not after loading a 14B model.
        try:
            source = resolve_export_dir(cfg.model.connector.stage1_weights)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"model.connector.stage1_weights: {exc}") from None
    tokenizer = load_tokenizer(llm_cfg)
    image_token_id = add_image_token(tokenizer, llm_cfg.image_token)
    llm = load_llm(llm_cfg)
    rows = llm.get_input_embeddings().num_embeddings  # not weight.shape: empty under ZeRO-3 partitioning
    if not llm_cfg.freeze and len(tokenizer) > rows:
        # A trainable LLM may learn the new row; a frozen one never looks it up (see fused.py).
        llm.resize_token_embeddings(len(tokenizer))

    stage1_state = None
    if source is not None:
        stage1_state, stage1_manifest = read_export(source)
    stage1 = None
    if stage1_manifest is not None:
        compare_stage1(stage1_manifest, cfg, vision, source or "(embedded manifest)")
        text_dim = (stage1_manifest.get("text") or {}).get("hidden_size")
        stage1 = build_stage1_module(cfg.model.connector, vision.hidden_size, vision.num_tokens, None if cfg.model.connector.type != "qformer" else text_dim)
    processors = Processors(image_transform=transform, num_image_tokens=0, tokenizer=tokenizer,
                            image_token=llm_cfg.image_token, image_token_id=image_token_id,
                            template=cfg.data.template, identity=_identity(cfg))
    model = FusedVLM(cfg, processors, vision, llm, stage1)
    model.stage1_manifest = stage1_manifest
    model.gather = gather  # for reads outside forward (merged LoRA export)
    processors.num_image_tokens = model.num_image_tokens
    if stage1_state is not None:
        load_stage1(model, stage1_state, gather, source=source)
    if llm_cfg.lora.enabled:
        from mmdist.models.lora import add_lora

        add_lora(model, llm_cfg.lora)
    return model


def load_stage1(model: FusedVLM, state_or_path: Any, gather: Gather = null_gather, *, source: Optional[str] = None) -> dict:
    """Copy the stage-1 export's ``stage1.*`` weights into ``model.stage1`` (inside ``gather``).

    Accepts a state dict or an export/run folder (whose manifest is checked first).
    Export keys the stage-2 module does not have (the stage-1 text head, ITM/ITG
    heads) are ignored and listed; keys it needs but the export lacks, or of
    another shape, are errors naming them.
    """
    if isinstance(state_or_path, str):
        source = resolve_export_dir(state_or_path)
        state, manifest = read_export(source)
        compare_stage1(manifest, model.cfg, model.vision, source)
    else:
        state = state_or_path
    if model.stage1 is None:
        raise ValueError("this model has no stage-1 module (model.connector.stage1_weights was not set when it was built)")
    theirs = {k[len("stage1."):]: v for k, v in state.items() if k.startswith("stage1.")}
    own_shapes = module_shapes(model.stage1)  # full shapes even when ZeRO-3 has partitioned the parameters
    missing = [k for k in own_shapes if k not in theirs]
    mismatched = [f"{k}: export {tuple(theirs[k].shape)} vs model {tuple(own_shapes[k])}"
                  for k in own_shapes if k in theirs and list(theirs[k].shape) != own_shapes[k]]
    ignored = [k for k in theirs if k not in own_shapes]
    if missing or mismatched:
        raise ValueError(f"stage-1 export {source or ''} does not fit the stage-2 module: missing {missing[:20]}, shape mismatch {mismatched[:20]}")
    with gather(list(model.stage1.parameters())):
        with torch.no_grad():
            for k, v in model.stage1.state_dict(keep_vars=True).items():
                v.data.copy_(theirs[k].to(v.dtype))
    if ignored:
        log.info("stage-1 export: %d key(s) not used in stage 2: %s", len(ignored), ", ".join(ignored[:10]))
    return {"loaded": list(own_shapes), "ignored": ignored}


def load_from_export(path: str, gather: Gather = null_gather, overrides: Optional[list[str]] = None) -> FusedVLM:
    """A ready FusedVLM from a stage-2 export (or run) folder, for inference (`mmdist generate`).

    The manifest carries the resolved config and the stage-1 manifest, so nothing
    but the export folder is needed. ``overrides`` (dotted ``key=value``) adjust the
    stored config, e.g. ``model.llm.dtype=fp32`` on a CPU.
    """
    from mmdist.config.run import RunConfig, parse_overrides
    from mmdist.config.schema import from_dict

    folder = resolve_export_dir(path)
    state, manifest = read_export(folder)
    if manifest.get("stage") != "fuse":
        raise ValueError(f"{folder}: this is a stage-{manifest.get('stage')!r} export; inference needs a stage 'fuse' export")
    data = manifest["config"]
    data["model"]["connector"]["stage1_weights"] = None
    merged_lora = bool(data["model"]["llm"]["lora"]["enabled"])
    data["model"]["llm"]["lora"]["enabled"] = False  # the export holds the merged weights
    for keys, value in parse_overrides(overrides or []):
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    cfg = from_dict(RunConfig, data, source=f"{folder}/manifest.json")
    model = build_model(cfg, gather, stage1_manifest=manifest.get("stage1"))
    load_trained_weights(model, state, gather, source=folder, allow_llm=merged_lora)
    model.eval()
    return model


def load_trained_weights(model: FusedVLM, state: dict[str, torch.Tensor], gather: Gather = null_gather, *,
                         source: str = "", allow_llm: bool = False) -> None:
    """Copy a stage-2 export (projector, stage-1 module, merged LoRA weights) into ``model``; every key must fit."""
    shapes = module_shapes(model)  # full shapes even when ZeRO-3 has partitioned the parameters
    problems = [k for k in state if k not in shapes or shapes[k] != list(state[k].shape)]
    if not allow_llm:
        problems += [k for k in state if k.startswith("llm.")]
    needed = [k for k in shapes if k.startswith(("projector.", "stage1.")) and k not in state]
    if problems or needed:
        raise ValueError(f"the export {source} does not fit this model: unknown or mis-shaped keys {problems[:20]}, missing {needed[:20]}")
    params = [p for n, p in model.named_parameters() if n in state]
    with gather(params):
        own = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in state.items():
                own[k].data.copy_(v.to(own[k].dtype))
