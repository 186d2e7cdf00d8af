"""Stage-1 losses: ITC (image-text contrastive) and the ITM hard-negative sampling, as open_clip's loss.py.

A leaf module (torch only), so that both stage-1 modules (the linear/MLP heads in
mmdist/models/align.py and the Q-Former in mmdist/models/qformer.py) use the
same contrastive loss without importing each other.

When torch.distributed is initialised, ITC compares against every rank's batch:
features are all-gathered without gradient and the local shard is put back with
its gradient (open_clip's default), so each rank computes the full loss and
gets the exact gradient for its own features.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmdist import distributed


def gather_with_local_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` along dim 0 across ranks; only the local shard keeps its gradient."""
    if distributed.world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(distributed.world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[distributed.rank()] = x
    return torch.cat(parts, 0)


def itc_targets(
    batch_size: int, caption_group: Optional[torch.Tensor], world: int, rank_ids: torch.Tensor
) -> torch.Tensor:
    """Soft targets [B*world, B*world]: 1 for the pair itself and
    for equal caption groups on the same rank, row-normalised."""
    n = batch_size * world
    if caption_group is None:
        return torch.eye(n, device=rank_ids.device)
    same = (caption_group[:, None] == caption_group[None, :]) & (rank_ids[:, None] == rank_ids[None, :])
    same = same.float()
    return same / same.sum(1, keepdim=True)


def contrastive_logits(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [Bi, Bt]; image embeddings [B, Q, D] (Q-Former queries) use the max over queries."""
    if image_emb.dim() == 3:
        return torch.einsum("iqd,jd->ijq", image_emb, text_emb).amax(-1)
    return image_emb @ text_emb.t()


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
             caption_group: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric contrastive loss over all ranks' pairs; returns (loss, image->text accuracy).

    ``image_emb``: [B, D] or [B, Q, D] (max over queries, BLIP-2); ``text_emb``: [B, D]
    (not yet normalised). ``logit_scale``: log of 1/temperature. ``caption_group``
    [B]: equal values on one rank mark identical captions, all of which count as
    positives (multi-positive soft targets). Groups are compared within a rank
    only, so a batch-local index and a caption hash both work.
    """
    image_emb = F.normalize(image_emb.float(), dim=-1)
    text_emb = F.normalize(text_emb.float(), dim=-1)
    b = image_emb.shape[0]
    all_images = gather_with_local_grad(image_emb)
    all_texts = gather_with_local_grad(text_emb)
    world = all_images.shape[0] // b
    rank_ids = torch.arange(world, device=image_emb.device).repeat_interleave(b)
    groups = None
    if caption_group is not None:
        groups = gather_with_local_grad(caption_group.to(image_emb.device).long())
    scale = logit_scale.float().reshape(()).clamp(max=4.6052).exp()  # temperature >= 0.01, as CLIP
    logits = scale * contrastive_logits(all_images, all_texts)
    targets = itc_targets(b, groups, world, rank_ids)
    loss_i2t = torch.sum(-targets * F.log_softmax(logits, dim=1), dim=1).mean()
    loss_t2i = torch.sum(-targets.t() * F.log_softmax(logits.t(), dim=1), dim=1).mean()
    with torch.no_grad():
        hit = targets.gather(1, logits.argmax(1, keepdim=True)).squeeze(1) > 0
        acc = hit.float().mean()
    return (loss_i2t + loss_t2i) / 2, acc


def gather_rows(x: torch.Tensor, pad: float = 0) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, without gradient (rank order); dim 1 is padded on the right
    with ``pad`` to the widest rank's (captions padded to each rank's own longest)."""
    world = distributed.world_size()
    if world == 1:
        return x
    x = x.detach().contiguous()
    if x.dim() >= 2:
        width = torch.tensor([x.shape[1]], device=x.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        if int(width) > x.shape[1]:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, int(width) - x.shape[1]), value=pad)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, 0)


def rank_offset(batch_size: int) -> int:
    """Where this rank's rows start in :func:`gather_rows`' output (equal batches on every rank)."""
    return distributed.rank() * batch_size


def draw_negatives(logits: torch.Tensor, excluded: torch.Tensor, itself: torch.Tensor,
                   uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row, drawn with probability softmax(``logits``) over the columns not ``excluded``.

    A row whose columns are all excluded draws uniformly from those that are not ``itself``. ``uniforms`` [B]
    in [0, 1) are the random numbers (inverse-CDF draw), so the caller decides where the randomness comes from.
    """
    weights = torch.softmax(logits.float(), 1).masked_fill(excluded, 0.0)
    weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, (~itself).float())
    cdf = weights.cumsum(1)
    target = uniforms.to(cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[1] - 1)


def sample_hard_negatives(sims: torch.Tensor, caption_group: Optional[torch.Tensor] = None,
                          sharpness: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative caption, for each caption a
    negative image, drawn with probability softmax(sharpness * sim).

    ``sims`` [B, B] image-to-text similarities. The pair itself and captions of the
    same ``caption_group`` are never drawn; a row with no candidate left falls back
    to any other index. (The Q-Former draws from every rank's batch: QFormer.hard_negatives.)
    """
    b = sims.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=sims.device)
    same = eye.clone()
    if caption_group is not None:
        g = caption_group.to(sims.device)
        same |= g[:, None] == g[None, :]
    uniforms = torch.rand(b, 2, device=sims.device)
    return (draw_negatives(sims * sharpness, same, eye, uniforms[:, 0]),
            draw_negatives(sims.t() * sharpness, same, eye, uniforms[:, 1]))
