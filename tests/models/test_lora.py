"""LoRA on the frozen LLM: only adapters (and the projector) train, base weights stay identical, export merges them."""

from __future__ import annotations

import torch
from helpers.tiny import fuse_batch, make_model

from mmdist.export import save_export
from mmdist.materialize import load_fused_model

LORA = {"llm": {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}}}


def test_lora_trains_adapters_only_and_export_merges(tmp_path):
    model = make_model("fuse", model=LORA)
    groups = model.trainable_groups()
    assert set(groups) == {"projector", "lora"}
    n_lora = sum(p.numel() for p in groups["lora"])
    assert n_lora == 2 * 2 * 4 * (64 + 64) + 2 * 2 * 4 * (64 + 32)  # q,o: 64->64; k,v: 64->32 (2 KV heads); 2 layers
    assert all(p.dtype == torch.float32 for p in groups["lora"])
    assert model.llm.get_input_embeddings() is not None
    base = {n: p.detach().clone() for n, p in model.llm.named_parameters() if "lora_" not in n}
    batch = fuse_batch(model)
    model.train()
    assert model.llm.training  # LoRA dropout may act; the frozen base has no dropout of its own on
    opt = torch.optim.AdamW([p for ps in groups.values() for p in ps], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    for n, p in model.llm.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]) and p.grad is None, n
    assert any(not torch.allclose(p, torch.zeros_like(p)) for n, p in model.llm.named_parameters() if "lora_B" in n)
    model.eval()
    state = model.export_state_dict()
    merged = [k for k in state if k.startswith("llm.")]
    assert "llm.model.layers.0.self_attn.q_proj.weight" in merged and len(merged) == 8
    save_export(model, str(tmp_path / "export"))
    restored = load_fused_model(str(tmp_path / "export"))
    assert not any("lora_" in n for n, _ in restored.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(restored(batch)["loss"], model(batch)["loss"], rtol=1e-5, atol=1e-5)
