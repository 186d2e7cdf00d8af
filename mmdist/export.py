"""The export format: one folder with ``model.safetensors`` (trained weights) and ``manifest.json``.

This module is its only owner: it builds the manifest, writes and reads the
folder, finds it from a run folder, checks a stage-1 manifest against stage-2
settings (:func:`compare_stage1`) and copies weights into a built model.
Building a model from an export is mmdist/materialize.py's job.

The manifest says what the export was made from: the vision encoder, text
encoder and connector, the LLM and tokenizer, the preprocessing, and the whole
resolved run config, so that a stage-2 export alone rebuilds the model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from mmdist import distributed
from mmdist.config.run import RunConfig, config_to_dict
from mmdist.models.align import AlignModel
from mmdist.models.fused import FusedVLM
from mmdist.models.gather import Gather, null_gather
from mmdist.models.llm import llm_fingerprint
from mmdist.models.settings import ModelConfig
from mmdist.models.text import text_fingerprint
from mmdist.models.vision import vision_fingerprint
from mmdist.stages import Stage, manifest_stage

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_MANIFEST = "manifest.json"

# Fields compared between a stage-1 manifest and the stage-2 configuration.
VISION_FIELDS = (
    "source",
    "name_or_path",
    "custom_class",
    "fingerprint",
    "select_layer",
    "select_tokens",
    "hidden_size",
    "num_tokens",
    "feature_stage",
    "feature_grid",
)
CONNECTOR_FIELDS = ("type", "align_dim", "image_tokens", "qformer")
TEXT_FIELDS = ("name_or_path", "fingerprint", "hidden_size")


# ---------------------------------------------------------------------------
# the manifest


def module_shapes(module: nn.Module) -> dict[str, list[int]]:
    """Parameter and buffer shapes by name; under ZeRO-3 the full shape (``ds_shape``), not the empty partition."""
    shapes = {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters()}
    shapes.update({name: list(b.shape) for name, b in module.named_buffers()})
    return shapes


def vision_section(settings: ModelConfig, vision: Any) -> dict:
    v = settings.vision
    return {
        "source": v.source, "name_or_path": v.name_or_path, "custom_class": v.custom_class,
        "fingerprint": vision_fingerprint(v), "select_layer": v.select_layer, "select_tokens": v.select_tokens,
        "hidden_size": vision.hidden_size, "num_tokens": vision.num_tokens, "image_size": vision.image_size,
        "image_mean": vision.image_mean, "image_std": vision.image_std, "pad_to_square": v.pad_to_square,
        "feature_stage": v.feature_stage, "feature_grid": v.feature_grid,
    }


def connector_section(settings: ModelConfig, stage1: Optional[nn.Module]) -> dict:
    c = settings.connector
    out = {
        "type": c.type,
        "align_dim": c.align_dim,
        "image_tokens": c.image_tokens,
        "qformer": {
            k: getattr(c.qformer, k)
            for k in ("num_queries", "num_layers", "hidden_size", "num_heads", "cross_attention_every")
        }
        if c.type == "qformer"
        else None,
    }
    if stage1 is not None:
        out["num_tokens"] = stage1.num_tokens
        out["out_dim"] = stage1.out_dim
        out["shapes"] = module_shapes(stage1)
    return out


def text_section(settings: ModelConfig, hidden_size: Optional[int]) -> Optional[dict]:
    t = settings.text
    if not t.name_or_path and not t.init_config:
        return None
    return {"name_or_path": t.name_or_path, "fingerprint": text_fingerprint(t), "hidden_size": hidden_size,
            "pooling": t.pooling, "freeze": t.freeze}


def run_config_of(model: Any) -> RunConfig:
    """The run config ``model`` was built from (set by mmdist.materialize when it builds a model)."""
    cfg = getattr(model, "run_config", None)
    if cfg is None:
        raise ValueError(
            f"this {type(model).__name__} carries no run config: build it with mmdist.materialize.build_run_model(cfg) "
            "(or pass the run config explicitly)"
        )
    return cfg


def build_manifest(model: Any, cfg: Optional[RunConfig] = None) -> dict:
    """The manifest of ``model`` (AlignModel or FusedVLM) built for run config ``cfg`` (default: the model's own).

    A model of another class (a custom ``model_builder``'s) describes itself with its ``manifest()`` method.
    """
    if not isinstance(model, (AlignModel, FusedVLM)):
        describe = getattr(model, "manifest", None)
        if describe is None:
            raise TypeError(
                f"cannot export a {type(model).__name__}: it is no mmdist model and has no manifest() method"
            )
        return describe()
    cfg = cfg if cfg is not None else run_config_of(model)
    settings = cfg.model
    text = getattr(model, "text", None)
    if text is not None:
        text_hidden = text.hidden_size
    else:
        text_hidden = ((getattr(model, "stage1_manifest", None) or {}).get("text") or {}).get("hidden_size")
    out: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "stage": cfg.stage.name,
        "vision": vision_section(settings, model.vision),
        "connector": connector_section(settings, model.stage1),
        "text": text_section(settings, text_hidden),
        "num_image_tokens": model.processors.num_image_tokens,
        "preprocessing": model.processors.fingerprint(),
        "template": cfg.data.template,
        "config": config_to_dict(cfg),
    }
    if cfg.stage.builds("llm"):
        llm = settings.llm
        tok = model.processors.tokenizer
        out["llm"] = {"name_or_path": llm.name_or_path, "gguf_file": llm.gguf_file, "fingerprint": llm_fingerprint(llm),
                      "dtype": llm.dtype, "lora": llm.lora.enabled}
        if getattr(getattr(model.llm, "config", None), "qwen1_source", False):
            # Loaded from a Qwen1 checkpoint (model_type 'qwen') mapped onto Qwen2; the fingerprint is of its files.
            out["llm"]["source_format"] = "qwen1"
        out["tokenizer"] = {"name": llm.tokenizer or llm.name_or_path, "size": len(tok),
                            "image_token": model.processors.image_token or llm.image_token,
                            "image_token_id": model.processors.image_token_id}
        out["projector"] = {
            "in_dim": model.projector.in_dim,
            "out_dim": model.projector.out_dim,
            "layers": model.projector.layers,
        }
        out["stage1"] = getattr(model, "stage1_manifest", None)
    return out


def compare_stage1(stage1: dict, settings: ModelConfig, vision: Any, source: str, *, expected: Stage) -> None:
    """Refuse a stage-1 manifest that does not fit these model settings; the error names the field.

    ``expected`` is the stage whose export the run loads (its stage's ``loads``)."""
    problems = []
    if stage1.get("format") != MANIFEST_FORMAT:
        problems.append(f"format: export has {stage1.get('format')!r}, this version reads {MANIFEST_FORMAT}")
    if manifest_stage(stage1) is not expected:
        problems.append(f"stage: export was made by stage {stage1.get('stage')!r}, expected {expected.name!r}")
    own_vision = vision_section(settings, vision)
    for key in VISION_FIELDS:
        theirs = stage1.get("vision", {}).get(key)
        if theirs != own_vision[key]:
            problems.append(
                f"vision.{key}: stage-1 export has {theirs!r}, this run has {own_vision[key]!r} (model.vision)"
            )
    own_conn = connector_section(settings, None)
    for key in CONNECTOR_FIELDS:
        theirs = stage1.get("connector", {}).get(key)
        if theirs != own_conn[key]:
            problems.append(
                f"connector.{key}: stage-1 export has {theirs!r}, this run has {own_conn[key]!r} (model.connector)"
            )
    own_text = text_section(settings, None)
    if own_text is not None and stage1.get("text"):
        for key in ("name_or_path", "fingerprint"):
            if stage1["text"].get(key) != own_text[key]:
                problems.append(
                    f"text.{key}: stage-1 export has {stage1['text'].get(key)!r}, "
                    f"this run has {own_text[key]!r} (model.text)"
                )
    if problems:
        raise ValueError(
            f"the stage-1 export {source} does not fit this run:\n  - "
            + "\n  - ".join(problems)
            + "\nUse the same encoders and connector settings as stage 1, "
            "or point model.connector.stage1_weights at a matching export."
        )


# ---------------------------------------------------------------------------
# the folder


def resolve_export_dir(path: str | os.PathLike, subfolders: tuple[str, ...] = ("export",)) -> str:
    """A weights file, an export folder, or a folder whose ``subfolders`` hold one -> the export folder."""
    path = str(path)
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    for candidate in (path, *(os.path.join(path, sub) for sub in subfolders)):
        if os.path.isfile(os.path.join(candidate, EXPORT_MANIFEST)):
            return candidate
    looked = ", ".join(os.path.join(path, sub) for sub in subfolders)
    raise FileNotFoundError(f"{path}: no {EXPORT_MANIFEST} there or in {looked}; give an export folder or a run folder")


def resolve_fused_export(path: str | os.PathLike) -> str:
    """A stage-2 export, run folder or demo run folder
    (``fuse/export``) -> the export folder (inference, conversion)."""
    try:
        return resolve_export_dir(path, subfolders=("export", os.path.join("fuse", "export")))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} holds no stage-2 export (looked for {EXPORT_MANIFEST} + {EXPORT_WEIGHTS} in {path}, "
            f"{os.path.join(path, 'export')} and {os.path.join(path, 'fuse', 'export')}); train stage 2 first "
            "(mmdist train --config configs/demo_fuse.yaml, or mmdist demo)") from None


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, manifest) of an export folder (or run folder, or weights file)."""
    from safetensors.torch import load_file

    folder = resolve_export_dir(path)
    with open(os.path.join(folder, EXPORT_MANIFEST)) as f:
        manifest = json.load(f)
    weights = os.path.join(folder, EXPORT_WEIGHTS)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights} is missing (the export in {folder} is incomplete)")
    return load_file(weights), manifest


def write_export(state: dict[str, torch.Tensor], manifest: dict, folder: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` + ``manifest.json`` into ``folder`` atomically; returns the folder.

    Both files go into ``FOLDER.tmp``, which then replaces ``folder``: a crash
    leaves the previous export (or none), never a mix of the two.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(tmp / EXPORT_WEIGHTS),
        metadata={"format": "pt"},
    )
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.rename(tmp, folder)
    return folder


def save_export(model: Any, folder: str | os.PathLike, cfg: Optional[RunConfig] = None) -> Path:
    """Export a model whose parameters are whole on this process (no ZeRO-3): trained weights + manifest."""
    return write_export(model.export_state_dict(), build_manifest(model, cfg), folder)


# ---------------------------------------------------------------------------
# loading


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], gather: Gather = null_gather, *, source: str = "",
                 required: tuple[str, ...] = (), refused: tuple[str, ...] = ()) -> None:
    """Copy an export's tensors into ``model`` (inside ``gather``); every key must exist there with its shape.

    Keys of ``model`` starting with a ``required`` prefix must all be in ``state``;
    keys starting with a ``refused`` prefix may not be.
    """
    shapes = module_shapes(model)  # full shapes even when ZeRO-3 has partitioned the parameters
    problems = [
        k for k in state if k not in shapes or shapes[k] != list(state[k].shape) or (refused and k.startswith(refused))
    ]
    needed = [k for k in shapes if required and k.startswith(required) and k not in state]
    if problems or needed:
        raise ValueError(
            f"the export {source} does not fit this model: "
            f"unknown or mis-shaped keys {problems[:20]}, missing {needed[:20]}"
        )
    params = [p for n, p in model.named_parameters() if n in state]
    with gather(params):
        own = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k, v in state.items():
                own[k].data.copy_(v.to(own[k].dtype))


def load_stage1(
    model: FusedVLM, state_or_path: Any, gather: Gather = null_gather, *, source: Optional[str] = None
) -> dict:
    """Copy the stage-1 export's ``stage1.*`` weights into ``model.stage1`` (inside ``gather``).

    Accepts a state dict or an export/run folder (whose manifest is checked first, against the model's run config).
    Export keys the stage-2 module does not have (the stage-1 text head, ITM/ITG
    heads) are ignored and listed; keys it needs but the export lacks, or of
    another shape, are errors naming them.
    """
    if isinstance(state_or_path, (str, os.PathLike)):
        source = resolve_export_dir(state_or_path)
        state, manifest = read_export(source)
        compare_stage1(manifest, model.settings, model.vision, source, expected=run_config_of(model).stage.loads)
    else:
        state = state_or_path
    if model.stage1 is None:
        raise ValueError(
            "this model has no stage-1 module (model.connector.stage1_weights was not set when it was built)"
        )
    theirs = {k[len("stage1."):]: v for k, v in state.items() if k.startswith("stage1.")}
    own_shapes = module_shapes(model.stage1)  # full shapes even when ZeRO-3 has partitioned the parameters
    missing = [k for k in own_shapes if k not in theirs]
    mismatched = [f"{k}: export {tuple(theirs[k].shape)} vs model {tuple(own_shapes[k])}"
                  for k in own_shapes if k in theirs and list(theirs[k].shape) != own_shapes[k]]
    ignored = [k for k in theirs if k not in own_shapes]
    if missing or mismatched:
        raise ValueError(
            f"stage-1 export {source or ''} does not fit the stage-2 module: "
            f"missing {missing[:20]}, shape mismatch {mismatched[:20]}"
        )
    load_weights(model.stage1, {k: theirs[k] for k in own_shapes}, gather, source=source or "")
    if ignored:
        log.info("stage-1 export: %d key(s) not used in stage 2: %s", len(ignored), ", ".join(ignored[:10]))
    return {"loaded": list(own_shapes), "ignored": ignored}


# ---------------------------------------------------------------------------
# writing a trained model (every rank)


class ExportError(RuntimeError):
    """A trained model could not be exported."""


def export_trainable(
    model: Any, read_gather: Callable[[list], Any], out_dir: str | os.PathLike, *, fp32_master: bool = False
) -> Optional[Path]:
    """Gather ``model.export_state_dict()`` and write it with its manifest (collective).

    Every rank takes part in the gather; rank 0 writes ``out_dir``
    (:func:`write_export`, atomic). With ``fp32_master`` (bf16/fp16
    training) each exported trainable parameter is replaced by DeepSpeed's fp32
    master copy, so the export is the optimizer's full-precision result rather
    than its rounded compute copy. Returns the folder on rank 0.
    """
    manifest = build_manifest(model)
    named = dict(model.named_parameters())
    # A first pass names the tensors the export needs (under ZeRO-3 it may fail on partitioned data: then
    # the trainable parameters are what we gather). LoRA layers are left out: the model gathers those
    # itself to merge them, and DeepSpeed forbids nested gathers of the same parameter.
    try:
        names = set(model.export_state_dict().keys())
    except RuntimeError:
        names = set()
    params = [p for n, p in named.items() if (n in names or p.requires_grad) and "lora_" not in n]
    with read_gather(params):
        state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.export_state_dict().items()}
    if fp32_master:
        from deepspeed.utils import safe_get_full_fp32_param  # only reached from a DeepSpeed engine's model

        for name in sorted(state):  # the same order on every rank: under ZeRO-3 each call is a collective
            param = named.get(name)
            if param is not None and param.requires_grad:
                full = safe_get_full_fp32_param(param)
                if full is not None:
                    state[name] = full.detach().float().cpu().clone().reshape(state[name].shape)
    empty = [k for k, v in state.items() if v.numel() == 0]
    if empty:
        raise ExportError(
            f"export: {len(empty)} tensor(s) are empty after gathering "
            f"(e.g. {empty[:3]}); a ZeRO-3 parameter was not gathered"
        )
    if distributed.rank() != 0:
        distributed.barrier()
        return None
    out_dir = write_export(state, manifest, out_dir)
    distributed.barrier()
    return out_dir
