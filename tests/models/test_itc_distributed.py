"""ITC across ranks: 2 gloo processes give the loss and the local gradients of one process holding the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from mmdist.launch_env import free_port
from mmdist.models.losses import itc_loss

B, D, WORLD = 3, 5, 2


def _data():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(WORLD * B, D, generator=g), torch.randn(WORLD * B, D, generator=g),
            torch.tensor([0, 1, 0, 4, 4, 2]), torch.tensor(2.0))


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        images, texts, groups, scale = _data()
        sl = slice(rank * B, (rank + 1) * B)
        for name, group in (("plain", None), ("groups", groups[sl])):
            img = images[sl].clone().requires_grad_(True)
            txt = texts[sl].clone().requires_grad_(True)
            loss, acc = itc_loss(img, txt, scale, group)
            loss.backward()
            torch.save({"loss": loss.detach(), "acc": acc, "img_grad": img.grad, "txt_grad": txt.grad},
                       os.path.join(out_dir, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()



@pytest.mark.multiproc
def test_two_ranks_match_one_process(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    images, texts, groups, scale = _data()
    for name in ("plain", "groups"):
        img = images.clone().requires_grad_(True)
        txt = texts.clone().requires_grad_(True)
        # One process, whole batch. Groups count within a rank only: make them unique per rank.
        full_groups = None if name == "plain" else groups + 100 * torch.arange(WORLD).repeat_interleave(B)
        loss, acc = itc_loss(img, txt, scale, full_groups)
        loss.backward()
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{name}_{rank}.pt")
            sl = slice(rank * B, (rank + 1) * B)
            torch.testing.assert_close(got["loss"], loss.detach())
            torch.testing.assert_close(got["acc"], acc)
            # The local shard carries the full gradient of the (shared) loss.
            torch.testing.assert_close(got["img_grad"], img.grad[sl])
            torch.testing.assert_close(got["txt_grad"], txt.grad[sl])
