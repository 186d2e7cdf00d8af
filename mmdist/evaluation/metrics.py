"""The metric math alone: answer normalisation and matching, and recall at k over a similarity matrix.

Pure functions on strings and tensors, kept apart from the runners that feed
them (mmdist/evaluation/runners.py) so they can be checked on hand-made inputs.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mmdist.models.losses import contrastive_logits

IGNORE_INDEX = -100
RECALL_AT = (1, 5, 10)


# ---------------------------------------------------------------------------
# answer matching


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def score_answer(answer: str, reference: str, normalise: Callable[[str], Any] = normalise_answer) -> tuple[bool, bool]:
    """(exact, contains) of one answer against its reference, after ``normalise`` (see the module docstring)."""
    got, want = normalise(answer), normalise(reference)
    exact = got is not None and want is not None and got == want
    if isinstance(got, str) and isinstance(want, str):
        contains = exact or (bool(want) and f" {want} " in f" {got} ")
    else:
        contains = exact
    return exact, contains


# ---------------------------------------------------------------------------
# retrieval metrics


def recall_at_k(similarity: torch.Tensor, correct: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """Fraction of queries (rows) with a correct gallery item (``correct`` [Q, G] bool) among their k most similar.

    Ties are broken by the gallery order (``torch.topk`` on CPU is stable for
    equal values only in practice, so the rank is computed explicitly): an item
    counts as within k when fewer than k items score strictly higher, or equally
    high and earlier.
    """
    if similarity.shape != correct.shape:
        raise ValueError(f"similarity {tuple(similarity.shape)} and correct {tuple(correct.shape)} differ in shape")
    sim = similarity.float()
    # Rank of the best correct item of each query: its count of items ranked ahead of it.
    best = sim.masked_fill(~correct, float("-inf"))
    best_score, best_index = best.max(1)
    order = torch.arange(sim.shape[1], device=sim.device)
    ahead = (sim > best_score[:, None]) | ((sim == best_score[:, None]) & (order[None, :] < best_index[:, None]))
    rank = ahead.sum(1)
    found = correct.any(1)
    return {k: float(((rank < k) & found).float().mean()) if sim.shape[0] else float("nan") for k in ks}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_index: torch.Tensor,
                      ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """R@k both ways. ``image_emb`` [N, D] or [N, Q, D], ``text_emb``
    [M, D] (distinct captions), ``caption_index`` [N] in [0, M)."""

    sim = contrastive_logits(F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1))  # [N, M]
    correct = caption_index[:, None] == torch.arange(text_emb.shape[0], device=caption_index.device)[None, :]
    i2t = recall_at_k(sim, correct, ks)
    t2i = recall_at_k(sim.t(), correct.t(), ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()}
    out.update({f"t2i_r{k}": v for k, v in t2i.items()})
    out["i2t_chance_r1"] = 1.0 / max(text_emb.shape[0], 1)
    return out
