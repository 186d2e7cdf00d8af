"""Tiny models built from the tiny recipes (helpers.configs), and hand-made batches for them."""

from __future__ import annotations

import torch

from helpers.configs import tiny_run_config
from mmdist.config.run import RunConfig

PAD_ID = 256  # <|pad|> of the tiny byte tokenizer


def make_cfg(stage: str = "fuse", connector: str = "mlp", **overrides) -> RunConfig:
    return tiny_run_config(stage, connector=connector, **overrides)


def make_model(stage: str = "fuse", connector: str = "mlp", **overrides):
    from mmdist.materialize import build_run_model

    torch.manual_seed(0)
    return build_run_model(make_cfg(stage, connector, **overrides))


def sample(model, n_images: int, prompt: list[int], answer: list[int]):
    """One sample: prompt with n_images placeholder runs, then the answer; labels on the answer only."""
    n, iid = model.num_image_tokens, model.image_token_id
    ids: list[int] = []
    for _ in range(n_images):
        ids += [iid] * n
    ids += prompt
    labels = [-100] * len(ids) + answer
    ids += answer
    return ids, labels


def pad_batch(samples, pad_id: int):
    t = max(len(ids) for ids, _ in samples)
    ids = torch.full((len(samples), t), pad_id)
    labels = torch.full((len(samples), t), -100)
    mask = torch.zeros((len(samples), t), dtype=torch.long)
    for i, (s_ids, s_labels) in enumerate(samples):
        ids[i, : len(s_ids)] = torch.tensor(s_ids)
        labels[i, : len(s_labels)] = torch.tensor(s_labels)
        mask[i, : len(s_ids)] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}


def align_batch(model):
    tok = model.processors.text_tokenizer
    enc = tok(["a red cat", "a dog", "a red cat", "two birds"], padding=True, return_tensors="pt")
    return {"pixel_values": torch.randn(4, 3, 16, 16), "text_input_ids": enc.input_ids,
            "text_attention_mask": enc.attention_mask, "caption_group": torch.tensor([0, 1, 0, 2])}


def fuse_batch(model):
    batch = pad_batch([sample(model, 1, [10, 11], [12, 13]), sample(model, 2, [20], [21, 22, 23])], pad_id=256)
    batch["pixel_values"] = torch.randn(3, 3, 16, 16)
    return batch


