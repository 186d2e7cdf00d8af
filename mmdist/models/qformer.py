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
  multimodal causal mask); an LM head predicts the next caption token. As in
  BLIP-2 (whose decoder is tied to the word embeddings) the head is the text
  encoder's token table with a bias of its own (``tie_lm_head``): it trains
  with the table, and a frozen table (``model.text.freeze_word_embeddings``)
  leaves only the bias to train and no vocabulary-sized weight gradient.

Layers are initialised from the text encoder's first layers when
``init_from_text`` (as BLIP-2 initialises from BERT-base); the cross-attention is
new. In stage 2 only the query path is built (the text parts stay in the
stage-1 export and are ignored). Written here rather than taken from
transformers' Blip2QFormerModel because that class has no text path for ITM/ITG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmdist.models.flops import FlopCount, compute_dtype
from mmdist.models.gather import Gather, null_gather
from mmdist.models.losses import draw_negatives, gather_rows, itc_loss, rank_offset
from mmdist.models.qformer_layers import KV, QFormerLayer


class QFormer(nn.Module):
    """Learnable queries -> image tokens [N, num_queries, hidden]; in stage 1 also ITC/ITM/ITG.

    ``text_dim`` is the text encoder's width; ``text_encoder`` (stage 1 only) adds the
    text parts (ITC text projection, ITM and LM heads) and initialises the layers. With
    ``tie_lm_head`` the LM head's weight is the text encoder's token table, which the
    Q-Former does not own: it reads it from the encoder it is given at each step
    (:meth:`lm_logits`; under ZeRO-3 the model lists it in ``external_parameters``).
    """

    def __init__(self, cfg: Any, vision_dim: int, text_dim: Optional[int], text_encoder: Any = None,
                 gather: Optional[Gather] = None, vision_tokens: Optional[int] = None):
        super().__init__()
        q = cfg.qformer
        self.cfg = cfg
        dim = text_dim if (q.init_from_text and text_dim) else q.hidden_size
        if dim % q.num_heads:
            raise ValueError(
                f"model.connector.qformer.num_heads={q.num_heads} does not divide the Q-Former width {dim}"
            )
        self.dim, self.num_tokens, self.out_dim = dim, q.num_queries, dim
        self.vision_tokens = vision_tokens  # per image, for the FLOP count (work)
        with_text = text_encoder is not None
        self.with_text = with_text
        self.tied_lm_head = with_text and q.tie_lm_head
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
            if self.tied_lm_head:
                if dim != text_dim:
                    raise ValueError(
                        f"model.connector.qformer.tie_lm_head: the LM head is the text encoder's token table "
                        f"({text_dim} wide), the Q-Former is {dim} wide; set init_from_text=true (or "
                        f"hidden_size={text_dim}), or tie_lm_head=false for a head of its own"
                    )
                self.lm_bias = nn.Parameter(torch.zeros(vocab))
            else:
                self.lm_head = nn.Linear(dim, vocab)
            if q.init_from_text:
                with (gather or null_gather)(list(self.parameters()) + list(text_encoder.parameters())):
                    self.init_from_text(text_encoder)

    # -- initialisation ---------------------------------------------------

    @torch.no_grad()
    def init_from_text(self, text_encoder: Any) -> int:
        """Copy self-attention and FFN weights from the text encoder's
        first layers (BERT layout); returns layers copied."""
        bert_layers = getattr(getattr(text_encoder.model, "encoder", None), "layer", None)
        if bert_layers is None:
            return 0
        copied = 0
        for ours, theirs in zip(self.layers, bert_layers):
            pairs = [
                (ours.self_attn.query, theirs.attention.self.query),
                (ours.self_attn.key, theirs.attention.self.key),
                (ours.self_attn.value, theirs.attention.self.value),
                (ours.self_attn.out, theirs.attention.output.dense),
                (ours.self_attn.norm, theirs.attention.output.LayerNorm),
            ]
            for ffn in (ours.ffn_query, ours.ffn_text):
                pairs += [
                    (ffn.inter, theirs.intermediate.dense),
                    (ffn.out, theirs.output.dense),
                    (ffn.norm, theirs.output.LayerNorm),
                ]
            if any(a.weight.shape != b.weight.shape for a, b in pairs):
                continue
            for a, b in pairs:
                a.weight.copy_(b.weight)
                a.bias.copy_(b.bias)
            copied += 1
        word = text_encoder.model.embeddings.word_embeddings.weight
        if not self.tied_lm_head and self.lm_head.weight.shape == word.shape:
            self.lm_head.weight.copy_(word)
        self.layers_initialised_from_text = copied
        return copied

    # -- forward pieces ---------------------------------------------------

    def forward(self, image_features: torch.Tensor, text_states: Optional[torch.Tensor] = None,
                allowed: Optional[torch.Tensor] = None, *, stage1: Optional[Stage1Inputs] = None) -> Any:
        """Queries (+ text states) through the layers; returns [N, Q (+ L), dim].

        With ``stage1`` it returns the stage-1 losses instead (:meth:`align_losses`). Always
        reached through ``self(...)``: under ZeRO-3 the module call is what gathers ``self.queries``.
        """
        if stage1 is not None:
            return self._stage1_losses(image_features, stage1)
        image = self.image_norm(image_features.to(self.queries.dtype))
        if text_states is None:
            return self._queries_pass(self._image_kv(image), image.shape[0])[0]
        x = torch.cat([self.queries.expand(image.shape[0], -1, -1), self.text_in(text_states.to(image.dtype))], 1)
        for layer in self.layers:
            x = layer(x, self.num_tokens, image, allowed)
        return x

    def image_tokens_of(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features [N, n, Dv] -> query outputs [N, num_queries, dim] (what stage 2 projects)."""
        return self(features)

    def _image_kv(self, image: torch.Tensor) -> list[Optional[KV]]:
        """Each cross-attention layer's keys and values of the (normed) image tokens, computed once per image."""
        return [layer.cross_attn.kv(image) if layer.cross_attn is not None else None for layer in self.layers]

    def _queries_pass(self, image_kv: list[Optional[KV]], batch: int) -> tuple[torch.Tensor, list[KV]]:
        """The queries alone through every layer: [N, Q, dim] and each layer's query keys and values."""
        x, queries_kv = self.queries, []
        for layer, kv in zip(self.layers, image_kv):
            x, own = layer.queries_step(x, kv, batch)
            queries_kv.append(own)
        return x, queries_kv

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

    # -- work -----------------------------------------------------------

    def flop_count(self) -> FlopCount:
        """Stage 2 (mmdist.models.contract.CountsOwnFlops): the queries' pass per image, forward and backward where
        the Q-Former trains, forward only where it is frozen (the gradient stops at the projector above it)."""
        per_image = self.work().per_image
        trains = any(p.requires_grad for p in self.parameters())
        return FlopCount.of(compute_dtype(self), per_image=per_image if trains else per_image / 3)

    def stage1_flop_count(self, caption_len: int, batch_size: int = 1, world: int = 1,
                          head_trains: Optional[bool] = None) -> FlopCount:
        """Stage 1: :meth:`work` as rates over the align model's batch counts: per image, and per caption token
        (``BatchCounts.tokens``: the real caption tokens, so padding is left out and the count is low, never high).
        The ITG head's targets (one fewer than the caption's tokens) are folded into both rates."""
        work = self.work(caption_len=caption_len, batch_size=batch_size, world=world, head_trains=head_trains)
        return FlopCount.of(compute_dtype(self), per_image=work.per_image - work.per_itg_target,
                            per_token=work.per_caption_token + work.per_itg_target)

    def work(self, caption_len: int = 0, batch_size: int = 1, world: int = 1,
             image_tokens: Optional[int] = None, head_trains: Optional[bool] = None) -> QFormerFlops:
        """Training FLOPs of :meth:`align_losses` from the module's shapes, as it runs (see :class:`QFormerFlops`).

        Every matmul counts 2 x in x out per row forward and twice that backward (all inputs carry a gradient:
        the queries and the normed image are trainable functions); attention counts 4 x keys x width per query
        row forward, 8 backward. The hard-negative similarities run without gradient (forward only).
        ``batch_size``: samples per rank; ``world``: ranks (ITC and the negatives compare with all of them);
        ``image_tokens``: vision tokens per image (default: the tower's, given at construction). Without a text
        side (stage 2) or with ``caption_len`` 0, only the queries' pass (``image_tokens_of``) is counted, trained.
        ``head_trains``: whether the LM head's weight gets a gradient (a third matmul per target); default: an
        untied head's ``requires_grad``, a tied head's table assumed trained (the align model says, from its encoder).
        """
        b, length, q, d = batch_size, caption_len, self.num_tokens, self.dim
        n_all, pairs, rows = batch_size * world, 3 * batch_size, self.num_tokens + caption_len
        vision_dim, tokens = self.image_norm.normalized_shape[0], image_tokens or self.vision_tokens
        if not tokens:
            raise ValueError("QFormer.work needs image_tokens (the vision tower's tokens per image)")
        cross = [layer.cross_attn is not None for layer in self.layers]
        if not self.with_text or not caption_len:
            pairs = length = 0
        else:
            align, text_dim = self.vision_proj.out_features, self.text_proj.in_features
            vocab = self.lm_bias.shape[0] if self.tied_lm_head else self.lm_head.out_features
            if head_trains is None:
                head_trains = self.tied_lm_head or self.lm_head.weight.requires_grad

        def lin(n_rows: float, d_in: int, d_out: int) -> float:
            return 2.0 * n_rows * d_in * d_out

        def attn(n_rows: float, keys: float) -> float:
            return 4.0 * n_rows * keys * d

        image = text = 0.0  # forward FLOPs of the trained graph, per step
        for i, has_cross in enumerate(cross):
            rows_q = q if i == 0 else b * q  # the first self-attention runs once for the batch
            image += 4 * lin(rows_q, d, d) + attn(rows_q, q) + lin(b * q, d, 4 * d) * 2
            if has_cross:  # keys and values of this batch's images and of the negatives
                image += 2 * lin((2 if pairs else 1) * b * tokens, vision_dim, d)
                image += 2 * lin(b * q, d, d) + attn(b * q, tokens)  # the queries' pass
                image += 2 * lin(pairs * q, d, d) + attn(pairs * q, tokens)  # the ITM pairs' query rows
            if not pairs:
                continue
            last = i == len(cross) - 1
            image += 2 * lin(pairs * q, d, d) + lin(pairs * q, d, 4 * d) * 2  # ITM query rows: K, V; FFN
            image += 2 * lin(pairs * q, d, d) + attn(pairs * q, rows)  # ITM query rows: Q, O, scores
            text += 2 * lin(pairs * length, d, d)  # ITM caption rows: K, V
            if not last:
                text += 2 * lin(pairs * length, d, d) + attn(pairs * length, rows) + lin(pairs * length, d, 4 * d) * 2
            text += 4 * lin(b * length, d, d) + attn(b * length, rows) + lin(b * length, d, 4 * d) * 2  # ITG
        if not pairs:
            return QFormerFlops(per_image=3 * image / b, per_caption_token=0.0, per_itg_target=0.0)
        if not isinstance(self.text_in, nn.Identity):
            text += lin(4 * b * length, text_dim, d)
        image += lin(b * q, d, align) + lin(b, text_dim, align) + 2.0 * n_all * n_all * q * align  # ITC
        image += lin(pairs * q, d, 2)  # ITM head
        no_grad = 4.0 * b * n_all * q * align  # hard-negative similarities
        return QFormerFlops(per_image=(3 * image + no_grad) / b, per_caption_token=3 * text / (b * length),
                            per_itg_target=(3 if head_trains else 2) * lin(1, d, vocab))

    # -- stage-1 losses ---------------------------------------------------

    def align_losses(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, logit_scale: torch.Tensor,
                     caption_group: Optional[torch.Tensor], text_encoder: Any) -> dict:
        """ITC + ITM + ITG of a batch: ``{"loss", "metrics"}`` (through the module call, see :meth:`forward`)."""
        return self(features, stage1=Stage1Inputs(ids, mask, logit_scale, caption_group, text_encoder))

    def _stage1_losses(self, features: torch.Tensor, s: Stage1Inputs) -> dict:
        """Each piece runs once: the image's cross-attention keys and values serve ITC, ITM and ITG; the queries'
        pass serves ITC and ITG (ITG's queries never see the caption, so they are ITC's); the text encoder runs once."""
        q = self.cfg.qformer
        image = self.image_norm(features.to(self.queries.dtype))
        image_kv = self._image_kv(image)
        queries, queries_kv = self._queries_pass(image_kv, features.shape[0])
        _, pooled = s.text_encoder(s.ids, s.mask)
        image_emb = self.vision_proj(queries)  # [B, Q, D]
        text_emb = self.text_proj(pooled.to(image_emb.dtype))
        itc, acc = itc_loss(image_emb, text_emb, s.logit_scale, s.caption_group)
        embed = s.text_encoder.embeddings()
        text_states = embed(input_ids=s.ids)
        itm, itm_acc = self._itm_loss(features, image_kv, text_states, s, image_emb, text_emb, embed)
        itg = self._itg_loss(queries_kv, text_states, s.ids, s.mask, s.text_encoder)
        loss = itc + q.itm_weight * itm + q.itg_weight * itg
        metrics = {"itc": itc.detach(), "itm": itm.detach(), "itg": itg.detach(), "acc": acc, "itm_acc": itm_acc,
                   "temperature": (1.0 / s.logit_scale.detach().exp()).reshape(())}
        return {"loss": loss, "metrics": metrics}

    def itm_logits(self, features: torch.Tensor, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Match logits [N, 2] for image/text pairs (queries and text attend to each other)."""
        image_kv = self._image_kv(self.image_norm(features.to(self.queries.dtype)))
        return self._itm_logits(image_kv, self.text_in(text_states.to(self.queries.dtype)), text_mask)

    def _itm_logits(self, image_kv: list[Optional[KV]], text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        n, q = text.shape[0], self.num_tokens
        keys = None  # no padding in the batch: attention needs no mask
        if not bool(text_mask.bool().all()):
            keys = torch.cat([text_mask.new_ones(n, q, dtype=torch.bool), text_mask.bool()], 1)[:, None, None, :]
        x = torch.cat([self.queries.expand(n, -1, -1), text], 1)
        last = len(self.layers) - 1
        for i, (layer, kv) in enumerate(zip(self.layers, image_kv)):
            x = layer.joint(x, q, kv, keys, queries_only=i == last)
        return self.itm_head(x[:, :q]).mean(1)

    def _itm_loss(self, features: torch.Tensor, image_kv: list[Optional[KV]], text_states: torch.Tensor,
                  s: Stage1Inputs, image_emb: torch.Tensor, text_emb: torch.Tensor,
                  embed: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """BLIP-2 ITM: B positives, B (image, hard negative caption), B (hard negative image, caption).

        Negatives come from every rank's batch (the global similarity, as BLIP-2): a negative caption's token ids
        and a negative image's features are gathered from the rank that holds them. The image keys and values
        are computed once per distinct image and indexed per pair, not copied in with the features.
        """
        b = features.shape[0]
        neg_text, neg_image, ids_all, mask_all, features_all = self.hard_negatives(
            features, s.ids, s.mask, image_emb, text_emb, s.caption_group)
        if neg_text is None:
            return self.itm_head.weight.sum() * 0.0, torch.tensor(float("nan"))
        width = ids_all.shape[1]
        ids, mask = _pad_to(s.ids, width, 0), _pad_to(s.mask, width, 0)
        if width != s.ids.shape[1]:
            text_states = embed(input_ids=ids)
        neg_states = embed(input_ids=ids_all[neg_text])
        text = self.text_in(torch.cat([text_states, neg_states, text_states], 0).to(self.queries.dtype))
        text_mask = torch.cat([mask, mask_all[neg_text], mask], 0)
        neg_kv = self._image_kv(self.image_norm(features_all[neg_image].to(self.queries.dtype)))
        pairs = torch.cat([torch.arange(b), torch.arange(b), b + torch.arange(b)]).to(features.device)
        pair_kv = [None if kv is None else (torch.cat([kv[0], nkv[0]])[pairs], torch.cat([kv[1], nkv[1]])[pairs])
                   for kv, nkv in zip(image_kv, neg_kv)]
        logits = self._itm_logits(pair_kv, text, text_mask)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(logits.device)
        loss = F.cross_entropy(logits.float(), labels)
        return loss, (logits.argmax(1) == labels).float().mean().detach()

    @torch.no_grad()
    def hard_negatives(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, image_emb: torch.Tensor,
                       text_emb: torch.Tensor, caption_group: Optional[torch.Tensor] = None, sharpness: float = 10.0):
        """For each local image a negative caption, for each local caption a negative image, drawn from every
        rank's batch with probability softmax(sharpness * similarity); the pair itself and identical captions
        (equal token ids, or equal ``caption_group`` on this rank) are never drawn.

        Returns (negative caption index, negative image index, every rank's ids, masks and features), the indices
        into the gathered rows; (None, ...) when the whole batch holds fewer than 2 samples. The random draw
        takes [global batch, 2] uniforms from torch's generator and keeps this rank's rows, so ranks seeded alike
        draw what one process holding the whole batch would.
        """
        b = features.shape[0]
        ids_all, mask_all = gather_rows(ids, pad=0), gather_rows(mask, pad=0)
        features_all = gather_rows(features)
        n = ids_all.shape[0]
        if n < 2:
            return None, None, ids_all, mask_all, features_all
        image_n = F.normalize(image_emb.float(), dim=-1)
        text_n = F.normalize(text_emb.float(), dim=-1)
        images_all, texts_all = gather_rows(image_n), gather_rows(text_n)
        sims_i2t = torch.einsum("iqd,jd->ijq", image_n, texts_all).amax(-1)  # local images x all captions
        sims_t2i = torch.einsum("iqd,jd->jiq", images_all, text_n).amax(-1)  # local captions x all images
        offset = rank_offset(b)
        width = ids_all.shape[1]
        local = _pad_to(ids, width, 0) * _pad_to(mask, width, 0)
        same = (local[:, None, :] == (ids_all * mask_all)[None, :, :]).all(-1)  # identical captions, any rank
        same[torch.arange(b), offset + torch.arange(b)] = True
        if caption_group is not None:
            g = caption_group.to(same.device)
            same[:, offset : offset + b] |= g[:, None] == g[None, :]
        uniforms = torch.rand(n, 2, device=same.device)[offset : offset + b]
        self_mask = torch.zeros_like(same)
        self_mask[torch.arange(b), offset + torch.arange(b)] = True
        neg_text = draw_negatives(sims_i2t * sharpness, same, self_mask, uniforms[:, 0])
        neg_image = draw_negatives(sims_t2i * sharpness, same, self_mask, uniforms[:, 1])
        return neg_text, neg_image, ids_all, mask_all, features_all

    def lm_logits(self, x: torch.Tensor, text_encoder: Any) -> torch.Tensor:
        """ITG's next-token logits of the rows ``x`` [..., dim]: the tied head (the token table of ``text_encoder``,
        :meth:`TextEncoder.word_embeddings <mmdist.models.text.TextEncoder.word_embeddings>`, and ``lm_bias``) or
        the head of its own."""
        if not self.tied_lm_head:
            return self.lm_head(x)
        return F.linear(x, text_encoder.word_embeddings().weight.to(x.dtype), self.lm_bias.to(x.dtype))

    def _itg_loss(self, queries_kv: list[KV], text_states: torch.Tensor, ids: torch.Tensor,
                  text_mask: torch.Tensor, text_encoder: Any) -> torch.Tensor:
        """Image-grounded generation: next caption token from the queries + earlier tokens (pad ignored); the
        LM head runs at the supervised positions only."""
        b, length = ids.shape
        q = self.num_tokens
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril() & text_mask.bool()[:, None, :]
        allowed = torch.cat([causal.new_ones(b, length, q), causal], 2)[:, None]
        x = self.text_in(text_states.to(self.queries.dtype))
        for layer, kv in zip(self.layers, queries_kv):
            x = layer.text_step(x, kv, allowed)
        keep = text_mask[:, 1:].bool()
        logits = self.lm_logits(x[:, :-1][keep], text_encoder)
        return F.cross_entropy(logits.float(), ids[:, 1:][keep])

    def itg_loss(self, features: torch.Tensor, text_states: torch.Tensor, ids: torch.Tensor,
                 text_mask: torch.Tensor, text_encoder: Any) -> torch.Tensor:
        """ITG alone (the queries' pass included), as :meth:`align_losses` computes it."""
        image_kv = self._image_kv(self.image_norm(features.to(self.queries.dtype)))
        return self._itg_loss(self._queries_pass(image_kv, features.shape[0])[1], text_states, ids, text_mask,
                              text_encoder)


@dataclass(frozen=True)
class QFormerFlops:
    """Training FLOPs (forward and backward) of one stage-1 step of the Q-Former, the text encoder excluded.

    ``per_image``: per sample (image side, queries, ITC, the ITM pairs' query rows, hard negatives);
    ``per_caption_token``: per padded caption position (batch x caption length: the caption rows of ITM and
    ITG); ``per_itg_target``: the LM head, per predicted caption token. Terms quadratic in the caption length
    or the global batch are folded in for the ``caption_len`` and ``world`` they were counted at.
    """

    per_image: float
    per_caption_token: float
    per_itg_target: float

    def step(self, images: int, caption_tokens: int, itg_targets: Optional[int] = None) -> float:
        """A step's FLOPs: ``caption_tokens`` = images x caption length; ``itg_targets`` default: no padding."""
        if itg_targets is None:
            itg_targets = caption_tokens - images
        return self.per_image * images + self.per_caption_token * caption_tokens + self.per_itg_target * itg_targets


@dataclass
class Stage1Inputs:
    """What the stage-1 losses need beside the image features."""

    ids: torch.Tensor
    mask: torch.Tensor
    logit_scale: torch.Tensor
    caption_group: Optional[torch.Tensor]
    text_encoder: Any


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """Pad dim 1 of ``x`` on the right to ``width``."""
    return x if x.shape[1] >= width else F.pad(x, (0, width - x.shape[1]), value=value)
