"""`python -m capsdist.bench.memory`: measured peak memory in fresh processes, streaming routing well below default."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two fresh torch processes: ~10-25 s on 2 cores
def test_chunked_peak_is_a_fraction_of_the_default():
    out = subprocess.run(
        [sys.executable, "-m", "capsdist.bench.memory", "--default", "2048", "--chunked", "2048", "--ratio",
         "--batch", "16", "--chunk-size", "64"],  # fmt: skip
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    default, chunked = rows
    assert (default["chunk_size"], chunked["chunk_size"]) == (None, 64)
    priors = 16 * 2048 * 32 * 16 * 4
    assert default["priors_bytes"] == priors and default["peak_bytes"] >= priors  # at least the priors themselves
    # d priors written over the priors (2.4x when accumulated beside them, 4.1x with a temporary per round);
    # W's gradient, 0.5x the priors at batch 16, is in both peaks
    assert default["peak_bytes"] <= 2 * priors
    assert chunked["peak_bytes"] <= default["peak_bytes"] / 2
    assert chunked["peak_bytes"] >= chunked["weight_bytes"]  # W's gradient is part of the step
