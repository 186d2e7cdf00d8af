"""Any-resolution images (data.image_tiling): grid choice against LLaVA-NeXT's, tile order, token layout, the model."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from helpers.data_fixtures import make_config, make_processors, png, write_tar
from PIL import Image

from mmdist.config import ConfigError
from mmdist.data.collate import collate_fuse
from mmdist.data.loader import build_loader
from mmdist.data.preprocess import IGNORE_INDEX, make_preprocessor
from mmdist.data.reader import decode_sample
from mmdist.data.settings import ImageTilingConfig
from mmdist.data.tiling import (
    candidate_grids,
    expand_image_runs,
    fitted_size,
    max_tiled_image_tokens,
    select_grid,
    tile_image,
    tiled_image_tokens,
)
from mmdist.models.processors import ImageTransform

DEFAULT_GRIDS = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]


def llava_next_select_best_resolution(original_size, possible_resolutions):
    """LLaVA-NeXT's llava/mm_utils.py select_best_resolution, as published: sizes are (width, height)."""
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def llava_next_fitted_size(original_size, target_resolution):
    """The resized size of LLaVA-NeXT's resize_and_pad_image, (width, height)."""
    original_width, original_height = original_size
    target_width, target_height = target_resolution
    scale_w, scale_h = target_width / original_width, target_height / original_height
    if scale_w < scale_h:
        return target_width, min(int(np.ceil(original_height * scale_w)), target_height)
    return min(int(np.ceil(original_width * scale_h)), target_width), target_height


def _image_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _decoded(raw: dict) -> dict:
    raw = {
        "__key__": "k",
        "__url__": "mem.tar",
        **{
            k: (json.dumps(v).encode() if isinstance(v, dict) else v.encode() if isinstance(v, str) else v)
            for k, v in raw.items()
        },
    }
    return decode_sample(raw, 10**8, 10_000)


def _blocks(rows: int, cols: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """An image of rows x cols blocks of size x size pixels, each a distinct flat colour (row-major list)."""
    rng = random.Random(seed)
    colours = rng.sample(range(1, 255), rows * cols * 3)
    colours = [tuple(colours[3 * i : 3 * i + 3]) for i in range(rows * cols)]
    array = np.zeros((rows * size, cols * size, 3), dtype=np.uint8)
    for i, colour in enumerate(colours):
        r, c = divmod(i, cols)
        array[r * size : (r + 1) * size, c * size : (c + 1) * size] = colour
    return array, colours


# ----------------------------------------------------------------------------- grid choice


@pytest.mark.parametrize("tile_size", [336, 224, 16])
def test_grid_choice_matches_llava_next_on_random_sizes(tile_size):
    rng = random.Random(tile_size)
    grid_sets = [DEFAULT_GRIDS, [list(g) for g in candidate_grids(ImageTilingConfig(grid_pinpoints=[], max_tiles=9))]]
    grid_sets += [[[rng.randint(1, 4), rng.randint(1, 4)] for _ in range(rng.randint(1, 6))] for _ in range(4)]
    checked = 0
    for grids in grid_sets:
        settings = ImageTilingConfig(enabled=True, grid_pinpoints=grids, max_tiles=16)
        resolutions_wh = [(c * tile_size, r * tile_size) for r, c in grids]
        for _ in range(500):
            width, height = rng.randint(1, 5 * tile_size), rng.randint(1, 5 * tile_size)
            rows, cols = select_grid((height, width), settings, tile_size)
            assert (cols * tile_size, rows * tile_size) == llava_next_select_best_resolution(
                (width, height), resolutions_wh
            ), (width, height, grids)
            checked += 1
        # the tower's own size, its multiples and extreme aspects, where ties are decided
        for width, height in [
            (tile_size, tile_size),
            (2 * tile_size, tile_size),
            (tile_size, 3 * tile_size),
            (1, 1),
            (4000, 3),
            (3, 4000),
        ]:
            rows, cols = select_grid((height, width), settings, tile_size)
            assert (cols * tile_size, rows * tile_size) == llava_next_select_best_resolution(
                (width, height), resolutions_wh
            )
    assert checked == 3000


def test_fitted_size_matches_llava_next():
    rng = random.Random(1)
    for _ in range(2000):
        width, height = rng.randint(1, 3000), rng.randint(1, 3000)
        target_w, target_h = rng.choice([(672, 336), (336, 672), (672, 672), (1008, 336), (336, 1008)])
        assert fitted_size((height, width), (target_h, target_w))[::-1] == llava_next_fitted_size(
            (width, height), (target_w, target_h)
        )


def test_default_grids_are_llava_next_and_empty_means_every_grid_up_to_max_tiles():
    assert ImageTilingConfig().grid_pinpoints == DEFAULT_GRIDS and not ImageTilingConfig().enabled
    grids = candidate_grids(ImageTilingConfig(grid_pinpoints=[], max_tiles=4))
    assert sorted(grids) == [(1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]


# ----------------------------------------------------------------------------- tiles


@pytest.mark.parametrize(
    "transform",
    [ImageTransform(8, [0.5] * 3, [0.5] * 3), ImageTransform(8, [0.5] * 3, [0.5] * 3, resize="shortest_edge")],
    ids=["squash", "shortest_edge"],
)
def test_tiles_are_row_major_after_the_base_image(transform):
    array, colours = _blocks(2, 3, 8)
    image = Image.fromarray(array)
    settings = ImageTilingConfig(enabled=True, grid_pinpoints=[[1, 2], [2, 3], [3, 2]], max_tiles=6)
    rows, grid = tile_image(image, settings, transform)
    assert grid == (2, 3) and len(rows) == 7
    assert all(r.dtype == torch.uint8 and r.shape == (3, 8, 8) for r in rows)
    assert torch.equal(rows[0], transform.to_uint8(image)), (
        "the base image comes first: the whole image through the tower's transform"
    )
    for tile, colour in zip(rows[1:], colours):
        assert torch.equal(tile, torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 8)), (
            "tiles in row-major order"
        )


def test_an_elongated_image_is_fitted_and_padded_black_as_llava_next():
    array = np.full((8, 40, 3), 200, dtype=np.uint8)  # 40 wide, 8 high
    settings = ImageTilingConfig(enabled=True)
    rows, grid = tile_image(Image.fromarray(array), settings, ImageTransform(8, [0.5] * 3, [0.5] * 3))
    assert grid == (1, 3)  # of the default grids, the widest keeps most pixels
    canvas = torch.cat(rows[1:], dim=2)  # [3, 8, 24]: fitted to 24 x 5, centred vertically on black
    assert fitted_size((8, 40), (8, 24)) == (5, 24)
    assert canvas[:, 1:6].min() == 200 and canvas[:, :1].max() == 0 and canvas[:, 6:].max() == 0


# ----------------------------------------------------------------------------- token layout


def _tiled_pre(template: str = "chat", max_len: int = 256, **tiling):
    processors = make_processors(template=template)  # 4 tokens per image, an 8 x 8 "tower"
    cfg = make_config("unused.tar", max_len=max_len, image_tiling={"enabled": True, "separator": ",", **tiling})
    return processors, make_preprocessor(cfg, processors)


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_one_image_becomes_base_then_rows_of_tiles_with_separators(template):
    processors, pre = _tiled_pre(template)
    array, _ = _blocks(2, 2, 8)  # 16 x 16: grid 2 x 2
    conv = {
        "conversations": [
            {"from": "human", "value": "<image>\nwhat is this ?"},
            {"from": "gpt", "value": "red and blue"},
        ]
    }
    out = pre(_decoded({"png": _image_bytes(array), "json": conv}))
    n, iid = processors.num_image_tokens, processors.image_token_id
    sep = processors.tokenizer.convert_tokens_to_ids(",")
    ids, labels = out["input_ids"], out["labels"]
    assert out["image_grids"] == [(2, 2)] and out["num_images"] == 5 and len(out["pixel_values"]) == 5
    assert sum(t == iid for t in ids) == 5 * n, "(1 + tiles) x num_image_tokens placeholders"
    start = ids.index(iid)
    assert ids[start : start + 2 * n + 1 + 2 * n + 1 + n] == [iid] * n + [iid] * 2 * n + [sep] + [iid] * 2 * n + [sep]
    assert ids.count(sep) == 2, "one separator after each row of tiles"
    supervised = processors.tokenizer.convert_ids_to_tokens([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert supervised[:3] == ["red", "and", "blue"] and iid not in [
        t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX
    ]
    assert all(lab == IGNORE_INDEX for lab in labels[: ids.index(processors.tokenizer.convert_tokens_to_ids("red"))])
    assert sum(t in (iid, sep) for t in ids) == tiled_image_tokens((16, 16), pre.image_tiling, n, 1, tile_size=8)


def test_several_images_each_tiled_in_order():
    processors, pre = _tiled_pre()
    wide, wide_colours = _blocks(1, 2, 8, seed=1)
    tall, tall_colours = _blocks(3, 1, 8, seed=2)
    conv = {
        "conversations": [
            {"from": "human", "value": "<image> and <image> what is this ?"},
            {"from": "gpt", "value": "two"},
        ]
    }
    out = pre(_decoded({"0.png": _image_bytes(wide), "1.png": _image_bytes(tall), "json": conv}))
    assert out["image_grids"] == [(1, 2), (3, 1)] and out["num_images"] == (1 + 2) + (1 + 3)
    tiles = [out["pixel_values"][i] for i in (1, 2, 4, 5, 6)]  # rows 0 and 3 are the base images
    for tile, colour in zip(tiles, wide_colours + tall_colours):
        assert tile[:, 0, 0].tolist() == list(colour)
    assert sum(t == processors.image_token_id for t in out["input_ids"]) == 7 * processors.num_image_tokens


def test_truncation_drops_a_tiled_image_whole():
    processors, pre = _tiled_pre(max_len=30)  # a 2 x 2 image takes 5 x 4 + 2 = 22 positions
    array, _ = _blocks(2, 2, 8)
    conv = {
        "conversations": [
            {"from": "human", "value": "what is this ?"},
            {"from": "gpt", "value": "a picture"},
            {"from": "human", "value": "<image>\ndescribe the image"},
            {"from": "gpt", "value": "red and blue"},
        ]
    }
    out = pre(_decoded({"png": _image_bytes(array), "json": conv}))
    assert len(out["input_ids"]) <= 30
    assert out["num_images"] == 0 and out["pixel_values"] == [] and out["image_grids"] == []
    assert processors.image_token_id not in out["input_ids"]


def test_a_max_len_shorter_than_the_largest_grid_is_announced(caplog):
    with caplog.at_level("WARNING", logger="mmdist.data.preprocess"):
        _tiled_pre(max_len=21)
    assert "takes 22 positions, more than data.max_len=21" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmdist.data.preprocess"):
        _tiled_pre(max_len=22)
    assert "data.image_tiling" not in caplog.text


def test_a_prompt_rendered_without_tiling_expands_to_the_tiled_layout():
    processors, pre = _tiled_pre()
    plain = make_preprocessor(make_config("unused.tar", max_len=256), processors)
    wide, tall = _blocks(1, 2, 8, seed=1)[0], _blocks(3, 1, 8, seed=2)[0]
    conv = {
        "conversations": [
            {"from": "human", "value": "<image> and <image> what is this ?"},
            {"from": "gpt", "value": "two"},
        ]
    }
    raw = {"0.png": _image_bytes(wide), "1.png": _image_bytes(tall), "json": conv}
    tiled, untiled = pre(_decoded(raw)), plain(_decoded(raw))
    sep = processors.tokenizer.convert_tokens_to_ids(",")
    expanded = expand_image_runs(
        untiled["input_ids"], tiled["image_grids"], processors.num_image_tokens, processors.image_token_id, [sep]
    )
    assert expanded == tiled["input_ids"]
    with pytest.raises(ValueError, match=r"more images in the ids than the 1 grid\(s\) given"):
        expand_image_runs(
            untiled["input_ids"],
            tiled["image_grids"][:1],
            processors.num_image_tokens,
            processors.image_token_id,
            [sep],
        )
    with pytest.raises(ValueError, match=r"2 grid\(s\) for 1 image\(s\)"):
        first_only = untiled["input_ids"][
            : untiled["input_ids"].index(processors.image_token_id) + processors.num_image_tokens
        ]
        expand_image_runs(
            first_only, tiled["image_grids"], processors.num_image_tokens, processors.image_token_id, [sep]
        )


def test_token_counts_for_the_planner():
    settings = ImageTilingConfig(enabled=True)
    assert tiled_image_tokens((336, 672), settings, 576, 1, tile_size=336) == 3 * 576 + 1  # 1 x 2 grid
    assert tiled_image_tokens((1000, 1000), settings, 576, 1, tile_size=336) == 5 * 576 + 2  # 2 x 2 grid
    assert max_tiled_image_tokens(settings, 576, 1) == 5 * 576 + 2
    assert max_tiled_image_tokens(settings, 1, 10) == 4 + 30, "the costliest grid, separators included (3 x 1)"


# ----------------------------------------------------------------------------- off by default, checks


def test_off_by_default_leaves_the_sample_as_before():
    processors = make_processors(template="chat")
    pre = make_preprocessor(make_config("unused.tar", max_len=64), processors)
    assert not pre.tiling and not pre.image_tiling.enabled
    conv = {"conversations": [{"from": "human", "value": "<image>\nwhat is this ?"}, {"from": "gpt", "value": "seven"}]}
    out = pre(_decoded({"png": _image_bytes(_blocks(2, 3, 8)[0]), "json": conv}))
    assert "image_grids" not in out and out["num_images"] == 1 and len(out["pixel_values"]) == 1
    assert sum(t == processors.image_token_id for t in out["input_ids"]) == processors.num_image_tokens


def test_config_refuses_tiling_with_a_feature_cache_and_in_stage_align(tmp_path):
    with pytest.raises(ConfigError) as info:
        make_config("unused.tar", feature_cache=str(tmp_path), image_tiling={"enabled": True})
    assert "data.image_tiling.enabled" in str(info.value) and "data.feature_cache" in str(info.value)
    with pytest.raises(ConfigError, match=r"data.image_tiling.enabled: tiling feeds the LLM"):
        make_config("unused.tar", stage="align", image_tiling={"enabled": True})
    with pytest.raises(ConfigError, match=r"grid_pinpoints\[1\]: \[3, 3\] has 9 tiles, more than max_tiles=4"):
        make_config("unused.tar", image_tiling={"grid_pinpoints": [[1, 2], [3, 3]]})
    with pytest.raises(ValueError, match="data.image_tiling needs pixels"):
        make_preprocessor(
            make_config("unused.tar", image_tiling={"enabled": True}), make_processors(), use_features=True
        )


def test_loader_batches_hold_every_tile_and_pass_the_self_check(tmp_path):
    processors = make_processors(template="chat")
    samples = []
    for i, (rows, cols) in enumerate([(1, 2), (2, 2), (3, 1), (1, 1)]):
        conv = {
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is this ?"},
                {"from": "gpt", "value": "a picture"},
            ]
        }
        samples.append({"__key__": f"s{i}", "png": _image_bytes(_blocks(rows, cols, 8, seed=i)[0]), "json": conv})
    samples.append(
        {
            "__key__": "s4",
            "png": png(3),
            "json": {
                "conversations": [{"from": "human", "value": "what is this ?"}, {"from": "gpt", "value": "text only"}]
            },
        }
    )
    write_tar(tmp_path / "t-000000.tar", samples)
    cfg = make_config(
        str(tmp_path / "t-000000.tar"),
        max_len=128,
        micro_batch_size=5,
        packing=True,
        self_check_samples=5,
        image_tiling={"enabled": True, "separator": ","},
    )
    batch = next(iter(build_loader(cfg, processors, "train", 0, 1)))
    rows = batch["pixel_values"].shape[0]
    # (1, 2), (2, 2), (3, 1) pick themselves; an 8 x 8 image upscales to the smallest grid (1, 2); a 4 x 4 one too
    assert rows == (1 + 2) + (1 + 4) + (1 + 3) + (1 + 2) + (1 + 2)
    assert int((batch["input_ids"] == processors.image_token_id).sum()) == rows * processors.num_image_tokens


# ----------------------------------------------------------------------------- the model


def _tiny_tiled_run(tmp_path, **data):
    """The tiny fuse recipe with tiling on, reading four conversations about images of several aspects."""
    from helpers.configs import tiny_run_config

    samples = []
    for i, (height, width) in enumerate([(16, 32), (40, 20), (48, 48), (10, 60)]):
        conv = {
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is this?"},
                {"from": "gpt", "value": f"picture {i}"},
            ]
        }
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        samples.append({"__key__": f"s{i}", "png": _image_bytes(pixels), "json": conv})
    shard = str(write_tar(tmp_path / "t-000000.tar", samples))
    (tmp_path / "sizes.json").write_text(json.dumps({"t-000000.tar": len(samples)}))
    cfg = tiny_run_config("fuse", data={"train": [{"shards": [shard]}], "eval": [{"shards": [shard]}], "num_workers": 0,
                                        "max_len": 256, "image_tiling": {"enabled": True}, **data})
    return cfg, samples


def test_tiny_fuse_model_trains_on_a_tiled_batch(tmp_path):
    from mmdist.materialize import build_run_model

    cfg, samples = _tiny_tiled_run(tmp_path, packing=True)
    torch.manual_seed(0)
    model = build_run_model(cfg)
    processors = model.processors
    pre = make_preprocessor(cfg, processors)
    rendered = [pre(_decoded({k: v for k, v in s.items() if k != "__key__"})) for s in samples]
    grids = [r["image_grids"][0] for r in rendered]
    assert grids == [(1, 2), (2, 1), (2, 2), (1, 3)]
    newline = processors.tokenizer.encode("\n", add_special_tokens=False)
    assert len(newline) == 1
    for r, (rows, cols) in zip(rendered, grids):
        assert r["input_ids"].count(processors.image_token_id) == (1 + rows * cols) * processors.num_image_tokens
    batch = collate_fuse(rendered, processors.tokenizer.pad_token_id, pack=True, max_len=256)
    assert batch["pixel_values"].shape == (sum(1 + r * c for r, c in grids), 3, 16, 16)
    model.train()
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss"].backward()
    grads = [p.grad for p in model.trainable_groups()["projector"]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the loader makes the same batch (self-check included)
    loader_batch = next(iter(build_loader(cfg, processors, "train", 0, 1)))
    assert (
        int((loader_batch["input_ids"] == processors.image_token_id).sum())
        == loader_batch["pixel_values"].shape[0] * 16
    )


def test_a_large_jpeg_is_decoded_at_reduced_scale_with_the_file_geometry():
    from mmdist.data.reader import decode_image
    from mmdist.data.tiling import tiled_draft_size
    from mmdist.models.processors import ORIGINAL_SIZE_KEY

    transform = ImageTransform(8, [0.5] * 3, [0.5] * 3)
    settings = ImageTilingConfig(enabled=True)
    y, x = np.mgrid[0:120, 0:400]
    # smooth: JPEG keeps it
    array = np.stack([x * 255 // 400, y * 255 // 120, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    # the 1 x 3 grid's fit (24 x 8) covers the 8 x 8 base
    assert tiled_draft_size(transform, settings, 400, 120) == (24, 8)
    drafted = decode_image(buf.getvalue(), 10**8, lambda w, h: tiled_draft_size(transform, settings, w, h))
    full = decode_image(buf.getvalue(), 10**8)
    assert drafted.size[0] < 400 and drafted.info[ORIGINAL_SIZE_KEY] == (400, 120)
    small, grid = tile_image(drafted, settings, transform)
    large, full_grid = tile_image(full, settings, transform)
    assert grid == full_grid == (1, 3)
    for a, b in zip(small, large):
        assert (a.float() - b.float()).abs().mean() < 6, "a reduced-scale decode gives nearly the same pixels"


def test_answer_evaluation_runs_on_tiled_batches(tmp_path):
    from mmdist.evaluation import evaluate_answers
    from mmdist.materialize import build_run_model

    cfg, _ = _tiny_tiled_run(tmp_path)
    torch.manual_seed(0)
    model = build_run_model(cfg).eval()
    # the prompt keeps every row of pixel_values its images stand for (rows = placeholders / num_image_tokens)
    metrics = evaluate_answers(
        model, build_loader(cfg, model.processors, "eval", 0, 1), max_samples=4, max_new_tokens=2
    )
    assert metrics["samples"] == 4 and len(metrics["records"]) == 4


def test_generate_tiles_each_image_as_in_training(tmp_path, monkeypatch):
    """mmdist generate on a tiled model: each image becomes base + tiles with the prompt's run expanded to its grid."""
    from mmdist import generate
    from mmdist.materialize import build_run_model

    cfg, _ = _tiny_tiled_run(tmp_path)
    torch.manual_seed(0)
    model = build_run_model(cfg).eval()
    seen = []
    real = generate.answer_batch

    def spy(model, prompts, *, pixel_values=None, **kwargs):
        seen.append((list(prompts[0]), pixel_values.shape[0]))
        # the model checks placeholders == rows x tokens
        return real(model, prompts, pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(generate, "answer_batch", spy)
    wide, tall = Image.new("RGB", (64, 16), (250, 0, 0)), Image.new("RGB", (16, 48), (0, 250, 0))
    answers = generate.answer_images(model, [wide, tall], "what is this?", max_new_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    n, iid = model.processors.num_image_tokens, model.processors.image_token_id
    (wide_ids, wide_rows), (tall_ids, tall_rows) = seen
    assert wide_rows == 1 + 3 and tall_rows == 1 + 3  # (1, 3) and (3, 1) grids: the base image plus three tiles
    assert wide_ids.count(iid) == wide_rows * n and tall_ids.count(iid) == tall_rows * n
    newline = model.processors.tokenizer.encode("\n", add_special_tokens=False)[0]
    assert tall_ids.count(newline) - wide_ids.count(newline) == 2  # one separator per row of tiles: 3 rows vs 1
