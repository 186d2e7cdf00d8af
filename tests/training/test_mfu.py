"""MFU counts the FLOPs that run: the accounting of metrics.flop_count against torch's FLOP counter.

A figure above 100% is a bug. A naive "4N at every token" charges the LM head at
every position while FusedVLM runs it at supervised positions only, so on a
batch with few labelled tokens it claims more FLOPs than the step executes.
Here a forward and backward of the tiny stage-2 model from configs/tiny_fuse.yaml
run under ``torch.utils.flop_counter.FlopCounterMode``; the estimate must not
exceed what ran (attention's quadratic term, which the estimate leaves out, is
the only gap) and the naive count must.
"""

from __future__ import annotations

import pytest
import torch
from helpers.configs import tiny_run_config
from torch.utils.flop_counter import FlopCounterMode

from mmdist.materialize import build_run_model
from mmdist.training import metrics


@pytest.fixture(scope="module")
def fused():
    torch.manual_seed(0)
    # No recomputation: gradient checkpointing runs the forward twice, which the estimate does not count.
    return build_run_model(tiny_run_config("fuse", "model.llm.gradient_checkpointing=false"))


def demo_like_batch(model, rows: int = 4, prompt: int = 12, answer: int = 2) -> dict:
    """Rows like the demo's: one image, a prompt, and a short supervised answer (labels on the answer only)."""
    image = [model.image_token_id] * model.num_image_tokens
    ids, labels = [], []
    for r in range(rows):
        text = [10 + (r + i) % 200 for i in range(prompt + answer)]
        ids.append(image + text)
        labels.append([-100] * (len(image) + prompt) + text[prompt:])
    ids, labels = torch.tensor(ids), torch.tensor(labels)
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "position_ids": (mask.cumsum(1) - 1), "pixel_values": torch.randn(rows, 3, 16, 16)}


def executed_flops(model, batch) -> tuple[float, int]:
    """(FLOPs torch counted for one forward and backward, supervised tokens)."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        out = model(batch)
        out["loss"].backward()
    return float(counter.get_total_flops()), int(out["num_tokens"])


def test_each_part_is_charged_where_it_runs(fused):
    count = metrics.flop_count(fused, "fuse")
    head = fused.llm.get_output_embeddings().weight
    assert fused.llm.get_input_embeddings().weight is head  # tiny_fuse ties them: the head is the only copy
    assert count.per_supervised_token == 4 * head.numel()  # frozen, gradient flows through it
    def weights(module, trainable=None):  # Linear and Conv weights: the parameters that do FLOPs
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                   and (trainable is None or m.weight.requires_grad == trainable))

    vision = weights(fused.vision)
    trainable = weights(fused, trainable=True)
    body = weights(fused.llm) - head.numel()
    assert 0 < vision < sum(p.numel() for p in fused.vision.parameters())  # position embeddings, norms, biases: no FLOPs
    assert count.per_token == 4 * body
    # The vision tower runs forward only; trainable weights at 4 (no activation gradient below the lowest one).
    assert count.per_image_token == 2 * vision + 4 * trainable
    assert metrics.flop_count(fused, "fuse", vision_runs=False).per_image_token == 4 * trainable  # feature cache
    assert metrics.flops_per_token(fused, "fuse") == count.per_token


def test_estimate_does_not_exceed_the_flops_that_ran(fused):
    batch = demo_like_batch(fused)
    ran, supervised = executed_flops(fused, batch)
    tokens = int(batch["attention_mask"].sum())
    image_tokens = int((batch["input_ids"] == fused.image_token_id).sum())
    assert supervised == 4 * 2 and image_tokens == 4 * fused.num_image_tokens
    estimate = metrics.flop_count(fused, "fuse").step(tokens, supervised, image_tokens)
    assert estimate <= ran, f"MFU would read high: estimated {estimate:.3g} FLOPs, {ran:.3g} ran"
    assert estimate >= 0.8 * ran, f"estimate {estimate:.3g} far below the {ran:.3g} FLOPs that ran"
    # The naive accounting (every parameter at 4 or 6 per token, the head included) claims more than ran.
    counts = metrics.count_parameters(fused)
    old = (6 * counts["trainable"] + 4 * counts["frozen"]) * tokens
    assert old > ran


def test_mfu_from_throughput_counts_each_rate(monkeypatch):
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    flops = metrics.FlopCount(per_token=10.0, per_supervised_token=100.0, per_image_token=1.0)
    tp = metrics.Throughput(flops, peak_flops_total=1000.0, total_steps=4)
    tp.update(step=1, samples=2, tokens=20, supervised_tokens=4, image_tokens=8)
    out = tp.update(step=2, samples=2, tokens=20, supervised_tokens=4, image_tokens=8)
    assert out["mfu"] == pytest.approx((20 * 10.0 + 4 * 100.0 + 8 * 1.0) / 1000.0)


# ---------------------------------------------------------------------------
# Stage 1: each part where it runs, nothing for what the feature cache holds


def _linear_weights(module, trainable=None) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
               and (trainable is None or m.weight.requires_grad == trainable))


@pytest.fixture(scope="module")
def aligned():
    torch.manual_seed(0)
    return build_run_model(tiny_run_config("align"))


def test_stage1_counts_each_part_where_it_runs(aligned):
    vision, text = _linear_weights(aligned.vision), _linear_weights(aligned.text)
    heads = _linear_weights(aligned.stage1)
    assert heads == _linear_weights(aligned, trainable=True) > 0
    tokens = aligned.vision.num_tokens
    count = metrics.flop_count(aligned, "align")
    # frozen tower per image, once per token it computes; frozen text encoder per caption token; heads once per image
    assert count.per_image == 2 * vision * tokens + 4 * heads
    assert count.per_token == 2 * text
    assert count.per_image_token == count.per_supervised_token == 0
    images_cached = metrics.flop_count(aligned, "align", vision_runs=False)
    both_cached = metrics.flop_count(aligned, "align", vision_runs=False, text_runs=False)
    assert images_cached == metrics.FlopCount(per_token=2 * text, per_image=4 * heads)
    assert both_cached == metrics.FlopCount(per_token=0.0, per_image=4 * heads)
    step = dict(tokens=8 * 12, images=8)
    assert count.step(**step) > images_cached.step(**step) > both_cached.step(**step) > 0
    # the naive count charges every parameter at every caption token, the tower's included
    counts = metrics.count_parameters(aligned)
    old = (6 * counts["trainable"] + 2 * counts["frozen"]) * step["tokens"]
    assert old > count.step(**step)


def test_stage1_estimate_does_not_exceed_the_flops_that_ran(aligned):
    torch.manual_seed(0)
    size = aligned.vision.image_size
    ids = torch.randint(5, 80, (4, 10))
    batch = {"pixel_values": torch.randn(4, 3, size, size), "text_input_ids": ids, "text_attention_mask": torch.ones_like(ids)}
    aligned.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        aligned(batch)["loss"].backward()
    ran = float(counter.get_total_flops())
    counts = aligned.batch_counts(batch)
    estimate = metrics.flop_count(aligned, "align").step(counts.tokens, images=counts.images)
    assert estimate <= ran, f"estimated {estimate:.3g} FLOPs, {ran:.3g} ran"
    assert estimate >= 0.5 * ran, f"estimate {estimate:.3g} far below the {ran:.3g} that ran"


@pytest.mark.slow
def test_measured_stage1_run_reports_mfu_at_most_one(tmp_path):
    """The tiny align recipe trained on demo shards, MFU against this CPU's measured matmul peak (log.peak_flops unset)."""
    import json

    from mmdist.data.shards import shard_pattern, write_demo_shards
    from mmdist.training.loop import train

    shards = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=50, limit=100)
    cfg = tiny_run_config("align", "train.max_steps=5", "train.eval_every=0", "checkpoint.save_every=0",
                          "checkpoint.export=false", "log.progress_bar=false", "log.tensorboard=false",
                          data={"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": []},
                          run_dir=str(tmp_path / "run"))
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records if r["split"] == "train" and "mfu" in r]
    assert [r["step"] for r in steady] == [2, 3, 4, 5]  # step 1 is warm-up: not in the window
    assert all(r["mfu_steady_from_step"] == 2 for r in steady)
    assert all(0 < r["mfu"] <= 1.0 for r in steady), [r["mfu"] for r in steady]


def test_throughput_leaves_the_warmup_steps_out(monkeypatch):
    clock = iter([0.0, 10.0, 11.0, 12.0])  # a 10 s first step (compilation, allocation), then 1 s steps
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    tp = metrics.Throughput(metrics.FlopCount(per_token=1.0, per_image=5.0), peak_flops_total=100.0, total_steps=4,
                            warmup_steps=1)
    first = tp.update(step=1, samples=1, tokens=50, images=2)
    assert "mfu" not in first and "tokens_per_s" not in first and first["eta_s"] == pytest.approx(30.0)
    tp.update(step=2, samples=1, tokens=50, images=2)
    out = tp.update(step=3, samples=1, tokens=50, images=2)
    assert out["tokens_per_s"] == pytest.approx(50.0)  # the 10 s step left out: 100 tokens over 2 s
    assert out["mfu"] == pytest.approx((50 + 5 * 2) / 100.0)
    assert out["mfu_steady_from_step"] == 2 and out["throughput_window_steps"] == 2


def test_stage1_qformer_counts_the_trained_text_encoder_at_six_and_never_above_what_ran():
    torch.manual_seed(0)
    qformer = build_run_model(tiny_run_config("align", connector="qformer"))
    count = metrics.flop_count(qformer, "align", vision_runs=False, text_runs=False)  # a trained encoder runs regardless
    assert count.per_token == 6 * _linear_weights(qformer.text) > 0
    size = qformer.vision.image_size
    ids = torch.randint(5, 80, (4, 10))
    batch = {"pixel_values": torch.randn(4, 3, size, size), "text_input_ids": ids, "text_attention_mask": torch.ones_like(ids)}
    with FlopCounterMode(display=False) as counter:
        qformer(batch)["loss"].backward()
    counts = qformer.batch_counts(batch)
    assert metrics.flop_count(qformer, "align").step(counts.tokens, images=counts.images) <= counter.get_total_flops()


def test_the_loop_reads_from_the_cache_key_whether_text_features_are_cached(tmp_path):
    import json

    from mmdist.training.loop import _cache_holds_text

    (tmp_path / "train").mkdir()
    key = tmp_path / "train" / "cache_key.json"
    key.write_text(json.dumps({"parts": {"vision": {}, "text": {}}}))
    assert _cache_holds_text(tiny_run_config("align", f"data.feature_cache={tmp_path}"))
    key.write_text(json.dumps({"parts": {"vision": {}}}))
    assert not _cache_holds_text(tiny_run_config("align", f"data.feature_cache={tmp_path}"))
    assert not _cache_holds_text(tiny_run_config("align"))
