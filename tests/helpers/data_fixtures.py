"""Helpers for the data-pipeline tests: a fake Processors on a real tiny HF tokenizer, configs, shard writers.

The fake stands in for mmdist.models.processors.Processors (same attributes), so
these tests do not depend on the model code. Shards are written into tmp_path.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from mmdist.config.run import load_config

WORDS = (
    "a handwritten digit zero one two three four five six seven eight nine what is this ? . , user assistant system "
    "describe the image picture of number shows cat dog red blue green and with text only question answer"
).split()
SPECIALS = ["<pad>", "</s>", "<image>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer(chat: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<pad>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>", "<|im_end|>"]})
    if chat:
        tok.chat_template = CHATML
    return tok


@dataclass
class FakeTransform:
    size: int = 8

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        arr = np.array(image.convert("RGB").resize((self.size, self.size)), dtype=np.uint8)
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_uint8(image).float() / 255.0

    def draft_size(self, width: int, height: int) -> None:
        return None  # always a full decode


@dataclass
class FakeProcessors:
    image_transform: Any
    num_image_tokens: int
    tokenizer: Any = None
    text_tokenizer: Any = None
    image_token: Optional[str] = "<image>"
    image_token_id: Optional[int] = None
    template: str = "auto"
    identity: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        return f"fake-{self.image_transform.size}-{self.num_image_tokens}-{self.template}"


def make_processors(num_image_tokens: int = 4, chat: bool = True, template: str = "auto") -> FakeProcessors:
    tok = make_tokenizer(chat)
    return FakeProcessors(FakeTransform(8), num_image_tokens, tokenizer=tok, text_tokenizer=tok,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), template=template)


def make_config(shards: list[str] | str, stage: str = "fuse", eval_shards: Optional[list[str]] = None, **data: Any):
    """A validated RunConfig whose data section reads ``shards``; ``data`` overrides data.* keys (train.* via
    micro_batch_size and global_batch_size, which defaults to the micro-batch). The order is per rank unless
    ``order="global"`` is given: most data tests check what one rank's own stream does."""
    micro = data.pop("micro_batch_size", 2)
    global_batch = data.pop("global_batch_size", micro)
    data.setdefault("order", "per_rank")
    base = {
        "stage": stage,
        "model": {
            "llm": {"init_config": {"model_type": "llama"}, "tokenizer": "mmdist:tiny-bytes"},
            "vision": {"init_config": {"model_type": "vit"}},
            "text": {"init_config": {"model_type": "bert"}, "tokenizer": "mmdist:tiny-wordpiece"},
        },
        "data": {
            "train": [{"shards": [shards] if isinstance(shards, str) else shards}],
            "num_workers": 0,
            "shuffle_buffer": 0,
            "max_len": 64,
            **data,
        },
        "train": {"max_steps": 1, "micro_batch_size": micro, "global_batch_size": global_batch},
    }
    if eval_shards:
        base["data"]["eval"] = [{"shards": eval_shards}]
    return load_config(base=base)


def png(value: int = 0, size: int = 4) -> bytes:
    img = Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpg(value: int = 0, size: int = 4) -> bytes:
    img = Image.fromarray(np.full((size, size, 3), value % 256, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Write samples {"__key__": key, ext: bytes|str|dict} as a tar (members in the given order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                if isinstance(value, str):
                    value = value.encode()
                elif isinstance(value, dict):
                    value = json.dumps(value).encode()
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    return path


def caption_sample(i: int, ext: str = "png") -> dict:
    words = ["a handwritten digit", "a picture of a cat and a dog", "red blue green", "the number seven"][i % 4]
    return {"__key__": f"s{i:06d}", ext: png(i) if ext == "png" else jpg(i), "txt": f"{words} {WORDS[3 + i % 10]}"}


def write_caption_shards(
    folder: Path, counts: list[int], prefix: str = "train", sizes: bool = True, start: int = 0
) -> str:
    """Shards of caption samples with keys s{start}, s{start+1}, ...; returns a brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    index = start
    size_map = {}
    for s, count in enumerate(counts):
        write_tar(folder / f"{prefix}-{s:06d}.tar", [caption_sample(index + i) for i in range(count)])
        size_map[f"{prefix}-{s:06d}.tar"] = count
        index += count
    if sizes:
        (folder / "sizes.json").write_text(json.dumps(size_map))
    return str(folder / f"{prefix}-{{000000..{len(counts) - 1:06d}}}.tar")


def batch_keys(loader) -> list[str]:
    return list(loader.last_keys)


def new_workers(before: set) -> list:
    """This process's live children that ``before`` (a set of ``multiprocessing.active_children()``) lacks."""
    return [p for p in multiprocessing.active_children() if p not in before]


def stopped_within(workers: list, seconds: float) -> bool:
    """Whether every process of ``workers`` has ended within ``seconds``."""
    deadline = time.monotonic() + seconds
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not any(w.is_alive() for w in workers)
