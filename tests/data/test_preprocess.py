"""Templates, masking, image-token expansion, formats, truncation and the start-up self-check."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.data_fixtures import make_config, make_processors, png, write_tar

from mmdist.data.loader import build_loader
from mmdist.data.preprocess import IGNORE_INDEX, make_preprocessor
from mmdist.data.reader import BadSample, decode_sample


def _decoded(raw: dict) -> dict:
    raw = {
        "__key__": "k",
        "__url__": "mem.tar",
        **{
            k: (v.encode() if isinstance(v, str) else json.dumps(v).encode() if isinstance(v, dict) else v)
            for k, v in raw.items()
        },
    }
    return decode_sample(raw, 10**8, 10_000)


def _pre(template="chat", max_len=64, stage="fuse", fmt="auto", prompt=""):
    processors = make_processors(template=template)
    cfg = make_config("unused.tar", stage=stage, max_len=max_len, format=fmt, caption_prompt=prompt)
    return processors, make_preprocessor(cfg, processors)


def _tokens(processors, ids):
    return processors.tokenizer.convert_ids_to_tokens(ids)


def _supervised(processors, out):
    return [t for t, lab in zip(_tokens(processors, out["input_ids"]), out["labels"]) if lab != IGNORE_INDEX]


def test_plain_caption_masks_prompt_and_image(tmp_path):
    processors, pre = _pre("plain", prompt="describe the image")
    out = pre(_decoded({"png": png(1), "txt": "a digit seven"}))
    toks = _tokens(processors, out["input_ids"])
    assert toks == ["<image>"] * 4 + ["describe", "the", "image", "a", "digit", "seven", "</s>"]
    assert _supervised(processors, out) == ["a", "digit", "seven", "</s>"]
    assert len(out["pixel_values"]) == 1 and out["pixel_values"][0].shape == (3, 8, 8)


def test_chat_conversation_loss_only_on_assistant_turns():
    processors, pre = _pre("chat")
    conv = {"conversations": [
        {"from": "human", "value": "<image>\nwhat is this ?"}, {"from": "gpt", "value": "seven"},
        {"from": "human", "value": "and this ?"}, {"from": "gpt", "value": "a digit"},
    ]}
    out = pre(_decoded({"png": png(1), "json": conv}))
    toks = _tokens(processors, out["input_ids"])
    assert toks.count("<image>") == 4
    assert _supervised(processors, out) == ["seven", "<|im_end|>", "a", "digit", "<|im_end|>"]
    # prompt turns (user role and the assistant header) are masked
    assert all(
        lab == IGNORE_INDEX for t, lab in zip(toks, out["labels"]) if t in ("user", "assistant", "what", "<image>")
    )


def test_llava_without_image_mark_gets_it_before_first_question():
    processors, pre = _pre("chat")
    conv = {"conversations": [{"from": "human", "value": "what is this ?"}, {"from": "gpt", "value": "seven"}]}
    toks = _tokens(processors, pre(_decoded({"jpg": png(1), "json": conv}))["input_ids"])
    assert toks[:6] == ["<|im_start|>", "user", "<image>", "<image>", "<image>", "<image>"]


def test_several_images_in_order_and_text_only():
    processors, pre = _pre("chat")
    conv = {
        "conversations": [
            {"from": "human", "value": "<image> and <image> what is this ?"},
            {"from": "gpt", "value": "two"},
        ]
    }
    out = pre(_decoded({"0.png": png(10), "1.png": png(200), "json": conv}))
    assert out["num_images"] == 2 and len(out["pixel_values"]) == 2
    assert out["pixel_values"][0].dtype == torch.uint8, "workers ship uint8; the tower normalises"
    assert out["pixel_values"][0].float().mean() < out["pixel_values"][1].float().mean(), (
        "images follow their member index"
    )
    text_only = pre(
        _decoded(
            {
                "json": {
                    "conversations": [
                        {"from": "human", "value": "what is this ?"},
                        {"from": "gpt", "value": "text only"},
                    ]
                }
            }
        )
    )
    assert text_only["num_images"] == 0 and text_only["pixel_values"] == []
    assert processors.image_token_id not in text_only["input_ids"]
    with pytest.raises(BadSample) as info:
        pre(_decoded({"0.png": png(1), "json": conv}))
    assert info.value.reason == "image_count_mismatch"


def test_img2dataset_layout_reads_as_caption():
    processors, pre = _pre("plain")
    meta = {"url": "http://x/y.jpg", "caption": "ignored", "width": 4, "height": 4, "status": "success"}
    out = pre(_decoded({"jpg": png(3), "txt": "a red cat", "json": meta}))
    assert _supervised(processors, out) == ["a", "red", "cat", "</s>"]


@pytest.mark.parametrize("max_len", [17, 18, 19, 20, 21])
def test_truncation_never_cuts_inside_an_image_span(max_len):
    processors, pre = _pre("chat", max_len=max_len)
    conv = {"conversations": [
        {"from": "human", "value": "<image> what is this ?"}, {"from": "gpt", "value": "seven"},
        {"from": "human", "value": "<image> and this ?"}, {"from": "gpt", "value": "two"},
    ]}
    out = pre(_decoded({"0.png": png(1), "1.png": png(2), "json": conv}))
    ids = out["input_ids"]
    assert len(ids) <= max_len
    n_image_tokens = ids.count(processors.image_token_id)
    assert n_image_tokens % 4 == 0 and n_image_tokens // 4 == out["num_images"] == len(out["pixel_values"])
    # the second image starts at position 17 (0-based): any cut before 21 drops it whole
    assert out["num_images"] == (2 if max_len >= 21 else 1)
    assert "seven" in _supervised(processors, out)


def test_align_stage_uses_text_tokenizer():
    processors, pre = _pre(stage="align")
    out = pre(_decoded({"png": png(1), "txt": "a cat"}))
    assert out["caption"] == "a cat" and out["pixel_values"].shape == (3, 8, 8)
    assert out["text_input_ids"] == processors.text_tokenizer("a cat")["input_ids"]


def _shard(tmp_path, samples):
    write_tar(tmp_path / "c-000000.tar", samples)
    (tmp_path / "sizes.json").write_text(json.dumps({"c-000000.tar": len(samples)}))
    return str(tmp_path / "c-000000.tar")


def test_self_check_stops_when_masking_leaves_nothing(tmp_path, processors):
    # a long prompt and max_len=8: truncation leaves only prompt and image tokens, nothing to learn
    conv = {
        "conversations": [
            {"from": "human", "value": "<image> what is this ? what is this ?"},
            {"from": "gpt", "value": "seven"},
        ]
    }
    path = _shard(tmp_path, [{"__key__": f"k{i}", "png": png(i), "json": conv} for i in range(6)])
    with pytest.raises(RuntimeError, match="masking leaves no supervised tokens"):
        build_loader(make_config(path, max_len=8), processors, "train", 0, 1)


def test_self_check_stops_on_image_token_mismatch(tmp_path):
    processors = make_processors()
    processors.image_token_id = processors.tokenizer.convert_tokens_to_ids("seven")  # not the placeholder's id
    path = _shard(tmp_path, [{"__key__": f"k{i}", "png": png(i), "txt": "a digit"} for i in range(4)])
    with pytest.raises(RuntimeError, match="image placeholder"):
        build_loader(make_config(path), processors, "train", 0, 1)


def test_webp_and_jpeg_members_and_forced_caption_format():
    import io

    import numpy as np
    from PIL import Image

    processors, pre = _pre("plain", fmt="caption")
    buf = io.BytesIO()
    Image.fromarray(np.full((5, 7, 3), 99, dtype=np.uint8)).save(buf, format="WEBP")
    conv = {"conversations": [{"from": "human", "value": "<image> what is this ?"}, {"from": "gpt", "value": "seven"}]}
    out = pre(_decoded({"webp": buf.getvalue(), "txt": "a digit seven", "json": conv}))
    assert _supervised(processors, out) == ["a", "digit", "seven", "</s>"]  # format=caption ignores the conversation
    assert out["pixel_values"][0].shape == (3, 8, 8)
    out = pre(_decoded({"jpeg": png(5), "txt": "a cat"}))
    assert out["num_images"] == 1
