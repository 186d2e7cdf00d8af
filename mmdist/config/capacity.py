"""Stage-2 problems that the settings already decide: refused when the config is checked, before any work.

:func:`image_token_problems` (called by ``RunConfig.check``): the image tokens an image becomes in stage 2
(Q-Former queries, resampler outputs, tiles x tokens per tile, patches) must leave room for text within
``data.max_len``, or every sample loses its supervised tokens and stage 2 stops at its self-check.
:func:`stage_pair_problems` compares a stage-1 config with the stage-2 config that will load its export
(``mmdist demo`` runs it before stage 1): the stage-1 settings that stage 2 depends on (connector shape, vision
tower, the text encoder a Q-Former was initialised from) must agree, and the capacity is checked with the
stage-1 connector. Only attribute access on the configs: this module imports nothing of mmdist.
"""

from __future__ import annotations

from typing import Any, Optional

# The least text a stage-2 sample needs beside its image tokens: one prompt token and one supervised token.
MIN_TEXT_TOKENS = 2

_VISION_KEYS = ("source", "name_or_path", "init_config", "init_seed", "custom_class", "select_layer", "select_tokens",
                "feature_stage", "feature_grid")
_CONNECTOR_KEYS = ("type", "align_dim", "image_tokens")
_QFORMER_KEYS = ("num_queries", "num_layers", "hidden_size", "num_heads", "cross_attention_every", "init_from_text")
_TEXT_KEYS = ("name_or_path", "init_config", "init_seed")


def vision_tokens(vision: Any) -> Optional[int]:
    """Tokens per image of a ViT-like tower built from ``init_config`` (None when only loading it would tell)."""
    if vision.feature_grid:
        return int(vision.feature_grid) ** 2
    init = vision.init_config or {}
    size, patch = vision.image_size or init.get("image_size"), init.get("patch_size")
    if not size or not patch or init.get("model_type") not in ("vit", "clip_vision_model", "siglip_vision_model"):
        return None
    patches = (int(size) // int(patch)) ** 2
    has_cls = init.get("model_type") != "siglip_vision_model"
    return {"patch": patches, "cls": 1, "all": patches + (1 if has_cls else 0)}[vision.select_tokens]


def image_tokens_per_image(cfg: Any) -> Optional[tuple[int, str]]:
    """(image tokens one image becomes in stage 2, the setting that decides it), or None when unknown here."""
    conn = cfg.model.connector
    if conn.type == "resampler" or conn.resampler.before_projector:
        return conn.resampler.num_queries, "model.connector.resampler.num_queries"
    if conn.type == "qformer":
        return conn.qformer.num_queries, "model.connector.qformer.num_queries"
    if conn.image_tokens:
        return conn.image_tokens, "model.connector.image_tokens"
    tokens = vision_tokens(cfg.model.vision)
    return None if tokens is None else (tokens, "model.vision (its patches: image_size, select_tokens, feature_grid)")


def image_token_problems(cfg: Any) -> list[tuple[str, str]]:
    """(key, message) for a stage-2 config whose image tokens leave no room for text at ``data.max_len``."""
    if not cfg.stage.builds("llm"):  # image tokens share the LLM's context only where a stage feeds it
        return []
    found = image_tokens_per_image(cfg)
    if found is None:
        return []
    per_image, decided_by = found
    tiling = cfg.data.image_tiling
    what = f"{per_image} image tokens per image ({decided_by})"
    total = per_image
    if tiling.enabled:
        total = per_image * (tiling.max_tiles + 1)
        what = (f"{total} image tokens for an image of data.image_tiling.max_tiles={tiling.max_tiles} tiles + the base "
                f"image, {per_image} each ({decided_by})")
    room = cfg.data.max_len - total
    if room >= MIN_TEXT_TOKENS:
        return []
    fix = f"Raise data.max_len to at least {total + MIN_TEXT_TOKENS} plus the prompt and answer, or give fewer tokens"
    if tiling.enabled:
        fix += " (or lower data.image_tiling.max_tiles)"
    return [("data.max_len", f"data.max_len={cfg.data.max_len} leaves {max(room, 0)} token(s) for text after {what}: "
                             f"every sample would lose its answer. {fix}")]


def stage_pair_problems(align_cfg: Any, fuse_cfg: Any) -> list[tuple[str, str]]:
    """(key in the stage-2 config, message) for stage-2 settings the stage-1 config contradicts or leaves no room for.

    Stage 2 rebuilds the stage-1 module from its own settings and refuses an export that differs (on load, after
    stage 1 ran); here the same comparison is made from the two configs, before either stage starts.
    """
    out = []
    a, f = align_cfg.model, fuse_cfg.model

    def compare(section: str, ours: Any, theirs: Any, keys: tuple[str, ...]) -> None:
        for key in keys:
            mine, yours = getattr(theirs, key), getattr(ours, key)
            if mine != yours:
                out.append((f"model.{section}.{key}", f"stage 1 trains with model.{section}.{key}={yours!r}, stage 2 "
                                                      f"would load it as {mine!r}: set the same value in both stages"))

    compare("vision", a.vision, f.vision, _VISION_KEYS)
    compare("connector", a.connector, f.connector, _CONNECTOR_KEYS)
    if a.connector.type == f.connector.type == "qformer":
        compare("connector.qformer", a.connector.qformer, f.connector.qformer, _QFORMER_KEYS)
        if a.connector.qformer.init_from_text:  # the Q-Former's width is the text encoder's
            compare("text", a.text, f.text, _TEXT_KEYS)
    if not out:
        out += image_token_problems(fuse_cfg)
    return out
