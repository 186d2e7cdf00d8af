"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

# The tests run the no-native-bf16 path on every machine (one with AMX too): `auto` precisions resolve to fp32,
# so results do not depend on the CI machine's CPU. Tests of the other branch set MMDIST_CPU_BF16=1 themselves.
os.environ.setdefault("MMDIST_CPU_BF16", "0")
# Every process a test starts (torchrun ranks, Slurm tasks) prints its Python stacks if it dies on a fatal signal:
# a rank that aborts in native code then says where in the CI log, not only "exitcode -6".
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

_DS_ACCELERATOR_AT_START = os.environ.get("DS_ACCELERATOR")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the group into the test id's @suffix
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (CI runs ``-n 2 --dist loadgroup``), every Slurm test runs on one worker: the local cluster
    has fixed ports and one home folder, so two workers must not each start and stop it."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


def pytest_collection_finish(session):
    """No test file may set DS_ACCELERATOR when it is imported: DeepSpeed keeps the first accelerator it picks for
    the process, so a value set while collecting would put every later test (the GPU tier's too) on it."""
    now = os.environ.get("DS_ACCELERATOR")
    if now != _DS_ACCELERATOR_AT_START:
        raise pytest.UsageError(f"collecting the tests changed DS_ACCELERATOR from {_DS_ACCELERATOR_AT_START!r} to "
                                f"{now!r}: set it in a fixture (monkeypatch), not at a test file's import")


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster (installed and started on first use); skips, saying why, if impossible."""
    from helpers.slurm_cluster import SlurmUnavailable, start_cluster

    try:
        cluster = start_cluster()
    except SlurmUnavailable as exc:
        print(f"\nSlurm tests skipped: {exc}")
        pytest.skip(f"no local Slurm cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster_2nodes():
    """Two Slurm nodes, n1 and n2, on this host: a cluster of their own beside the one-node one; skips if impossible."""
    from helpers.slurm_cluster import SlurmUnavailable, start_cluster

    try:
        cluster = start_cluster(nodes=2)
    except SlurmUnavailable as exc:
        print(f"\nTwo-node Slurm tests skipped: {exc}")
        pytest.skip(f"no local two-node Slurm cluster: {exc}")
    yield cluster
    cluster.stop()


def _mapped_files() -> set[str]:
    """Files some live process of this machine has mapped (from /proc/*/maps; those not readable are skipped)."""
    from pathlib import Path

    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(line.split(maxsplit=5)[-1] for line in maps.read_text().splitlines() if "/dev/shm/" in line)
        except (OSError, IndexError):
            continue
    return mapped


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_deepspeed_shm_buffers():
    """Ranks killed on purpose (SIGKILL tests) cannot unlink DeepSpeed's 66 MB /dev/shm all-reduce buffer
    (mmdist.training.engine.EngineBundle.close does it on a normal exit); remove those this test run made and no
    live process maps (another pytest-xdist worker's ranks may still be using theirs)."""
    import os
    import time
    from pathlib import Path

    start = time.time()
    yield
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*"
    in_use = _mapped_files()
    for path in Path("/dev/shm").glob(pattern):
        try:
            if path.stat().st_mtime >= start - 1 and str(path) not in in_use:
                path.unlink()
        except OSError:
            pass
