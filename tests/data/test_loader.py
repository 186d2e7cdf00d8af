"""build_loader: every sample once across ranks x workers, equal batch counts, resampled mode, batch layout."""

from __future__ import annotations

import multiprocessing
from collections import Counter

import pytest
import torch
from helpers.data_fixtures import make_config, make_processors, new_workers, stopped_within, write_caption_shards

from mmdist.data.loader import build_loader
from mmdist.data.stream import ShardStream


def _epoch_keys(cfg, processors, rank, world):
    loader = build_loader(cfg, processors, "train", rank, world)
    keys, batches = [], 0
    for batch in loader:
        assert batch["input_ids"].shape[0] == cfg.train.micro_batch_size
        keys.extend(loader.last_keys)
        batches += 1
    return loader, keys, batches


def _one_epoch(loader) -> list[str]:
    """The sample keys of one full pass over ``loader``, in order."""
    keys = []
    for _batch in loader:
        keys.extend(loader.last_keys)
    return keys


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_and_workers_see_each_sample_exactly_once(tmp_path, processors, num_workers):
    pattern = write_caption_shards(tmp_path, [12, 12, 12, 12])
    cfg = make_config(pattern, num_workers=num_workers, shuffle_buffer=5, micro_batch_size=3, persistent_workers=False)
    seen: Counter = Counter()
    counts = []
    for rank in range(2):
        loader, keys, batches = _epoch_keys(cfg, processors, rank, 2)
        assert batches == len(loader) == 8
        counts.append(batches)
        seen.update(keys)
    assert len(seen) == 48 and set(seen.values()) == {1}, "every sample exactly once across 2 ranks x workers"


def test_epochs_reshuffle_but_keep_coverage(tmp_path, processors):
    pattern = write_caption_shards(tmp_path, [6, 6, 6, 6])
    cfg = make_config(pattern, shuffle_buffer=4)
    loader = build_loader(cfg, processors, "train", 0, 1)
    epochs = [_one_epoch(loader) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 24
    assert epochs[0] != epochs[1], "epoch 1 must use another shard/sample order (seed + epoch)"


def test_equal_batch_counts_across_ranks_with_uneven_shards(tmp_path, processors):
    pattern = write_caption_shards(tmp_path, [5, 17, 3, 9, 30, 1, 2])
    cfg = make_config(pattern, num_workers=2, micro_batch_size=4, persistent_workers=False)
    counts, lens = [], []
    seen: Counter = Counter()
    for rank in range(3):
        loader, keys, batches = _epoch_keys(cfg, processors, rank, 3)
        counts.append(batches)
        lens.append(len(loader))
        seen.update(keys)
    assert counts == lens and len(set(counts)) == 1, f"batches per rank differ: {counts}"
    assert counts[0] == -(-67 // (3 * 4))
    assert len(seen) >= 60, "wrap-around/drop must only touch a few samples"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fewer_shards_than_ranks_splits_by_sample(tmp_path, processors, num_workers):
    pattern = write_caption_shards(tmp_path, [12])
    cfg = make_config(
        pattern, eval_shards=[pattern], num_workers=num_workers, micro_batch_size=2, persistent_workers=False
    )
    seen: Counter = Counter()
    for rank in range(3):
        loader = build_loader(cfg, processors, "eval", rank, 3)
        n = 0
        for _batch in loader:
            seen.update(loader.last_keys)
            n += 1
        assert n == len(loader) == 2
    assert len(seen) == 12 and set(seen.values()) == {1}


def test_persistent_workers_run_several_epochs(tmp_path, processors):
    pattern = write_caption_shards(tmp_path, [8, 8, 8, 8])
    cfg = make_config(pattern, num_workers=2, persistent_workers=True, shuffle_buffer=4, micro_batch_size=4)
    loader = build_loader(cfg, processors, "train", 0, 1)
    epochs = [_one_epoch(loader) for _ in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) and len(set(e)) == 32 for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    # a loader built fresh at epoch 2 (no persistent workers) agrees with the persistent one
    other = build_loader(
        make_config(pattern, num_workers=2, persistent_workers=False, shuffle_buffer=4, micro_batch_size=4),
        processors,
        "train",
        0,
        1,
    )
    other.load_state_dict({**loader.state_dict(), "epoch": 2, "workers": {}})
    assert _one_epoch(other) == epochs[2]


def test_shard_list_file_and_img2dataset_stats(tmp_path, processors):
    import json

    pattern = write_caption_shards(tmp_path / "d", [3, 5], sizes=False)
    (tmp_path / "d" / "train-000000_stats.json").write_text(
        json.dumps({"count": 4, "successes": 3, "failed_to_download": 1})
    )
    (tmp_path / "list.txt").write_text("# shards\nd/train-000000.tar\nd/train-000001.tar\n")
    cfg = make_config(str(tmp_path / "list.txt"), micro_batch_size=2)
    loader = build_loader(cfg, processors, "train", 0, 1)
    assert [s.size for s in loader.dataset.shards] == [3, 5]  # stats file, then counted from the tar
    assert [s.url for s in loader.dataset.shards] == [
        str(tmp_path / "d" / "train-000000.tar"),
        str(tmp_path / "d" / "train-000001.tar"),
    ]
    assert len(loader) == 4 and pattern.endswith(".tar")


def test_resampled_mode_budget_and_mixing(tmp_path, processors):
    a = write_caption_shards(tmp_path / "a", [4, 4], prefix="a")
    b = write_caption_shards(tmp_path / "b", [4], prefix="b", start=1000)
    cfg = make_config(a, mode="resampled", samples_per_epoch=400, micro_batch_size=2)
    cfg.data.train.append(type(cfg.data.train[0])(shards=[b], weight=3.0, name="b"))
    from_b = total = 0
    for rank in range(2):
        loader = build_loader(cfg, processors, "train", rank, 2)
        n = 0
        for _batch in loader:
            n += 1
            from_b += sum(1 for k in loader.last_keys if int(k[1:]) >= 1000)
            total += len(loader.last_keys)
        assert n == len(loader) == 100
    assert 0.65 < from_b / total < 0.85, f"weight 3:1 should give ~75% from source b, got {from_b / total:.2f}"


def test_eval_split_is_ordered_and_separate(tmp_path, processors):
    train = write_caption_shards(tmp_path / "train", [4, 4], prefix="train")
    held = write_caption_shards(tmp_path / "eval", [4], prefix="eval")
    cfg = make_config(train, eval_shards=[held], shuffle_buffer=100)
    loader = build_loader(cfg, processors, "eval", 0, 1)
    keys = [_one_epoch(loader) for _ in range(2)]
    assert keys[0] == keys[1] == [f"s{i:06d}" for i in range(4)]


def test_batch_layout_pad_to_longest(tmp_path, processors):
    pattern = write_caption_shards(tmp_path, [8])
    cfg = make_config(pattern, micro_batch_size=4)
    batch = next(iter(build_loader(cfg, processors, "train", 0, 1)))
    ids, mask, labels, pos = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]
    assert ids.dtype == torch.long and ids.shape == mask.shape == labels.shape == pos.shape
    pad = processors.tokenizer.pad_token_id
    assert ((mask == 0) == (ids == pad)).all()
    assert (labels[mask == 0] == -100).all()
    assert (labels[ids == processors.image_token_id] == -100).all()
    assert ((ids == processors.image_token_id).sum(1) == processors.num_image_tokens).all()
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    for row in range(4):
        n = int(mask[row].sum())
        assert torch.equal(pos[row, :n], torch.arange(n))
    assert "sequence_ids" not in batch


def test_align_batches(tmp_path):
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [6])
    cfg = make_config(pattern, stage="align", micro_batch_size=3)
    batch = next(iter(build_loader(cfg, processors, "train", 0, 1)))
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["text_input_ids"].shape == batch["text_attention_mask"].shape
    assert batch["caption_group"].tolist() == [0, 1, 2]


def test_abandoned_epochs_with_persistent_workers(tmp_path, processors):
    pattern = write_caption_shards(tmp_path, [8, 8, 8, 8])
    cfg = make_config(pattern, eval_shards=[pattern], num_workers=2, persistent_workers=True, micro_batch_size=2)
    loader = build_loader(cfg, processors, "eval", 0, 1)
    firsts = []
    for _ in range(3):  # like periodic evaluation: a few batches, then break
        keys = []
        for i, _batch in enumerate(loader):
            keys.extend(loader.last_keys)
            if i == 2:
                break
        firsts.append(keys)
    assert firsts[0] == firsts[1] == firsts[2] and len(firsts[0]) == 6
    train = build_loader(cfg, processors, "train", 0, 1)
    it = iter(train)
    next(it)
    assert train.epoch == 0
    full = list(train)  # a new iteration after an abandoned one is the next epoch, complete
    assert train.epoch == 2 and len(full) == len(train) == 16


@pytest.mark.parametrize("persistent", [True, False])
def test_close_stops_the_workers_at_once(tmp_path, processors, persistent):
    pattern = write_caption_shards(tmp_path, [8, 8, 8, 8])
    cfg = make_config(pattern, num_workers=2, persistent_workers=persistent, micro_batch_size=2)
    loader = build_loader(cfg, processors, "train", 0, 1)
    before = set(multiprocessing.active_children())
    batches = iter(loader)
    next(batches)  # an epoch left part-way, as a run's end leaves it
    workers = new_workers(before)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    loader.close()
    assert stopped_within(workers, 1.0), "close() left data workers running"
    assert len(list(loader)) == len(loader) == 16 and loader.epoch == 2  # then the next epoch, whole, new workers
    loader.close()


def test_a_data_worker_error_leaves_no_workers_behind_once_closed(tmp_path, processors, monkeypatch):
    reads = ShardStream.worker_batches

    def store_gone_after_a_batch(self, *args, **kwargs):
        yield next(reads(self, *args, **kwargs))
        raise OSError("the shard store went away")

    pattern = write_caption_shards(tmp_path, [8, 8, 8, 8])
    cfg = make_config(pattern, num_workers=2, persistent_workers=True, micro_batch_size=2)
    loader = build_loader(cfg, processors, "train", 0, 1)
    monkeypatch.setattr(ShardStream, "worker_batches", store_gone_after_a_batch)  # the workers fork after this
    before = set(multiprocessing.active_children())
    batches = iter(loader)
    next(batches)
    workers = new_workers(before)
    assert len(workers) == 2
    with pytest.raises(OSError, match="went away") as error:
        for _ in batches:
            pass
    loader.close()
    assert stopped_within(workers, 1.0), "the kept error holds the data workers"
    assert "the shard store went away" in str(error.value)
