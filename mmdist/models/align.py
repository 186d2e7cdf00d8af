"""Stage 1: align a frozen image encoder with a BERT-style text encoder.

With a frozen text encoder, linear/MLP heads map both sides into a shared space
trained by ITC (image-text contrastive loss with a learnable temperature). With
a trainable text encoder the Q-Former adds ITM (matching with hard negatives)
and ITG (image-grounded generation) as in BLIP-2 (mmdist/models/qformer.py).

The losses themselves live in mmdist/models/losses.py.

A frozen text encoder's pooled output never changes for a caption, so the
feature cache may precompute it: a batch with ``text_features`` [B, H] skips
the text encoder and gives the same loss as its token ids.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mmdist.models.connectors import build_stage1_module
from mmdist.models.contract import BatchCounts, count_samples, leading_size
from mmdist.models.flops import FlopCount, module_flops, part_flops
from mmdist.models.freeze import FrozenAwareModule, Part, freeze
from mmdist.models.gather import Gather, null_gather
from mmdist.models.losses import itc_loss
from mmdist.models.qformer import QFormer
from mmdist.models.settings import ModelConfig
from mmdist.models.text import TextEncoder
from mmdist.models.vision import VisionTower


class AlignModel(FrozenAwareModule):
    """Stage-1 model: frozen vision encoder, text encoder, stage-1 module, learnable temperature."""

    def __init__(
        self,
        settings: ModelConfig,
        processors: Any,
        vision: VisionTower,
        text: TextEncoder,
        gather: Gather = null_gather,
    ):
        super().__init__()
        conn = settings.connector
        self.settings = settings
        self.processors = processors
        self.vision = vision
        self.text = text
        self.stage1 = build_stage1_module(
            conn, vision.hidden_size, vision.num_tokens, text.hidden_size, text_encoder=text, gather=gather
        )
        # Shape [1], not []: DeepSpeed 0.19's ZeRO-3 cannot broadcast 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / conn.temperature)]))
        self.apply_policy()
        if not settings.text.freeze and settings.text.freeze_word_embeddings:
            freeze(self.text.word_embeddings())  # fp32 as the rest of the encoder, which trains

    def parts(self) -> list[Part]:
        m = self.settings
        return [
            Part("vision", trainable=not m.vision.freeze, dtype=m.vision.dtype),
            Part("text", trainable=not m.text.freeze, dtype=m.text.dtype),
            Part("stage1", trainable=True, dtype="fp32"),
        ]

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """The Q-Former's tied LM head reads the text encoder's token table (contract.ReadsOthersParameters)."""
        if isinstance(self.stage1, QFormer) and self.stage1.tied_lm_head:
            return [(self.stage1, self.text.word_embeddings().weight)]
        return []

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"stage1": [p for p in self.stage1.parameters() if p.requires_grad],
                  "temperature": [self.logit_scale]}
        if not self.settings.text.freeze:
            groups["text"] = [p for p in self.text.parameters() if p.requires_grad]
        if not self.settings.vision.freeze:
            groups["vision"] = [p for p in self.vision.parameters() if p.requires_grad]
        return {k: v for k, v in groups.items() if v}

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision features [N, tokens, D] (what the feature cache stores)."""
        return self.vision(pixel_values)

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled frozen text-encoder output [B, H], before the
        trainable head (what the cache stores as ``text_features``)."""
        return self.text(input_ids, attention_mask)[1]

    def image_features(self, batch: dict) -> torch.Tensor:
        if batch.get("image_features") is not None:
            return batch["image_features"]
        if self.settings.vision.freeze:
            with torch.no_grad():
                return self.vision(batch["pixel_values"])
        return self.vision(batch["pixel_values"])

    def text_features(self, batch: dict) -> torch.Tensor:
        """Pooled caption vectors [B, H]: precomputed ``text_features``
        (feature cache) or the text encoder on the tokens."""
        cached = batch.get("text_features")
        if cached is not None:
            if not self.settings.text.freeze:
                raise ValueError(
                    "batch has precomputed text_features but model.text.freeze=false: a trainable text encoder "
                    "needs token ids; rebuild the feature cache without text features (`mmdist cache` with this config)"
                )
            return cached
        ids, mask = batch["text_input_ids"], batch["text_attention_mask"]
        if self.settings.text.freeze:
            with torch.no_grad():
                return self.text(ids, mask)[1]
        return self.text(ids, mask)[1]

    def forward(self, batch: dict) -> dict:
        features = self.image_features(batch)
        group = batch.get("caption_group")
        if self.settings.connector.type == "qformer":  # the Q-Former's text side trains: always from token ids
            return self.stage1.align_losses(features, batch["text_input_ids"], batch["text_attention_mask"],
                                            self.logit_scale, group, self.text)
        pooled = self.text_features(batch)
        image_emb = self.stage1.image_embedding(features)
        text_emb = self.stage1.text_embedding(pooled)
        loss, acc = itc_loss(image_emb, text_emb, self.logit_scale, group)
        metrics = {"itc": loss.detach(), "acc": acc, "temperature": (1.0 / self.logit_scale.detach().exp()).reshape(())}
        return {"loss": loss, "metrics": metrics}

    def batch_counts(self, batch: dict) -> BatchCounts:
        """One image per sample; tokens are the caption tokens; the contrastive loss is a mean over the batch as a
        whole, so micro-batches are not weighted (``loss_terms`` None) and no position is supervised token by token."""
        samples = count_samples(batch, "text_input_ids", "pixel_values", "image_features")
        mask = batch.get("text_attention_mask")
        return BatchCounts(
            samples=samples,
            tokens=int(mask.sum()) if mask is not None else samples,
            supervised_tokens=0,
            images=leading_size(batch, "pixel_values", "image_features"),
            image_tokens=0,
            positions=int(batch["text_input_ids"].numel()) if "text_input_ids" in batch else 0,
        )

    def flop_count(self, *, vision_runs: bool = True, text_runs: bool = True) -> FlopCount:
        """The training FLOPs of a step's parts where they run (:func:`align_flop_count`; mmdist.models.contract)."""
        runs = vision_runs or any(p.requires_grad for p in self.vision.parameters())
        return align_flop_count(self.vision.flop_count() if runs else FlopCount(), self.text.model, self.stage1,
                                text_runs=text_runs, caption_len=self.settings.text.max_length)

    # -- export -----------------------------------------------------------

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights by name: the stage-1 module, the temperature (and a trained text encoder)."""
        out = {f"stage1.{k}": v.detach().cpu() for k, v in self.stage1.state_dict().items()}
        out["logit_scale"] = self.logit_scale.detach().cpu().reshape(1)
        if not self.settings.text.freeze:
            out.update({f"text.{k}": v.detach().cpu() for k, v in self.text.state_dict().items()})
        return out



def align_flop_count(vision: FlopCount, text: nn.Module, stage1: nn.Module, *, text_runs: bool = True,
                     caption_len: int = 0) -> FlopCount:
    """Stage 1's training FLOPs by where each part runs (mmdist.models.flops for the rules); also what the planner
    counts on meta-device modules. ``text``: the text encoder's transformers model (``TextEncoder.model``).

    - ``vision``: the tower's count per image (mmdist.models.vision.tower_flop_count), nothing (``FlopCount()``)
      when its features are cached;
    - the text encoder per caption token: forward only when frozen, 6 per weight when it trains (its trainable
      embeddings put a gradient under every layer); nothing when a frozen encoder's pooled features are cached;
    - the stage-1 module by its own ``flop_count()`` (the linear/MLP heads: the image head at each image token, the
      text head per caption); a module without one by its shapes, once per image (counted low);
    - a Q-Former by :meth:`QFormer.stage1_flop_count <mmdist.models.qformer.QFormer.stage1_flop_count>`: its
      queries, cross-attention, ITC, every ITM pair and the ITG pass, per image and per caption token, with the
      attention terms at ``caption_len`` (captions of at most ``model.text.max_length`` tokens) and one sample
      per rank (the first layer's shared self-attention counted per image, the similarity over the global batch
      per own sample: both small beside the per-image work); its tied LM head's weight gradient only where the
      encoder's token table trains.
    The learnable temperature does no matmul.
    """
    count = vision
    text_trains = any(p.requires_grad for p in text.parameters())
    if text_runs or text_trains:
        count += part_flops(text, "per_token", 1, input_grad=text_trains)
    if isinstance(stage1, QFormer) and caption_len:
        head_trains = text.get_input_embeddings().weight.requires_grad if stage1.tied_lm_head else None
        return count + stage1.stage1_flop_count(caption_len, head_trains=head_trains)
    return count + module_flops(stage1, "per_image", 1)
