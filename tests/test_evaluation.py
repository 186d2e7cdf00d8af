"""Evaluation that measures answers (mmdist/evaluation/): R@k,
answer matching, batched KV-cache generation, `mmdist eval`.

Tiny stage-1 and stage-2 exports come from a few steps of the tiny recipes on 40 demo digits (seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmdist import evaluation
from mmdist.commands import eval as eval_command
from mmdist.materialize import load_export_model, load_inference_model

REPO = Path(__file__).resolve().parent.parent


# --- answer matching ---------------------------------------------------------


@pytest.mark.parametrize("answer, reference, exact, contains", [
    ("The Seven.", "seven", True, True),
    ("  a  cat, sat ", "cat sat", True, True),
    ("it is seven", "seven", False, True),
    ("seventeen", "seven", False, False),  # whole words only
    ("", "seven", False, False),
    ("seven", "", False, False),
])
def test_score_answer_normalises_as_squad(answer, reference, exact, contains):
    assert evaluation.score_answer(answer, reference) == (exact, contains)


def test_score_answer_with_a_parser_never_matches_none():
    from mmdist.generate import parse_digit

    assert evaluation.score_answer("Seven.", "seven", parse_digit) == (True, True)
    assert evaluation.score_answer("???", "???", parse_digit) == (False, False)


# --- recall at k ---------------------------------------------------------------


def test_recall_at_k_on_a_hand_made_set():
    # 4 queries x 5 gallery items; the correct item's rank is 0, 1, 2 and (query 3) absent.
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.0, 0.0],
                        [0.5, 0.9, 0.0, 0.0, 0.0],
                        [0.8, 0.9, 0.7, 0.0, 0.0],
                        [0.1, 0.2, 0.3, 0.4, 0.5]])
    correct = torch.zeros(4, 5, dtype=torch.bool)
    correct[0, 0] = correct[1, 0] = correct[2, 2] = True
    assert evaluation.recall_at_k(sim, correct, (1, 2, 3, 5)) == {1: 0.25, 2: 0.5, 3: 0.75, 5: 0.75}


def test_recall_at_k_breaks_ties_by_gallery_order():
    sim = torch.ones(1, 3)
    correct = torch.tensor([[False, False, True]])
    assert evaluation.recall_at_k(sim, correct, (1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_retrieval_metrics_count_a_repeated_caption_once():
    # images 0 and 2 share caption 0; a caption query is right when any image with it ranks within k.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    m = evaluation.retrieval_metrics(image, text, torch.tensor([0, 1, 0]), ks=(1,))
    assert m["i2t_r1"] == 1.0 and m["t2i_r1"] == 1.0 and m["i2t_chance_r1"] == 0.5


# --- tiny exports ----------------------------------------------------------------


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
            *over,
        ],
    )
    assert train(cfg)["finished"]
    return root / stage


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Stage-1 and stage-2 exports of the tiny recipes, the stage-2 run measuring its answers while it trains."""
    with pytest.MonkeyPatch.context() as patch:  # DeepSpeed's CPU accelerator for these runs, not for later tests
        patch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
        return _tiny_runs(tmp_path_factory)


def _tiny_runs(tmp_path_factory):
    from mmdist.data.shards import write_demo_shards

    root = tmp_path_factory.mktemp("evalruns")
    write_demo_shards(root / "shards", image_size=28, limit=40)
    align = _train("align", root, "train.eval_metrics=true")
    fuse = _train("fuse", root, "train.eval_metrics=true", "train.eval_max_samples=4")
    from mmdist.data.reader import read_tar

    shard = str(root / "shards" / "eval" / "eval-000000.tar")
    return {"root": root, "align": align, "fuse": fuse, "eval": shard, "n_eval": sum(1 for _ in read_tar(shard))}


def _loader(model, shards, batch_size):
    from mmdist.data.loader import build_loader

    cfg = evaluation.eval_config(model.run_config, batch_size, [shards])
    return cfg, build_loader(cfg, model.processors, "eval")


def test_training_logs_the_metrics(tiny_runs):
    for stage, key in (("align", "i2t_r1"), ("fuse", "exact")):
        records = [json.loads(line) for line in (tiny_runs[stage] / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in records if f"eval/{key}" in r or r.get("split") == "eval" and key in r]
        assert evals, f"no eval/{key} in {tiny_runs[stage] / 'metrics.jsonl'}: {records[-1]}"
    lines = (tiny_runs["fuse"] / "eval" / "answers_step000002.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(json.loads(lines[0])) == {
        "key",
        "question",
        "reference",
        "answer",
        "exact",
        "contains",
    }


def test_retrieval_equals_brute_force(tiny_runs):
    model = load_export_model(tiny_runs["align"])
    cfg, loader = _loader(model, tiny_runs["eval"], 6)
    got = evaluation.evaluate_retrieval(model, loader)
    # brute force: one sample at a time, python loops over the ranks
    _, loader = _loader(model, tiny_runs["eval"], 1)
    seen: dict[str, tuple] = {}
    tok = model.processors.text_tokenizer
    for batch, keys in evaluation.batches_with_keys(loader):
        image, text = evaluation.align_embeddings(model, batch)
        caption = tok.decode(batch["text_input_ids"][0].tolist(), skip_special_tokens=True).strip()
        seen.setdefault(keys[0], (torch.nn.functional.normalize(image[0], dim=-1),
                                  torch.nn.functional.normalize(text[0], dim=-1), caption))
    samples = [seen[k] for k in sorted(seen)]
    captions = sorted({c for _, _, c in samples})
    text_of = {c: next(t for _, t, cc in samples if cc == c) for c in captions}
    assert got["samples"] == len(samples) == tiny_runs["n_eval"] and got["captions"] == len(captions)
    for k in (1, 5, 10):
        hits = 0
        for image, _, caption in samples:
            scores = sorted(((float(image @ text_of[c]), c) for c in captions), key=lambda s: -s[0])
            hits += caption in [c for _, c in scores[:k]]
        assert got[f"i2t_r{k}"] == pytest.approx(hits / len(samples))
        hits = 0
        for c in captions:
            scores = sorted(((float(image @ text_of[c]), cap) for image, _, cap in samples), key=lambda s: -s[0])
            hits += c in [cap for _, cap in scores[:k]]
        assert got[f"t2i_r{k}"] == pytest.approx(hits / len(captions))


def test_answer_accuracy_with_forced_answers(tiny_runs, monkeypatch, tmp_path):
    import mmdist.generate as generate

    model = load_inference_model(tiny_runs["fuse"])
    cfg, loader = _loader(model, tiny_runs["eval"], 8)
    forced = iter(["The Seven!", "it is a seven", "nonsense"] * 100)

    def fake_answer_batch(model, prompts, **kwargs):
        return [next(forced) for _ in prompts]

    monkeypatch.setattr(generate, "answer_batch", fake_answer_batch)
    got = evaluation.evaluate_answers(model, loader, max_samples=7, jsonl_path=tmp_path / "a.jsonl")
    records = got["records"]
    assert got["samples"] == len(records) == 7 and records == sorted(records, key=lambda r: r["key"])
    for r in records:
        assert r["question"] == "What digit is this?"  # the plain template: the prompt's text, image tokens dropped
        assert (r["exact"], r["contains"]) == evaluation.score_answer(r["answer"], r["reference"])
    assert got["exact"] == sum(r["exact"] for r in records) / 7
    assert got["contains"] == sum(r["contains"] for r in records) / 7
    written = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert written == records


def test_batched_cached_generation_equals_one_by_one_without_cache(tiny_runs):
    from mmdist.generate import answer_batch

    model = load_export_model(tiny_runs["fuse"])
    _, loader = _loader(model, tiny_runs["eval"], 8)
    batch = next(iter(loader))
    prompts = [
        evaluation.split_last_turn(i, lab, m)[0]
        for i, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])
    ]
    prompts[1] = prompts[1][:-1]  # unequal lengths: left padding is exercised
    batched = answer_batch(model, prompts, pixel_values=batch["pixel_values"], max_new_tokens=6)
    for row, prompt in enumerate(prompts):
        alone = answer_batch(
            model, [prompt], pixel_values=batch["pixel_values"][row : row + 1], max_new_tokens=6, use_cache=False
        )
        assert alone == [batched[row]]


def test_eval_cli_writes_metrics_and_answers(tiny_runs, tmp_path, capsys):
    out = tmp_path / "fuse"
    assert (
        eval_command.main(
            [
                "--run",
                str(tiny_runs["fuse"]),
                "--data",
                tiny_runs["eval"],
                "--batch-size",
                "8",
                "--max-new-tokens",
                "4",
                "--device",
                "cpu",
                "--out",
                str(out),
                "data.num_workers=0",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["stage"] == "fuse"
        and metrics["samples"] == tiny_runs["n_eval"]
        and 0.0 <= metrics["exact"] <= metrics["contains"] <= 1.0
    )
    assert len((out / "answers.jsonl").read_text().splitlines()) == tiny_runs["n_eval"]
    assert eval_command.main(["--run", str(tiny_runs["align"]), "--data", tiny_runs["eval"], "--max-samples", "5",
                                "--device", "cpu", "data.num_workers=0"]) == 0
    metrics = json.loads((tiny_runs["align"] / "eval" / "metrics.json").read_text())
    assert metrics["stage"] == "align" and metrics["samples"] == 5 and {"i2t_r1", "t2i_r10"} <= set(metrics)
    assert "i2t R@1/5/10" in capsys.readouterr().out


def test_eval_cli_refuses_a_folder_without_export(tmp_path, capsys):
    assert eval_command.main(["--run", str(tmp_path), "--data", "x.tar"]) == 2
    assert "manifest" in capsys.readouterr().err


DIST_SCRIPT = """
import sys
import torch.distributed
from mmdist import distributed as dist
from mmdist.commands import eval as eval_command
dist.init(backend="gloo")
for stage, out in (("align", sys.argv[2]), ("fuse", sys.argv[3])):
    assert eval_command.main(["--run", f"{sys.argv[1]}/{stage}", "--data", sys.argv[4], "--batch-size", "4",
                                "--max-new-tokens", "4", "--device", "cpu", "--out", out, "data.num_workers=0"]) == 0
    torch.distributed.barrier()  # every rank done with this stage before the next (rank 0 writes its files)
dist.shutdown()
"""


@pytest.mark.multiproc
def test_distributed_eval_equals_single_process(tiny_runs, tmp_path):
    script = tmp_path / "dist_eval.py"
    script.write_text(DIST_SCRIPT)
    one, two = tmp_path / "one", tmp_path / "two"
    for stage in ("align", "fuse"):
        assert (
            eval_command.main(
                [
                    "--run",
                    str(tiny_runs[stage]),
                    "--data",
                    tiny_runs["eval"],
                    "--batch-size",
                    "4",
                    "--max-new-tokens",
                    "4",
                    "--device",
                    "cpu",
                    "--out",
                    str(one / stage),
                    "data.num_workers=0",
                ]
            )
            == 0
        )
    env = dict(
        os.environ,
        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    from mmdist.launch_env import free_port

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            str(script),
            str(tiny_runs["root"]),
            str(two / "align"),
            str(two / "fuse"),
            tiny_runs["eval"],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("align", "fuse"):
        a = json.loads((one / stage / "metrics.json").read_text())
        b = json.loads((two / stage / "metrics.json").read_text())
        assert a == b
    assert (one / "fuse" / "answers.jsonl").read_text() == (two / "fuse" / "answers.jsonl").read_text()
