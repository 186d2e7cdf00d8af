"""The planner's micro-batch against the collator's: tokens planned from the shards' statistics vs batches built.

Shards are written with the shard writer (the demo digits, and a skewed mixture of
text-only, one-image, tiled and three-image samples), the plan is made from their
stats.json, and real batches come from the loader with the tiny model's processors.
"""

from __future__ import annotations

import pytest
from helpers.configs import tiny_run_config
from helpers.mixtures import skewed_samples

from mmdist.data.loader import build_loader
from mmdist.data.shards import shard_pattern, write_demo_shards, write_shards
from mmdist.models.fused import supervised_mask
from mmdist.plan.lengths import batch_tokens
from mmdist.plan.shapes import model_shapes


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("lengths")
    demo = write_demo_shards(root / "demo", image_size=16, samples_per_shard=100, limit=240)["train"]
    mixed = write_shards(skewed_samples(320), root / "mixed", prefix="mix", samples_per_shard=80)
    return {"demo": shard_pattern(demo), "mixed": shard_pattern(mixed)}


@pytest.fixture(scope="module")
def processors():
    from mmdist.materialize import build_run_model

    return build_run_model(tiny_run_config("fuse")).processors


def _config(pattern: str, packing: bool, micro: int, tiling: bool = False, max_len: int = 256):
    return tiny_run_config("fuse", f"data.packing={str(packing).lower()}", f"train.micro_batch_size={micro}",
                           f"train.global_batch_size={micro}", f"data.max_len={max_len}",
                           f"data.image_tiling.enabled={str(tiling).lower()}",
                           data={"train": [{"shards": [pattern]}], "eval": [], "num_workers": 0, "shuffle_buffer": 50})


def _collated(cfg, processors) -> dict:
    """Means per micro-batch over one epoch of real batches: real tokens, positions, tower images, and the supervised
    tokens (those the loss is taken on, where the LM head runs)."""
    loader = build_loader(cfg, processors, "train", 0, 1)
    real = positions = images = batches = supervised = 0
    for batch in loader:
        real += int(batch["attention_mask"].sum())
        supervised += int(supervised_mask(batch).sum())
        positions += batch["input_ids"].numel()
        images += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        batches += 1
    assert batches >= 10, "too few batches for a mean"
    return {"tokens": real / batches, "positions": positions / batches, "tower_images": images / batches,
            "supervised_tokens": supervised / batches}


@pytest.mark.parametrize("data,packing,tiling,micro", [
    ("demo", True, False, 16), ("demo", False, False, 8),
    ("mixed", True, False, 8), ("mixed", True, True, 8), ("mixed", False, True, 8)])
def test_planned_tokens_are_within_10_percent_of_the_collated(shards, processors, data, packing, tiling, micro):
    cfg = _config(shards[data], packing, micro, tiling)
    planned = batch_tokens(cfg, model_shapes(cfg))
    built = _collated(cfg, processors)
    assert planned.source == "shard statistics"
    for key in ("tokens", "positions", "tower_images", "supervised_tokens"):
        assert getattr(planned, key) == pytest.approx(built[key], rel=0.10), (key, getattr(planned, key), built[key])
    print(f"{data} packing={packing} tiling={tiling}: planned {planned.tokens:.0f} tokens, {planned.positions:.0f} "
          f"positions, {planned.tower_images:.1f} tower images, {planned.supervised_tokens:.0f} supervised; "
          f"collated {built['tokens']:.0f}, {built['positions']:.0f}, "
          f"{built['tower_images']:.1f}, {built['supervised_tokens']:.0f}")
    # memory is sized above the mean micro-batch and never above every sample at max_len
    assert planned.positions <= planned.peak_positions <= micro * cfg.data.max_len
    if data == "demo":  # the worst case the planner used before statistics existed is far off on short samples
        assert micro * cfg.data.max_len > 3 * built["positions"]


def test_mixture_is_skewed_as_intended(shards, processors):
    """The mixture's kinds really differ in length: tiling adds positions, text-only rows are the longest."""
    configs = (_config(shards["mixed"], True, 8, tiling) for tiling in (False, True))
    plain, tiled = (batch_tokens(c, model_shapes(c)) for c in configs)
    assert tiled.tokens > 1.15 * plain.tokens and tiled.tower_images > 1.3 * plain.tower_images


def test_without_statistics_the_plan_says_what_it_used(tmp_path):
    from helpers.data_fixtures import write_caption_shards

    pattern = write_caption_shards(tmp_path / "old", [4, 4])  # no stats.json: shards of an older writer
    cfg = _config(pattern, True, 8)
    worst = batch_tokens(cfg, model_shapes(cfg))
    assert worst.source == "worst case" and worst.tokens == worst.positions == 8 * 256
    assert "has a stats.json entry" in worst.note and "data.mean_tokens_per_sample" in worst.note
    cfg = tiny_run_config("fuse", "data.packing=true", "train.micro_batch_size=8", "train.global_batch_size=8",
                          "data.max_len=256", "data.mean_tokens_per_sample=100",
                          data={"train": [{"shards": [pattern]}], "eval": []})
    mean = batch_tokens(cfg, model_shapes(cfg))
    assert mean.source == "configured mean" and mean.tokens == 800
    assert mean.peak_positions == 4 * 256  # ceil(800 / 256) rows, counted full for memory
    assert "data.mean_tokens_per_sample=100" in mean.note
    missing = tiny_run_config("fuse", data={"train": [{"shards": [str(tmp_path / "gone-{000000..000003}.tar")]}]})
    assert "not on this machine" in batch_tokens(missing, model_shapes(missing)).note


def test_unreadable_statistics_fall_back_and_say_so(tmp_path):
    import json

    from mmdist.data.shard_stats import STATS_FILE

    write_shards(skewed_samples(20), tmp_path, samples_per_shard=10)
    stats = json.loads((tmp_path / STATS_FILE).read_text())
    for entry in stats.values():  # another tool's file: the groups lack the summaries the planner reads
        entry["by_images"] = {k: {"samples": g["samples"]} for k, g in entry["by_images"].items()}
    (tmp_path / STATS_FILE).write_text(json.dumps(stats))
    cfg = _config(str(tmp_path / "shard-{000000..000001}.tar"), True, 8)
    planned = batch_tokens(cfg, model_shapes(cfg))
    assert planned.source == "worst case" and "could not be read (KeyError" in planned.note


def test_statistics_without_answers_count_every_text_token(tmp_path, processors):
    """Shards written before answers were recorded: the supervised tokens are bounded above by the text tokens, and
    the plan says so; with the answers recorded, the same shards plan fewer."""
    import json

    from mmdist.data.shard_stats import STATS_FILE

    write_shards(skewed_samples(160), tmp_path, samples_per_shard=80)
    cfg = _config(str(tmp_path / "shard-{000000..000001}.tar"), True, 8)
    recorded = batch_tokens(cfg, model_shapes(cfg))
    stats = json.loads((tmp_path / STATS_FILE).read_text())
    for entry in stats.values():
        for group in entry["by_images"].values():
            del group["answers"], group["answer_chars_mean"]
    (tmp_path / STATS_FILE).write_text(json.dumps(stats))
    bound = batch_tokens(cfg, model_shapes(cfg))
    built = _collated(cfg, processors)
    assert "answers not recorded" in bound.note and "answers not recorded" not in recorded.note
    assert bound.tokens == pytest.approx(recorded.tokens)
    assert bound.supervised_tokens >= built["supervised_tokens"] > 0
    assert bound.supervised_tokens > 1.5 * recorded.supervised_tokens
    assert bound.peak_supervised_tokens >= recorded.peak_supervised_tokens


def test_the_stats_know_which_turns_the_preprocessor_supervises():
    from mmdist.data.preprocess import ROLE_MAP
    from mmdist.data.shard_stats import ASSISTANT_ROLES

    assert set(ASSISTANT_ROLES) == {k for k, v in ROLE_MAP.items() if v == "assistant"}


def test_the_split_search_loads_the_tokenizer_once(shards, monkeypatch):
    """mmdist plan tries every micro-batch of a rank's share; the run's tokenizer (a hub tokenizer can take seconds)
    is read once for them all, and again only for other LLM settings."""
    from mmdist.plan import lengths
    from mmdist.plan.memory import Setting
    from mmdist.plan.micro_batch import fastest_split
    from mmdist.plan.step_time import interconnect_for

    loads = []
    real = lengths._load_planner_tokenizer
    monkeypatch.setattr(lengths, "_load_planner_tokenizer", lambda cfg: loads.append(1) or real(cfg))
    monkeypatch.setattr(lengths, "_LAST_TOKENIZER", {})
    cfg = _config(shards["demo"], True, 8)
    best, splits = fastest_split(cfg, model_shapes(cfg), 1, "cpu", interconnect_for("cpu"), 1 << 40, [Setting(0)], 0)
    assert [s.micro_batch for s in splits] == [1, 2, 4, 8] and len(loads) == 1
    assert best.tokens.source == "shard statistics"
    other = _config(shards["demo"], True, 8, max_len=128)
    batch_tokens(other, model_shapes(other))  # data settings differ, the LLM's do not: still the same tokenizer
    assert len(loads) == 1
