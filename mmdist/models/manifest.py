"""Manifests: what an export was made from, and the checks stage 2 runs on a stage-1 export.

A manifest is a JSON dict written beside ``model.safetensors``. Stage 2 rebuilds
the stage-1 module from it and refuses an export whose vision encoder, text
encoder or connector differ from its own configuration, naming the field.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from mmdist.atomic import write_text_atomic
from mmdist.models.text import text_fingerprint
from mmdist.models.vision import vision_fingerprint

MANIFEST_FORMAT = 1
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_MANIFEST = "manifest.json"

# Fields compared between a stage-1 manifest and the stage-2 configuration.
VISION_FIELDS = ("source", "name_or_path", "custom_class", "fingerprint", "select_layer", "select_tokens", "hidden_size", "num_tokens")
CONNECTOR_FIELDS = ("type", "align_dim", "image_tokens", "qformer")
TEXT_FIELDS = ("name_or_path", "fingerprint", "hidden_size")


def vision_section(cfg: Any, vision: Any) -> dict:
    v = cfg.model.vision
    return {
        "source": v.source, "name_or_path": v.name_or_path, "custom_class": v.custom_class,
        "fingerprint": vision_fingerprint(v), "select_layer": v.select_layer, "select_tokens": v.select_tokens,
        "hidden_size": vision.hidden_size, "num_tokens": vision.num_tokens, "image_size": vision.image_size,
        "image_mean": vision.image_mean, "image_std": vision.image_std, "pad_to_square": v.pad_to_square,
    }


def module_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    """Parameter and buffer shapes by name; under ZeRO-3 the full shape (``ds_shape``), not the empty partition."""
    shapes = {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}
    shapes.update({name: list(b.shape) for name, b in module.named_buffers()})
    return shapes


def connector_section(cfg: Any, stage1: Optional[torch.nn.Module]) -> dict:
    c = cfg.model.connector
    out = {"type": c.type, "align_dim": c.align_dim, "image_tokens": c.image_tokens,
           "qformer": {k: getattr(c.qformer, k) for k in ("num_queries", "num_layers", "hidden_size", "num_heads", "cross_attention_every")} if c.type == "qformer" else None}
    if stage1 is not None:
        out["num_tokens"] = stage1.num_tokens
        out["out_dim"] = stage1.out_dim
        out["shapes"] = module_shapes(stage1)
    return out


def text_section(cfg: Any, hidden_size: Optional[int]) -> Optional[dict]:
    t = cfg.model.text
    if not t.name_or_path and not t.init_config:
        return None
    return {"name_or_path": t.name_or_path, "fingerprint": text_fingerprint(t), "hidden_size": hidden_size,
            "pooling": t.pooling, "freeze": t.freeze}


def build_manifest(cfg: Any, model: Any) -> dict:
    """The manifest of ``model`` (AlignModel or FusedVLM) built from ``cfg``."""
    from mmdist.config.run import config_to_dict
    from mmdist.models.llm import llm_fingerprint

    text = getattr(model, "text", None)
    if text is not None:
        text_hidden = text.hidden_size
    else:
        text_hidden = ((getattr(model, "stage1_manifest", None) or {}).get("text") or {}).get("hidden_size")
    out: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "stage": cfg.stage,
        "vision": vision_section(cfg, model.vision),
        "connector": connector_section(cfg, model.stage1),
        "text": text_section(cfg, text_hidden),
        "num_image_tokens": model.processors.num_image_tokens,
        "preprocessing": model.processors.fingerprint(),
        "template": cfg.data.template,
        "config": config_to_dict(cfg),
    }
    if cfg.stage == "fuse":
        llm = cfg.model.llm
        tok = model.processors.tokenizer
        out["llm"] = {"name_or_path": llm.name_or_path, "gguf_file": llm.gguf_file, "fingerprint": llm_fingerprint(llm),
                      "dtype": llm.dtype, "lora": llm.lora.enabled}
        out["tokenizer"] = {"name": llm.tokenizer or llm.name_or_path, "size": len(tok), "image_token": llm.image_token,
                            "image_token_id": model.processors.image_token_id}
        out["projector"] = {"in_dim": model.projector.in_dim, "out_dim": model.projector.out_dim, "layers": model.projector.layers}
        out["stage1"] = getattr(model, "stage1_manifest", None)
    return out


def compare_stage1(stage1: dict, cfg: Any, vision: Any, source: str) -> None:
    """Refuse a stage-1 manifest that does not fit this configuration; the error names the field."""
    problems = []
    if stage1.get("format") != MANIFEST_FORMAT:
        problems.append(f"format: export has {stage1.get('format')!r}, this version reads {MANIFEST_FORMAT}")
    if stage1.get("stage") != "align":
        problems.append(f"stage: export was made by stage {stage1.get('stage')!r}, expected 'align'")
    own_vision = vision_section(cfg, vision)
    for key in VISION_FIELDS:
        theirs = stage1.get("vision", {}).get(key)
        if theirs != own_vision[key]:
            problems.append(f"vision.{key}: stage-1 export has {theirs!r}, this run has {own_vision[key]!r} (model.vision)")
    own_conn = connector_section(cfg, None)
    for key in CONNECTOR_FIELDS:
        theirs = stage1.get("connector", {}).get(key)
        if theirs != own_conn[key]:
            problems.append(f"connector.{key}: stage-1 export has {theirs!r}, this run has {own_conn[key]!r} (model.connector)")
    own_text = text_section(cfg, None)
    if own_text is not None and stage1.get("text"):
        for key in ("name_or_path", "fingerprint"):
            if stage1["text"].get(key) != own_text[key]:
                problems.append(f"text.{key}: stage-1 export has {stage1['text'].get(key)!r}, this run has {own_text[key]!r} (model.text)")
    if problems:
        raise ValueError(f"the stage-1 export {source} does not fit this run:\n  - " + "\n  - ".join(problems)
                         + "\nUse the same encoders and connector settings as stage 1, or point model.connector.stage1_weights at a matching export.")


def resolve_export_dir(path: str) -> str:
    """A run dir, an export dir or a model.safetensors path -> the export dir."""
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if os.path.isfile(os.path.join(path, EXPORT_MANIFEST)):
        return path
    if os.path.isfile(os.path.join(path, "export", EXPORT_MANIFEST)):
        return os.path.join(path, "export")
    raise FileNotFoundError(f"{path}: no {EXPORT_MANIFEST} there or in {os.path.join(path, 'export')}; give an export folder or a run folder")


def read_export(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, manifest) of an export folder (or run folder, or weights file)."""
    from safetensors.torch import load_file

    folder = resolve_export_dir(path)
    with open(os.path.join(folder, EXPORT_MANIFEST)) as f:
        manifest = json.load(f)
    weights = os.path.join(folder, EXPORT_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} is missing (the export in {folder} is incomplete)")
    return load_file(weights), manifest


def read_manifest(path: str) -> dict:
    with open(os.path.join(resolve_export_dir(path), EXPORT_MANIFEST)) as f:
        return json.load(f)


def write_export(state: dict[str, torch.Tensor], manifest: dict, folder: str) -> str:
    """Write ``model.safetensors`` + ``manifest.json`` into ``folder`` (each atomically); returns the folder."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, EXPORT_WEIGHTS + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)
    os.replace(tmp, os.path.join(folder, EXPORT_WEIGHTS))
    write_text_atomic(os.path.join(folder, EXPORT_MANIFEST), json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return folder


def save_export(model: Any, folder: str) -> str:
    """Export ``model`` (trainable weights + manifest) into ``folder``."""
    return write_export(model.export_state_dict(), model.manifest(), folder)
