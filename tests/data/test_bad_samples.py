"""Bad samples are skipped, counted by reason and never crash the loader; pickle members are never unpickled."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from helpers.data_fixtures import make_config, png, write_tar
from PIL import Image

from mmdist.data.loader import build_loader
from mmdist.data.reader import TooManyBadSamples


def _big_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _good(i: int) -> dict:
    return {"__key__": f"good{i:03d}", "png": png(i), "txt": "a handwritten digit seven"}


def _write_mixed(tmp_path):
    """Shard 0: truncated tar (2 good samples survive). Shard 1: one sample of every bad kind + good ones."""
    whole = write_tar(
        tmp_path / "tmp-full.tar", [_good(0), _good(1), {"__key__": "good002", "png": _big_png(64), "txt": "a digit"}]
    )
    data = whole.read_bytes()
    # cut inside the third sample's image member (its header is after the first two samples' 4 members)
    (tmp_path / "eval-000000.tar").write_bytes(data[: 4 * 1024 + 700])
    whole.unlink()
    bad = [
        {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "txt": "a digit"},
        {"__key__": "zerobyte", "jpg": b"", "txt": "a digit"},
        {"__key__": "bomb", "png": _big_png(200), "txt": "a digit"},
        {"__key__": "nocaption", "png": png(3)},
        {"__key__": "notutf8", "png": png(4), "txt": b"\xff\xfe\xfa caption".decode("latin-1").encode("latin-1")},
        {"__key__": "missingkeys", "png": png(5), "json": {"conversations": [{"from": "human"}]}},
        {"__key__": "toolong", "png": png(6), "txt": "seven " * 400},
    ]
    good = [_good(i) for i in range(10, 14)]
    write_tar(tmp_path / "eval-000001.tar", bad + good)
    (tmp_path / "sizes.json").write_text(json.dumps({"eval-000000.tar": 2, "eval-000001.tar": 4}))
    return [str(tmp_path / "eval-000000.tar"), str(tmp_path / "eval-000001.tar")]


def test_every_bad_kind_is_skipped_and_counted(tmp_path, processors, caplog):
    shards = _write_mixed(tmp_path)
    cfg = make_config(shards, eval_shards=shards, max_bad_fraction=1.0, max_image_pixels=100 * 100,
                      max_caption_chars=1000, micro_batch_size=2, self_check_samples=0)
    loader = build_loader(cfg, processors, "eval", 0, 1)
    keys = []
    with caplog.at_level("WARNING"):
        for _batch in loader:
            keys.extend(loader.last_keys)
    counts = loader.bad_counts()
    assert keys == ["good000", "good001", "good010", "good011", "good012", "good013"]
    assert counts == {
        "truncated_tar": 1, "corrupt_image": 1, "empty_image": 1, "decompression_bomb": 1, "missing_caption": 1,
        "bad_text_encoding": 1, "missing_keys": 1, "text_too_long": 1,
    }
    text = caplog.text
    assert "eval-000001.tar" in text and "key bomb" in text and "key notutf8" in text, "log names shard and key"


def test_counts_survive_until_epoch_end(tmp_path, processors):
    shards = _write_mixed(tmp_path)
    cfg = make_config(shards, eval_shards=shards, max_bad_fraction=1.0, max_image_pixels=100 * 100,
                      max_caption_chars=1000, micro_batch_size=2, self_check_samples=0)
    loader = build_loader(cfg, processors, "eval", 0, 1)
    it = iter(loader)
    for _ in range(len(loader)):
        next(it)
    assert sum(loader.bad_counts().values()) == 8


def test_abort_past_max_bad_fraction(tmp_path, processors):
    samples = [{"__key__": f"b{i:03d}", "png": b"", "txt": "a digit"} for i in range(60)]
    samples += [_good(i) for i in range(60)]
    write_tar(tmp_path / "x-000000.tar", samples)
    (tmp_path / "sizes.json").write_text(json.dumps({"x-000000.tar": 120}))
    cfg = make_config(str(tmp_path / "x-000000.tar"), max_bad_fraction=0.1, self_check_samples=0)
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction=0.1"):
        for _ in build_loader(cfg, processors, "train", 0, 1):
            pass


class _Payload:
    """Unpickling this creates a file: proof that a member was (or was not) unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pickle_members_are_never_unpickled(tmp_path, processors, num_workers):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(_Payload(str(marker)))
    samples = []
    for i in range(8):
        s = _good(i)
        s["pyd"] = payload
        s["pickle"] = payload
        s["pth"] = payload
        samples.append(s)
    write_tar(tmp_path / "p-000000.tar", samples[:4])
    write_tar(tmp_path / "p-000001.tar", samples[4:])
    cfg = make_config(str(tmp_path / "p-{000000..000001}.tar"), num_workers=num_workers, persistent_workers=False)
    loader = build_loader(cfg, processors, "train", 0, 1)
    keys = []
    for batch in loader:
        keys.extend(loader.last_keys)
        assert set(batch) >= {"input_ids", "pixel_values"}
    assert sorted(keys) == [f"good{i:03d}" for i in range(8)]
    assert not marker.exists(), "a pickle member was unpickled"
    pickle.loads(payload)  # the payload is live: unpickling it does create the file
    assert marker.exists()


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path, processors):
    # a large image of one colour compresses to a few KB; the pixel count decides, not the byte size
    big = _big_png(4000)
    assert len(big) < 200_000
    from mmdist.data.reader import BadSample, decode_image

    with pytest.raises(BadSample) as info:
        decode_image(big, max_pixels=1_000_000)
    assert info.value.reason == "decompression_bomb"
    assert np.asarray(decode_image(big, max_pixels=20_000_000)).shape == (4000, 4000, 3)


def test_all_bad_shard_stops_instead_of_looping(tmp_path, processors):
    write_tar(tmp_path / "z-000000.tar", [{"__key__": f"b{i}", "png": b"", "txt": "a"} for i in range(5)])
    write_tar(tmp_path / "z-000001.tar", [_good(i) for i in range(5)])
    cfg = make_config(
        str(tmp_path / "z-{000000..000001}.tar"),
        max_bad_fraction=1.0,
        self_check_samples=0,
        num_workers=2,
        persistent_workers=False,
    )
    with pytest.raises(RuntimeError, match="none of the last"):
        for _ in build_loader(cfg, processors, "train", 0, 1):
            pass
