"""The one place that builds a model: from a run config, or from an export folder.

The engine, the feature cache, evaluation, inference and the converters ask
here for their model; none of them calls ``build_model`` itself. The export
format (manifest, files, stage-1 checks) is mmdist/export.py's; this module
reads it and builds what it describes.

A model built here carries its run's config as ``model.run_config``: the model
classes never read it; the manifest and the code that rebuilds the run's data
pipeline do.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from typing import Any, Optional

from torch import nn

from mmdist.config.run import RunConfig, parse_overrides
from mmdist.export import (
    EXPORT_MANIFEST,
    compare_stage1,
    load_stage1,
    load_weights,
    read_export,
    resolve_export_dir,
    resolve_fused_export,
)
from mmdist.models.align import AlignModel
from mmdist.models.build import build_image_encoder, build_model
from mmdist.models.fused import FusedVLM
from mmdist.models.gather import Gather, null_gather
from mmdist.precision import concrete, resolve_precision
from mmdist.settings import from_dict
from mmdist.stages import Stage, manifest_stage

log = logging.getLogger(__name__)

# Where `mmdist eval` looks for an export under a run folder: its own, a demo's stage 2, a demo's stage 1.
EVAL_SUBFOLDERS = ("export", os.path.join("fuse", "export"), os.path.join("align", "export"))


def build_run_encoder(cfg: RunConfig) -> nn.Module:
    """What ``mmdist cache`` runs images through: the whole stage-1 model (no LLM there), or for stage 2 only the
    vision tower and processors (models.build.build_image_encoder),
    with the stage-1 manifest deciding the token count."""
    if not cfg.stage.builds("llm"):
        return build_run_model(cfg)
    manifest = None
    if cfg.model.connector.stage1_weights:
        try:
            _, manifest = read_export(resolve_export_dir(cfg.model.connector.stage1_weights))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"model.connector.stage1_weights: {exc}") from None
    return build_image_encoder(cfg.model, template=cfg.data.template, stage1_manifest=manifest)


def build_run_model(cfg: RunConfig, gather: Gather = null_gather) -> nn.Module:
    """The model of run ``cfg``: `build_model` on its parts and, for a stage that loads an earlier one's export
    (``model.connector.stage1_weights``), that export checked and loaded. A resolved config (the trainer's, from
    mmdist.training.resolve) is used as it is and becomes ``model.run_config``; an ``auto`` dtype left by a caller
    without a resolve step (tests, notebooks) is resolved for this machine (mmdist.precision.concrete)."""
    cfg = concrete(cfg)
    source = state = stage1_manifest = None
    if cfg.stage.loads is not None and cfg.model.connector.stage1_weights:
        # Before the LLM loads: a wrong path should fail in seconds, not after loading a 14B model.
        try:
            source = resolve_export_dir(cfg.model.connector.stage1_weights)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"model.connector.stage1_weights: {exc}") from None
        state, stage1_manifest = read_export(source)
    model = build_model(cfg.model, stage=cfg.stage, template=cfg.data.template,
                        uses_feature_cache=bool(cfg.data.feature_cache), gather=gather, stage1_manifest=stage1_manifest)
    if state is not None:
        compare_stage1(stage1_manifest, cfg.model, model.vision, source, expected=cfg.stage.loads)
        load_stage1(model, state, gather, source=source)
    model.run_config = cfg
    return model


def manifest_config(folder: str | os.PathLike, manifest: dict, overrides: Optional[list[str]] = None) -> RunConfig:
    """The run config an export's manifest carries, with dotted
    ``overrides`` applied (e.g. ``model.llm.dtype=fp32``)."""
    data = copy.deepcopy(manifest["config"])
    for keys, value in parse_overrides(overrides or []):
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return from_dict(RunConfig, data, source=f"{folder}/{EXPORT_MANIFEST}")


def load_fused_model(path: str | os.PathLike, gather: Gather = null_gather, overrides: Optional[list[str]] = None,
                     precision: Optional[Callable[[RunConfig], tuple[RunConfig, list]]] = None) -> FusedVLM:
    """A ready FusedVLM from a stage-2 export (or run) folder, for inference.

    The manifest carries the resolved config and the stage-1 manifest, and the
    weights hold the stage-1 module's, so nothing but the export folder is read:
    ``model.connector.stage1_weights`` stays in the config as a record of where
    stage 1 came from (a Q-Former run's config is only valid with it) and that
    folder is never opened. ``overrides`` (dotted ``key=value``) adjust the stored
    config, e.g. ``model.llm.dtype=fp32`` on a CPU. ``precision`` maps the config
    to (config with concrete dtypes, resolved lines), e.g. for the target device.
    """
    folder = resolve_export_dir(path)
    state, manifest = read_export(folder)
    stage = manifest_stage(manifest)
    if stage is None or not stage.builds("llm"):
        raise ValueError(
            f"{folder}: this is a stage-{manifest.get('stage')!r} export; inference needs a stage 'fuse' export"
        )
    merged_lora = bool(manifest["config"]["model"]["llm"]["lora"]["enabled"])
    # the export holds the LLM with its LoRA delta merged in: build it without adapters
    cfg = manifest_config(folder, manifest, ["model.llm.lora.enabled=false", *(overrides or [])])
    resolved: list = []
    if precision is not None:
        cfg, resolved = precision(cfg)
    stage1_manifest = manifest.get("stage1")
    model = build_model(cfg.model, stage=cfg.stage, template=cfg.data.template,
                        uses_feature_cache=bool(cfg.data.feature_cache), gather=gather, stage1_manifest=stage1_manifest)
    if stage1_manifest is not None:
        compare_stage1(stage1_manifest, cfg.model, model.vision, "(embedded manifest)", expected=cfg.stage.loads)
    load_weights(
        model,
        state,
        gather,
        source=folder,
        required=("projector.", "stage1."),
        refused=() if merged_lora else ("llm.",),
    )
    model.run_config = cfg
    model.precision = resolved
    model.eval()
    return model


def load_align_model(cfg: RunConfig, path: str | os.PathLike) -> AlignModel:
    """The stage-1 model of ``cfg`` with the trained weights of the stage-1 export at ``path``, in eval mode."""
    folder = resolve_export_dir(path)
    state, _ = read_export(folder)
    model = build_run_model(cfg)
    load_weights(model, state, source=folder, required=("stage1.",))
    return model.eval()


def load_inference_model(
    path: str | os.PathLike, overrides: Optional[list[str]] = None, device: Any = "cpu"
) -> FusedVLM:
    """The trained FusedVLM of a stage-2 export / run / demo folder, in eval mode, on ``device``.

    An ``auto`` dtype is resolved for that device; ``model.precision`` lists what
    was resolved (a command prints its warnings, e.g. bf16 from a GPU run on a CPU
    without native bf16).
    """
    folder = resolve_fused_export(path)
    model = load_fused_model(folder, overrides=overrides, precision=lambda cfg: resolve_precision(cfg, device))
    return model.to(device).eval()


def load_export_model(path: str | os.PathLike, overrides: Optional[list[str]] = None, device: Any = "cpu") -> nn.Module:
    """The model of an export (or run / demo folder; a demo folder means its stage 2), by the manifest's stage.

    The model carries ``run_config`` and ``export_dir`` (the folder it was read from).
    """
    folder = resolve_export_dir(path, subfolders=EVAL_SUBFOLDERS)
    _, manifest = read_export(folder)
    stage = manifest_stage(manifest)
    if stage is None:
        raise ValueError(f"{folder}: the manifest names stage {manifest.get('stage')!r}; mmdist eval knows "
                         f"{' and '.join(map(repr, Stage.names()))} exports")
    if stage.builds("llm"):
        model = load_fused_model(folder, overrides=overrides, precision=lambda cfg: resolve_precision(cfg, device))
    else:
        cfg, _ = resolve_precision(manifest_config(folder, manifest, overrides), device)
        model = load_align_model(cfg, folder)
        model.run_config = cfg
    model.export_dir = folder
    return model
