"""Gradient checkpointing on the frozen LLM: recomputation really happens and the projector gets the same gradients."""

from __future__ import annotations

import torch
from helpers.tiny import fuse_batch, make_model


def _grads_and_calls(checkpointing: bool):
    model = make_model("fuse", model={"llm": {"gradient_checkpointing": checkpointing}})
    model.train()
    calls = []
    # A pre-hook: torch's non-reentrant checkpoint stops recomputing as soon as the saved
    # tensors are rebuilt, before the MLP returns, so a post-hook would not fire again.
    model.llm.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    batch = fuse_batch(model)
    model(batch)["loss"].backward()
    assert all(p.grad is None for p in model.llm.parameters())
    return {n: p.grad.clone() for n, p in model.projector.named_parameters()}, len(calls)


def test_checkpointing_recomputes_and_gives_the_same_grads():
    plain, plain_calls = _grads_and_calls(False)
    ckpt, ckpt_calls = _grads_and_calls(True)
    assert plain_calls == 1 and ckpt_calls == 2  # the layer ran again in backward
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name])
