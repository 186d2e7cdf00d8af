"""What one sample's images cost the plan: tower forwards and LLM
positions, with ``data.image_tiling`` as the packer counts it.

Without tiling a sample holds one image of ``tokens_per_image`` LLM tokens. With
``data.image_tiling`` (stage fuse, mmdist/data/tiling.py) every image is the base image
plus a grid of tiles, each one more tower forward and ``tokens_per_image`` more LLM
tokens, and each row of tiles is followed by the separator's tokens. The planner takes
the costliest candidate grid: ``max_tiled_image_tokens``, the figure the preprocessor
checks against ``data.max_len``; the packer packs the expanded lengths, which the plan
bounds by ``data.max_len`` per sample when it has no shard statistics (mmdist.plan.lengths,
which with statistics picks each image's grid from its recorded size).
"""

from __future__ import annotations

import dataclasses

from mmdist.config.run import RunConfig
from mmdist.data.tiling import candidate_grids, max_tiled_image_tokens

__all__ = ["SampleImages", "sample_images", "separator_tokens"]


@dataclasses.dataclass(frozen=True)
class SampleImages:
    """The images of one sample (one ``<image>``) as the model sees them, at the costliest tiling grid."""

    images: int  # tower forwards: the base image plus the largest grid's tiles (1 without tiling)
    tokens_per_image: int  # LLM tokens one tower image becomes (after the stage-1 module / resampler)
    image_tokens: int  # LLM tokens carrying image features: images x tokens_per_image
    positions: int  # LLM positions the image takes, separators included (max_tiled_image_tokens)
    separator_tokens: int = 0
    separator_note: str = ""  # where separator_tokens comes from

    @property
    def tiles(self) -> int:
        return self.images - 1


def sample_images(cfg: RunConfig, tokens_per_image: int) -> SampleImages:
    """One sample's images for ``cfg``: tiled at the costliest
    candidate grid when ``data.image_tiling`` is on (stage fuse)."""
    tiling = cfg.data.image_tiling
    if not (cfg.stage.tiles and tiling.enabled):
        return SampleImages(1, tokens_per_image, tokens_per_image, tokens_per_image)
    sep, note = separator_tokens(cfg)
    images = 1 + max(rows * cols for rows, cols in candidate_grids(tiling))
    return SampleImages(images, tokens_per_image, images * tokens_per_image,
                        max_tiled_image_tokens(tiling, tokens_per_image, sep), sep, note)


def separator_tokens(cfg: RunConfig) -> tuple[int, str]:
    """(tokens of ``data.image_tiling.separator`` in the LLM's tokenizer, where the figure comes from).

    The tokenizer is read from a built-in name or local files only (the planner runs
    offline); without one, the separator's UTF-8 bytes plus one (a byte-level tokenizer
    needs at most one token per byte, SentencePiece may add a leading '▁') bound it.
    """
    text = cfg.data.image_tiling.separator
    if not text:
        return 0, "no separator"
    llm = cfg.model.llm
    source = llm.tokenizer or (llm.name_or_path if not llm.gguf_file and not llm.init_config else "")
    tokenizer = None
    if source:
        from mmdist.models.tokenizers import builtin_tokenizer

        tokenizer = builtin_tokenizer(source)
        if tokenizer is None:
            try:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(
                    source, local_files_only=True, trust_remote_code=llm.trust_remote_code
                )
            except Exception:  # not on this machine, or remote code refused: bound it instead
                tokenizer = None
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False)), f"{source}'s tokenizer"
    return len(text.encode("utf-8")) + 1, "upper bound: no local tokenizer (UTF-8 bytes + 1)"
