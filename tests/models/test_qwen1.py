"""Qwen1 (model_type 'qwen') loaded natively as Qwen2: config mapping, weights, logits, tokenizer ids, max_len.

The tiny checkpoints are written here in Qwen1's own layout and key names
(fused c_attn, w1/w2/c_proj, transformer.* prefix) at the real vocabulary size,
and the logits are checked against a forward pass written from Qwen1's
equations, independent of transformers.
"""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
import torch
from helpers.qwen1 import (
    FFN,
    HEADS,
    HIDDEN,
    LAYERS,
    SEQ_LENGTH,
    VOCAB,
    needs_tiktoken_file,
    qwen1_config,
    qwen1_reference_logits,
    qwen1_state_dict,
    write_qwen1_checkpoint,
)

from mmdist.models import qwen1
from mmdist.models.llm import LLMConfig, load_llm, load_tokenizer


@pytest.fixture(scope="module")
def qwen1_weights():
    return qwen1_state_dict()


@pytest.fixture(scope="module")
def qwen1_folders(tmp_path_factory, qwen1_weights):
    root = tmp_path_factory.mktemp("qwen1")
    return {
        "safetensors": write_qwen1_checkpoint(root / "st", qwen1_weights, "safetensors", "later"),
        "bin": write_qwen1_checkpoint(root / "bin", qwen1_weights, "bin", "early"),
    }


# ---------------------------------------------------------------------------
# config


@pytest.mark.parametrize("spelling", ["early", "later"])
def test_both_config_spellings_map_to_the_same_qwen2_config(spelling):
    config = qwen1.qwen2_config_from_qwen1(qwen1_config(spelling))
    assert type(config).__name__ == "Qwen2Config"
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (HIDDEN, HEADS, HEADS)
    assert config.num_hidden_layers == LAYERS
    assert config.intermediate_size == FFN // 2  # Qwen1 counts w1 and w2 together
    assert config.vocab_size == VOCAB  # padded_vocab_size wins over the early spelling's vocab_size
    assert config.head_dim == HIDDEN // HEADS
    assert config.max_position_embeddings == SEQ_LENGTH
    assert config.rms_norm_eps == 1e-6 and config.rope_parameters["rope_theta"] == 10000
    assert config.tie_word_embeddings is False and config.pad_token_id is None
    assert all(t == "full_attention" for t in config.layer_types)


def test_real_qwen14b_config_maps_to_its_shapes():
    raw = {"model_type": "qwen", "hidden_size": 5120, "num_attention_heads": 40, "num_hidden_layers": 40,
           "intermediate_size": 27392, "kv_channels": 128, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
           "seq_length": 2048, "vocab_size": 152064, "no_bias": True, "rotary_pct": 1.0}
    fields = qwen1.qwen2_config_fields(raw)
    assert fields["intermediate_size"] == 13696 and fields["head_dim"] == 128 and fields["vocab_size"] == 152064


def test_unmappable_config_names_the_problem():
    raw = {**qwen1_config("later"), "rotary_pct": 0.5, "kv_channels": 8}
    with pytest.raises(ValueError, match=r"x/config\.json: .*kv_channels=8.*rotary_pct=0\.5"):
        qwen1.qwen2_config_from_qwen1(raw, where="x/config.json")
    raw = {k: v for k, v in qwen1_config("later").items() if k != "hidden_size"}
    with pytest.raises(ValueError, match="none of hidden_size / n_embd"):
        qwen1.qwen2_config_from_qwen1(raw)


def test_detection_reads_model_type(tmp_path, qwen1_folders):
    assert qwen1.is_qwen1_checkpoint(str(qwen1_folders["bin"]))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert not qwen1.is_qwen1_checkpoint(str(tmp_path))
    assert not qwen1.is_qwen1_checkpoint(str(tmp_path / "missing"))
    assert not qwen1.is_qwen1_checkpoint("")


# ---------------------------------------------------------------------------
# weights and logits


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_qwen1_checkpoint_loads_as_qwen2_with_qwen1_logits(fmt, qwen1_folders, qwen1_weights):
    model = qwen1.load_qwen1_llm(str(qwen1_folders[fmt]), dtype=torch.float32, attn_implementation="eager")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    layer = model.model.layers[1]
    q, k, v = qwen1_weights["transformer.h.1.attn.c_attn.weight"].split(HIDDEN)
    assert torch.equal(layer.self_attn.q_proj.weight, q) and torch.equal(layer.self_attn.v_proj.weight, v)
    assert torch.equal(
        layer.self_attn.k_proj.bias, qwen1_weights["transformer.h.1.attn.c_attn.bias"][HIDDEN : 2 * HIDDEN]
    )
    assert layer.self_attn.o_proj.bias is None
    assert torch.equal(layer.mlp.gate_proj.weight, qwen1_weights["transformer.h.1.mlp.w2.weight"])
    assert torch.equal(layer.mlp.up_proj.weight, qwen1_weights["transformer.h.1.mlp.w1.weight"])

    ids = torch.tensor([[151643, 9707, 1879, 0, 220, 108386, 3837, 151850, 17, 42],
                        [5, 151644, 872, 198, 14990, 151645, 198, 100, 2000, 151935]])
    with torch.no_grad():
        got = model(input_ids=ids).logits
    want = qwen1_reference_logits(qwen1_weights, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    sdpa = qwen1.load_qwen1_llm(str(qwen1_folders[fmt]), dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_saved_mapped_model_is_a_plain_qwen2_checkpoint(tmp_path, qwen1_folders):
    from transformers import AutoModelForCausalLM

    model = qwen1.load_qwen1_llm(str(qwen1_folders["safetensors"]), dtype=torch.float32)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    assert type(again).__name__ == "Qwen2ForCausalLM"
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_conversions_do_not_leak_to_other_qwen2_models(tmp_path, qwen1_folders):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    qwen1.load_qwen1_llm(str(qwen1_folders["safetensors"]), dtype=torch.float32)
    assert get_checkpoint_conversion_mapping("Qwen2ForCausalLM") is None
    plain = Qwen2ForCausalLM(Qwen2Config(**qwen1.qwen2_config_fields(qwen1_config("later")) | {"vocab_size": 300}))
    plain.save_pretrained(tmp_path / "plain")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" in f.keys()


def test_load_llm_routes_a_qwen1_folder_to_the_native_path(qwen1_folders, qwen1_weights):
    model = load_llm(LLMConfig(name_or_path=str(qwen1_folders["safetensors"]), dtype="fp32"))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32 and model.config.qwen1_source is True
    assert torch.equal(model.lm_head.weight, qwen1_weights["lm_head.weight"])


def test_mismatched_checkpoint_is_refused_naming_the_keys(tmp_path, qwen1_weights):
    sd = dict(qwen1_weights)
    del sd["transformer.h.1.mlp.w2.weight"]
    folder = write_qwen1_checkpoint(tmp_path / "broken", sd, "safetensors", "later")
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.mlp\.gate_proj\.weight'\]"):
        qwen1.load_qwen1_llm(str(folder), dtype=torch.float32)


# ---------------------------------------------------------------------------
# max_len


def test_max_len_beyond_seq_length_is_refused_with_the_reason(qwen1_folders, tmp_path):
    folder = str(qwen1_folders["bin"])
    assert qwen1.qwen1_max_positions(folder) == SEQ_LENGTH
    assert qwen1.qwen1_max_len_problem(folder, SEQ_LENGTH) is None
    problem = qwen1.qwen1_max_len_problem(folder, SEQ_LENGTH + 1)
    assert problem is not None
    assert "dynamic NTK" in problem and "log-n" in problem and f"data.max_len <= {SEQ_LENGTH}" in problem
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 8}))
    assert qwen1.qwen1_max_len_problem(str(tmp_path), 10_000) is None


# ---------------------------------------------------------------------------
# tokenizer

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog. It's we're they've I'm you'll he'd.",
    "IT'S WE'RE THEY'VE I'M YOU'LL HE'D",
    "你好，世界。通义千问是阿里云研发的大语言模型。我们来测试一下中文分词效果！",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\n\n    else:\r\n        return -x\n",
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1e-6 0x1F 2024-06-01 12:30:45 ¥100 €99,99",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇨🇳 ❤️ and text after",
    "Accents: café naïve résumé Ångström Zürich São Paulo Đorđe Œuvre",
    "Decomposed: cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030angstro\u0308m",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n图中是什么？<|extra_0|><|im_end|>\n"
    "<|im_start|>assistant\n一只猫。<|im_end|>\n<|endoftext|>",
    "   leading spaces and trailing   \n\n  \t mixed whitespace \u00a0nbsp\u3000ideographic space  ",
    "Mixed 中English文 mixed123汉字456 ÀÉÎÕÜ ñ ç ß ø 日本語のテキスト 한국어 텍스트 Русский текст العربية",
    "<|extra_204|><|extra_17|>adjacent<|im_end|><|im_end|>",
]


@pytest.fixture(scope="module")
def tiktoken_reference():
    path = needs_tiktoken_file()
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the reference encoder (pip install tiktoken)")
    ranks = qwen1.read_tiktoken_ranks(str(path))
    special = {t: qwen1.QWEN1_SPECIAL_START + i for i, t in enumerate(qwen1.QWEN1_SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen", pat_str=qwen1.QWEN1_PATTERN, mergeable_ranks=ranks, special_tokens=special)


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    """One cache folder for the module: the merges are derived once (seconds), then read back."""
    folder = tmp_path_factory.mktemp("mmdist-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(qwen1.TOKENIZER_CACHE_ENV, str(folder))
        yield folder


@pytest.fixture(scope="module")
def qwen1_tokenizer(tokenizer_cache):
    return qwen1.qwen1_tokenizer_from_file(str(needs_tiktoken_file()))


def test_token_ids_equal_qwen1_tiktoken(qwen1_tokenizer, tiktoken_reference):
    for text in CORPUS + ["\n".join(CORPUS)]:
        want = tiktoken_reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        got = qwen1_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got == want, text
        assert qwen1_tokenizer.decode(got) == unicodedata.normalize("NFC", text)


def test_special_tokens_and_ids(qwen1_tokenizer):
    tok = qwen1_tokenizer
    assert len(tok) == 151851
    assert tok.convert_tokens_to_ids(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_0|>", "<|extra_204|>"]
    ) == [151643, 151644, 151645, 151646, 151850]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok("a<|extra_3|>b", add_special_tokens=False)["input_ids"][1] == 151649


def test_chatml_template(qwen1_tokenizer):
    text = qwen1_tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")


def test_image_token_is_reserved_and_the_vocabulary_does_not_grow(qwen1_tokenizer):
    from mmdist.models.llm import add_image_token

    before = len(qwen1_tokenizer)
    assert add_image_token(qwen1_tokenizer, qwen1.QWEN1_IMAGE_TOKEN) == 151646
    assert len(qwen1_tokenizer) == before < VOCAB


def test_tokenizer_cache_is_keyed_by_the_file(qwen1_tokenizer, tokenizer_cache, tmp_path):
    import hashlib

    path = needs_tiktoken_file()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
    assert [p.name for p in (tokenizer_cache / "qwen1-tokenizer").glob("*.json")] == [f"{digest}.json"]
    again = qwen1.qwen1_tokenizer_backend(str(path))  # read back from the cache
    assert again.encode("Hello 世界").ids == qwen1_tokenizer("Hello 世界", add_special_tokens=False)["input_ids"]
    edited = tmp_path / "qwen.tiktoken"
    edited.write_bytes(path.read_bytes().replace(b"IQ== 0", b"Ig== 0", 1))  # another file, another key
    with pytest.raises(ValueError, match="ranks|special token"):
        qwen1.qwen1_tokenizer_backend(str(edited))


def test_load_tokenizer_reads_qwen_tiktoken_from_a_qwen1_folder(tmp_path, tokenizer_cache):
    path = needs_tiktoken_file()
    folder = tmp_path / "chat"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(qwen1_config("later")))
    (folder / "generation_config.json").write_text(json.dumps({"chat_format": "chatml"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "QWenTokenizer"}))
    shutil.copy(path, folder / "qwen.tiktoken")
    tok = load_tokenizer(LLMConfig(name_or_path=str(folder)))
    assert tok.eos_token == "<|im_end|>"  # a chat model ends its turns with <|im_end|>
    assert tok("<|im_start|>user", add_special_tokens=False)["input_ids"] == [151644, 872]


def test_missing_tiktoken_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(qwen1_config("later")))
    with pytest.raises(FileNotFoundError, match=r"needs its qwen\.tiktoken"):
        qwen1.load_qwen1_tokenizer(str(tmp_path))
