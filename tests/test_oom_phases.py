"""Out of device memory in every phase is the same kind of message and exit code 76, never a traceback.

Each test makes one phase's inner function raise ``torch.OutOfMemoryError`` (as a GPU
would) and runs the real command around it: the engine build, a training step, the
trainer's evaluation and export (``mmdist train`` on configs/tiny_fuse.yaml), then
``mmdist eval``, ``mmdist export`` and ``mmdist generate`` on a tiny trained export.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from mmdist.commands import eval as eval_command
from mmdist.commands import exits_on_oom
from mmdist.commands import export as export_command
from mmdist.commands import generate as generate_command
from mmdist.commands import train as train_command
from mmdist.oom import OOM_EXIT
from mmdist.training import engine, loop, step

REPO = Path(__file__).resolve().parent.parent


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")


def _train_argv(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "tiny_fuse.yaml"), f"run_dir={run_dir}", "train.max_steps=3",
            "train.global_batch_size=4", "train.micro_batch_size=4", "engine.zero_stage=2", "log.progress_bar=false",
            "log.tensorboard=false", "log.param_table=false", "checkpoint.save_every=0",
            f"data.train=[{{shards: ['{shards / 'train' / 'train-000000.tar'}']}}]",
            f"data.eval=[{{shards: ['{shards / 'eval' / 'eval-000000.tar'}']}}]", *extra]


def _assert_common_shape(err: str, phase: str) -> None:
    """What every out-of-memory message says: the phase and the device, the sizes, the settings, the exit code."""
    assert f"[mmdist] out of memory in {phase}: cpu (torch keeps no allocated/reserved counters" in err, err
    assert "[mmdist] sizes: " in err and "[mmdist] settings that lower memory: " in err, err
    assert f"[mmdist] exit code {OOM_EXIT}: change a setting and start the same command again" in err, err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mmdist.data.shards import write_demo_shards

    root = tmp_path_factory.mktemp("oom_shards")
    write_demo_shards(root, image_size=28, limit=40)
    return root


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A tiny stage-2 run trained for three steps, with its export and a digit image (seconds)."""
    root = tmp_path_factory.mktemp("oom_run")
    assert train_command.main(_train_argv(shards, root / "fuse")) == 0
    with tarfile.open(shards / "eval" / "eval-000000.tar") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        (root / "digit.png").write_bytes(tar.extractfile(member).read())
    return root


def test_engine_build(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine, "default_model_builder", _out_of_memory)  # the model runs out as it loads
    assert train_command.main(_train_argv(shards, tmp_path / "run")) == OOM_EXIT == 76
    err = capsys.readouterr().err
    _assert_common_shape(err, "the engine build (loading the model, wrapping it in DeepSpeed)")
    assert "parameters (vision_encoder " in err and " llm " in err, err  # the planner's size of the model
    assert "world size 1, ZeRO stage 2" in err
    assert "engine.zero_stage=3 with engine.offload_params=true" in err and "engine.offload_optimizer=true" in err
    assert "model.llm.quantize=int8 or nf4" in err  # a frozen LLM at ZeRO 0-2 may be held quantized
    assert "`mmdist train`" not in err  # the phase's own message, not the command's fallback


def test_training_step(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(step, "to_device", _out_of_memory)  # the first micro-batch's copy to the device
    assert train_command.main(_train_argv(shards, tmp_path / "run")) == OOM_EXIT
    err = capsys.readouterr().err
    _assert_common_shape(err, "the training step (step 1, micro-batch 1 of 1, in the host-to-device copy)")
    assert "sizes: micro-batch 4, sequence 128, accumulation 1, world size 1, ZeRO stage 2" in err
    assert "train.micro_batch_size=4 -> smaller" in err and "planner:" in err
    assert f"last checkpoint: none yet in {tmp_path / 'run' / 'checkpoints'}" in err


def test_evaluation_in_training(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "_evaluate", _out_of_memory)  # the evaluation at the end, after the last checkpoint
    run = tmp_path / "run"
    assert train_command.main(_train_argv(shards, run)) == OOM_EXIT
    err = capsys.readouterr().err
    _assert_common_shape(err, "the evaluation at step 3")
    assert "sizes: batch 4, sequence 128, batches 4, world size 1, ZeRO stage 2" in err
    assert "train.micro_batch_size=4 -> smaller" in err and "data.max_len=128 -> shorter rows" in err
    assert f"last checkpoint: {run / 'checkpoints' / 'step_000003'}" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000003"


def test_export_in_training_then_a_rerun_exports(shards, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(loop, "export_trainable", _out_of_memory)
        assert train_command.main(_train_argv(shards, run)) == OOM_EXIT
    err = capsys.readouterr().err
    _assert_common_shape(err, "the export of the trainable weights at step 3")
    assert "trainable " in err and " parameters, ZeRO stage 2" in err
    assert "checkpoint.export=false" in err and "start the same command again to retry the export" in err
    assert not (run / "export").exists()
    # as the message says: the same command resumes at the last step and writes the export
    assert train_command.main(_train_argv(shards, run)) == 0
    assert (run / "export" / "model.safetensors").is_file()


def test_mmdist_eval(trained, shards, monkeypatch, capsys):
    monkeypatch.setattr(eval_command, "evaluate_model", _out_of_memory)
    code = eval_command.main(["--run", str(trained / "fuse"), "--data", str(shards / "eval" / "eval-000000.tar"),
                              "--batch-size", "2", "--device", "cpu"])
    assert code == OOM_EXIT
    err = capsys.readouterr().err
    _assert_common_shape(err, "the evaluation (`mmdist eval`)")
    assert "sizes: batch 2, model " in err and " parameters, sequence 128, answers up to 32 tokens" in err
    assert "--batch-size 2 -> smaller" in err and "--max-new-tokens 32 -> fewer" in err


@pytest.mark.parametrize("fmt, inner", [("hf", "export_hf"), ("mmdist", "export_mmdist")])
def test_mmdist_export(trained, tmp_path, monkeypatch, capsys, fmt, inner):
    monkeypatch.setattr(export_command, inner, _out_of_memory)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the device the export names: this machine's default
    code = export_command.main(["--run", str(trained / "fuse"), "--out", str(tmp_path / "out"), "--format", fmt])
    assert code == OOM_EXIT
    err = capsys.readouterr().err
    _assert_common_shape(err, f"the export (`mmdist export --format {fmt}`)")
    assert f"sizes: run {trained / 'fuse'}, format {fmt}" in err
    assert "CUDA_VISIBLE_DEVICES=" in err and "model.llm.dtype=bf16" in err


def test_mmdist_generate(trained, monkeypatch, capsys):
    monkeypatch.setattr(generate_command, "answer_images", _out_of_memory)
    image = str(trained / "digit.png")
    code = generate_command.main(["--run", str(trained / "fuse"), "--image", image, image, "--device", "cpu",
                                  "--max-new-tokens", "8"])
    assert code == OOM_EXIT
    err = capsys.readouterr().err
    _assert_common_shape(err, "generation (`mmdist generate`)")
    assert "sizes: images 2, answers up to 8 tokens, model " in err and " parameters" in err
    assert "--max-new-tokens 8 -> fewer" in err and "fewer --image per call (2 answered in one batch)" in err


def test_a_phase_without_a_guard_still_gets_the_message(capsys):
    @exits_on_oom
    def main(argv=None):
        return _out_of_memory()

    assert main([]) == OOM_EXIT  # exits_on_oom names the command after its module (here, this test file)
    _assert_common_shape(capsys.readouterr().err, "`mmdist test_oom_phases`")
