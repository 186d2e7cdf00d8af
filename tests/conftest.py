"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster (installed and started on first use); skips, saying why, if impossible."""
    from slurm_cluster import SlurmUnavailable, start_cluster

    try:
        cluster = start_cluster()
    except SlurmUnavailable as exc:
        print(f"\nSlurm tests skipped: {exc}")
        pytest.skip(f"no local Slurm cluster: {exc}")
    yield cluster
    cluster.stop()
