"""The data position moves between world sizes: N ranks read part of an epoch, M ranks read exactly the rest."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch
from helpers.data_fixtures import make_config, make_processors, write_caption_shards

from mmdist.data.loader import build_loader


def _read(loader, batches: int) -> list[str]:
    """The keys of the first ``batches`` batches of a new iteration (an epoch, or the rest of a resumed one)."""
    return _take_keys(loader, iter(loader), batches)


def _take_keys(loader, it, batches: int) -> list[str]:
    keys: list[str] = []
    for _ in range(batches):
        next(it)
        keys.extend(loader.last_keys)
    return keys


def _epoch_keys(loader) -> list[str]:
    keys: list[str] = []
    for _ in loader:
        keys.extend(loader.last_keys)
    return keys


@pytest.mark.parametrize(
    "before,after,num_workers,group", [(2, 1, 0, False), (2, 3, 2, False), (2, 3, 2, True), (3, 2, 1, False)]
)
def test_epoch_continues_on_another_world_size_without_repeats_or_gaps(tmp_path, before, after, num_workers, group):
    processors = make_processors()
    # 72 samples: an uninterrupted run sees each once on 1, 2 or 3 ranks with micro-batch 2
    pattern = write_caption_shards(tmp_path, [12, 12, 12, 12, 12, 12])
    cfg = make_config(pattern, num_workers=num_workers, shuffle_buffer=5, micro_batch_size=2, group_by_length=group,
                      length_group_batches=2, persistent_workers=num_workers > 0)
    all_keys = {f"s{i:06d}" for i in range(72)}

    first = [build_loader(cfg, processors, "train", r, before) for r in range(before)]
    seen_before = [k for loader in first for k in _read(loader, 6)]  # the rest divides evenly; buffer: not a prefix
    states = pickle.loads(pickle.dumps([loader.state_dict() for loader in first]))

    second = [build_loader(cfg, processors, "train", r, after) for r in range(after)]
    for loader in second:
        loader.load_elastic_state(states)
    lengths = {len(loader) for loader in second}
    assert len(lengths) == 1  # equal batches on every rank: no collective waits forever
    seen_after = [k for loader in second for k in _epoch_keys(loader)]

    together = Counter(seen_before + seen_after)
    assert set(together) == all_keys and max(together.values()) == 1  # one full epoch, nothing twice
    assert len(seen_after) == lengths.pop() * after * 2
    # the next epoch is planned for the new world as usual: every sample once again
    next_epoch = [k for loader in second for k in _epoch_keys(loader)]
    assert Counter(next_epoch) == Counter(all_keys)


def test_second_move_and_same_size_resume_of_a_continued_epoch(tmp_path):
    """2 ranks -> 3 ranks (part of the rest) -> same 3 ranks resume exactly -> 1 rank finishes the epoch."""
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [12, 12, 12, 12, 12, 12])
    cfg = make_config(pattern, num_workers=2, shuffle_buffer=5, micro_batch_size=2, persistent_workers=False)
    first = [build_loader(cfg, processors, "train", r, 2) for r in range(2)]
    seen = [k for loader in first for k in _read(loader, 4)]
    states = [loader.state_dict() for loader in first]

    second = [build_loader(cfg, processors, "train", r, 3) for r in range(3)]
    for loader in second:
        loader.load_elastic_state(states)
    iterators = [iter(loader) for loader in second]
    for loader, it in zip(second, iterators):
        for _ in range(3):
            next(it)
            seen += loader.last_keys
    states3 = pickle.loads(pickle.dumps([loader.state_dict() for loader in second]))
    # a same-size resume of the continued epoch replays the exact next batches
    expected = [next(iterators[0]) for _ in range(2)]
    again = build_loader(cfg, processors, "train", 0, 3)
    again.load_state_dict(states3[0])
    it = iter(again)
    for want in expected:
        got = next(it)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)

    third = build_loader(cfg, processors, "train", 0, 1)
    third.load_elastic_state(states3)
    seen += _epoch_keys(third)
    together = Counter(seen)
    assert set(together) == {f"s{i:06d}" for i in range(72)} and max(together.values()) == 1


def test_uneven_rest_pads_the_last_batch_from_the_same_rank(tmp_path):
    """When the rest does not divide into whole batches on every rank, the short batches repeat a few samples."""
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [10, 10, 10, 10])
    cfg = make_config(pattern, num_workers=0, shuffle_buffer=0, micro_batch_size=2, persistent_workers=False)
    first = [build_loader(cfg, processors, "train", r, 2) for r in range(2)]
    seen = [k for loader in first for k in _read(loader, 3)]  # 12 of 40 read: 28 left
    second = [build_loader(cfg, processors, "train", r, 3) for r in range(3)]
    for loader in second:
        loader.load_elastic_state([loader_.state_dict() for loader_ in first])
    assert {len(loader) for loader in second} == {5}  # ceil(28 / (3 x 2))
    after = [k for loader in second for k in _epoch_keys(loader)]
    assert len(after) == 30
    assert set(seen) | set(after) == {f"s{i:06d}" for i in range(40)} and not set(seen) & set(after)
    assert len(set(after)) == 28  # 2 padding samples repeat one of their rank's own


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_epoch_continues_on_another_world_size_deterministically(tmp_path, num_workers):
    """2 ranks draw 3 batches each of a 40-sample resampled epoch; 1 rank draws the 28 samples left, from new
    streams that are the same on every rerun; a second move (1 -> 2 ranks) and a same-size resume continue it."""
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [7, 9, 11])
    cfg = make_config(pattern, mode="resampled", samples_per_epoch=40, num_workers=num_workers, shuffle_buffer=4,
                      persistent_workers=False)
    first = [build_loader(cfg, processors, "train", r, 2) for r in range(2)]
    assert {len(loader) for loader in first} == {10}  # 40 samples = 2 ranks x 10 batches of 2
    for loader in first:
        _read(loader, 3)
    states = pickle.loads(pickle.dumps([loader.state_dict() for loader in first]))

    def continued(world, rank, saved):
        loader = build_loader(cfg, processors, "train", rank, world)
        loader.load_elastic_state(saved)
        return loader

    second = continued(1, 0, states)
    assert second.epoch == 0 and len(second) == 14  # the epoch's 40 - 12 samples drawn, in batches of 2
    assert _read(continued(1, 0, states), 14) == _read(second, 14)  # deterministic: a rerun draws the same
    restarted = build_loader(cfg, processors, "train", 0, 1)  # what a resume that restarted the epoch would draw
    assert _read(restarted, 14) != _read(continued(1, 0, states), 14)

    # a second move within the same epoch: 1 rank draws 4 batches, then 2 ranks share the 20 samples left
    partial = continued(1, 0, states)
    _read(partial, 4)
    saved = pickle.loads(pickle.dumps([partial.state_dict()]))
    third = [continued(2, r, saved) for r in range(2)]
    assert {len(loader) for loader in third} == {5} and {loader.epoch for loader in third} == {0}
    # a same-size resume of the continued epoch replays its exact next batches
    it = iter(third[1])
    _take_keys(third[1], it, 2)
    state = pickle.loads(pickle.dumps(third[1].state_dict()))
    want = _take_keys(third[1], it, 3)
    again = build_loader(cfg, processors, "train", 1, 2)
    again.load_state_dict(state)
    it = iter(again)
    assert _take_keys(again, it, 3) == want
    # the epoch ends where an uninterrupted one does (5 batches on this rank), then a regular epoch of this world
    assert next(it, None) is None
    assert again.epoch == 1 and len(again) == 10


def test_resampled_epoch_drawn_to_its_end_moves_on_to_the_next(tmp_path):
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [7, 9, 11])
    cfg = make_config(pattern, mode="resampled", samples_per_epoch=40, num_workers=0, persistent_workers=False)
    first = [build_loader(cfg, processors, "train", r, 2) for r in range(2)]
    for loader in first:
        _read(loader, len(loader))
    second = build_loader(cfg, processors, "train", 0, 3)
    second.load_elastic_state([loader.state_dict() for loader in first])
    assert second.epoch == 1 and len(second) == 6  # 40 // (3 x 2)


def test_state_before_the_global_position_is_refused(tmp_path):
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [10, 10])
    cfg = make_config(pattern, num_workers=0, micro_batch_size=2, persistent_workers=False)
    old = build_loader(cfg, processors, "train", 0, 2)
    _read(old, 1)
    state = {k: v for k, v in old.state_dict().items() if k not in ("consumed", "base", "batches_in_epoch")}
    state["version"] = 1  # as written before the global position existed
    with pytest.raises(ValueError, match="version 1"):
        build_loader(cfg, processors, "train", 0, 1).load_elastic_state([state, state])


def test_checkpoint_at_the_last_batch_of_an_epoch_moves_on_to_the_next(tmp_path):
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [10, 10])
    cfg = make_config(pattern, num_workers=0, shuffle_buffer=3, micro_batch_size=2, persistent_workers=False)
    first = [build_loader(cfg, processors, "train", r, 2) for r in range(2)]
    for loader in first:
        _read(loader, len(loader))  # the whole epoch handed out, the iteration not yet finished
    second = build_loader(cfg, processors, "train", 0, 1)
    second.load_elastic_state([loader.state_dict() for loader in first])
    assert second.epoch == 1
    assert Counter(_epoch_keys(second)) == Counter(f"s{i:06d}" for i in range(20))


def test_position_of_other_shards_is_refused(tmp_path):
    processors = make_processors()
    first = [
        build_loader(
            make_config(write_caption_shards(tmp_path / "a", [10, 10]), num_workers=0, micro_batch_size=2),
            processors,
            "train",
            r,
            2,
        )
        for r in range(2)
    ]
    for loader in first:
        _read(loader, 1)
    moved = build_loader(make_config(write_caption_shards(tmp_path / "b", [10, 10]), num_workers=0, micro_batch_size=2),
                         processors, "train", 0, 1)
    with pytest.raises(ValueError, match="shard.s. this run does not read"):
        moved.load_elastic_state([loader.state_dict() for loader in first])
