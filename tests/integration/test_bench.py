"""The benchmark command: its JSON rows, ratios, activation-memory accounting and flag errors (no timings asserted)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from capsdist import bench
from tests.conftest import REPO as ROOT

KEYS = {
    "what",
    "impl",
    "device",
    "precision",
    "batch_size",
    "image_size",
    "iterations",
    "images_per_s",
    "peak_memory_bytes",
}


def test_saved_activation_bytes_counts_distinct_storages_without_parameters():
    weight = torch.nn.Parameter(torch.ones(250))
    x = torch.ones(250, requires_grad=True)
    with bench.saved_activation_bytes([weight]) as total:
        y = x * 2.0
        z = (y * y) * weight  # y saved twice (one storage); y*y saved for weight's grad; weight excluded
    assert total[0] == 250 * 4 * 2
    z.sum().backward()


def test_routing_rows_have_the_contract_keys_and_ratios(capsys):
    bench.main(
        ["--what", "routing", "--precision", "32,bf16-mixed", "--batch-size", "2", "--steps", "2", "--warmup", "0"]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["precision"], r["impl"], r["detach"]) for r in rows] == [
        (p, impl, detach)
        for p in ("32", "bf16-mixed")
        for impl, detach in (("reference", True), ("capsdist", True), ("capsdist", False))
    ]
    for row in rows:
        assert row.keys() >= KEYS and row["images_per_s"] > 0 and row["peak_memory_bytes"] > 0
        assert (row["batch_size"], row["image_size"], row["iterations"]) == (2, 28, 3)
    capsdist_rows = [r for r in rows if r["impl"] == "capsdist"]
    assert all(r["speedup_vs_reference"] > 0 for r in capsdist_rows)
    # bytes, not time: deterministic. In bf16 at batch 2 the batch-independent bf16 copy of W dominates both.
    assert all(r["memory_vs_reference"] <= 0.5 for r in capsdist_rows if r["precision"] == "32")


def test_cli_train_step_prints_json_lines():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "capsdist.bench",
        "--what",
        "train_step",
        "--precision",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--image-size",
        "28",
        "--iterations",
        "2",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["impl"] for r in rows] == ["reference", "capsdist", "capsdist"]
    assert all(r["what"] == "train_step" and r["iterations"] == 2 for r in rows)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--what", "nonsense"], "--what 'nonsense'"),
        (["--precision", "64"], "--precision '64'"),
        (["--cuda-graphs"], "--cuda_graphs needs --device cuda"),
    ],
)
def test_bad_flags_name_the_problem(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert message in capsys.readouterr().err


def test_data_rows_report_samples_per_second(capsys):
    threads = torch.get_num_threads()
    argv = "--what shard_write,shard_read --what onthefly --steps 1 --warmup 1 --data-samples 300 --batch-size 8"
    bench.main(argv.split())
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["what"] for r in rows] == ["shard_write", "shard_read", "onthefly"]
    assert all(row.keys() >= KEYS and row["images_per_s"] > 0 and row["image_size"] == 36 for row in rows)
    assert rows[2]["batch_size"] == 8
    assert torch.get_num_threads() == threads  # the shard benchmark's one-thread pin does not leak


@pytest.mark.gpu
def test_cuda_rows_the_gpu_script_uses(capsys):
    """The colleague's GPU command line, one quick step: model and on-device generation rows on CUDA."""
    argv = "--device cuda --what train_step,onthefly --precision bf16-mixed --batch-size 8 --steps 1 --warmup 0"
    bench.main([*argv.split(), "--channels-last"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["device"] for r in rows} == {"cuda"} and all(r["images_per_s"] > 0 for r in rows)
