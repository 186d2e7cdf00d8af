"""A stage-2 run whose connector is a Q-Former answers and is measured from its export alone.

Tiny align (Q-Former, trainable text encoder) then tiny fuse on the same
connector, both through the library trainer on the demo shards; the stage-1
folder is then removed, so `mmdist generate` and `mmdist eval` can only read the
stage-2 export (which carries the stage-1 weights and manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QFORMER = ("model.connector.type=qformer", "model.text.freeze=false")


def _train(stage: str, root: Path, *over: str) -> Path:
    from mmdist.config.run import load_config
    from mmdist.training.loop import train

    cfg = load_config(
        REPO / "configs" / f"tiny_{stage}.yaml",
        [
            f"run_dir={root / stage}",
            "train.max_steps=2",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
            "engine.zero_stage=2",
            "log.progress_bar=false",
            "log.tensorboard=false",
            "checkpoint.save_every=0",
            "train.eval_every=0",
            f"data.train=[{{shards: ['{root / 'shards' / 'train' / 'train-000000.tar'}']}}]",
            f"data.eval=[{{shards: ['{root / 'shards' / 'eval' / 'eval-000000.tar'}']}}]",
            *QFORMER,
            *over,
        ],
    )
    assert train(cfg)["finished"]
    return root / stage


def test_generate_and_eval_on_a_qformer_stage2_export(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))  # for this test only
    from mmdist.commands import eval as eval_command
    from mmdist.commands import generate as generate_command
    from mmdist.data.shards import write_demo_shards

    write_demo_shards(tmp_path / "shards", image_size=28, limit=40)
    align = _train("align", tmp_path)
    fuse = _train("fuse", tmp_path, f"model.connector.stage1_weights={align / 'export'}")
    manifest = json.loads((fuse / "export" / "manifest.json").read_text())
    assert manifest["connector"]["type"] == "qformer" and manifest["stage1"]["stage"] == "align"
    shutil.rmtree(align)  # the stage-2 export alone must be enough

    eval_shard = tmp_path / "shards" / "eval" / "eval-000000.tar"
    with tarfile.open(eval_shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        (tmp_path / "digit.png").write_bytes(tar.extractfile(member).read())
    capsys.readouterr()
    image = str(tmp_path / "digit.png")
    assert (
        generate_command.main(["--run", str(fuse), "--image", image, image, "--max-new-tokens", "4", "--device", "cpu"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{image}: ") for line in lines), lines  # one answer per image

    assert (
        eval_command.main(
            [
                "--run",
                str(fuse),
                "--data",
                str(eval_shard),
                "--max-samples",
                "4",
                "--batch-size",
                "4",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "eval"),
                "data.num_workers=0",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (
        metrics["stage"] == "fuse" and metrics["samples"] == 4 and 0.0 <= metrics["exact"] <= metrics["contains"] <= 1.0
    )
    answers = [json.loads(line) for line in (tmp_path / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(isinstance(a["answer"], str) and a["reference"] for a in answers)
