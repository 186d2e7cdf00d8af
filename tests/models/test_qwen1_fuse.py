"""Stage 2 on a Qwen1 checkpoint (tiny, in Qwen1's own layout): the recipe is validated against its seq_length, the
image placeholder is a reserved <|extra_N|> token (the vocabulary never grows), training learns and the export
records where the LLM came from."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers.configs import tiny_run_config
from helpers.qwen1 import SEQ_LENGTH, VOCAB, needs_tiktoken_file, qwen1_state_dict, write_qwen1_checkpoint

from mmdist.settings import ConfigError


def _qwen1_overrides(folder) -> list[str]:
    return [f"model.llm.name_or_path={folder}", "model.llm.init_config=null", "model.llm.tokenizer=null"]


def test_max_len_beyond_the_checkpoints_seq_length_is_refused(tmp_path):
    folder = write_qwen1_checkpoint(tmp_path / "qwen1", qwen1_state_dict(), "safetensors", "late")
    assert tiny_run_config("fuse", *_qwen1_overrides(folder), f"data.max_len={SEQ_LENGTH}").data.max_len == SEQ_LENGTH
    with pytest.raises(ConfigError, match=r"data\.max_len.*seq_length"):
        tiny_run_config("fuse", *_qwen1_overrides(folder), f"data.max_len={SEQ_LENGTH * 2}")


@pytest.mark.slow
def test_stage1_to_qwen1_stage2_keeps_the_vocabulary_and_learns(tmp_path):
    pytest.importorskip("sklearn")
    from mmdist.data.shards import shard_pattern, write_demo_shards
    from mmdist.training.loop import train

    folder = write_qwen1_checkpoint(tmp_path / "qwen1", qwen1_state_dict(), "safetensors", "late", chat=True)
    shutil.copy(needs_tiktoken_file(), folder / "qwen.tiktoken")
    shards = write_demo_shards(tmp_path / "demo", image_size=16, samples_per_shard=50, limit=100)
    data = {"train": [{"shards": [shard_pattern(shards["train"])]}], "eval": []}
    quiet = {"progress_bar": False, "tensorboard": False, "param_table": False}
    # stage 1 first: its export is handed to the Qwen1 stage 2
    train(tiny_run_config("align", run_dir=str(tmp_path / "align"), data={**data, "format": "caption"},
                          train={"max_steps": 2, "eval_every": 0}, log=quiet))
    cfg = tiny_run_config("fuse", *_qwen1_overrides(folder), f"model.connector.stage1_weights={tmp_path / 'align'}",
                          run_dir=str(tmp_path / "run"), data=data,
                          train={"max_steps": 8, "eval_every": 0, "lr": 1e-2, "warmup_ratio": 0.0},
                          log=quiet)
    summary = train(cfg)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    manifest = json.loads((tmp_path / "run" / "export" / "manifest.json").read_text())
    assert manifest["llm"]["source_format"] == "qwen1" and manifest["stage1"]["stage"] == "align"
    token = manifest["tokenizer"]
    assert token["image_token"] == "<|extra_0|>" and token["image_token_id"] == 151646
    assert token["size"] <= VOCAB, "the placeholder is a reserved token: no row is added to the frozen embeddings"


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_rank_zero3_fuse_run_on_a_qwen1_checkpoint(tmp_path):
    """torchrun, 2 CPU ranks, ZeRO-3: the Qwen1 checkpoint is
    partitioned as it loads, the loss falls, the export is written."""
    pytest.importorskip("sklearn")
    from helpers.launch_harness import TRAIN_SCRIPT, check_run, python, run, train_args, write_recipes

    from mmdist.launch_env import free_port

    folder = write_qwen1_checkpoint(tmp_path / "qwen1", qwen1_state_dict(), "safetensors", "early", chat=True)
    shutil.copy(needs_tiktoken_file(), folder / "qwen.tiktoken")
    recipe = write_recipes(tmp_path)["fuse"]
    run_dir = tmp_path / "run"
    cmd = [python(), "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(TRAIN_SCRIPT), *train_args(recipe, run_dir, 6, 6, *_qwen1_overrides(folder), "train.lr=0.01")]
    out = run(cmd, 600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    check_run(run_dir, 6, out.stdout + out.stderr)  # world=2, every step logged, the loss fell, a checkpoint
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["llm"]["source_format"] == "qwen1" and manifest["tokenizer"]["image_token"] == "<|extra_0|>"
    config = (run_dir / "config.yaml").read_text()
    assert "zero_stage: 3" in config
