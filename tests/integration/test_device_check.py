"""scripts/device_check.sh in its CPU smoke mode: every stage runs, and what it reports is what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from capsdist.model.capsnet import load_weights
from capsdist.tools.pretrained import mnist_hits
from capsdist.training.diagnostics import train_flops_per_image
from capsdist.training.module import CapsNetModule

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_device_check_smoke_runs_every_stage_and_ships_a_loadable_model(tmp_path):
    env = {**os.environ, "DEVICE_CHECK_SMOKE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["bash", "scripts/device_check.sh", "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + (tmp_path / "device_check.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    assert rows == [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_what: dict[str, list[dict]] = {}
    for row in rows:
        assert {"what", "device_name", "torch"} <= set(row)
        by_what.setdefault(row["what"], []).append(row)
    tests = by_what["gpu_tests"][0]
    assert tests["exit_code"] == 0 and tests["passed"] >= 6 and not tests["failed_tests"]
    train = by_what["train_mnist"][0]
    assert train["exit_code"] == 0 and train["steps"] == 32 and len(train["val_curve"]) == 2
    measured = {(r["precision"], r["impl"]) for r in by_what["train_step"]}
    assert measured >= {("32", "reference"), ("32", "capsdist"), ("bf16-mixed", "capsdist")}
    assert by_what["onthefly"][0]["images_per_s"] > 0
    assert {r["chunk_size"] for r in by_what["routing_memory"]} == {None, 64} and by_what["routing_time_ratio"]
    tta = by_what["time_to_accuracy"][0]
    assert tta["validations"] == 2 and "seconds_to_99.6" in tta and "seconds_to_99.65" in tta
    service = by_what["service"][0]
    assert service["batch_size"] == 8 and service["cli_images_per_s"] > 0 and service["ratio"] > 0
    multimnist = by_what["multimnist"][0]
    assert multimnist["exit_code"] == 0 and 0 <= multimnist["test_error"] <= 1
    # the paper's MultiMNIST run: a row per validation (every 2 of 4 steps at batch 16), then the FLOP estimate
    paper, estimate = by_what["multimnist_paper_val"], by_what["multimnist_paper_estimate"][0]
    assert by_what["multimnist_paper"][0]["exit_code"] == 0
    assert [(r["steps"], r["images_seen"]) for r in paper] == [(2, 32), (4, 64)]
    assert all(0 <= r["val_acc"] <= r["val_digit_acc"] <= 1 and r["images_per_s"] > 0 for r in paper)
    assert paper[0]["wall_s"] < paper[1]["wall_s"] and estimate["images_seen"] == 64
    assert estimate["train_flops_per_image"] == paper_model_flops()
    assert estimate["paper_flops"] == estimate["train_flops_per_image"] * 60_000_000
    hours = 60_000_000 / estimate["train_images_per_s"] / 3600
    assert estimate["paper_hours_at_train_rate"] == pytest.approx(hours, rel=0.01)
    assert by_what["done"][0]["failures"] == 0
    # the exported file holds what the row says: its weights score the recorded accuracy on the test digits
    shipped = by_what["pretrained"][0]
    model, meta = load_weights(tmp_path / "capsnet-mnist.safetensors")
    assert meta["global_step"] == train["steps"] and meta["test_correct"] == shipped["test_correct"]
    assert int(mnist_hits(model, limit=1000).sum()) == meta["first_1000_correct"]
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())


def paper_model_flops() -> int:
    """Training FLOPs per image of the smoke run's paper-config model, as the training CLI counts them."""
    module = CapsNetModule(num_targets=2, image_size=36, conv_channels=8, primary_channels=4, decoder_hidden=[16])
    return train_flops_per_image(module)


def test_stages_choose_what_runs(tmp_path):
    """--stages env runs the environment stage alone; an unknown stage is refused, naming the choices."""
    env = {**os.environ, "DEVICE_CHECK_SMOKE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        ["bash", "scripts/device_check.sh", "--out", str(tmp_path), "--stages", "env"],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    assert [r["what"] for r in rows] == ["env", "done"]
    bad = subprocess.run(
        ["bash", "scripts/device_check.sh", "--stages", "env,nope"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "'nope' is not one of env,tests,train" in bad.stderr
