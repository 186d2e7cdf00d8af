"""Start-up self-check: render a few samples and stop early, with a clear message, if the setup is wrong.

A misconfigured template or tokenizer fails silently during training: the loss
is computed on nothing, or image features land on the wrong positions. So before
the first step each rank renders its first samples and checks that some tokens
are supervised, that the image placeholder is one token with ``image_token_id``,
and that every image got exactly ``num_image_tokens`` positions.
"""

from __future__ import annotations

import logging
from typing import Any

from mmdist.data.preprocess import IGNORE_INDEX
from mmdist.data.reader import BadSampleCounter, read_tar
from mmdist.stages import Batch

log = logging.getLogger(__name__)


def self_check(dataset: Any, processors: Any, num_samples: int) -> list[dict]:
    """Render the first samples of this rank; stop with a clear error if the supervision or image tokens are wrong."""
    if num_samples <= 0:
        return []
    pre = dataset.preprocess
    counter = BadSampleCounter(1.0, dataset.log_bad, where="self-check")
    rendered: list[dict] = []
    for shard in dataset.shards[: max(1, num_samples)]:
        for raw in read_tar(shard.url, counter):
            out = dataset.process(raw, counter)
            if out is not None:
                rendered.append(out)
            if len(rendered) >= num_samples:
                break
        if len(rendered) >= num_samples:
            break
    if not rendered:
        reasons = dict(counter.bad)
        if reasons.get("no_supervised_tokens"):
            raise RuntimeError(
                f"self-check: masking leaves no supervised tokens in the first samples of {dataset.shards[0].url} "
                f"(template={pre.template!r}, max_len={pre.max_len}, bad samples: {reasons}); check data.template, "
                "data.format, data.max_len and that the samples have assistant answers"
            )
        raise RuntimeError(
            f"self-check: none of the first samples of {dataset.shards[0].url} could be used (bad samples: {reasons})"
        )
    if pre.stage.batch is Batch.CAPTIONS:
        return rendered
    if not any(any(t != IGNORE_INDEX for t in s["labels"]) for s in rendered):
        raise RuntimeError(
            "self-check: masking leaves no supervised tokens in "
            f"{len(rendered)} rendered samples (template={pre.template!r}); "
            "check data.template / data.format and that the samples have assistant answers"
        )
    image_id, n_tok = processors.image_token_id, processors.num_image_tokens
    probe = pre._encode(pre.image_token)
    if probe != [image_id]:
        raise RuntimeError(
            "self-check: the tokenizer turns the image placeholder "
            f"{pre.image_token!r} into {probe}, not the single id "
            f"image_token_id={image_id}; the placeholder token must be added to the tokenizer"
        )
    for s in rendered:
        count = sum(1 for t in s["input_ids"] if t == image_id)
        n_img = s["num_images"]
        if "pixel_values" in s:
            images = len(s["pixel_values"])
        else:
            images = int(s["image_features"].shape[0]) if "image_features" in s else 0
        if count != n_img * n_tok or images != n_img:
            raise RuntimeError(
                f"self-check: sample {s['key']} has {count} image tokens for {images} image(s); expected "
                f"{n_img} x num_image_tokens={n_tok}. The image token count does not match the encoder's"
            )
    return rendered
