"""Settings of the data pipeline (`DataConfig`, `SourceConfig`), shared by the pipeline's steps.

They sit in their own small file because every step of mmdist/data reads them
(reader, decoder, preprocessing, collation, cache) and none of those steps
should import another just for its settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from mmdist.settings import SettingsBase, setting


@dataclass
class SourceConfig(SettingsBase):
    """One source of WebDataset shards; several are mixed by weight."""

    shards: list[str] = setting(
        doc="brace patterns ('data/train-{000000..000099}.tar'), tar paths, or a .txt file listing them", factory=list
    )
    weight: float = setting(1.0, "relative sampling weight when several sources are mixed")
    name: str = setting("", "label used in logs and bad-sample counts (default: first shard pattern)")

    def check(self) -> list[tuple[str, str]]:
        out = []
        if not self.shards:
            out.append(("shards", "needs at least one shard pattern or path"))
        if self.weight <= 0:
            out.append(("weight", "must be positive"))
        return out


LLAVA_NEXT_GRIDS = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]  # LLaVA-NeXT's 336px pinpoints in tiles of 336


@dataclass
class ImageTilingConfig(SettingsBase):
    """Any-resolution images (LLaVA-NeXT "anyres", mmdist/data/tiling.py): the whole image plus a grid of tiles."""

    enabled: bool = setting(
        False, "stage fuse: feed each image as a resized copy of the whole image plus tiles of the tower's input size"
    )
    grid_pinpoints: list[list[int]] = setting(
        doc="candidate grids as [rows, cols] of tiles, a grid covers rows x size by cols x size "
        "pixels (size: the tower's input); [] = every grid of 2..max_tiles tiles",
        factory=lambda: [list(g) for g in LLAVA_NEXT_GRIDS],
    )
    separator: str = setting("\n", "text whose tokens follow each row of tiles in the LLM's input ('' for none)")
    max_tiles: int = setting(
        4, "most tiles per image, the base image not counted; every grid of grid_pinpoints must fit"
    )

    def check(self) -> list[tuple[str, str]]:
        out = []
        if not isinstance(self.max_tiles, int) or self.max_tiles < 1:
            out.append(("max_tiles", "must be at least 1"))
            return out
        for i, grid in enumerate(self.grid_pinpoints):
            if len(grid) != 2 or min(grid) < 1:
                out.append((f"grid_pinpoints[{i}]", f"{grid} is not a grid [rows, cols] of positive integers"))
            elif grid[0] * grid[1] > self.max_tiles:
                out.append(
                    (
                        f"grid_pinpoints[{i}]",
                        f"{grid} has {grid[0] * grid[1]} tiles, more than max_tiles={self.max_tiles}: "
                        "raise data.image_tiling.max_tiles or remove the grid",
                    )
                )
        if not self.grid_pinpoints and self.max_tiles < 2:
            out.append(
                ("max_tiles", "grid_pinpoints=[] uses every grid of 2..max_tiles tiles: max_tiles must be at least 2")
            )
        return out


@dataclass
class DataConfig(SettingsBase):
    """Where image-text pairs come from and how they become batches."""

    train: list[SourceConfig] = setting(doc="training sources (each: shards, weight)", factory=list)
    eval: list[SourceConfig] = setting(doc="held-out sources for periodic evaluation (never trained on)", factory=list)
    mode: Literal["epoch", "resampled"] = setting(
        "epoch", "'epoch': every sample once per epoch across ranks; 'resampled': draw shards with replacement"
    )
    order: Literal["global", "per_rank"] = setting(
        "global",
        "training data order. 'global': the samples of every optimizer step "
        "depend on data.seed, the step and the data settings only, not on the number "
        "of ranks, the micro-batch or the workers (mmdist/data/global_batch.py); "
        "'per_rank': every rank streams its own shards, nothing moves between ranks",
    )
    streams: int = setting(
        64,
        "order global: logical streams the shards are dealt into, each read in order, hosted by the ranks "
        "(at most one per shard); a run resized to another number of ranks keeps its order when this "
        "stays; best a multiple of the world sizes used",
    )
    balance: bool = setting(
        True,
        "order global: split every global batch over ranks and micro-batches by predicted cost "
        "(mmdist/data/cost.py) instead of by sample count",
    )
    image_row_cost: Optional[float] = setting(
        None,
        "order global, balance: cost of one image row (base image or tile) in the "
        "vision tower, in LLM tokens; null: the image's placeholder count, i.e. a "
        "tower token costs one LLM token (uncalibrated default)",
    )
    samples_per_epoch: Optional[int] = setting(None, "resampled mode: samples per (virtual) epoch across all ranks")
    format: Literal["auto", "caption", "conversation"] = setting(
        "auto", "sample format: jpg+txt captions, jpg+json LLaVA conversations, or detect per sample"
    )
    template: str = setting(
        "auto", "chat template: 'auto' (the tokenizer's own if it has one), 'plain' (captioning / short answers)"
    )
    caption_prompt: str = setting("", "plain template: prompt text placed after the image for caption samples")
    max_len: int = setting(
        512, "longest token sequence (image tokens included); longer samples are truncated, never inside an image"
    )
    packing: bool = setting(
        False, "pack several samples into one sequence of max_len (attention kept inside each sample)"
    )
    mean_tokens_per_sample: Optional[int] = setting(
        None, "the planner's mean LLM tokens per sample (text, template and image tokens) where the shards have no "
              "stats.json; null: their statistics, else every sample counted as a full max_len row")
    group_by_length: bool = setting(False, "pad-to-longest batches built from samples of similar length (order global: "
                                           "each micro-batch is cut from its step's samples sorted by length)")
    shuffle_buffer: int = setting(
        1000,
        "samples held in the shuffle buffer (0 disables sample shuffling); order global: "
        "shared evenly by the logical streams",
    )
    num_workers: Optional[int] = setting(
        None,
        "DataLoader worker processes per rank; null (auto): the CPUs this rank owns "
        "(affinity, cgroup quota, Slurm --cpus-per-task, shared by local ranks) minus one, "
        "at most 8; printed at start-up",
    )
    persistent_workers: bool = setting(True, "keep workers alive between epochs")
    seed: int = setting(0, "seed of the shard shuffle (seed + epoch, identical on every rank) and the sample shuffle")
    max_bad_fraction: float = setting(0.01, "abort when more than this fraction of samples is bad (after 100 samples)")
    max_image_pixels: int = setting(89_478_485, "images with more pixels are skipped as decompression bombs")
    max_caption_chars: int = setting(20_000, "captions/conversations longer than this are skipped as bad")
    feature_cache: Optional[str] = setting(
        None, "folder of a frozen-feature cache (mmdist cache); the run reads features instead of pixels"
    )
    length_group_batches: int = setting(
        16,
        "order per_rank, group_by_length: batches' worth of samples sorted together by "
        "length (order global sorts within each global batch)",
    )
    self_check_samples: int = setting(4, "samples rendered at start-up to check masking and image tokens (0 disables)")
    log_bad_samples: int = setting(
        20, "bad samples logged one by one per reason and worker (later ones are only counted)"
    )
    prefetch_factor: int = setting(2, "batches prefetched per worker")
    image_tiling: ImageTilingConfig = setting(
        doc="any-resolution images: whole image plus tiles (LLaVA-NeXT), off by default", factory=ImageTilingConfig
    )

    def check(self) -> list[tuple[str, str]]:
        out = []
        if self.mode == "epoch":
            for i, src in enumerate(self.train):
                if isinstance(src.weight, (int, float)) and src.weight != 1.0:
                    out.append(
                        (
                            f"train[{i}].weight",
                            f"{src.weight} would be ignored: epoch mode reads every sample once; source "
                            "weights apply in resampled mode (set data.mode=resampled and data.samples_per_epoch)",
                        )
                    )
        if self.mode == "resampled" and not self.samples_per_epoch:
            out.append(("samples_per_epoch", "resampled mode needs samples_per_epoch"))
        if not isinstance(self.streams, int) or self.streams < 1:
            out.append(("streams", "must be a positive integer"))
        if self.image_row_cost is not None and self.image_row_cost < 0:
            out.append(("image_row_cost", "must be >= 0 (or null for the image's placeholder count)"))
        if self.max_len < 8:
            out.append(("max_len", "must be at least 8"))
        if self.mean_tokens_per_sample is not None and not 1 <= self.mean_tokens_per_sample <= self.max_len:
            out.append(("mean_tokens_per_sample", f"{self.mean_tokens_per_sample} must be between 1 and data.max_len="
                        f"{self.max_len}, or null"))
        if self.num_workers is not None and self.num_workers < 0:
            out.append(("num_workers", "must be >= 0"))
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            out.append(("max_bad_fraction", "must be in [0, 1]"))
        if self.length_group_batches < 1:
            out.append(("length_group_batches", "must be at least 1"))
        if self.template not in ("auto", "plain", "chat"):
            out.append(("template", f"{self.template!r} is not one of 'auto', 'plain', 'chat'"))
        if self.image_tiling.enabled and self.feature_cache:
            out.append(
                (
                    "image_tiling.enabled",
                    "data.image_tiling is not supported with data.feature_cache: the cache holds one "
                    "feature map per image, not one per tile; "
                    "set data.image_tiling.enabled=false or data.feature_cache=null",
                )
            )
        return out
