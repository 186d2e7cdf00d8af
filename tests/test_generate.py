"""`mmdist generate`: answer parsing, prompt rendering identical to training, and the CLI on a trained export.

The trained export comes from a short stage-2 run of the tiny recipe
(configs/tiny_fuse.yaml) on the demo shards, through the library trainer.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mmdist import generate
from mmdist.commands import generate as generate_command

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text, digit", [
    ("seven", 7), ("Seven.", 7), (" 7", 7), ("zero\n", 0), ("nine, I think", 9),
    ("", None), ("the digit seven", None), ("seventeen", None), ("12", None), ("<unk>", None),
])
def test_parse_digit(text, digit):
    assert generate.parse_digit(text) == digit


def test_missing_export_is_reported(tmp_path, capsys):
    image = tmp_path / "x.png"
    code = generate_command.main(["--run", str(tmp_path), "--image", str(image)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no stage-2 export" in err and str(tmp_path) in err


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A stage-2 export of the tiny recipe trained for a few steps on the demo shards (seconds)."""
    import os

    with pytest.MonkeyPatch.context() as patch:  # DeepSpeed's CPU accelerator for this run, not for later tests
        patch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
        return _tiny_export(tmp_path_factory)


def _tiny_export(tmp_path_factory):
    from mmdist.config.run import load_config
    from mmdist.data.shards import write_demo_shards
    from mmdist.training.loop import train

    root = tmp_path_factory.mktemp("gen")
    write_demo_shards(root / "shards", image_size=28, limit=40)
    cfg = load_config(REPO / "configs" / "tiny_fuse.yaml", [
        f"run_dir={root / 'fuse'}", "train.max_steps=3", "train.global_batch_size=4", "train.micro_batch_size=4",
        "engine.zero_stage=2", "log.progress_bar=false", "log.tensorboard=false", "checkpoint.save_every=0",
        f"data.train=[{{shards: ['{root / 'shards' / 'train' / 'train-000000.tar'}']}}]",
        f"data.eval=[{{shards: ['{root / 'shards' / 'eval' / 'eval-000000.tar'}']}}]",
    ])
    summary = train(cfg)
    assert summary["finished"]
    return root


def test_prompt_is_rendered_as_in_training(tiny_export):
    from mmdist.data.loader import build_loader

    model = generate_command.load_model(tiny_export / "fuse")
    batch = next(iter(build_loader(model.run_config, model.processors, "eval")))
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    start = int((labels != -100).nonzero()[0])
    # the demo conversations ask "<image>\nWhat digit is this?"
    assert generate.prompt_ids(model, "What digit is this?") == ids[:start].tolist()
    assert generate.prompt_ids(model, "<image>\nWhat digit is this?") == ids[:start].tolist()
    assert ids[:start].tolist().count(model.image_token_id) == model.num_image_tokens


def test_generate_cli_answers_on_the_export(tiny_export, capsys):
    from PIL import Image

    image_path = next((tiny_export / "shards").rglob("*.tar"))
    import tarfile

    with tarfile.open(image_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
        (tiny_export / "digit.png").write_bytes(tar.extractfile(member).read())
    for run in (tiny_export / "fuse", tiny_export / "fuse" / "export"):  # a run folder or its export
        code = generate_command.main(
            [
                "--run",
                str(run),
                "--image",
                str(tiny_export / "digit.png"),
                "--prompt",
                "What digit is this?",
                "--max-new-tokens",
                "4",
            ]
        )
        assert code == 0
        printed = capsys.readouterr().out
        model = generate_command.load_model(run)
        expected = generate.answer_images(
            model, [Image.open(tiny_export / "digit.png")], "What digit is this?", max_new_tokens=4
        )[0]
        assert printed.endswith(expected + "\n")  # greedy: the CLI prints exactly the model's answer


def test_unreadable_image_is_reported(tiny_export, capsys):
    bad = tiny_export / "not_an_image.png"
    bad.write_text("hello")
    code = generate_command.main(["--run", str(tiny_export / "fuse"), "--image", str(bad)])
    assert code == 2
    assert "cannot read it as an image" in capsys.readouterr().err
