"""Preprocessing: a decoded sample becomes token ids, labels and image tensors.

Formats understood (detected per sample, or forced by ``data.format``):

* caption: images + ``txt`` (img2dataset's ``json`` metadata is ignored);
* conversation: ``json`` with a LLaVA ``conversations`` list (``from``: human/gpt/system,
  ``value``); ``<image>`` in the text marks where each image goes (if the marks are
  missing they are put before the first human turn, as LLaVA does);
* several images per sample (``0.jpg``, ``1.jpg``, ...) and text-only samples.

Stage ``fuse``: every image placeholder becomes ``num_image_tokens`` copies of
``image_token_id``; labels are -100 on prompt, image and (later) padding tokens, so
the loss covers assistant turns only. Two templates: ``plain`` (image, prompt,
answer + EOS) and ``chat`` (the tokenizer's own chat template, rendered turn by
turn so the assistant spans are known exactly). Truncation to ``max_len`` never
cuts inside an image span: the cut moves to the span's start and the image is dropped.

With ``data.image_tiling`` (stage fuse, mmdist/data/tiling.py) each image is a base image
plus tiles: a placeholder expands to the base image's tokens and each row of tiles'
tokens followed by the separator's, ``pixel_values`` gets one row per base image and
tile, and ``num_images`` counts those rows (what the model fills placeholders with);
``image_grids`` gives each kept image's (rows, cols). Truncation drops a whole tiled image.

Stage ``align``: one image and its caption tokenised by the text encoder's tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Optional

from mmdist.data.reader import BadSample, decode_images
from mmdist.data.settings import ImageTilingConfig
from mmdist.data.tiling import image_layout, max_tiled_image_tokens, select_grid, tile_image, tiled_draft_size
from mmdist.models.processors import ORIGINAL_SIZE_KEY
from mmdist.stages import Batch, Stage

if TYPE_CHECKING:
    from mmdist.config.run import RunConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# The mark LLaVA-style data uses for an image; it places images
# whatever the placeholder token is (e.g. Qwen1's <|extra_0|>).
DATA_IMAGE_MARK = "<image>"
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def resolve_template(template: str, processors: Any) -> str:
    """'plain' or 'chat': 'auto' picks the tokenizer's chat template when it has one."""
    tok = getattr(processors, "tokenizer", None)
    if template == "auto":
        template = getattr(processors, "template", None) or "auto"
    if template == "auto":
        template = "chat" if tok is not None and getattr(tok, "chat_template", None) else "plain"
    if template == "chat" and (tok is None or not getattr(tok, "chat_template", None)):
        raise ValueError("data.template=chat but the LLM tokenizer has no chat template; use data.template=plain")
    if template not in ("plain", "chat"):
        raise ValueError(f"unknown template {template!r}: use 'auto', 'plain' or 'chat'")
    return template


@dataclass
class Preprocessor:
    """Turns decoded samples into model-ready pieces for one stage; built once per loader (picklable)."""

    processors: Any
    stage: Stage
    template: str
    max_len: int
    data_format: str = "auto"
    caption_prompt: str = ""
    image_token: str = "<image>"
    max_image_pixels: int = 89_478_485
    text_max_length: int = 64
    use_features: bool = False
    image_tiling: ImageTilingConfig = field(default_factory=ImageTilingConfig)

    def __post_init__(self) -> None:
        if self.tiling and self.use_features:
            raise ValueError(
                "data.image_tiling needs pixels: it cannot render samples from image features "
                "(data.feature_cache, or a prompt rendered without its images); set data.image_tiling.enabled=false"
            )
        if self.tiling and self.processors.num_image_tokens:
            worst = max_tiled_image_tokens(
                self.image_tiling, self.processors.num_image_tokens, len(self._encode(self.image_tiling.separator))
            )
            if worst > self.max_len:
                log.warning(
                    "data.image_tiling: an image on the largest grid takes %d positions, more than data.max_len=%d; "
                    "such samples lose the image to truncation (raise data.max_len or drop large grids)",
                    worst,
                    self.max_len,
                )

    @property
    def tiling(self) -> bool:
        """Whether images are tiled (a stage that tiles, with ``data.image_tiling.enabled``)."""
        return self.stage.tiles and self.image_tiling.enabled

    # ----------------------------------------------------------------- helpers
    @property
    def tokenizer(self):
        return self.processors.tokenizer

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _marked(self, text: str) -> str:
        """``text`` with the data's ``<image>`` marks written as the placeholder token (when that is another token)."""
        return text.replace(DATA_IMAGE_MARK, self.image_token) if self.image_token != DATA_IMAGE_MARK else text

    def _encode_with_images(
        self, text: str, layouts: Optional[list[list[int]]] = None, first: int = 0
    ) -> tuple[list[int], int]:
        """Token ids of ``text`` with every image placeholder expanded; returns (ids, images used).

        ``layouts`` (tiling) holds the ids each image of the sample expands to; ``first`` is
        the index of this text's first image in the sample.
        """
        parts = text.split(self.image_token)
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i > 0:
                index = first + i - 1
                if layouts is not None and index < len(layouts):
                    ids.extend(layouts[index])
                else:  # an extra placeholder: the image count check reports it
                    ids.extend([self.processors.image_token_id] * self.processors.num_image_tokens)
            ids.extend(self._encode(part))
        return ids, len(parts) - 1

    # ----------------------------------------------------------------- formats
    def conversation_of(self, sample: dict, n_images: int) -> list[dict]:
        """The sample as a list of {role, content} messages, with exactly ``n_images`` placeholders."""
        meta = sample["json"]
        fmt = self.data_format
        has_conv = isinstance(meta, dict) and "conversations" in meta
        if fmt == "auto":
            fmt = "conversation" if has_conv else "caption"
        if fmt == "conversation":
            if not has_conv:
                raise BadSample("missing_keys", "no json member with a 'conversations' list")
            turns = meta["conversations"]
            if not isinstance(turns, list) or not turns:
                raise BadSample("missing_keys", "'conversations' is not a non-empty list")
            messages = []
            for turn in turns:
                if (
                    not isinstance(turn, dict)
                    or "value" not in turn
                    or turn.get("from", turn.get("role")) not in ROLE_MAP
                ):
                    raise BadSample("missing_keys", f"conversation turn without 'from'/'value': {str(turn)[:80]}")
                messages.append(
                    {"role": ROLE_MAP[turn.get("from", turn.get("role"))], "content": self._marked(str(turn["value"]))}
                )
            marks = sum(m["content"].count(self.image_token) for m in messages)
            if marks == 0 and n_images:
                first_user = next((m for m in messages if m["role"] == "user"), None)
                if first_user is None:
                    raise BadSample("missing_keys", "conversation has images but no human turn")
                first_user["content"] = (self.image_token + "\n") * n_images + first_user["content"]
            elif marks != n_images:
                raise BadSample(
                    "image_count_mismatch", f"{marks} '{self.image_token}' marks for {n_images} image member(s)"
                )
            if not any(m["role"] == "assistant" for m in messages):
                raise BadSample("missing_keys", "conversation has no gpt/assistant turn")
            return messages
        # caption
        if sample["text"] is None:
            raise BadSample("missing_caption", "no txt member")
        caption = self._marked(sample["text"]).replace(self.image_token, "").strip()
        if not caption:
            raise BadSample("missing_caption", "empty caption")
        prompt = self.image_token * n_images + self.caption_prompt
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": caption}]

    # ----------------------------------------------------------------- templates
    def _render_plain(
        self, messages: list[dict], layouts: Optional[list[list[int]]] = None
    ) -> tuple[list[int], list[int], int]:
        ids: list[int] = []
        labels: list[int] = []
        used = 0
        eos = self.tokenizer.eos_token_id
        for msg in messages:
            piece, n = self._encode_with_images(msg["content"], layouts, used)
            used += n
            if msg["role"] == "assistant":
                if eos is not None:
                    piece = piece + [eos]
                ids += piece
                labels += piece
            else:
                if msg["content"].replace(self.image_token, "").strip():
                    piece = piece + self._encode("\n")  # separate a text prompt from the answer
                ids += piece
                labels += [IGNORE_INDEX] * len(piece)
        return ids, labels, used

    def _render_chat(
        self, messages: list[dict], layouts: Optional[list[list[int]]] = None
    ) -> tuple[list[int], list[int], int]:
        tok = self.tokenizer

        def render(msgs: list[dict], gen: bool) -> str:
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        # Render growing prefixes: text between prefixes is one segment, supervised when it is an
        # assistant reply. This needs a prefix-stable template (true of ChatML/Llama/Qwen templates).
        segments: list[tuple[str, bool]] = []
        done = ""
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prompt = render(messages[:i], True)
            full = render(messages[: i + 1], False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise ValueError(
                    "the tokenizer's chat template is not prefix-stable (a rendered conversation does not start with "
                    "the rendering of its first turns), so assistant turns cannot be located; use data.template=plain"
                )
            segments.append((prompt[len(done):], False))
            segments.append((full[len(prompt):], True))
            done = full
        ids: list[int] = []
        labels: list[int] = []
        used = 0
        for text, supervised in segments:
            piece, n = self._encode_with_images(text, layouts, used)
            used += n
            ids += piece
            if supervised:
                labels += [IGNORE_INDEX if t == self.processors.image_token_id else t for t in piece]
            else:
                labels += [IGNORE_INDEX] * len(piece)
        return ids, labels, used

    # ----------------------------------------------------------------- truncation
    def truncate(self, ids: list[int], labels: list[int], n_images: int) -> tuple[list[int], list[int], int]:
        """Cut to max_len, moving the cut back to the start of an image span it would split; returns images kept."""
        if len(ids) <= self.max_len:
            return ids, labels, n_images
        cut = self.max_len
        n_tok = self.processors.num_image_tokens
        kept_image_tokens = sum(1 for t in ids[:cut] if t == self.processors.image_token_id)
        partial = kept_image_tokens % n_tok  # > 0 only when the cut falls inside an image span
        cut -= partial
        kept_image_tokens -= partial
        return ids[:cut], labels[:cut], kept_image_tokens // n_tok

    def _image_spans(self, ids: list[int], layouts: list[list[int]]) -> list[tuple[int, int]]:
        """[start, end) of each image's layout in ``ids``, in order (each layout starts with an image token)."""
        spans = []
        pos = 0
        image_id = self.processors.image_token_id
        for layout in layouts:
            start = ids.index(image_id, pos)
            end = start + len(layout)
            if ids[start:end] != layout:  # the text itself holds a stray placeholder id
                raise BadSample("image_count_mismatch", "image placeholder tokens outside the images' places")
            spans.append((start, end))
            pos = end
        return spans

    def _truncate_tiled(
        self, ids: list[int], labels: list[int], spans: list[tuple[int, int]]
    ) -> tuple[list[int], list[int], int]:
        """Cut to max_len, moving the cut back to the start of a tiled image it would split; returns images kept."""
        cut = len(ids)
        if cut > self.max_len:
            cut = self.max_len
            for start, end in spans:
                if start < cut < end:
                    cut = start
        kept = sum(1 for _, end in spans if end <= cut)
        return ids[:cut], labels[:cut], kept

    def _tiled(self, sample: dict, messages: list[dict], n_images: int) -> dict:
        """Stage fuse with data.image_tiling: images decoded first, since their sizes decide the token layout."""
        transform = self.processors.image_transform
        draft = partial(tiled_draft_size, transform, self.image_tiling)
        images = decode_images(sample, self.max_image_pixels, draft)
        separator = self._encode(self.image_tiling.separator)
        grids = []
        for image in images:
            width, height = image.info.get(ORIGINAL_SIZE_KEY, image.size)
            grids.append(select_grid((height, width), self.image_tiling, transform.size))
        layouts = [
            image_layout(g, self.processors.num_image_tokens, self.processors.image_token_id, separator) for g in grids
        ]
        render = self._render_chat if self.template == "chat" else self._render_plain
        ids, labels, used = render(messages, layouts)
        if used != n_images:
            raise BadSample("image_count_mismatch", f"template placed {used} images, sample has {n_images}")
        spans = self._image_spans(ids, layouts)
        for start, end in spans:  # separators inside an image are never targets, even in an assistant turn
            labels[start:end] = [IGNORE_INDEX] * (end - start)
        ids, labels, kept = self._truncate_tiled(ids, labels, spans)
        if not any(t != IGNORE_INDEX for t in labels):
            raise BadSample(
                "no_supervised_tokens", f"nothing left to learn after masking/truncation to max_len={self.max_len}"
            )
        pixel_values = []
        for image in images[:kept]:
            rows, _ = tile_image(image, self.image_tiling, transform)
            pixel_values += rows  # uint8: the vision tower normalises on its device
        return {"input_ids": ids, "labels": labels, "num_images": len(pixel_values), "image_grids": grids[:kept],
                "key": sample["key"], "pixel_values": pixel_values}

    # ----------------------------------------------------------------- entry
    def __call__(self, sample: dict) -> dict:
        n_images = _feature_count(sample["features"]) if self.use_features else len(sample["image_bytes"])
        if self.stage.batch is Batch.CAPTIONS:
            return self._align(sample, n_images)
        if self.tiling:
            return self._tiled(sample, self.conversation_of(sample, n_images), n_images)
        messages = self.conversation_of(sample, n_images)
        if self.template == "chat":
            ids, labels, used = self._render_chat(messages)
        else:
            ids, labels, used = self._render_plain(messages)
        if used != n_images:
            raise BadSample("image_count_mismatch", f"template placed {used} images, sample has {n_images}")
        ids, labels, kept = self.truncate(ids, labels, n_images)
        if not any(t != IGNORE_INDEX for t in labels):
            raise BadSample(
                "no_supervised_tokens", f"nothing left to learn after masking/truncation to max_len={self.max_len}"
            )
        out = {"input_ids": ids, "labels": labels, "num_images": kept, "key": sample["key"]}
        if self.use_features:
            if kept:
                out["image_features"] = _feature_tensor(sample["features"])[:kept]
        else:
            transform = self.processors.image_transform
            images = decode_images(sample, self.max_image_pixels, transform.draft_size)[:kept]
            # uint8: the vision tower normalises on its device (4x less to pin and copy)
            out["pixel_values"] = [transform.to_uint8(img) for img in images]
        return out

    def _align(self, sample: dict, n_images: int) -> dict:
        if n_images != 1:
            raise BadSample("align_needs_one_image", f"stage align needs exactly one image, sample has {n_images}")
        if sample["text"] is not None:  # a caption wins over a conversation's answers
            caption = self._marked(sample["text"]).replace(self.image_token, "").strip()
        elif isinstance(sample["json"], dict) and "conversations" in sample["json"]:
            turns = sample["json"]["conversations"]
            caption = " ".join(
                str(t.get("value", ""))
                for t in turns
                if isinstance(t, dict) and ROLE_MAP.get(t.get("from", t.get("role"))) == "assistant"
            ).strip()
        else:
            caption = ""
        if not caption:
            raise BadSample("missing_caption", "no caption (txt) or assistant answer (json) to align with")
        text_tok = self.processors.text_tokenizer
        ids = list(text_tok(caption, truncation=True, max_length=self.text_max_length)["input_ids"])
        out = {"text_input_ids": ids, "caption": caption, "key": sample["key"]}
        if self.use_features:
            if sample["features"] is None:
                raise BadSample("missing_keys", "feature cache sample without features")
            out["image_features"] = _feature_tensor(sample["features"])[0]
        else:
            transform = self.processors.image_transform
            out["pixel_values"] = transform.to_uint8(
                decode_images(sample, self.max_image_pixels, transform.draft_size)[0]
            )
        return out


def _feature_count(features: Any) -> int:
    if features is None:  # text-only sample in a feature cache
        return 0
    arr = features["image_features"] if isinstance(features, dict) else features
    return int(arr.shape[0]) if arr.ndim == 3 else 1


def _feature_tensor(features: Any):
    import numpy as np
    import torch

    arr = features["image_features"] if isinstance(features, dict) else features
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    return torch.from_numpy(arr.astype(np.float32))  # stored fp16; the trainable connector takes fp32 like pixels


def make_preprocessor(cfg: RunConfig, processors: Any, use_features: bool = False) -> Preprocessor:
    """The preprocessor of a run config (stage, template, lengths) and the model's processors."""
    data = cfg.data
    stage = cfg.stage
    template = resolve_template(data.template, processors) if stage.batch is Batch.CONVERSATIONS else "plain"
    image_token = getattr(processors, "image_token", None) or cfg.model.llm.image_token
    return Preprocessor(
        processors=processors,
        stage=stage,
        template=template,
        max_len=data.max_len,
        data_format=data.format,
        caption_prompt=data.caption_prompt,
        image_token=image_token,
        max_image_pixels=data.max_image_pixels,
        text_max_length=cfg.model.text.max_length,
        use_features=use_features,
        image_tiling=data.image_tiling,
    )

