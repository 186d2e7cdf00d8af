"""Two real processes (gloo): uneven shards, one all_reduce per batch; both ranks finish (no hang) with equal counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.data_fixtures import write_caption_shards

from mmdist.launch_env import free_port

pytestmark = pytest.mark.multiproc

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from helpers.data_fixtures import make_config, make_processors
    from mmdist.data.loader import build_loader

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = make_config({pattern!r}, num_workers=2, micro_batch_size=3, shuffle_buffer=8, persistent_workers=False)
        loader = build_loader(cfg, make_processors(), "train", rank, world)
        keys, steps = [], 0
        for batch in loader:
            total = torch.tensor([float(batch["input_ids"].shape[0])])
            dist.all_reduce(total)  # a collective every step: a rank with fewer batches would hang the other
            keys.extend(loader.last_keys)
            steps += 1
        dist.barrier()
        json.dump({{"steps": steps, "len": len(loader), "keys": keys}}, open({out!r} + f".{{rank}}", "w"))
    finally:
        dist.destroy_process_group()
''')



def test_two_ranks_uneven_shards_finish_together(tmp_path):
    pattern = write_caption_shards(tmp_path / "shards", [3, 17, 5, 11, 29, 2])
    out = str(tmp_path / "result")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(pattern=pattern, out=out))
    repo = Path(__file__).resolve().parents[2]
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests"), os.environ.get("PYTHONPATH", "")])}
        procs.append(
            subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=120)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung: the ranks did not get the same number of batches")
    assert all(p.returncode == 0 for p in procs), "\n".join(outputs)
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert results[0]["steps"] == results[1]["steps"] == results[0]["len"] == -(-67 // 6)
    assert not set(results[0]["keys"]) & set(results[1]["keys"]), "ranks read disjoint shards"
