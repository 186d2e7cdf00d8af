"""The training loop across ranks: 2-rank ZeRO-3 equals one process, resume equals an uninterrupted run (data
included), a signal or a stalled rank ends every rank cleanly, and a resume on another world size continues
from the consolidated trainable state."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.toy_launch import launch
from helpers.trainer_toy import read_export, toy_config, train_toy

# ---------------------------------------------------------------------------
# 2 ranks (torchrun)


def _long_config(run_dir, **extra):
    return toy_config(str(run_dir), train={"max_steps": 12, "lr_scheduler": "cosine", "warmup_ratio": 0.25},
                      checkpoint={"save_every": 6}, **extra)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-3 run of 12 steps (shared by the equivalence and resume tests)."""
    work = tmp_path_factory.mktemp("two_rank")
    summary = launch(work, {"config": _long_config(work / "run")}, nproc=2)
    return work / "run", summary


@pytest.mark.multiproc
def test_two_rank_zero3_equals_single_process(two_rank_run, tmp_path):
    run2, summary2 = two_rank_run
    summary1 = train_toy(_long_config(tmp_path / "run1"))  # 1 rank, micro 2 x accumulation 2 = the same global batch
    assert [h["loss"] for h in summary2["history"]] == pytest.approx([h["loss"] for h in summary1["history"]], abs=1e-5)
    w1, w2 = read_export(tmp_path / "run1"), read_export(run2)
    assert set(w1) == set(w2)
    for name in w1:
        assert torch.allclose(w1[name], w2[name], atol=1e-5), name
    assert summary2["history"][-1]["loss"] < summary2["history"][0]["loss"]


@pytest.mark.multiproc
def test_resume_at_step_6_equals_uninterrupted_run(two_rank_run, tmp_path):
    full_dir, full = two_rank_run
    run = tmp_path / "run"
    first = launch(tmp_path, {"config": _long_config(run), "stop_after": 6}, nproc=2)
    assert (
        first["step"] == 6
        and not first["finished"]
        and (run / "checkpoints" / "latest").read_text().strip() == "step_000006"
    )
    second = launch(tmp_path, {"config": _long_config(run)}, nproc=2)
    assert second["resumed_from"].endswith("step_000006") and second["step"] == 12
    history = first["history"] + second["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    # the same batches in the same order on every rank (data position restored), same lr schedule, same losses
    assert [h["data"] for h in history] == [h["data"] for h in full["history"]]
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in full["history"]], rel=1e-9)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)
    a, b = read_export(run), read_export(full_dir)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert not math.isnan(second["history"][-1]["loss"])


# ---------------------------------------------------------------------------
# preemption and hangs (2 ranks)


@pytest.mark.multiproc
def test_signal_on_one_rank_stops_both_at_one_step_and_the_rerun_equals_uninterrupted(two_rank_run, tmp_path):
    """SIGUSR1 reaches rank 1 only, while it draws step 4's batch: both ranks finish step 4, checkpoint it,
    leave preempted.json and exit 75; the same command again resumes there and ends equal to the uninterrupted run."""
    from mmdist.training.preemption import PREEMPTED_EXIT, read_marker

    full_dir, full = two_rank_run
    run = tmp_path / "run"
    output: list = []
    first = launch(
        tmp_path,
        {"config": _long_config(run), "signal": {"rank": 1, "batch": 3}},
        nproc=2,
        expect_rc=None,
        output=output,
    )
    stdout, stderr = output[0]
    assert first["returncode"] != 0  # torchrun reports the ranks' 75 as a failure; the Slurm scripts read the marker
    assert f"exitcode  : {PREEMPTED_EXIT}" in stderr or f"exitcode: {PREEMPTED_EXIT}" in stderr.replace("  ", " "), (
        stderr[-3000:]
    )
    assert [r["step"] for r in first["ranks"]] == [4, 4] and all(
        r["preempted"] and not r["finished"] for r in first["ranks"]
    )
    assert "SIGUSR1 received" in stderr
    marker = read_marker(run)
    assert (
        marker["step"] == 4 and marker["checkpoint"].endswith("step_000004") and marker["signal"] == "on another rank"
    )
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not (run / "export").exists()  # a stopped run exports nothing

    second = launch(tmp_path, {"config": _long_config(run)}, nproc=2)
    assert second["resumed_from"].endswith("step_000004") and second["step"] == 12 and second["finished"]
    history = first["history"] + second["history"]
    assert [h["step"] for h in history] == list(range(1, 13))
    # the same batches: the same sample multiset
    assert [h["data"] for h in history] == [h["data"] for h in full["history"]]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in full["history"]], abs=1e-6)
    a, b = read_export(run), read_export(full_dir)
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.multiproc
def test_stalled_rank_ends_the_job_with_a_stack_dump(tmp_path):
    """Rank 1 sleeps while drawing step 4's batch: within watchdog.timeout_s (2 s) plus a poll the job ends,
    non-zero, with the stalled frame in the log and in RUN_DIR/stacks/rank00001.txt."""
    import time

    from mmdist.training.watchdog import WATCHDOG_EXIT

    run = tmp_path / "run"
    cfg = _long_config(run, watchdog={"timeout_s": 2, "poll_s": 0.25, "phase_timeout_s": 120})
    output: list = []
    started = time.monotonic()
    result = launch(
        tmp_path,
        {"config": cfg, "stall": {"rank": 1, "batch": 3, "seconds": 300}},
        nproc=2,
        expect_rc=None,
        output=output,
        timeout=200,
    )
    elapsed = time.monotonic() - started
    stdout, stderr = output[0]
    assert result["returncode"] != 0 and elapsed < 150, (result["returncode"], elapsed)
    assert "[mmdist] watchdog: rank 1" in stderr and "hung in the training loop after step 3" in stderr, stderr[-4000:]
    assert f"exitcode  : {WATCHDOG_EXIT}" in stderr or f"exiting with code {WATCHDOG_EXIT}" in stderr
    dump = (run / "stacks" / "rank00001.txt").read_text()
    assert "_run_hooks" in dump and "trainer_toy.py" in dump  # the stalled frame, where it sleeps


# ---------------------------------------------------------------------------
# elastic resume: another world size continues from the consolidated trainable state (that a resume on 2 -> 1 -> 3
# ranks under ZeRO-3 and 4 -> 2 -> 3 under ZeRO-2 equals an uninterrupted run is tested with the real model and its
# data in tests/training/test_elastic_data_position.py and tests/training/test_global_batch_training.py)


def test_checkpoint_without_consolidated_state_is_refused_on_another_world_size(tmp_path):
    """A checkpoint from before trainable_state.pt existed resumes only on its own world size, and says so."""
    from mmdist.training.checkpoint import FILE_LIST, TRAINABLE_STATE, CheckpointError

    run = tmp_path / "run"
    train_toy(toy_config(str(run), train={"max_steps": 2}))
    ckpt = run / "checkpoints" / "step_000002"
    assert (ckpt / TRAINABLE_STATE).is_file()
    (ckpt / TRAINABLE_STATE).unlink()
    client = torch.load(ckpt / "client_state_rank00000.pt", weights_only=False)
    torch.save(dict(client, world_size=2), ckpt / "client_state_rank00000.pt")  # as if 2 ranks had written it
    torch.save(dict(client, world_size=2), ckpt / "client_state_rank00001.pt")
    (ckpt / FILE_LIST).unlink()  # that version wrote no list of the checkpoint's files
    with pytest.raises(
        CheckpointError, match=r"written by 2 rank\(s\) and this run has 1, and it has no trainable_state.pt"
    ):
        train_toy(toy_config(str(run), train={"max_steps": 4}))


def test_zero3_checkpoint_with_the_old_optimizer_groups_resumes_by_parameter_name(tmp_path, monkeypatch, capsys):
    """A checkpoint written by a version that put every ZeRO-3 parameter in a .no_decay group (judged by the
    partition's 1-D shape) and did not record the groups resumes through its consolidated copy into this run's groups,
    and the run ends where an uninterrupted one does (weight decay 0, so the groups change nothing numerically)."""
    import mmdist.training.optimizer as optimizer_module
    from mmdist.training.checkpoint import FILE_LIST, TRAINABLE_STATE

    def config(run):
        return toy_config(str(tmp_path / run), train={"max_steps": 4, "lr_scheduler": "cosine", "warmup_ratio": 0.25},
                          engine={"zero_stage": 3})

    full = train_toy(config("full"))
    with monkeypatch.context() as old:
        old.setattr(optimizer_module, "_no_decay", lambda name, param: param.ndim < 2)  # that version's rule
        train_toy(config("split"), stop_after=2)
    ckpt = tmp_path / "split" / "checkpoints" / "step_000002"
    client_file = ckpt / "client_state_rank00000.pt"
    client = torch.load(client_file, weights_only=False)
    assert all(name.endswith(".no_decay") for name in client.pop("optimizer_groups"))  # that version's layout
    torch.save(client, client_file)  # as that version wrote it: no record of the groups
    (ckpt / FILE_LIST).unlink()  # nor a list of the checkpoint's files
    capsys.readouterr()
    resumed = train_toy(config("split"))
    assert "optimizer groups differ from this run's" in capsys.readouterr().out
    assert [h["lr"] for h in resumed["history"]] == pytest.approx([h["lr"] for h in full["history"][2:]], rel=1e-9)
    a, b = read_export(tmp_path / "split"), read_export(tmp_path / "full")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    (ckpt / TRAINABLE_STATE).unlink()  # without the consolidated copy there is nothing to load by name: a clear error
    from mmdist.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="other parameter groups than this run's"):
        train_toy(dict(config("split"), checkpoint={"resume": str(ckpt)}))
