"""The stage the planner picks on 80 GB cards once micro-batches are counted from the shards' statistics, and why.

configs/fuse.yaml on 1 and 8 GPUs (`mmdist plan --data`), benchmarks/gpu_system.py's shape (Qwen-14B + CLIP-L/336,
16 packed samples of max_len 2048) at start-up (`engine.zero_stage: auto`), and offload's PCIe time.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers.mixtures import skewed_samples

from mmdist.commands.plan import main as plan_main
from mmdist.config.run import load_config
from mmdist.data.shards import shard_pattern, write_demo_shards, write_shards
from mmdist.plan import GiB, Setting, estimate, model_shapes, parse_bytes
from mmdist.plan.lengths import batch_tokens, worst_case
from mmdist.plan.speed import TIE, choose, step_inputs
from mmdist.plan.step_time import GB, PCIE_DEFAULT, interconnect_for, predict

ROOT = Path(__file__).resolve().parents[1]
# benchmarks/gpu_throughput.py's shapes (copied: importing the benchmark sets its environment)
QWEN_14B = dict(model_type="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=8192, tie_word_embeddings=False)
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, num_channels=3, projection_dim=768)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mix")
    return shard_pattern(write_shards(skewed_samples(200, seed=1), folder, samples_per_shard=100))


@pytest.mark.parametrize("gpus", [1, 8])
def test_fuse_recipe_picks_a_stage_that_fits_with_shard_statistics(mixture, capsys, gpus):
    assert plan_main(["--config", str(ROOT / "configs" / "fuse.yaml"), "--gpus", str(gpus), "--gpu-memory", "80GB",
                      "--no-deepspeed", "--data", mixture]) == 0
    out = capsys.readouterr().out
    assert "micro-batch tokens from the shard statistics: stats.json of 2 of the 2 shard(s) of --data" in out
    assert "characters per token (a default" in out  # Qwen's tokenizer is not on this machine: the marked default
    picked = re.search(r"engine.zero_stage=auto on \d+ GPU\(s\) of this size picks ZeRO-(\d)", out)
    assert picked, out
    why = next(line for line in out.splitlines() if line.startswith("  why: "))
    assert f"engine.zero_stage = {picked.group(1)} (auto): predicted fastest of the stages that fit 80.0 GiB" in why
    assert "from the shard statistics" in why and "nothing fits" not in out
    # the chosen stage's plan fits: recompute it as the command did
    cfg = load_config(str(ROOT / "configs" / "fuse.yaml"), ["engine.precision=bf16"])
    shapes = model_shapes(cfg)
    tokens = batch_tokens(cfg, shapes, [mixture])
    (chosen,) = estimate(cfg, shapes, gpus, settings=[Setting(int(picked.group(1)))], tokens=tokens)
    need = float(re.search(r"s/step, ([0-9.]+) GiB predicted", why).group(1))
    assert chosen.total(True) <= parse_bytes("80GB") and need == pytest.approx(chosen.total(True) / GiB, abs=0.05)
    assert tokens.tokens < 0.5 * cfg.train.micro_batch_size * cfg.data.max_len  # far below the full rows


def _gpu_system_config(shards: str):
    recipe = yaml.safe_load((ROOT / "configs" / "tiny_fuse.yaml").read_text())
    recipe["model"]["llm"].update(init_config=QWEN_14B, dtype="bf16", gradient_checkpointing=True)
    recipe["model"]["vision"].update(init_config=CLIP_L_336, dtype="bf16", select_layer=-2, select_tokens="patch")
    recipe["model"]["text"]["dtype"] = "bf16"
    recipe["data"].update(train=[{"shards": [shards]}], eval=[], max_len=2048, packing=True)
    recipe["train"].update(global_batch_size=16, micro_batch_size=16)
    recipe["engine"].update(zero_stage="auto", precision="bf16")
    return load_config(base=recipe)


def test_gpu_system_shape_fits_80gb_and_picks_the_same_stage_as_on_141gb(tmp_path, monkeypatch):
    from mmdist.plan.auto import DEVICE_MEMORY_ENV, auto_candidates, resolve_zero_stage

    demo = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=100, limit=200)["train"]
    cfg = _gpu_system_config(shard_pattern(demo))
    shapes = model_shapes(cfg)
    link = interconnect_for("H100 SXM")
    full, stats = worst_case(cfg, shapes), batch_tokens(cfg, shapes)
    assert stats.source == "shard statistics" and 8_000 < stats.tokens < 12_000  # about 600 tokens a sample, not 2048
    picks = {}
    for tokens in (full, stats):
        est = estimate(cfg, shapes, 1, settings=auto_candidates(cfg, "bf16"), tokens=tokens)
        for memory in ("80GB", "141GB"):
            picks[tokens.source, memory] = choose(est, step_inputs(cfg, shapes, 1, "H100 SXM", tokens=tokens), 1, link,
                                                  parse_bytes(memory), [True])[0]
    assert not picks["worst case", "80GB"].fits  # full rows: nothing fits an 80 GB card
    assert picks["shard statistics", "80GB"].fits
    assert picks["shard statistics", "80GB"].setting == picks["shard statistics", "141GB"].setting
    monkeypatch.setenv(DEVICE_MEMORY_ENV, "80GB")  # start-up's `auto` reads the same statistics from data.train
    out, why = resolve_zero_stage(cfg, 1, "cpu")
    assert out.engine.zero_stage == picks["shard statistics", "80GB"].setting.zero_stage
    assert "predicted fastest of the stages that fit 80.0 GiB" in why and "from the shard statistics" in why


def test_offload_costs_pcie_time(mixture):
    cfg = load_config(str(ROOT / "configs" / "fuse.yaml"), ["engine.precision=bf16"])
    shapes = model_shapes(cfg)
    inputs = step_inputs(cfg, shapes, 8, "H100 SXM", tokens=batch_tokens(cfg, shapes, [mixture]))
    slow, fast = interconnect_for("H100 SXM"), interconnect_for("H100 SXM", pcie_gbps=2 * PCIE_DEFAULT / GB)
    plain = predict(inputs, 3, 8, slow, True)
    opt = predict(inputs, 3, 8, slow, True, offload_optimizer=True)
    both = predict(inputs, 3, 8, slow, True, offload_optimizer=True, offload_params=True)
    assert plain.pcie_s == 0 < opt.pcie_s < both.pcie_s and plain.step_s < opt.step_s < both.step_s
    # optimizer offload: the rank's fp32 gradients down and its bf16 weights up, once per step, not overlapped
    p = inputs.trainable_params
    assert opt.pcie_s == pytest.approx((4 * p + 2 * p) / 8 / PCIE_DEFAULT)
    assert opt.step_s - plain.step_s == pytest.approx(opt.pcie_s)
    assert predict(inputs, 3, 8, fast, True, offload_optimizer=True).pcie_s == pytest.approx(opt.pcie_s / 2)
    # parameter offload: every gather (forward, backward, recompute) fetches the rank's weight partition
    params_s = both.pcie_s - opt.pcie_s
    assert params_s == pytest.approx(inputs.weight_bytes / 8 * 3 * inputs.micro_batches / PCIE_DEFAULT)


def test_micro_batch_sizes_divide_a_ranks_share():
    from mmdist.plan.micro_batch import micro_batch_sizes

    cfg = load_config(str(ROOT / "configs" / "fuse.yaml"), ["train.global_batch_size=48"])
    assert micro_batch_sizes(cfg, 4) == [1, 2, 3, 4, 6, 12]
    assert micro_batch_sizes(cfg, 5) == []  # 48 samples cannot be split over 5 ranks: the trainer refuses it too


@pytest.mark.parametrize("memory", ["80GB", "33GB"])
def test_the_fastest_split_fits_and_is_what_the_command_recommends(tmp_path, capsys, memory):
    """gpu_system's shape: every split the planner lists fits; the recommended one has the shortest predicted step
    among them; its overrides give a config the trainer accepts and whose plan fits; where a card holds the
    micro-batch without checkpointing, not recomputing the LLM wins (4 rather than 6 FLOPs per weight and token),
    where it holds none, checkpointing is kept."""
    from mmdist.plan.auto import auto_candidates
    from mmdist.plan.micro_batch import fastest_split
    from mmdist.training.ds_config import batch_layout

    demo = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=100, limit=200)["train"]
    cfg = _gpu_system_config(shard_pattern(demo))
    shapes = model_shapes(cfg)
    budget = parse_bytes(memory)
    best, splits = fastest_split(cfg, shapes, 1, "H100 SXM", interconnect_for("H100 SXM"), budget,
                                 auto_candidates(cfg, "bf16"), int(1.5 * GiB))
    assert best is not None and splits
    for split in splits:
        assert split.choice.fits and split.choice.estimate.total(split.choice.checkpointing) <= budget
        assert split.micro_batch * split.accumulation == cfg.train.global_batch_size
    assert best.step_s <= min(s.step_s for s in splits) * (1 + TIE)  # within a tie of the fastest
    if memory == "80GB":
        configured = next(s for s in splits if s.micro_batch == 16)
        assert configured.choice.checkpointing  # 16 samples of ~600 tokens need it on an 80 GB card
        assert not best.choice.checkpointing and best.step_s < 0.8 * configured.step_s
    else:  # 27 GiB of frozen bf16 weights leave too little for one sample's activations without checkpointing
        assert all(s.choice.checkpointing for s in splits)
        assert best.micro_batch < 16 and not best.choice.setting.offload_params
    path = tmp_path / "gpu_system.yaml"
    from mmdist.config.run import dump_config

    dump_config(cfg, path)
    assert plan_main(["--config", str(path), "--gpus", "1", "--gpu-memory", memory, "--gpu", "H100",
                      "--no-deepspeed"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("recommended: micro-batch"))
    assert line.startswith(f"recommended: {best.label}: {best.step_s:.3g} s/step predicted")
    overrides = next(x for x in out.splitlines()[out.splitlines().index(line):] if x.startswith("  overrides: "))
    applied = load_config(path, overrides.split()[1:])
    assert applied.train.micro_batch_size == best.micro_batch
    assert batch_layout(applied, 1) == (16, best.micro_batch, best.accumulation)
    tokens = batch_tokens(applied, model_shapes(applied))
    (est,) = estimate(applied, shapes, 1, settings=[best.choice.setting], tokens=tokens)
    assert est.total(applied.model.llm.gradient_checkpointing) <= budget


def test_the_split_table_says_when_the_gpus_cannot_share_the_global_batch(capsys):
    assert plan_main(["--config", str(ROOT / "configs" / "fuse.yaml"), "--gpus", "3", "--gpu-memory", "80GB",
                      "--no-deepspeed"]) == 0
    out = capsys.readouterr().out
    assert "3 GPU(s) cannot share 128 samples evenly" in out and "recommended: micro-batch" not in out
