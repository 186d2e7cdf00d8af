"""data.order=global: the samples of every step depend on the data settings and the step, not on ranks,
micro-batch, accumulation or workers; the position moves between any of them (one process plays every rank)."""

from __future__ import annotations

import multiprocessing
import pickle
from collections import Counter

import pytest
import torch
from helpers.data_fixtures import (
    make_config,
    make_processors,
    new_workers,
    stopped_within,
    write_caption_shards,
    write_tar,
)

from mmdist.data.loader import build_loader
from mmdist.data.streams import HostedStreams

SHARDS = [12, 9, 15, 12, 10, 14]  # 72 samples, uneven shards


_BUILT: list = []  # every loader a test built, closed when it ends (as the trainer closes its own)


@pytest.fixture(autouse=True)
def _close_loaders():
    yield
    while _BUILT:
        _BUILT.pop().close()


def _loaders(pattern, world: int, micro: int, global_batch: int = 12, **data):
    data.setdefault("shuffle_buffer", 16)
    data.setdefault("num_workers", 0)
    cfg = make_config(pattern, order="global", micro_batch_size=micro, global_batch_size=global_batch, **data)
    loaders = [build_loader(cfg, make_processors(), "train", r, world) for r in range(world)]
    _BUILT.extend(loaders)
    return loaders


def _endless(loader):
    while True:  # an iteration is one epoch; the trainer's Batches goes on the same way
        yield from loader


def _steps(loaders, steps: int, iterators=None) -> list[list[list[str]]]:
    """Per step, per rank, the keys of its micro-batches in order (``iterators`` continue earlier iterations)."""
    iterators = iterators or [_endless(loader) for loader in loaders]
    out = []
    for _ in range(steps):
        ranks = []
        for loader, it in zip(loaders, iterators):
            micro = []
            for _ in range(loader.accumulation):
                next(it)
                micro.append(list(loader.last_keys))
            ranks.append(micro)
        out.append(ranks)
    return out


def _step_keys(steps) -> list[list[str]]:
    return [sorted(k for rank in step for micro in rank for k in micro) for step in steps]


@pytest.mark.parametrize("world,micro,workers", [(2, 2, 0), (3, 1, 2), (4, 3, 1)])
def test_steps_hold_the_same_samples_on_any_world_micro_batch_and_workers(tmp_path, world, micro, workers):
    pattern = write_caption_shards(tmp_path, SHARDS)
    reference = _step_keys(_steps(_loaders(pattern, 1, 12), 8))
    # an epoch, once
    assert Counter(k for step in reference[:6] for k in step) == Counter(f"s{i:06d}" for i in range(72))
    one_epoch = _loaders(pattern, 1, 12)[0]
    assert len(one_epoch) == 6 and len(list(one_epoch)) == 6 and len(list(one_epoch)) == 6  # then the next epoch
    steps = _steps(_loaders(pattern, world, micro, num_workers=workers), 8)
    assert _step_keys(steps) == reference
    for step in steps:  # ranks disjoint, every micro-batch of every rank holds a sample
        keys = [k for rank in step for m in rank for k in m]
        assert len(keys) == len(set(keys)) == 12
        assert all(m for rank in step for m in rank)
    other_seed = _step_keys(_steps(_loaders(pattern, 1, 12, seed=1), 8))
    assert other_seed != reference  # the order is the seed's (the test can fail)


def test_position_moves_from_4_to_2_to_3_ranks_and_continues_the_same_steps(tmp_path):
    pattern = write_caption_shards(tmp_path, SHARDS)
    reference = _step_keys(_steps(_loaders(pattern, 1, 12), 9))
    first = _loaders(pattern, 4, 1)
    seen = _steps(first, 3)
    states = pickle.loads(pickle.dumps([loader.state_dict() for loader in first]))
    second = _loaders(pattern, 2, 3)
    for loader in second:
        loader.load_elastic_state(states)
    seen += _steps(second, 3)
    states = pickle.loads(pickle.dumps([loader.state_dict() for loader in second]))
    third = _loaders(pattern, 3, 2, num_workers=2)
    for loader in third:
        loader.load_elastic_state(states)
    seen += _steps(third, 3)
    assert _step_keys(seen) == reference


def test_same_size_resume_inside_a_step_gives_the_same_next_batches(tmp_path):
    pattern = write_caption_shards(tmp_path, SHARDS)
    loaders = _loaders(pattern, 2, 2, num_workers=2)
    loader = loaders[1]
    it = _endless(loader)
    for _ in range(7):  # two steps of 3 micro-batches and one micro-batch into the third
        next(it)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    want = [next(it) for _ in range(5)]
    again = _loaders(pattern, 2, 2, num_workers=2)[1]
    again.load_state_dict(state)
    got = [b for b, _ in zip(_endless(again), range(5))]
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(want, got))


def test_bad_samples_are_replaced_by_their_streams_next_on_any_world_size(tmp_path):
    pattern = write_caption_shards(tmp_path, SHARDS)
    broken = tmp_path / "train-000001.tar"  # rewrite one shard with a corrupt image and a sample without a caption
    from helpers.data_fixtures import caption_sample

    samples = [caption_sample(12 + i) for i in range(9)]
    samples[2]["png"] = b"not a png"
    del samples[5]["txt"]
    write_tar(broken, samples)
    reference = _step_keys(_steps(_loaders(pattern, 1, 12, max_bad_fraction=0.5), 7))
    moved = _step_keys(_steps(_loaders(pattern, 3, 2, max_bad_fraction=0.5), 7))
    assert moved == reference and all(len(step) == 12 for step in reference)
    flat = {k for step in reference[:6] for k in step}
    assert "s000014" not in flat and "s000017" not in flat


def test_grouping_and_packing_change_the_split_not_the_steps(tmp_path):
    pattern = write_caption_shards(tmp_path, SHARDS)
    reference = _step_keys(_steps(_loaders(pattern, 1, 12), 4))
    grouped = _loaders(pattern, 2, 2, group_by_length=True)
    assert _step_keys(_steps(grouped, 4)) == reference
    packed = _loaders(pattern, 2, 3, packing=True, max_len=64)
    batch = next(iter(_loaders(pattern, 2, 3, packing=True, max_len=64)[0]))
    assert "sequence_ids" in batch and batch["input_ids"].shape[1] <= 64
    assert _step_keys(_steps(packed, 4)) == reference


def test_balance_report_and_count_split(tmp_path):
    pattern = write_caption_shards(tmp_path, SHARDS)
    balanced = _loaders(pattern, 4, 2, global_batch=24)
    _steps(balanced, 2)
    report = balanced[0].step_report()
    assert set(report) >= {"cost_imbalance", "micro_cost_imbalance", "rank_cost", "samples_moved", "data_exchange_s"}
    assert 1.0 <= report["cost_imbalance"] <= 1.05
    by_count = _loaders(pattern, 4, 2, global_batch=24, balance=False)
    steps = _steps(by_count, 2)
    assert all(len(m) == 2 for step in steps for rank in step for m in rank)  # equal sample counts
    assert _step_keys(steps) == _step_keys(_steps(_loaders(pattern, 1, 24, global_batch=24), 2))


def test_resampled_mode_is_world_size_independent_and_mixes_by_weight(tmp_path):
    a = write_caption_shards(tmp_path / "a", [4, 4], prefix="a")
    b = write_caption_shards(tmp_path / "b", [4], prefix="b", start=1000)

    def loaders(world, micro):
        cfg = make_config(a, order="global", mode="resampled", samples_per_epoch=400, micro_batch_size=micro,
                          global_batch_size=8, shuffle_buffer=4, streams=4)
        cfg.data.train.append(type(cfg.data.train[0])(shards=[b], weight=3.0, name="b"))
        return [build_loader(cfg, make_processors(), "train", r, world) for r in range(world)]

    reference = _step_keys(_steps(loaders(1, 8), 30))
    assert _step_keys(_steps(loaders(2, 2), 30)) == reference
    from_b = sum(1 for step in reference for k in step if int(k[1:]) >= 1000) / (30 * 8)
    assert 0.6 < from_b < 0.9


def test_state_of_another_order_or_setting_is_refused(tmp_path):
    pattern = write_caption_shards(tmp_path, SHARDS)
    loader = _loaders(pattern, 2, 2)[0]
    per_rank = build_loader(make_config(pattern, micro_batch_size=2), make_processors(), "train", 0, 2)
    with pytest.raises(ValueError, match="per rank"):
        loader.load_elastic_state([per_rank.state_dict()] * 2)
    other = _loaders(pattern, 2, 2, streams=3)[0]
    with pytest.raises(ValueError, match="streams=6 but this run has streams=3"):
        other.load_elastic_state([loader.state_dict()] * 2)


def test_close_stops_the_workers_at_once_and_the_next_iteration_goes_on_where_it_stopped(tmp_path):
    pattern = write_caption_shards(tmp_path, SHARDS)
    reference = _loaders(pattern, 1, 3)[0]
    want = [list(reference.last_keys) for _ in zip(range(10), _endless(reference))]
    before = set(multiprocessing.active_children())
    loader = _loaders(pattern, 1, 3, num_workers=2)[0]
    got = [list(loader.last_keys) for _ in zip(range(5), _endless(loader))]  # a step and one micro-batch
    workers = new_workers(before)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    loader.close()
    assert stopped_within(workers, 1.0), "close() left data workers running"
    got += [list(loader.last_keys) for _ in zip(range(5), _endless(loader))]  # new workers, the same batches
    assert got == want
    loader.close()
    loader.close()  # idempotent


def test_a_data_worker_error_leaves_no_workers_behind_while_the_error_is_kept(tmp_path, monkeypatch):
    reads = HostedStreams.__iter__
    go = multiprocessing.get_context("fork").Event()  # the workers fork with it: they fail once the test has them

    def store_gone_after_a_step(self):
        yield next(reads(self))
        go.wait(60)
        raise OSError("the shard store went away")

    pattern = write_caption_shards(tmp_path, SHARDS)
    loader = _loaders(pattern, 1, 3, num_workers=2)[0]
    monkeypatch.setattr(HostedStreams, "__iter__", store_gone_after_a_step)  # the workers fork after this
    before = set(multiprocessing.active_children())
    batches = iter(loader)
    next(batches)
    workers = new_workers(before)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    go.set()
    with pytest.raises(OSError, match="went away") as error:
        for _ in batches:  # the step's other micro-batches, then the next step's read fails
            pass
    loader.close()
    assert stopped_within(workers, 1.0), "the kept error holds the data workers"
    assert "the shard store went away" in str(error.value)
