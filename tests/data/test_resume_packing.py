"""Loader resume (save after 40 batches, rebuild, next 8 identical) and packed batch layout."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from helpers.data_fixtures import make_config, make_processors, write_caption_shards

from mmdist.data.collate import collate_fuse, pack_rows
from mmdist.data.loader import build_loader


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "num_workers,group,done", [(0, False, 40), (2, False, 40), (2, False, 41), (2, True, 40), (2, True, 41)]
)
def test_resume_after_40_batches_gives_the_same_next_8(tmp_path, num_workers, group, done):
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [57, 43, 61, 39, 50])  # uneven: workers wrap/stop at different points
    cfg = make_config(pattern, num_workers=num_workers, shuffle_buffer=16, micro_batch_size=2, group_by_length=group,
                      length_group_batches=3, persistent_workers=True)
    reference = build_loader(cfg, processors, "train", 1, 2)
    it = iter(reference)
    _take(it, done)  # 41: the saved point is mid-round, the other worker goes first after resuming
    state = pickle.loads(pickle.dumps(reference.state_dict()))  # it must survive serialisation
    expected = _take(it, 8)
    del it

    resumed = build_loader(cfg, processors, "train", 1, 2)
    resumed.load_state_dict(state)
    got = _take(iter(resumed), 8)
    assert all(_same(a, b) for a, b in zip(expected, got))
    # and a loader that did NOT load the state gives other batches (the test can fail)
    fresh = _take(iter(build_loader(cfg, processors, "train", 1, 2)), 8)
    assert not all(_same(a, b) for a, b in zip(expected, fresh))


def test_resume_in_resampled_mode(tmp_path):
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [7, 9, 11])
    cfg = make_config(
        pattern, mode="resampled", samples_per_epoch=200, num_workers=2, shuffle_buffer=8, persistent_workers=False
    )
    reference = build_loader(cfg, processors, "train", 0, 2)
    it = iter(reference)
    _take(it, 21)
    state = reference.state_dict()
    expected = _take(it, 8)
    resumed = build_loader(cfg, processors, "train", 0, 2)
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(expected, _take(iter(resumed), 8)))


def test_resume_across_epoch_boundary(tmp_path):
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [10, 10])
    cfg = make_config(pattern, shuffle_buffer=4, micro_batch_size=2)
    loader = build_loader(cfg, processors, "train", 0, 1)
    assert len(loader) == 10
    batches = []
    for _ in range(2):
        batches.extend(loader)
    loader2 = build_loader(cfg, processors, "train", 0, 1)
    it = iter(loader2)
    _take(it, 7)
    state = loader2.state_dict()
    loader3 = build_loader(cfg, processors, "train", 0, 1)
    loader3.load_state_dict(state)
    rest = list(loader3) + list(loader3)
    assert len(rest) == 13 and all(_same(a, b) for a, b in zip(batches[7:], rest))


def test_state_from_other_world_size_is_refused(tmp_path, processors):
    pattern = write_caption_shards(tmp_path, [4, 4])
    state = build_loader(make_config(pattern), processors, "train", 0, 2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        build_loader(make_config(pattern), processors, "train", 0, 1).load_state_dict(state)


def _fake_sample(rng, n, image_id, n_img_tok, with_image):
    ids, labels, pix = [], [], []
    if with_image:
        ids += [image_id] * n_img_tok
        labels += [-100] * n_img_tok
        pix.append(torch.full((3, 2, 2), float(n)))
    body = [rng.randrange(1, 30) for _ in range(n)]
    ids += body
    labels += [-100] * (n // 2) + body[n // 2:]
    return {"input_ids": ids, "labels": labels, "pixel_values": pix, "num_images": int(with_image), "key": str(n)}


def test_packing_layout():
    rng = random.Random(0)
    samples = [_fake_sample(rng, n, 99, 3, i % 2 == 0) for i, n in enumerate([5, 20, 9, 14, 3, 11, 7])]
    batch = collate_fuse(samples, pad_token_id=0, pack=True, max_len=32)
    ids, labels, pos, seq, mask = (
        batch[k] for k in ("input_ids", "labels", "position_ids", "sequence_ids", "attention_mask")
    )
    assert ids.shape[1] <= 32 and ids.shape[0] < len(samples)
    found = []
    for r in range(ids.shape[0]):
        for j in range(int(seq[r].max()) + 1):
            where = (seq[r] == j).nonzero().flatten()
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1)), "a sample is contiguous"
            assert torch.equal(pos[r, where], torch.arange(len(where))), "positions restart per sample"
            found.append((r, ids[r, where].tolist(), labels[r, where].tolist()))
        pad = seq[r] == -1
        assert (mask[r][pad] == 0).all() and (labels[r][pad] == -100).all() and (mask[r][~pad] == 1).all()
    # every sample appears exactly once with its own ids and labels
    assert sorted((tuple(i), tuple(lab)) for _, i, lab in found) == sorted(
        (tuple(s["input_ids"]), tuple(s["labels"])) for s in samples
    )
    # images in row-major order of appearance
    order = [tuple(i) for _, i, _ in found]
    image_samples = [s for o in order for s in samples if tuple(s["input_ids"]) == o and s["pixel_values"]]
    assert torch.equal(batch["pixel_values"], torch.stack([s["pixel_values"][0] for s in image_samples]))


def test_pack_rows_fills_rows():
    rng = random.Random(1)
    lengths = [rng.randrange(20, 300) for _ in range(64)]
    rows = pack_rows(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(64))
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert max(fills) <= 1024
    assert sum(lengths) / (len(rows) * max(fills)) >= 0.95


def test_packed_loader_batches(tmp_path):
    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [16])
    cfg = make_config(pattern, packing=True, micro_batch_size=8, max_len=64)
    loader = build_loader(cfg, processors, "train", 0, 1)
    batch = next(iter(loader))
    assert "sequence_ids" in batch and batch["input_ids"].shape[0] < 8
    assert (batch["input_ids"] == processors.image_token_id).sum() == 8 * processors.num_image_tokens
    assert batch["pixel_values"].shape[0] == 8


def test_auto_worker_count_follows_the_checkpoint(tmp_path, monkeypatch, capsys):
    """data.num_workers null (auto) depends on the machine; the sample order depends on the worker count, so a
    resumed auto loader takes the checkpoint's count and reads on exactly where the saved run stopped."""
    import mmdist.hardware

    processors = make_processors()
    pattern = write_caption_shards(tmp_path, [30, 25, 28])
    cfg = make_config(pattern, num_workers=None, shuffle_buffer=8, micro_batch_size=2)
    monkeypatch.setattr(mmdist.hardware, "cpus_for_this_rank", lambda: (3, "test: 3 CPUs"))
    saved = build_loader(cfg, processors, "train", 0, 1)
    assert saved.num_workers == 2 and "auto -> 2" in capsys.readouterr().out
    it = iter(saved)
    _take(it, 5)
    state, expected = saved.state_dict(), _take(it, 6)
    del it
    monkeypatch.setattr(mmdist.hardware, "cpus_for_this_rank", lambda: (1, "test: 1 CPU"))
    resumed = build_loader(cfg, processors, "train", 0, 1)
    assert resumed.num_workers == 0
    resumed.load_state_dict(state)
    assert resumed.num_workers == 2 and "as the checkpoint was written with" in capsys.readouterr().out
    assert all(_same(a, b) for a, b in zip(expected, _take(iter(resumed), 6)))
    explicit = build_loader(
        make_config(pattern, num_workers=0, shuffle_buffer=8, micro_batch_size=2), processors, "train", 0, 1
    )
    with pytest.raises(ValueError, match="num_workers"):
        explicit.load_state_dict(state)  # an explicit count is the user's: a different one stays an error
