"""`mmdist shard`: round trips (LLaVA JSON, image folder + captions, demo digits), sizes.json, skips, no overwrite."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from helpers.data_fixtures import make_config, make_processors, png
from PIL import Image

from mmdist.commands.shard import main as cli_main
from mmdist.data.loader import build_loader
from mmdist.data.reader import read_tar
from mmdist.data.shards import demo_split, shard_pattern, write_demo_shards


def _images(root, n):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((6, 6, 3), 20 * i, dtype=np.uint8)).save(root / f"img{i}.png")
        Image.fromarray(np.full((6, 6, 3), 20 * i, dtype=np.uint8)).save(root / f"img{i}.jpg")


def _all_samples(folder):
    samples = []
    for tar in sorted(folder.glob("*.tar")):
        samples.extend(read_tar(str(tar)))
    return samples


def test_llava_round_trip(tmp_path, capsys):
    _images(tmp_path / "imgs", 5)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    records = [
        {
            "id": f"q.{i}",
            "image": f"img{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is this ?"},
                {"from": "gpt", "value": f"digit {i}"},
            ],
        }
        for i in range(5)
    ]
    records.append({"id": "two", "image": ["img1.png", "img2.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "two"}]})
    records.append(
        {
            "id": "textonly",
            "conversations": [{"from": "human", "value": "what is this ?"}, {"from": "gpt", "value": "text"}],
        }
    )
    records.append({"id": "gone", "image": "missing.jpg", "conversations": records[0]["conversations"]})
    records.append({"id": "bad", "image": "broken.jpg", "conversations": records[0]["conversations"]})
    records.append({"id": "noconv", "image": "img0.jpg"})
    (tmp_path / "llava.json").write_text(json.dumps(records))
    out = tmp_path / "shards"
    rc = cli_main(
        [
            "llava",
            "--json",
            str(tmp_path / "llava.json"),
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
            "--samples-per-shard",
            "3",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert (
        "7 samples in 3 shard(s)" in text
        and "missing_image=1" in text
        and "corrupt_image=1" in text
        and "missing_keys=1" in text
    )
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 3, "shard-000001.tar": 3, "shard-000002.tar": 1}
    samples = {s["__key__"]: s for s in _all_samples(out)}
    assert set(samples) == {"q_0", "q_1", "q_2", "q_3", "q_4", "two", "textonly"}
    assert samples["q_3"]["jpg"] == (tmp_path / "imgs" / "img3.jpg").read_bytes(), "image bytes are copied unchanged"
    assert json.loads(samples["q_3"]["json"])["conversations"] == records[3]["conversations"]
    assert {"0.png", "1.png"} <= set(samples["two"]) and "png" not in samples["textonly"]
    # and the loader reads it back: 7 samples, multi-image and text-only included
    cfg = make_config(shard_pattern_of(out), micro_batch_size=1, shuffle_buffer=0)
    processors = make_processors()
    loader = build_loader(cfg, processors, "train", 0, 1)
    images = 0
    for batch in loader:
        images += 0 if "pixel_values" not in batch else batch["pixel_values"].shape[0]
    assert len(loader) == 7 and images == 7 and loader.bad_counts() == {}


def shard_pattern_of(folder):
    n = len(list(folder.glob("*.tar")))
    return str(folder / f"shard-{{000000..{n - 1:06d}}}.tar")


def test_folder_with_csv_and_jsonl(tmp_path):
    _images(tmp_path / "imgs", 4)
    (tmp_path / "caps.csv").write_text("image,caption\nimg0.png,a red cat\nimg1.jpg,a blue dog\nnope.png,gone\n")
    (tmp_path / "caps.jsonl").write_text(
        "\n".join(json.dumps({"file": f"img{i}.png", "text": f"digit {i}"}) for i in range(4))
    )
    assert (
        cli_main(
            [
                "folder",
                "--images",
                str(tmp_path / "imgs"),
                "--captions",
                str(tmp_path / "caps.csv"),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert (
        cli_main(
            [
                "folder",
                "--images",
                str(tmp_path / "imgs"),
                "--captions",
                str(tmp_path / "caps.jsonl"),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    a = _all_samples(tmp_path / "a")
    assert [s["txt"] for s in a] == [b"a red cat", b"a blue dog"] and "jpg" in a[1]
    b = _all_samples(tmp_path / "b")
    assert [s["txt"].decode() for s in b] == [f"digit {i}" for i in range(4)]
    assert b[2]["png"] == (tmp_path / "imgs" / "img2.png").read_bytes()


def test_refuses_to_overwrite(tmp_path, capsys):
    _images(tmp_path / "imgs", 2)
    (tmp_path / "c.csv").write_text("image,caption\nimg0.png,a cat\n")
    args = [
        "folder",
        "--images",
        str(tmp_path / "imgs"),
        "--captions",
        str(tmp_path / "c.csv"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli_main(args) == 0
    before = (tmp_path / "o" / "shard-000000.tar").read_bytes()
    assert cli_main(args) == 2
    assert "--overwrite" in capsys.readouterr().out
    assert (tmp_path / "o" / "shard-000000.tar").read_bytes() == before
    assert cli_main(args + ["--overwrite"]) == 0


def test_writer_verifies_images(tmp_path):
    from mmdist.data.shards import write_shards

    summary = write_shards(
        [
            {"__key__": "ok", "png": png(1), "txt": "a"},
            {"__key__": "bad", "png": b"\x89PNG broken", "txt": "b"},
            {"__key__": "empty", "jpg": b"", "txt": "c"},
        ],
        tmp_path,
        samples_per_shard=10,
    )
    assert summary.written == 1 and dict(summary.skipped) == {"corrupt_image": 1, "empty_image": 1}
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames() == ["ok.png", "ok.txt"]


def test_demo_split_is_fixed_and_disjoint(tmp_path):
    train_idx, eval_idx = demo_split(1797)
    assert not set(train_idx) & set(eval_idx) and len(train_idx) + len(eval_idx) == 1797
    assert demo_split(1797) == (train_idx, eval_idx)
    summaries = write_demo_shards(tmp_path, image_size=16, samples_per_shard=50, limit=120)
    train = _all_samples(tmp_path / "train")
    held = _all_samples(tmp_path / "eval")
    assert len(train) == summaries["train"].written == 120 and len(held) == 30
    train_ids = {json.loads(s["json"])["index"] for s in train}
    eval_ids = {json.loads(s["json"])["index"] for s in held}
    assert not train_ids & eval_ids and all(i % 5 == 0 for i in eval_ids)
    sample = train[0]
    meta = json.loads(sample["json"])
    from mmdist.data.shards import DIGIT_NAMES

    name = DIGIT_NAMES[meta["label"]]
    assert sample["txt"].decode() == f"a handwritten digit {name}"
    assert meta["conversations"][1]["value"] == name
    assert Image.open(io.BytesIO(sample["png"])).size == (16, 16)
    assert shard_pattern(summaries["eval"]).endswith("eval-{000000..000000}.tar")
