"""Q-Former ITM across ranks: hard negatives from the global similarity, gathered from the rank that holds them.

Two gloo processes, each with half of a batch, against one process with the whole batch: with the sampling
seeded alike they draw the same negatives (as global indices), and the mean of their ITM losses and gradients
(what data parallelism averages) is the one process's loss and gradient.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from helpers.tiny import make_model

from mmdist.launch_env import free_port

WORLD, B = 2, 4
# Rank 0's captions are shorter than rank 1's (each rank pads to its own longest); "a red cat" is on both ranks.
CAPTIONS = ["a red cat", "a dog", "two birds", "a cat", "a red cat", "a small grey dog on a mat", "a bird", "a fish"]


def _groups(captions: list[str]) -> torch.Tensor:
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(c, len(seen)) for c in captions])


def _itm(model, captions: list[str], features: torch.Tensor) -> dict:
    """ITM loss of ``captions`` with ``features`` (seeded draw), its gradients, and the negatives drawn."""
    from mmdist.models.qformer import Stage1Inputs

    qf, text = model.stage1, model.text
    enc = model.processors.text_tokenizer(captions, padding=True, return_tensors="pt")
    ids, mask, group = enc.input_ids, enc.attention_mask, _groups(captions)
    params = [p for p in qf.parameters() if p.requires_grad] + [p for p in text.parameters() if p.requires_grad]
    torch.manual_seed(7)
    image_emb = qf.vision_proj(qf(features))
    text_emb = qf.text_proj(text(ids, mask)[1])
    negatives = qf.hard_negatives(features, ids, mask, image_emb, text_emb, group)[:2]
    torch.manual_seed(7)
    image_kv = qf._image_kv(qf.image_norm(features))
    inputs = Stage1Inputs(ids, mask, model.logit_scale, group, text)
    loss, _ = qf._itm_loss(features, image_kv, text.embeddings()(input_ids=ids), inputs, image_emb, text_emb,
                           text.embeddings())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {"loss": loss.detach(), "grads": [None if g is None else g.detach() for g in grads],
            "neg_text": negatives[0], "neg_image": negatives[1]}


def _features(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(WORLD * B, model.vision.num_tokens, model.vision.hidden_size, generator=g)


def _model():
    return make_model("align", "qformer").eval()  # eval: no dropout, so both sides draw only the negatives


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        sl = slice(rank * B, (rank + 1) * B)
        torch.save(_itm(model, CAPTIONS[sl], _features(model)[sl]), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_ranks_draw_global_negatives_and_match_one_process(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    model = _model()
    whole = _itm(model, CAPTIONS, _features(model))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, got in enumerate(ranks):
        sl = slice(r * B, (r + 1) * B)
        assert torch.equal(got["neg_text"], whole["neg_text"][sl])
        assert torch.equal(got["neg_image"], whole["neg_image"][sl])
    drawn = torch.cat([torch.cat([got["neg_text"], got["neg_image"]]) // B != r for r, got in enumerate(ranks)])
    assert bool(drawn.any()), "no negative came from the other rank"
    for r, got in enumerate(ranks):  # "a red cat" (rows 0 and 4, one on each rank) is never the other's negative
        assert (4 - 4 * r) not in (int(got["neg_text"][0]), int(got["neg_image"][0]))
    torch.testing.assert_close(sum(got["loss"] for got in ranks) / WORLD, whole["loss"])
    for i, expected in enumerate(whole["grads"]):
        got = [rank["grads"][i] for rank in ranks]
        if expected is None:
            assert all(g is None for g in got)
            continue
        torch.testing.assert_close(sum(got) / WORLD, expected, rtol=1e-4, atol=1e-6)
