"""MFU counts the FLOPs that run: the model's own count (``model.flop_count()``) against torch's FLOP counter.

A figure above 100% is a bug. A naive "4N at every token" charges the LM head at
every position while FusedVLM runs it at supervised positions only, so on a
batch with few labelled tokens it claimed more FLOPs than the step executed.
Here a forward and backward of the tiny models from configs/tiny_{fuse,align}.yaml
run under ``torch.utils.flop_counter.FlopCounterMode``. The count takes the matmul
layers' forward FLOPs (2 per multiply-add) times 1, 2 or 3 (forward; + weight
gradient where a layer trains; + input gradient where a gradient passes below it):
it must come within 10% of the counter's matmuls and convolutions. Attention's
score products (QK^T and AV, in sdpa or bmm) are left out of both, and so is the
contrastive loss's similarity matrix (a batch x batch product, counted by torch
only). Each dtype's FLOPs are measured against its own peak, and a quantized model
shows the MFU of the unquantized one at the same speed.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from helpers.configs import tiny_run_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmdist.materialize import build_run_model
from mmdist.models.flops import FlopCount
from mmdist.training import metrics

# The ops the count's layers run as: Linear (mm, addmm) and convolutions, forward and backward. Attention's sdpa and
# bmm are what the count leaves out.
MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.convolution", "aten.convolution_backward")


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


def executed_flops(model, batch) -> tuple[float, float, int]:
    """(FLOPs torch counted for one forward and backward, those of its matmul ops, supervised tokens)."""
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        out = model(batch)
        out["loss"].backward()
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = float(sum(ops.get(op, 0) for op in MATMUL_OPS))
    return float(counter.get_total_flops()), matmuls, int(out.get("num_tokens", 0))


def _forward_macs(module, trainable=None) -> int:
    """Multiply-adds per position of the Linear layers (weights of this test's modules have their full shape)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)
               and (trainable is None or m.weight.requires_grad == trainable))


def test_each_part_is_charged_where_it_runs(fused):
    count = fused.flop_count()
    head = fused.llm.get_output_embeddings()
    assert fused.llm.get_input_embeddings().weight is head.weight  # tiny_fuse ties them: the head is the only copy
    assert count.per_supervised_token == 4 * head.weight.numel()  # frozen, gradient flows through it
    body = _forward_macs(fused.llm) - head.weight.numel()
    assert count.per_token == 4 * body
    # the projector per image token: its lowest layer reads frozen features (4), the next one passes a gradient (6)
    first, second = (m for m in fused.projector.modules() if isinstance(m, torch.nn.Linear))
    assert count.per_image_token == 4 * first.weight.numel() + 6 * second.weight.numel()
    # per image: the frozen tower forward only at its 16 patches + class token (the pooler at one, the patch
    # convolution at the patches); the trainable stage-1 heads, when there are some, at their image tokens
    assert count.per_image == fused.vision.flop_count().per_image > 0
    assert fused.flop_count(vision_runs=False).per_image == 0  # feature cache: the tower does not run
    assert count.per_sample == 0


def test_the_count_matches_the_flops_that_ran_within_ten_percent(fused):
    batch = demo_like_batch(fused)
    ran, matmuls, supervised = executed_flops(fused, batch)
    counts = fused.batch_counts(batch)
    assert counts.supervised_tokens == supervised == 4 * 2 and counts.image_tokens == 4 * fused.num_image_tokens
    estimate = fused.flop_count().step(counts.tokens, counts.supervised_tokens, counts.image_tokens, counts.images,
                                       counts.samples)
    assert estimate <= ran, f"MFU would read high: estimated {estimate:.3g} FLOPs, {ran:.3g} ran"
    assert estimate == pytest.approx(matmuls, rel=0.1), f"count {estimate:.4g}, matmuls that ran {matmuls:.4g}"
    # The old accounting (every parameter at 4 or 6 per token, the head included) claims more than ran.
    params = metrics.count_parameters(fused)
    assert (6 * params["trainable"] + 4 * params["frozen"]) * counts.tokens > ran


def test_mfu_from_throughput_counts_each_rate(monkeypatch):
    clock = iter([0.0, 1.0, 2.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    flops = FlopCount(per_token=10.0, per_supervised_token=100.0, per_image_token=1.0)
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


def _align_batch(model, rows: int = 4, length: int = 10) -> dict:
    torch.manual_seed(0)
    size = model.vision.image_size
    ids = torch.randint(5, 80, (rows, length))
    return {"pixel_values": torch.randn(rows, 3, size, size), "text_input_ids": ids,
            "text_attention_mask": torch.ones_like(ids)}


def test_stage1_counts_each_part_where_it_runs(aligned):
    text = _linear_weights(aligned.text)
    heads = aligned.stage1
    image_head = [m for m in heads.image_head.modules() if isinstance(m, torch.nn.Linear)]
    text_head = [m for m in heads.text_head.modules() if isinstance(m, torch.nn.Linear)]
    count = aligned.flop_count()
    tower = aligned.vision.flop_count().per_image
    # frozen tower per image; the image head at each of its tokens, the text head once per caption (lowest layer 4)
    per_token_head = 4 * image_head[0].weight.numel() + 6 * image_head[1].weight.numel()
    assert count.per_image == tower + heads.num_tokens * per_token_head
    assert count.per_sample == 4 * text_head[0].weight.numel() + 6 * text_head[1].weight.numel()
    assert count.per_token == 2 * text  # frozen text encoder per caption token, forward only
    assert count.per_image_token == count.per_supervised_token == 0
    images_cached = aligned.flop_count(vision_runs=False)
    both_cached = aligned.flop_count(vision_runs=False, text_runs=False)
    assert images_cached == FlopCount(per_token=2 * text, per_image=count.per_image - tower,
                                      per_sample=count.per_sample)
    assert both_cached == dataclasses.replace(images_cached, per_token=0.0)
    step = dict(tokens=8 * 12, images=8, samples=8)
    assert count.step(**step) > images_cached.step(**step) > both_cached.step(**step) > 0


def test_stage1_count_matches_the_flops_that_ran_within_ten_percent(aligned):
    batch = _align_batch(aligned)
    ran, matmuls, _ = executed_flops(aligned, batch)
    c = aligned.batch_counts(batch)
    estimate = aligned.flop_count().step(c.tokens, c.supervised_tokens, c.image_tokens, c.images, c.samples)
    assert estimate <= ran, f"estimated {estimate:.3g} FLOPs, {ran:.3g} ran"
    assert estimate == pytest.approx(matmuls, rel=0.1), f"count {estimate:.4g}, matmuls that ran {matmuls:.4g}"


@pytest.mark.slow
def test_measured_stage1_run_reports_mfu_at_most_one(tmp_path):
    """The tiny align recipe trained on demo shards, MFU against
    this CPU's measured matmul peak (log.peak_flops unset)."""
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
    tp = metrics.Throughput(FlopCount(per_token=1.0, per_image=5.0), peak_flops_total=100.0, total_steps=4,
                            warmup_steps=1)
    first = tp.update(step=1, samples=1, tokens=50, images=2)
    assert "mfu" not in first and "tokens_per_s" not in first and first["eta_s"] == pytest.approx(30.0)
    tp.update(step=2, samples=1, tokens=50, images=2)
    out = tp.update(step=3, samples=1, tokens=50, images=2)
    assert out["tokens_per_s"] == pytest.approx(50.0)  # the 10 s step left out: 100 tokens over 2 s
    assert out["mfu"] == pytest.approx((50 + 5 * 2) / 100.0)
    assert out["mfu_steady_from_step"] == 2 and out["throughput_window_steps"] == 2


def test_stage1_qformer_counts_the_trained_text_encoder_at_six_and_stays_within_10_percent_of_what_ran():
    torch.manual_seed(0)
    qformer = build_run_model(tiny_run_config("align", connector="qformer"))
    count = qformer.flop_count(vision_runs=False, text_runs=False)  # a trained encoder runs regardless
    own = qformer.stage1.stage1_flop_count(qformer.settings.text.max_length)  # the Q-Former's caption rows
    assert count.per_token == pytest.approx(6 * _linear_weights(qformer.text) + own.per_token)
    assert 6 * _linear_weights(qformer.text) > 0
    batch = _align_batch(qformer)
    with sdpa_kernel(SDPBackend.MATH):  # the counter has no entry for the CPU flash kernel's attention FLOPs
        ran, _, _ = executed_flops(qformer, batch)
    c = qformer.batch_counts(batch)
    counted = qformer.flop_count().step(c.tokens, c.supervised_tokens, c.image_tokens, c.images, c.samples)
    assert abs(counted - ran) <= 0.1 * ran, (counted, ran)


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


# ---------------------------------------------------------------------------
# each dtype against its own peak; a quantized model at the unquantized one's MFU


def test_mfu_divides_each_dtype_by_its_own_peak(monkeypatch):
    clock = iter([0.0, 1.0, 3.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    # a frozen bf16 tower per image and a trainable fp32 module per sample (stage 1 with a trained Q-Former)
    flops = FlopCount.of("bf16", per_image=400.0) + FlopCount.of("fp32", per_sample=30.0)
    tp = metrics.Throughput(flops, {"bf16": 1000.0, "fp32": 100.0}, total_steps=4)
    tp.update(step=1, samples=2, tokens=20, images=2)
    out = tp.update(step=2, samples=2, tokens=20, images=2)
    # per step 800 bf16 FLOPs take 0.8 s at peak, 60 fp32 FLOPs 0.6 s: 2 x 1.4 s of peak work in 3 s
    assert out["mfu"] == pytest.approx(2 * (800 / 1000 + 60 / 100) / 3.0)
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: 0.0)
    one = metrics.Throughput(flops, 1000.0, total_steps=4)  # one peak for every dtype (log.peak_flops)
    assert one._shares == [(flops, 1000.0)]
    with pytest.raises(ValueError, match="no peak FLOP/s for fp32"):
        metrics.Throughput(flops, {"bf16": 1000.0}, total_steps=4)


class _Clock:
    """time.perf_counter for the meter: ``now`` moves only when a test (or a probe) moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_peak_probed_low_is_measured_again_when_steps_outrun_it(monkeypatch):
    """A matmul probe that ran during a slow spell (a shared CPU) gave a peak below what the steps then computed:
    the meter measures again, keeps the higher peak and leaves the probe's time out of the window. Twice at most;
    without a probe to repeat (a datasheet or configured peak) an MFU over 100% is shown as it is."""
    clock = _Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    flops = FlopCount.of("fp32", per_token=10.0)  # 200 FLOPs a step of 20 tokens, one step a second
    probes = []

    def probe(value: float):
        def remeasure():
            probes.append(value)
            clock.now += 5.0  # a probe takes time: not the steps'
            return {"fp32": value}
        return remeasure

    tp = metrics.Throughput(flops, {"fp32": 100.0}, total_steps=10, remeasure=probe(400.0))
    clock.now += 1.0
    out = tp.update(step=1, samples=2, tokens=20)  # 200 FLOPs in 1 s against 100 FLOP/s: 200%, so measure again
    assert probes == [400.0] and tp.peak == {"fp32": 400.0}
    assert out["mfu"] == pytest.approx(200 / 400 / 1.0)
    clock.now += 1.0
    out = tp.update(step=2, samples=2, tokens=20)
    assert out["mfu"] == pytest.approx(0.5), "the window's two seconds, the probe's five left out"
    assert probes == [400.0]  # below 100%: no other probe

    still_low = metrics.Throughput(flops, {"fp32": 100.0}, total_steps=10, remeasure=probe(150.0))
    probes.clear()
    for step in range(1, 5):
        clock.now += 1.0
        out = still_low.update(step=step, samples=2, tokens=20)
    assert probes == [150.0, 150.0] and out["mfu"] == pytest.approx(200 / 150)  # measured twice, then shown

    datasheet = metrics.Throughput(flops, {"fp32": 100.0}, total_steps=10)
    for step in range(1, 3):
        clock.now += 1.0
        out = datasheet.update(step=step, samples=2, tokens=20)
    assert out["mfu"] == pytest.approx(2.0)


def test_raising_one_dtypes_peak_keeps_the_others():
    flops = FlopCount.of("bf16", per_image=400.0) + FlopCount.of("fp32", per_sample=30.0)
    tp = metrics.Throughput(flops, {"bf16": 1000.0, "fp32": 100.0}, total_steps=4)
    assert tp.raise_peaks({"bf16": 1000.0, "fp32": 250.0})
    assert tp.peak == {"bf16": 1000.0, "fp32": 250.0}
    assert not tp.raise_peaks({"bf16": 900.0, "fp32": 200.0})  # lower figures change nothing
    with pytest.raises(ValueError, match="other dtypes"):
        tp.raise_peaks(1000.0)


HAS = {name: importlib.util.find_spec(name) is not None for name in ("bitsandbytes", "torchao")}
QUANT = [pytest.param(m, b, marks=pytest.mark.skipif(not HAS[b], reason=f"{b} not installed (extra mmdist[quant])"))
         for m, b in (("int8", "bitsandbytes"), ("nf4", "bitsandbytes"), ("int8", "torchao"), ("nf4", "torchao"))]


@pytest.mark.parametrize("method,backend", QUANT)
def test_a_quantized_run_shows_the_mfu_of_the_unquantized_one_at_the_same_speed(fused, method, backend, monkeypatch):
    """The bar's MFU (Throughput over the model's count) of a quantized model fed the same step times and counts."""
    torch.manual_seed(0)
    quantized = build_run_model(tiny_run_config("fuse", "model.llm.gradient_checkpointing=false",
                                                f"model.llm.quantize={method}",
                                                f"model.llm.quantize_backend={backend}"))
    counts = quantized.batch_counts(demo_like_batch(quantized))
    assert counts == fused.batch_counts(demo_like_batch(fused))

    def bar_mfu(model) -> float:
        clock = iter([0.0, 1.0, 1.5, 2.0])
        monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
        flops = model.flop_count()
        tp = metrics.Throughput(flops, {d: 1e9 for d in flops.dtypes()}, total_steps=3, warmup_steps=1)
        for step in (1, 2, 3):
            out = tp.update(step, counts.samples, counts.tokens, counts.supervised_tokens, counts.image_tokens,
                            counts.images)
        return out["mfu"]

    plain, quant = bar_mfu(fused), bar_mfu(quantized)
    assert plain > 0 and quant == pytest.approx(plain, rel=0.1), f"quantized {quant:.4g} vs unquantized {plain:.4g}"
