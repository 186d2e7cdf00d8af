"""Out of device memory in a step ends the run with a message and exit code 76, and leaves the last checkpoint intact.

The toy model raises ``torch.OutOfMemoryError`` from its forward on one chosen
micro-batch (tests/helpers/trainer_toy.py's ``oom`` hook), as a GPU would.
"""

from __future__ import annotations

import pytest
import torch
from helpers.trainer_toy import toy_config, toy_loader_builder, toy_model_builder

from mmdist.commands import train as train_command
from mmdist.config.run import load_config
from mmdist.training import oom
from mmdist.training.loop import train
from mmdist.training.step import StepOutOfMemoryError


def test_oom_in_step_two_is_a_message_and_the_checkpoint_survives(tmp_path):
    run = tmp_path / "run"
    # global 4, micro 2, one rank: two micro-batches a step; micro-batch 3 (0-based) is step 2's second
    cfg = load_config(base=toy_config(str(run), train={"max_steps": 4}, checkpoint={"save_every": 1}))
    with pytest.raises(oom.OutOfMemoryStop) as info:
        train(
            cfg,
            model_builder=toy_model_builder,
            loader_builder=toy_loader_builder(hooks={"oom": {"rank": 0, "batch": 3}}),
        )
    message = str(info.value)
    assert "out of memory in the training step (step 2, micro-batch 2 of 2, in the forward)" in message
    assert "sizes: micro-batch 2, sequence" in message and "world size 1, ZeRO stage 3" in message
    assert "cpu (torch keeps no allocated/reserved counters" in message  # on a GPU: allocated / reserved / total GiB
    assert f"last checkpoint: {run / 'checkpoints' / 'step_000001'}" in message
    assert "planner:" in message and "mmdist plan --config" in message  # no GPU total to plan against: the command
    assert "train.micro_batch_size=2" in message and "engine.zero_stage=3 already" in message
    assert f"exit code {oom.OOM_EXIT}" in message
    assert isinstance(info.value.__cause__, StepOutOfMemoryError)
    assert isinstance(info.value.__cause__.__cause__, torch.OutOfMemoryError)
    # the checkpoint of step 1 is intact: latest points at it, nothing of step 2 was written, and a resume loads it
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_000001"]
    resumed = train(cfg, model_builder=toy_model_builder, loader_builder=toy_loader_builder())
    assert resumed["resumed_from"].endswith("step_000001") and resumed["step"] == 4


def test_planner_line_sizes_the_micro_batch_when_a_budget_is_known():
    from helpers.configs import tiny_run_config

    cfg = tiny_run_config("fuse")
    line = oom.planner_line(cfg, world_size=1, budget=80 * 2**30)
    assert line.startswith("planner: largest micro-batch that fits ZeRO-") and "on 80 GiB" in line, line
    fits = int(line.split("GiB: ")[1].split()[0])
    assert fits > cfg.train.micro_batch_size  # a tiny model fits many rows in 80 GiB
    assert "mmdist plan --config" in oom.planner_line(cfg, world_size=1, budget=None)


def test_train_command_exits_76_with_the_message(tmp_path, monkeypatch, capsys):
    def out_of_memory(cfg):
        raise oom.OutOfMemoryStop("[mmdist] out of memory at step 2, micro-batch 1 of 4, in the backward: ...")

    monkeypatch.setattr(train_command.loop, "train", out_of_memory)
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(toy_config(str(tmp_path / "run"))))
    assert train_command.main(["--config", str(cfg)]) == oom.OOM_EXIT == 76
    assert "out of memory at step 2" in capsys.readouterr().err
