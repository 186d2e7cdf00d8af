"""BLIP-2 Q-Former: learnable queries that read the frozen image features, trained with ITC, ITM and ITG.

Structure (Li et al., 2023, "BLIP-2"): a BERT-like stack whose self-attention is
shared by the learnable queries and the caption tokens; every
``cross_attention_every``-th layer lets the queries (only) cross-attend to the
image features; queries and text have separate feed-forward blocks. What the
shared self-attention may see is decided by a mask per objective:

* ITC: queries alone / text alone (unimodal), similarity = max over queries;
* ITM: queries and text see each other (bidirectional); a linear head on the
  query outputs says match / no match, with hard negatives sampled from the
  ITC similarities;
* ITG: queries see only queries, text sees all queries and earlier text (the
  multimodal causal mask); an LM head predicts the next caption token.

Layers are initialised from the text encoder's first layers when
``init_from_text`` (as BLIP-2 initialises from BERT-base); the cross-attention is
new. In stage 2 only the query path is built (the text parts stay in the
stage-1 export and are ignored). Written here rather than taken from
transformers' Blip2QFormerModel because that class has no text path for ITM/ITG.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmdist.models.gather import Gather, null_gather
from mmdist.models.losses import itc_loss, sample_hard_negatives


class Attention(nn.Module):
    """Multi-head attention with BERT's post-norm residual: LN(x + O(attn(x, ctx)))."""

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, eps: float = 1e-12):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        b, t, d = x.shape
        h = self.heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, h, d // h).transpose(1, 2)

        mask = None if allowed is None else allowed[:, None]
        attn = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)), split(self.value(context)), attn_mask=mask)
        return self.norm(x + self.out(attn.transpose(1, 2).reshape(b, t, d)))


class FeedForward(nn.Module):
    """BERT FFN block: LN(x + W2 gelu(W1 x))."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.inter, self.out, self.norm = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.out(F.gelu(self.inter(x))))


class QFormerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, vision_dim: int, cross: bool, with_text: bool):
        super().__init__()
        self.self_attn = Attention(dim, heads)
        self.cross_attn = Attention(dim, heads, kv_dim=vision_dim) if cross else None
        self.ffn_query = FeedForward(dim, 4 * dim)
        self.ffn_text = FeedForward(dim, 4 * dim) if with_text else None

    def forward(self, x: torch.Tensor, n_queries: int, image: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.self_attn(x, allowed=allowed)
        queries, text = x[:, :n_queries], x[:, n_queries:]
        if self.cross_attn is not None:
            queries = self.cross_attn(queries, context=image)
        queries = self.ffn_query(queries)
        if text.shape[1]:
            text = self.ffn_text(text)
        return torch.cat([queries, text], 1)


class QFormer(nn.Module):
    """Learnable queries -> image tokens [N, num_queries, hidden]; in stage 1 also ITC/ITM/ITG.

    ``text_dim`` is the text encoder's width; ``text_encoder`` (stage 1 only) adds the
    text parts (ITC text projection, ITM and LM heads) and initialises the layers.
    """

    def __init__(self, cfg: Any, vision_dim: int, text_dim: Optional[int], text_encoder: Any = None, gather: Optional[Gather] = None):
        super().__init__()
        q = cfg.qformer
        self.cfg = cfg
        dim = text_dim if (q.init_from_text and text_dim) else q.hidden_size
        if dim % q.num_heads:
            raise ValueError(f"model.connector.qformer.num_heads={q.num_heads} does not divide the Q-Former width {dim}")
        self.dim, self.num_tokens, self.out_dim = dim, q.num_queries, dim
        with_text = text_encoder is not None
        self.queries = nn.Parameter(torch.randn(1, q.num_queries, dim) * 0.02)
        self.image_norm = nn.LayerNorm(vision_dim)
        self.layers = nn.ModuleList(
            QFormerLayer(dim, q.num_heads, vision_dim, cross=(i % q.cross_attention_every == 0), with_text=with_text)
            for i in range(q.num_layers)
        )
        if with_text:
            vocab = int(text_encoder.model.config.vocab_size)
            self.text_in = nn.Identity() if text_dim == dim else nn.Linear(text_dim, dim)
            self.vision_proj = nn.Linear(dim, cfg.align_dim)
            self.text_proj = nn.Linear(text_dim, cfg.align_dim)
            self.itm_head = nn.Linear(dim, 2)
            self.lm_head = nn.Linear(dim, vocab)
            if q.init_from_text:
                with (gather or null_gather)(list(self.parameters()) + list(text_encoder.parameters())):
                    self.init_from_text(text_encoder)

    # -- initialisation ---------------------------------------------------

    @torch.no_grad()
    def init_from_text(self, text_encoder: Any) -> int:
        """Copy self-attention and FFN weights from the text encoder's first layers (BERT layout); returns layers copied."""
        bert_layers = getattr(getattr(text_encoder.model, "encoder", None), "layer", None)
        if bert_layers is None:
            return 0
        copied = 0
        for ours, theirs in zip(self.layers, bert_layers):
            pairs = [
                (ours.self_attn.query, theirs.attention.self.query), (ours.self_attn.key, theirs.attention.self.key),
                (ours.self_attn.value, theirs.attention.self.value), (ours.self_attn.out, theirs.attention.output.dense),
                (ours.self_attn.norm, theirs.attention.output.LayerNorm),
            ]
            for ffn in (ours.ffn_query, ours.ffn_text):
                pairs += [(ffn.inter, theirs.intermediate.dense), (ffn.out, theirs.output.dense), (ffn.norm, theirs.output.LayerNorm)]
            if any(a.weight.shape != b.weight.shape for a, b in pairs):
                continue
            for a, b in pairs:
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            copied += 1
        word = text_encoder.model.embeddings.word_embeddings.weight
        if self.lm_head.weight.shape == word.shape:
            self.lm_head.weight.copy_(word)
        self.layers_initialised_from_text = copied
        return copied

    # -- forward pieces ---------------------------------------------------

    def forward(self, image_features: torch.Tensor, text_states: Optional[torch.Tensor] = None,
                allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Queries (+ text states) through the layers; returns [N, Q (+ L), dim].

        Always reached through ``self(...)``: under ZeRO-3 the module call is what
        gathers ``self.queries``.
        """
        image = self.image_norm(image_features.to(self.queries.dtype))
        x = self.queries.expand(image.shape[0], -1, -1)
        if text_states is not None:
            x = torch.cat([x, self.text_in(text_states.to(x.dtype))], 1)
        for layer in self.layers:
            x = layer(x, self.num_tokens, image, allowed)
        return x

    def image_tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [N, n, Dv] -> query outputs [N, num_queries, dim] (what stage 2 projects)."""
        return self(features)

    def _masks(self, text_mask: torch.Tensor, kind: str) -> torch.Tensor:
        """Boolean [B, Q+L, Q+L] (True = may attend) for 'itm' (bidirectional) or 'itg' (multimodal causal)."""
        b, length = text_mask.shape
        q = self.num_tokens
        keys = torch.cat([torch.ones(b, q, dtype=torch.bool, device=text_mask.device), text_mask.bool()], 1)
        allowed = keys[:, None, :].expand(b, q + length, q + length).clone()
        if kind == "itg":
            allowed[:, :q, q:] = False  # queries never see the caption they help generate
            causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
            allowed[:, q:, q:] &= causal
        return allowed

    # -- stage-1 losses ---------------------------------------------------

    def align_losses(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, logit_scale: torch.Tensor,
                     caption_group: Optional[torch.Tensor], text_encoder: Any) -> dict:
        q = self.cfg.qformer
        queries = self.image_tokens_of(features)
        _, pooled = text_encoder(ids, mask)
        image_emb = self.vision_proj(queries)  # [B, Q, D]
        text_emb = self.text_proj(pooled.to(image_emb.dtype))
        itc, acc = itc_loss(image_emb, text_emb, logit_scale, caption_group)
        text_states = text_encoder.model.embeddings(input_ids=ids)
        itm, itm_acc = self.itm_loss(features, text_states, mask, image_emb, text_emb, caption_group)
        itg = self.itg_loss(features, text_states, ids, mask)
        loss = itc + q.itm_weight * itm + q.itg_weight * itg
        metrics = {"itc": itc.detach(), "itm": itm.detach(), "itg": itg.detach(), "acc": acc, "itm_acc": itm_acc,
                   "temperature": (1.0 / logit_scale.detach().exp()).reshape(())}
        return {"loss": loss, "metrics": metrics}

    def itm_logits(self, features: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Match logits [N, 2] for image/text pairs (queries and text attend to each other)."""
        out = self(features, text_states, self._masks(text_mask, "itm"))
        return self.itm_head(out[:, : self.num_tokens]).mean(1)

    def itm_loss(self, features, text_states, text_mask, image_emb, text_emb, caption_group) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP-2 ITM: B positives, B (image, hard negative text), B (hard negative image, text)."""
        b = features.shape[0]
        if b < 2:
            zero = (self.itm_head.weight.sum() * 0.0)
            return zero, torch.tensor(float("nan"))
        with torch.no_grad():
            sims = torch.einsum("iqd,jd->ijq", F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)).amax(-1)
            neg_text, neg_image = sample_hard_negatives(sims, caption_group)
        all_features = torch.cat([features, features, features[neg_image]], 0)
        all_text = torch.cat([text_states, text_states[neg_text], text_states], 0)
        all_mask = torch.cat([text_mask, text_mask[neg_text], text_mask], 0)
        logits = self.itm_logits(all_features, all_text, all_mask)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, (logits.argmax(1) == labels).float().mean().detach()

    def itg_loss(self, features: torch.Tensor, text_states: torch.Tensor, ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Image-grounded generation: next caption token from queries + earlier tokens (pad ignored)."""
        out = self(features, text_states, self._masks(text_mask, "itg"))
        logits = self.lm_head(out[:, self.num_tokens :])[:, :-1]
        targets = ids[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
