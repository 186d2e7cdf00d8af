"""A true two-node torchrun job on this machine: two agents, a c10d rendezvous, ZeRO-3, checkpoint and resume.

Each "node" is its own ``torchrun --nnodes 2`` agent with one rank, its own
TMPDIR (node-local scratch) and the same run folder (the shared filesystem of a
cluster). The job must behave as one job: two distinct ranks in a world of 2,
losses equal to a single agent's 2-rank run, one checkpoint and one export per
step and run (rank 0's files; every rank's own shard once), one metrics record
per step, nothing of the run in node-local scratch, and a second pair of agents
resuming the checkpoint to the uninterrupted result. A run folder that is not
shared (each node its own, as on node-local storage) is refused on every rank,
at the first checkpoint and at a resume, instead of publishing a checkpoint
without the other node's shards or letting the nodes start from different steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers.toy_launch import launch, launch_nodes, node_local_supported
from helpers.trainer_toy import toy_config
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]
STEPS, SAVE_AT = 8, 4


def _config(run_dir) -> dict:
    return toy_config(str(run_dir), train={"max_steps": STEPS, "lr_scheduler": "cosine", "warmup_ratio": 0.25},
                      checkpoint={"save_every": SAVE_AT, "keep_last": 5})


def _check_written_once(run_dir, steps: list[int], world: int) -> None:
    """The run folder holds each file once: rank 0's logs and consolidated state, one shard file per rank."""
    ckpts = run_dir / "checkpoints"
    # DeepSpeed's recovery scripts next to the checkpoints, nothing per node
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["latest", "zero_to_fp32.py", "zero_to_torch.py",
                                                              *(f"step_{s:06d}" for s in steps)])
    for step in steps:
        folder = ckpts / f"step_{step:06d}"
        names = sorted(p.name for p in folder.iterdir())
        assert names.count("trainable_state.pt") == 1
        assert [n for n in names if n.startswith("client_state_rank")] == [
            f"client_state_rank{r:05d}.pt" for r in range(world)
        ]
        for kind in ("model", "optim"):  # one ZeRO-3 partition per rank
            assert [n for n in names if n.endswith(f"_{kind}_states.pt")] == [
                f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in range(world)]
        assert not [n for n in names if n.endswith(".part")], names
    records = [
        json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.startswith("{")
    ]
    train_steps = [r["step"] for r in records if r.get("split", "train") == "train" and "loss" in r]
    assert train_steps == sorted(set(train_steps)), train_steps  # one record per step: one writer
    assert (run_dir / "config.yaml").is_file()
    assert not list(run_dir.glob("*.tmp")) and not list(ckpts.glob(".tmp-*"))


def test_two_torchrun_agents_rendezvous_checkpoint_and_resume(tmp_path):
    run = tmp_path / "run"
    first = launch_nodes(tmp_path / "part1", {"config": _config(run), "stop_after": SAVE_AT})
    ranks = first["ranks"]
    assert sorted(int(r["launch"]["RANK"]) for r in ranks) == [0, 1]
    assert {r["launch"]["WORLD_SIZE"] for r in ranks} == {"2"} and {r["launch"]["LOCAL_WORLD_SIZE"] for r in ranks} == {
        "1"
    }
    # one rank per agent: the rendezvous gave the two nodes distinct node ranks, and each rank came from another agent
    assert sorted(int(r["launch"]["GROUP_RANK"]) for r in ranks) == [0, 1]
    assert sorted(r["launch"]["MMDIST_TEST_NODE"] for r in ranks) == ["0", "1"]
    roll_call = "".join(out for out, _ in first["outputs"])
    assert (
        "[mmdist] 2 ranks on 2 node(s) (torchrun, master " in roll_call
        and "node 0 (" in roll_call
        and "node 1 (" in roll_call
    )
    assert first["step"] == SAVE_AT and not first["finished"]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{SAVE_AT:06d}"
    _check_written_once(run, [SAVE_AT], world=2)

    second = launch_nodes(tmp_path / "part2", {"config": _config(run)})
    assert second["resumed_from"].endswith(f"step_{SAVE_AT:06d}") and second["step"] == STEPS and second["finished"]
    assert all(r["step"] == STEPS for r in second["ranks"])
    _check_written_once(run, [SAVE_AT, STEPS], world=2)
    assert sorted(p.name for p in (run / "export").iterdir()) == ["manifest.json", "model.safetensors"]
    # node-local scratch: nothing of the run went there, nothing was read from another node's
    for part in ("part1", "part2"):
        for node in (0, 1):
            assert not any((tmp_path / part / f"node{node}-tmp").rglob("*.safetensors"))
            assert not any((tmp_path / part / f"node{node}-tmp").rglob("*.pt"))

    # the reference: one agent, 2 ranks, uninterrupted
    ref_dir = tmp_path / "ref"
    ref = launch(tmp_path / "ref_work", {"config": _config(ref_dir)}, nproc=2)
    history = first["history"] + second["history"]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert [h["data"] for h in history] == [h["data"] for h in ref["history"]]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in ref["history"]], abs=1e-6)
    assert [h["lr"] for h in history] == pytest.approx([h["lr"] for h in ref["history"]], rel=1e-9)
    a, b = (
        load_file(str(run / "export" / "model.safetensors")),
        load_file(str(ref_dir / "export" / "model.safetensors")),
    )
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)



node_local = pytest.mark.skipif(not node_local_supported(), reason="needs root and unshare --mount for per-node mounts")


@node_local
def test_run_folder_on_node_local_storage_is_refused_at_the_first_checkpoint(tmp_path):
    """run_dir on node-local storage (the same path, another disk per node): nothing is published."""
    run, work = tmp_path / "run", tmp_path / "work"
    spec = {"config": _config(run), "stop_after": SAVE_AT}
    result = launch_nodes(work, spec, expect_ok=False, env={"MMDIST_SHARED_WAIT_S": "2"}, node_local=[run])
    assert all(code != 0 for code in result["returncodes"]), result["returncodes"]
    err = "".join(e for _, e in result["outputs"])
    assert "the run folder is not shared by every node" in err and "nothing was published" in err, err[-4000:]
    for node in (0, 1):
        ckpts = work / f"node{node}-local" / "0" / "checkpoints"
        assert not (ckpts / "latest").exists() and not list(ckpts.glob("step_*"))


@node_local
def test_ranks_that_see_different_checkpoints_refuse_to_resume(tmp_path):
    run, work = tmp_path / "run", tmp_path / "work"
    # node 0's disk holds a checkpoint, node 1's is empty: node-local run folders after a restart
    node0 = work / "node0-local" / "0"
    launch(tmp_path / "first", {"config": _config(node0), "stop_after": SAVE_AT}, nproc=2)
    result = launch_nodes(work, {"config": _config(run)}, expect_ok=False, node_local=[run])
    assert all(code != 0 for code in result["returncodes"]), result["returncodes"]
    err = "".join(e for _, e in result["outputs"])
    assert "the ranks disagree on the checkpoint to resume" in err and "no checkpoint" in err, err[-4000:]
    assert f"step_{SAVE_AT:06d}" in err
    assert (node0 / "checkpoints" / "latest").read_text().strip() == f"step_{SAVE_AT:06d}"
