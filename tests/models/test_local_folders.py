"""Backbones loaded from local folders (the hub-id/local-path code path), processor settings and overrides."""

from __future__ import annotations

import json

import torch
from helpers.configs import tiny_llm_config, tiny_vision_config
from helpers.tiny import make_model

from mmdist.models.llm import LLMConfig, llm_fingerprint, load_llm, load_tokenizer
from mmdist.models.tokenizers import tiny_byte_tokenizer
from mmdist.models.vision import VisionConfig, VisionTower, vision_fingerprint
from mmdist.settings import from_dict


def test_vision_tower_from_a_local_folder_reads_its_processor_settings(tmp_path):
    built = VisionTower(from_dict(VisionConfig, tiny_vision_config()))
    built.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "size": {"height": 16, "width": 16},
        "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "do_resize": True, "do_normalize": True}))
    loaded = VisionTower(from_dict(VisionConfig, {"name_or_path": str(tmp_path), "select_layer": -1, "dtype": "fp32"}))
    assert (loaded.image_size, loaded.image_mean, loaded.image_std) == (16, [0.1, 0.2, 0.3], [0.4, 0.5, 0.6])
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), built(pixels))
    fp = vision_fingerprint(from_dict(VisionConfig, {"name_or_path": str(tmp_path)}))
    assert fp.startswith("sha256:")
    # Overrides in the settings win over the processor file.
    over = VisionTower(
        from_dict(
            VisionConfig, {"name_or_path": str(tmp_path), "image_mean": [0.5], "image_std": [0.5], "dtype": "fp32"}
        )
    )
    assert over.image_mean == [0.5, 0.5, 0.5] and over.image_std == [0.5, 0.5, 0.5]


def test_llm_and_tokenizer_from_a_local_folder(tmp_path):
    llm = load_llm(from_dict(LLMConfig, tiny_llm_config()))
    llm.save_pretrained(tmp_path)
    tiny_byte_tokenizer().save_pretrained(tmp_path)
    cfg = from_dict(LLMConfig, {"name_or_path": str(tmp_path), "dtype": "fp32"})
    loaded, tok = load_llm(cfg), load_tokenizer(cfg)
    assert len(tok) == 259 and tok.eos_token == "<|im_end|>"
    ids = torch.tensor([tok("hello").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, llm(ids).logits)
    first = llm_fingerprint(cfg)
    (tmp_path / "model.safetensors").write_bytes(b"changed")
    assert llm_fingerprint(cfg) != first


def test_fuse_without_stage1_pools_patch_tokens_and_pads_to_square():
    model = make_model("fuse", model={"connector": {"image_tokens": 4}, "vision": {"pad_to_square": True}})
    assert model.stage1 is None and model.num_image_tokens == 4 and model.processors.num_image_tokens == 4
    assert model.projector.in_dim == 32  # vision width: the projector maps features directly (LLaVA style)
    assert model.processors.image_transform.pad_to_square
    embeds = model.image_embeddings(torch.randn(2, 3, 16, 16))
    assert embeds.shape == (2, 4, 64)
