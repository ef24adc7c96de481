"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm_cluster import SlurmCluster, ensure_installed


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A real single-host SLURM cluster (see tests/slurm_cluster.py), started once per session."""
    reason = ensure_installed()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM must run in CI: {reason}")
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()
