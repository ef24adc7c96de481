"""The shipped weights through the user's commands: evaluate, figures and fine-tuning from them."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from capsdist.model.capsnet import load_weights
from capsdist.tools import pretrained
from capsdist.tools.pretrained import mnist_hits
from capsdist.training import cli as train
from tests.conftest import REPO, refused, subprocess_env, tiny_checkpoint

WEIGHTS = REPO / "pretrained" / "capsnet-mnist.safetensors"


def run(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    """`python -m ...` as a user runs it, from the repository root."""
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=subprocess_env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def first_500_correct() -> int:
    """Digits of the first 500 test images the shipped model gets right, scored by plain CapsNet + IDX reader."""
    model, _ = load_weights(WEIGHTS)
    return int(mnist_hits(model, limit=500).sum())


def test_evaluate_weights_agrees_with_the_independent_scorer(first_500_correct):
    """evaluate --weights scores as the independent scorer does; stdout is the JSON result alone, progress lines
    go to stderr (plain lines where it is not a terminal)."""
    done = run("capsdist.evaluate", "--weights", str(WEIGHTS), "--data.val_samples", "500", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["source"] == "mnist" and result["samples"] == 500
    assert round(result["acc"] * 500) == first_500_correct
    assert re.search(r"^evaluate: 500/500 images \(100%\), [\d,]+ images/s, ETA 0:00:00$", done.stderr, re.M)
    assert "\r" not in done.stderr, done.stderr


def test_pretrained_check_shows_progress_on_stderr(capsys: pytest.CaptureFixture) -> None:
    """`pretrained check` (and export, which scores the same way) prints progress lines on stderr while its
    stdout stays one JSON object."""
    pretrained.main(["check", "--weights", str(WEIGHTS), "--limit", "64", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert json.loads(out)["test_digits"] == 64
    assert err.startswith("pretrained check: 64/64 images (100%)"), err


def test_figures_from_weights_draw_the_perturbation_grid(tmp_path):
    done = run("capsdist.figures", "--weights", str(WEIGHTS), "--out", str(tmp_path), "--count", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    grid = np.asarray(Image.open(tmp_path / "perturbation.png").convert("L"), dtype=np.float32) / 255
    assert grid.shape[0] > grid.shape[1] / 2  # 16 rows of tweaks per digit, side by side
    assert 0.05 < grid.mean() < 0.6 and grid.max() == 1.0  # drawn digits, not a blank or saturated canvas


def test_training_starts_from_the_shipped_weights_and_refuses_a_misfit(tmp_path, first_500_correct, capsys):
    """validate from the shipped weights scores as the independent scorer; a model they do not fit is refused (in
    this process: the refusal comes before any work)."""
    common = ["--config", str(REPO / "configs" / "mnist.yaml"), "--model.init_weights", str(WEIGHTS)]
    common += ["--wandb_mode", "disabled"]
    common += ["--trainer.accelerator", "cpu", "--trainer.precision", "32", "--trainer.enable_progress_bar", "false"]
    done = run("capsdist.train", "validate", *common, "--data.val_samples", "500", "--data.num_workers", "0",
               "--trainer.default_root_dir", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(next((tmp_path / "run" / "csv").glob("version_*/metrics.csv")).open()))
    assert round(float(rows[-1]["val/acc"]) * 500) == first_500_correct
    misfit = refused(train.main, ["validate", *common, "--model.conv_channels", "64", "--trainer.default_root_dir",
                                  str(tmp_path / "other")], capsys)  # fmt: skip
    assert "do not fit the configured model" in misfit and "conv_channels" in misfit, misfit


def test_export_scores_a_multimnist_model_on_its_test_stream(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """A MultiMNIST checkpoint exports with the paper's metric over the whole fixed stream of 10,000 test overlays
    (not MNIST digits it cannot read), its data source recorded; `check` and evaluate --weights read the source
    from the file and score the stream's first 500 overlays alike."""
    data = {"source": "multimnist_onthefly", "batch_size": 500, "num_workers": 0, "val_samples": 64}
    ckpt = tiny_checkpoint(tmp_path / "mm.ckpt", data, image_size=36, num_targets=2)
    out = tmp_path / "mm.safetensors"
    pretrained.main(["export", "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu"])
    exported = json.loads(capsys.readouterr().out)
    assert exported["data_source"] == "multimnist_onthefly" and exported["test_samples"] == 10_000  # not val_samples
    assert 0 <= exported["test_accuracy"] <= exported["test_digit_accuracy"] <= 1 and "test_digits" not in exported
    pretrained.main(["check", "--weights", str(out), "--device", "cpu", "--limit", "500"])
    checked = json.loads(capsys.readouterr().out)
    assert checked["test_samples"] == 500 and checked["recorded"]["test_accuracy"] == exported["test_accuracy"]
    done = run("capsdist.evaluate", "--weights", str(out), "--data.val_samples", "500", "--device", "cpu")
    assert json.loads(done.stdout)["acc"] == checked["test_accuracy"], done.stderr
