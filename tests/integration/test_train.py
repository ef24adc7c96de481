"""The training CLI end to end on CPU: learning, checkpoints, exact resume, configs, evaluate, figures, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from capsdist.tools import evaluate
from capsdist.training.cli import main
from tests.conftest import REPO, TINY, refused

ROOT = REPO


def fit(root: Path, *extra: str, wandb: str = "disabled") -> dict:
    """Run `capsdist.train fit` in-process on a tiny model; return the JSON summary it prints."""
    args = ["fit", *TINY, f"--trainer.default_root_dir={root}", f"--wandb_mode={wandb}", *extra]
    main(args)
    return root


def summary(capsys: pytest.CaptureFixture) -> dict:
    """The JSON line `fit` prints last."""
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def test_learns_mnist_subset(tmp_path, capsys):
    fit(tmp_path, "--trainer.max_epochs=2", "--data.train_samples=512", "--data.val_samples=256")
    result = summary(capsys)
    assert result["global_step"] == 32
    assert result["val/acc"] > 0.6  # chance is 0.1
    metrics = (tmp_path / "csv").rglob("metrics.csv")
    rows = next(metrics).read_text().splitlines()
    header = rows[0].split(",")
    losses = [
        float(r.split(",")[header.index("train/loss")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]
    ]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # the loss falls
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert Path(result["best_checkpoint"]).is_file()


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("source", ["mnist", "multimnist_onthefly"])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, source):
    common = [f"--data.source={source}", "--data.train_samples=256", "--data.val_samples=64"]
    common += ["--trainer.deterministic=true", "--checkpoint_every_n_steps=5", "--data.num_workers=2"]
    fit(tmp_path / "full", *common, "--trainer.max_steps=12")
    # the rolling snapshot at step 5 is what a crash leaves behind: mid-epoch 0 (8 batches an epoch)
    fit(tmp_path / "cut", *common, "--trainer.max_steps=7")
    snapshot = tmp_path / "cut/checkpoints/snapshot-step=5.ckpt"
    loops = torch.load(snapshot, weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert [{k: v for k, v in state.items() if k in ("epoch", "batches")} for state in loops["combined_loader"]] == [
        {"epoch": 0, "batches": 5}
    ]
    placement = {"version": 1, "world_size": 1, "num_workers": 2}
    assert loops["combined_loader"][0] | placement == loops["combined_loader"][0]
    fit(tmp_path / "resumed", *common, "--trainer.max_steps=12", f"--ckpt_path={snapshot}")
    full, resumed = state(tmp_path / "full/checkpoints/last.ckpt"), state(tmp_path / "resumed/checkpoints/last.ckpt")
    assert all(torch.equal(full[name], resumed[name]) for name in full)


def test_more_epochs_continue_a_finished_fit_exactly(tmp_path, capsys):
    """A fit of 1 epoch continued with `--trainer.max_epochs 2` trains exactly the missing epoch: the step and the
    weights of an uninterrupted 2-epoch run (2 batches an epoch)."""
    common = ["--data.train_samples=64", "--data.val_samples=32", "--trainer.deterministic=true"]
    fit(tmp_path / "full", *common, "--trainer.max_epochs=2")
    fit(tmp_path / "cut", *common, "--trainer.max_epochs=1")
    fit(tmp_path / "cut", *common, "--trainer.max_epochs=2", "--ckpt_path=last")
    assert summary(capsys)["global_step"] == 4
    full, resumed = state(tmp_path / "full/checkpoints/last.ckpt"), state(tmp_path / "cut/checkpoints/last.ckpt")
    assert all(torch.equal(full[name], resumed[name]) for name in full)


def test_fit_on_multimnist_shards(tmp_path, capsys):
    from data_prep.multimnist import generate

    for split, count in (("train", 96), ("test", 32)):
        plan = {"split": split, "per_digit": None, "num_samples": count, "shard_size": 32, "seed": 1}
        generate(ROOT / "data/mnist", tmp_path / split, plan, workers=1)
    shards = [f"--data.train_shards={tmp_path / 'train'}", f"--data.val_shards={tmp_path / 'test'}"]
    fit(
        tmp_path / "run",
        "--data.source=multimnist_shards",
        *shards,
        "--data.shuffle_buffer=16",
        "--trainer.max_steps=4",
    )
    result = summary(capsys)
    assert result["global_step"] == 4 and 0 <= result["val/acc"] <= result["val/digit_acc"] <= 1
    hparams = torch.load(result["last_checkpoint"], weights_only=True)["hyper_parameters"]
    assert (hparams["image_size"], hparams["num_targets"]) == (36, 2)  # linked from the data source


@pytest.mark.parametrize(
    "configs",
    [["quickstart.yaml"], ["mnist.yaml"], ["large.yaml"], ["multimnist.yaml"]]
    + [["multimnist.yaml", "multimnist_onthefly.yaml"]]
    + [["mnist.yaml", f"ablation/{p.name}"] for p in sorted((ROOT / "configs/ablation").glob("*.yaml"))],
    ids=lambda c: "+".join(c),
)
def test_every_config_parses(configs, capsys):
    args = [arg for name in configs for arg in ("--config", str(ROOT / "configs" / name))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "model:" in capsys.readouterr().out


def test_unknown_config_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.routing_iteration=2"])
    assert exit_info.value.code == 2
    assert "routing_iteration" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    fit(root, "--trainer.max_steps=4", "--data.train_samples=128", "--data.val_samples=64", wandb="offline")
    assert list((root / "wandb").glob("offline-run-*"))  # W&B works with no account and no network
    return root / "checkpoints" / "last.ckpt"


def test_checkpoint_of_another_model_is_refused(tmp_path, checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path, "--trainer.max_steps=6", "--model.conv_channels=16", f"--ckpt_path={checkpoint}")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "different model" in err and "conv_channels': '32 vs 16'" in err and "Traceback" not in err


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_evaluate_prints_metrics_json(checkpoint, capsys):
    """In this process (the real process's output and exit are the whole-split test's)."""
    evaluate.main(["--ckpt", str(checkpoint), "--data.val_samples=64"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["samples"] == 64 and result["source"] == "mnist"
    assert 0 <= result["acc"] <= 1 and result["error"] == pytest.approx(1 - result["acc"])


def test_evaluate_scores_the_whole_split_not_the_runs_validation_subset(checkpoint):
    """The run validated on 64 digits (val_samples saved in the checkpoint); evaluate scores all 10,000."""
    done = run_module("capsdist.evaluate", "--ckpt", str(checkpoint), "--data.batch_size=1000")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["samples"] == 10000


def test_evaluate_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert "no checkpoint at" in refused(evaluate.main, ["--ckpt", str(tmp_path / "nope.ckpt")], capsys)


def test_figures_are_written(checkpoint, tmp_path):
    done = run_module(
        "capsdist.figures", "--ckpt", str(checkpoint), "--out", str(tmp_path), "--data.val_samples=8", "--pdf"
    )
    assert done.returncode == 0, done.stderr
    from PIL import Image

    recon = Image.open(tmp_path / "reconstructions.png")
    perturb = Image.open(tmp_path / "perturbation.png")
    # 8 rows of (input, reconstruction); 3 digits side by side, each 8 dims x 11 tweaks of 28x28 (pad 2, x3),
    # plus label margins (row names on the left, column names on top)
    assert recon.width > (2 * 30 + 2) * 3 and recon.height > (8 * 30 + 2) * 3
    assert perturb.width > 3 * (11 * 30 + 2) * 3 and perturb.height > (8 * 30 + 2) * 3
    assert (tmp_path / "perturbation.pdf").read_bytes().startswith(b"%PDF")
