"""stats.json: the shard writer records each shard's lengths; shards without them read as None; shard --tokenizer."""

from __future__ import annotations

import json

import pytest
from helpers.data_fixtures import png, write_caption_shards

from mmdist.data.shard_stats import STATS_FILE, quantiles, read_shard_stats, sample_length
from mmdist.data.shards import write_shards


def _conversation(key: str, question: str, answer: str, images: list[bytes]) -> dict:
    turns = [{"from": "human", "value": "<image>\n" * len(images) + question}, {"from": "gpt", "value": answer}]
    sample = {"__key__": key, "json": {"conversations": turns}}
    if len(images) == 1:
        sample["png"] = images[0]
    for i, image in enumerate(images if len(images) > 1 else []):
        sample[f"{i}.png"] = image
    return sample


def test_sample_length_counts_what_the_preprocessor_reads():
    conv = sample_length(_conversation("a", "What is it?", "A cat.", [png(1, 8), png(2, 12)]))
    assert (conv.caption, conv.messages, conv.chars) == (False, 2, len("\n\nWhat is it?") + len("A cat."))
    assert sorted(conv.image_sizes) == [(8, 8), (12, 12)]
    caption = sample_length({"__key__": "b", "jpg": png(0, 4), "txt": " <image>two words "})
    assert (caption.caption, caption.chars, caption.words, caption.image_sizes) == (True, 9, 2, [(4, 4)])
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    text_only = sample_length({"__key__": "c", "json": json.dumps({"conversations": turns})})
    assert (text_only.chars, text_only.image_sizes) == (7, [])
    # the answers, apart: the gpt/assistant turns of a conversation, a caption
    assert (conv.answers, conv.answer_chars) == (1, len("A cat."))
    assert (caption.answers, caption.answer_chars) == (1, 9)
    several = [*turns, {"from": "human", "value": "and?"}, {"from": "assistant", "value": "bye"}]
    two = sample_length({"__key__": "d", "json": {"conversations": several}})
    assert (two.answers, two.answer_chars, two.chars) == (2, len("hello") + len("bye"), 7 + 4 + 3)


def test_writer_records_per_shard_statistics_grouped_by_images(tmp_path):
    samples = [_conversation(f"t{i}", "x" * (10 + i), "y" * 5, []) for i in range(6)]
    samples += [_conversation(f"o{i}", "what?", "z" * (20 + i), [png(i, 16)]) for i in range(3)]
    samples += [_conversation("m0", "three?", "yes", [png(1, 8), png(2, 8), png(3, 40)])]
    write_shards(samples, tmp_path, prefix="mix", samples_per_shard=8)
    stats = json.loads((tmp_path / STATS_FILE).read_text())
    assert sorted(stats) == ["mix-000000.tar", "mix-000001.tar"]
    first, second = stats["mix-000000.tar"], stats["mix-000001.tar"]
    assert first["samples"] == 8 and second["samples"] == 2
    assert {k: g["samples"] for k, g in first["by_images"].items()} == {"0": 6, "1": 2}
    assert {k: g["samples"] for k, g in second["by_images"].items()} == {"1": 1, "3": 1}
    text_only = first["by_images"]["0"]
    assert text_only["chars_mean"] == pytest.approx(sum(10 + i + 5 for i in range(6)) / 6)
    assert text_only["chars_q"][0] == 15 and text_only["chars_q"][-1] == 20 and text_only["messages"] == 2
    assert (text_only["answers"], text_only["answer_chars_mean"]) == (1, 5)
    assert first["by_images"]["1"]["answer_chars_mean"] == pytest.approx((20 + 21) / 2)
    assert "tokens_q" not in text_only and "tokenizer" not in first  # no tokenizer given: characters and words only
    assert second["image_sizes"] == {"8x8": 2, "40x40": 1, "16x16": 1}
    assert first["text_sample"][:2] == ["x" * 10, "y" * 5]
    # a second prefix in the same folder keeps the first one's entries (as sizes.json does)
    write_shards([_conversation("e0", "q", "a", [])], tmp_path, prefix="other")
    names = set(json.loads((tmp_path / STATS_FILE).read_text()))
    assert names == {"mix-000000.tar", "mix-000001.tar", "other-000000.tar"}


def test_writer_records_tokens_with_a_tokenizer(tmp_path):
    from mmdist.models.tokenizers import builtin_tokenizer

    tok = builtin_tokenizer("mmdist:tiny-bytes")
    samples = [_conversation(f"s{i}", "q" * i, "answer", [png(i, 8)]) for i in range(1, 5)]
    write_shards(samples, tmp_path, tokenizer=tok, tokenizer_name="mmdist:tiny-bytes")
    entry = json.loads((tmp_path / STATS_FILE).read_text())["shard-000000.tar"]
    group = entry["by_images"]["1"]
    # bytes: the text between the image marks ("\n" + question) and the answer, each encoded without special tokens
    assert entry["tokenizer"] == "mmdist:tiny-bytes"
    assert group["tokens_mean"] == pytest.approx(sum(1 + i + 6 for i in range(1, 5)) / 4)
    assert group["tokens_q"][0] == 8 and group["tokens_q"][-1] == 11
    assert group["answer_tokens_mean"] == 6  # "answer", byte for byte


def test_shards_without_statistics_read_as_none(tmp_path):
    write_caption_shards(tmp_path / "old", [3, 3])  # written by hand, as older tools did: no stats.json
    urls = [str(tmp_path / "old" / f"train-{i:06d}.tar") for i in range(2)]
    assert read_shard_stats(urls) == {url: None for url in urls}
    write_shards([_conversation("a", "q", "a", [])], tmp_path / "new")
    new = str(tmp_path / "new" / "shard-000000.tar")
    missing = str(tmp_path / "new" / "shard-000001.tar")  # not in the file: e.g. added later by another tool
    found = read_shard_stats([new, missing])
    assert found[new]["samples"] == 1 and found[missing] is None
    (tmp_path / "new" / STATS_FILE).write_text("{not json")
    assert read_shard_stats([new]) == {new: None}


def test_quantiles_interpolate():
    assert quantiles([0, 10], (0, 50, 100)) == [0, 5, 10]
    assert quantiles([], (0, 100)) == [0.0, 0.0]


def test_shard_cli_records_tokens(tmp_path):
    from mmdist.commands.shard import main

    (tmp_path / "img.png").write_bytes(png(3, 8))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "img.png", "caption": "a red square"}) + "\n")
    assert main(["folder", "--out", str(tmp_path / "out"), "--images", str(tmp_path), "--captions",
                 str(tmp_path / "caps.jsonl"), "--tokenizer", "mmdist:tiny-bytes"]) == 0
    entry = json.loads((tmp_path / "out" / STATS_FILE).read_text())["shard-000000.tar"]
    assert entry["tokenizer"] == "mmdist:tiny-bytes"
    assert entry["by_images"]["1"]["captions"] == 1 and entry["by_images"]["1"]["tokens_mean"] == len("a red square")
