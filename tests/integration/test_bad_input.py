"""Bad input, run as a user would (the CLIs' own entry points): each case -> its exit code and a phrase of the
one-paragraph message, never a traceback, never a hang, never a command taken from a file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from capsdist.tools import evaluate, figures
from capsdist.training import cli as train
from data_prep import multimnist
from tests.conftest import REPO, TINY, Dripping, subprocess_env, tiny_checkpoint

FIT = ["fit", *TINY, "--wandb_mode=disabled", "--trainer.max_steps=2"]
FIT += ["--data.train_samples=64", "--data.val_samples=32"]

# (flags added to a tiny `fit`, exit code, phrase of the message)
FIT_CASES = [
    (["--data.batch_size=0"], 2, "--data.batch_size 0 is out of range: it must be an integer from 1 to 65536"),
    (["--data.batch_size=-4"], 2, "--data.batch_size -4 is out of range"),
    (["--data.batch_size=-1"], 2, "--data.batch_size -1 is out of range"),
    (["--model.routing_iterations=0"], 2, "--model.routing_iterations 0 is out of range: it must be an integer from 1"),
    (["--data.num_workers=-1"], 2, "--data.num_workers -1 is out of range: it must be an integer >= 0"),
    (["--model.lr_decay_steps=0"], 2, "--model.lr_decay_steps 0 is out of range"),
    (["--model.lr=-1"], 2, "--model.lr -1.0 is out of range: it must be a number > 0"),
    (["--model.lr=0"], 2, "--model.lr 0.0 is out of range"),
    (["--trainer.precision=16-true"], 2, "--trainer.precision 16-true needs a GPU"),
    (["--ckpt_path=/nonexistent/x.ckpt"], 2, "--ckpt_path /nonexistent/x.ckpt: no such file"),
    (["--ckpt_path=/etc"], 2, "/etc is not a sharded checkpoint (no meta.pt)"),  # a directory, not a sharded one
    (["--data.max_shift=40"], 2, "--data.max_shift 40 is out of range: it must be an integer from 0 to 4"),
    (["--model.recon_weight=-5"], 2, "--model.recon_weight -5.0 is out of range: it must be a number >= 0"),
    (["--model.lr_decay=0"], 2, "--model.lr_decay 0.0 is out of range: it must be a number in (0, 1]"),
    (["--model.lr_decay=1.5"], 2, "--model.lr_decay 1.5 is out of range"),
    (["--model.image_size=28"], 2, "--model.image_size is not a setting: the image size comes from the data"),
    (["--data.source=multimnist_shards", "--data.train_batches_per_epoch=2"], 2, "no shard setting was given"),
    (["--trainer.default_root_dir=/etc/hostname/run"], 2, "cannot write the run folder /etc/hostname/run: /etc/"),
    (["--trainer.default_root_dir=/proc/x"], 2, "/proc is the kernel's proc filesystem, where no folder can be"),
    (["--data.batch_size=65536"], 2, "--data.batch_size 65536 is larger than the training data: 64 samples per epoch"),
    (["--data.train_batches_per_epoch=3"], 2, "--data.train_batches_per_epoch 3 is more than the training data holds"),
    # priors of 1152 x 10 x 1024 floats (47 MB) a sample: 2.6 TiB for the step, beyond any test host's memory
    (["--model.primary_channels=32", "--model.primary_dim=1", "--model.caps_layers=[[10, 1024]]",
      "--data.train_samples=60000", "--data.batch_size=60000"], 2, "--data.batch_size 60000 needs about 2642.6 GiB"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "code", "phrase"), FIT_CASES, ids=[" ".join(c[0]) for c in FIT_CASES])
def test_fit_bad_value(flags: list[str], code: int, phrase: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each bad setting stops `fit` before training with exit 2 and one line naming the flag and the range."""
    root = [] if any("default_root_dir" in f for f in flags) else [f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SystemExit) as stop:
        train.main([*FIT, *root, *flags])
    err = capsys.readouterr().err
    assert stop.value.code == code, err
    assert phrase in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


MISSING_INPUTS = [
    (["--data.mnist_dir=/nonexistent"], "MNIST file missing: /nonexistent/train-images-idx3-ubyte.gz", False),
    (["--data.source=multimnist_shards", "--data.train_shards=/nonexistent/train-000000.tar",
      "--data.train_batches_per_epoch=2"], "shard '/nonexistent/train-000000.tar' (from", True),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "phrase", "used"), MISSING_INPUTS, ids=["mnist dir", "shards in a used folder"])
def test_missing_data_stops_fit_before_anything_is_written(
    flags: list[str], phrase: str, used: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    """A missing MNIST folder or shard: exit 2 with one paragraph, and no run folder, lock, config, CSV or W&B run
    (offline) is made; a used run folder is left byte for byte as it was (they were all made, and W&B offered to
    sync the empty run)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    root = tmp_path / "run"
    if used:
        (root / "checkpoints").mkdir(parents=True)
        (root / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's")
        (root / "config.yaml").write_text("seed_everything: 0\n")
    before = _tree(tmp_path)
    with pytest.raises(SystemExit) as stop:
        train.main([*FIT, f"--trainer.default_root_dir={root}", "--wandb_mode=offline", *flags])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and phrase in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [err.splitlines()[-1]], err
    assert "wandb" not in out + err and _tree(tmp_path) == before


# checked every step (logging every step); checked at the step-2 checkpoint only (the guard reads the device there)
DEFERRED = ["--trainer.log_every_n_steps=50", "--checkpoint_every_n_steps=2"]
OVERFLOWS = [
    ([], "at step 1"),
    (DEFERRED, "between step 1 and step 2 (epoch 0); training stopped with the weights of step 0"),
]


@pytest.mark.parametrize(("later", "where"), OVERFLOWS, ids=["every step", "at the next checkpoint"])
def test_nonfinite_loss_stops_at_first_step_with_finite_checkpoints(
    later: list[str], where: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """lr 1e38 (Adam's first step overflows the weights): the run stops at the first check after that step with
    exit 2, naming the step and the cause, and every checkpoint on disk holds finite weights (they used to be NaN,
    exit 0)."""
    flags = ["--model.lr=1e38", "--trainer.max_steps=8", "--checkpoint_every_n_steps=1", "--model.lr_decay=1"]
    with pytest.raises(SystemExit) as stop:
        train.main([*FIT, f"--trainer.default_root_dir={tmp_path}", *flags, *later])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"non-finite weights after the optimizer step {where}" in err
    assert "lower --model.lr" in err
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts
    for path in ckpts:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path.name


@pytest.mark.parametrize("cli", [evaluate, figures])
def test_checkpoint_pipe_is_never_run(cli, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A `pipe:` shard spec saved in a checkpoint is refused by evaluate and figures; the command never runs."""
    planted = tmp_path / "planted"
    data = {"source": "multimnist_shards", "val_shards": f"pipe:touch {planted}", "batch_size": 8}
    ckpt = tiny_checkpoint(tmp_path / "bad.ckpt", data, image_size=36, num_targets=2)
    with pytest.raises(SystemExit) as stop:
        cli.main(["--ckpt", str(ckpt), "--device", "cpu", "--data.num_workers=0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "never a pipe: command or a URL" in err and "--data.val_shards" in err
    time.sleep(0.2)
    assert not planted.exists()


def test_checkpoint_of_the_other_dataset_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A MultiMNIST checkpoint evaluated on MNIST: refused before any forward pass, naming its training data."""
    ckpt = tiny_checkpoint(tmp_path / "mm.ckpt", {"source": "multimnist_onthefly"}, image_size=36, num_targets=2)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["--ckpt", str(ckpt), "--device", "cpu", "--data.source=mnist", "--data.val_samples=8"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "trained on multimnist_onthefly (36x36 images of 1 channel(s), 2 target(s)" in err


def test_random_byte_shards_stop_fit_promptly(tmp_path: Path) -> None:
    """Training on shards that hold no valid sample ends within seconds with exit 2 naming the shards (it used to
    loop forever at full CPU writing gigabytes of skip lines)."""
    for i in range(2):
        (tmp_path / f"junk-{i}.tar").write_bytes(np.random.default_rng(i).bytes(20000))
    (tmp_path / "empty.tar").write_bytes(b"")
    args = [*FIT[1:], f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.source=multimnist_shards",
            f"--data.train_shards={tmp_path}", f"--data.val_shards={tmp_path}", "--data.train_batches_per_epoch=2",
            "--data.num_workers=1"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "capsdist.train", "fit", *args],
        capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=240,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "no valid sample" in done.stderr and "junk-0.tar" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr) < 20000  # skip warnings are rate-limited


def test_sigterm_during_a_stalled_read_saves_and_exits(
    shards: Path, dripping: Dripping, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # fmt: skip
    """0 loader workers, one shard on a host that drips bytes (deadline far off): a SIGTERM while the read blocks
    saves the last step and exits 143 within seconds (it was recorded and never acted on, past 7 minutes: under
    SLURM, KillWait then killed the job with nothing saved)."""
    # data seed 5 draws the stalled host after 7 steps
    args = [*FIT, f"--trainer.default_root_dir={tmp_path}", "--data.source=multimnist_shards", "--data.batch_size=4",
            f"--data.train_shards=[{shards / 'test-000000.tar'}, {dripping.url('stalled.tar')}]",
            "--data.train_batches_per_epoch=50", "--data.shuffle_buffer=1", "--trainer.limit_val_batches=0",
            "--trainer.max_steps=50", "--data.seed=5"]  # fmt: skip
    sent: list[float] = []

    def terminate_once_reading() -> None:  # the CLI owns SIGTERM by then (capsdist.cluster.signals)
        if dripping.requested.wait(120):
            sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_reading, daemon=True).start()
    with pytest.raises(SystemExit) as stop:
        train.main(args)
    took = time.monotonic() - sent[0]
    out, err = capsys.readouterr()
    assert stop.value.code == 143 and took < 10, (took, err[-2000:])
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] == "SIGTERM" and summary["global_step"] > 0
    saved = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert saved["global_step"] == summary["global_step"]
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"] == summary["global_step"]


def test_data_prep_second_writer_refused_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A second data_prep run into a folder another holds is refused; `verify` finds a changed shard."""
    out = tmp_path / "shards"
    out.mkdir()
    held = multimnist.lock_folder(out)
    with pytest.raises(SystemExit, match="another `python -m data_prep.multimnist` run is writing"):
        multimnist.main(["--split", "test", "--num-samples", "20", "--shard-size", "10", "--out", str(out)])
    held.close()
    assert multimnist.main(["--split", "test", "--num-samples", "20", "--shard-size", "10", "--out", str(out),
                            "--workers", "1"]) == 0  # fmt: skip
    assert multimnist.main(["verify", str(out)]) == 0
    shard = out / "test-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    assert multimnist.main(["verify", str(out)]) == 1
    lines = capsys.readouterr()
    assert "test-000001.tar: sha256 differs" in lines.err and json.loads(lines.out.splitlines()[-1])["ok"] is False


def test_unwritable_out_is_one_paragraph(capsys: pytest.CaptureFixture) -> None:
    """data_prep into a folder that cannot be created: one paragraph, no traceback."""
    assert multimnist.main(["--split", "test", "--num-samples", "10", "--out", "/etc/hostname/shards"]) == 1
    err = capsys.readouterr().err
    assert "cannot write /etc/hostname/shards" in err and "Traceback" not in err


def test_file_missing_from_repo_mnist_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A file missing from the repository's data/mnist is named (it used to surface as mirror DNS errors)."""
    from capsdist.data import mnist
    from tests.conftest import SHIPPED

    repo = tmp_path / "data" / "mnist"
    repo.mkdir(parents=True)
    for name in mnist.MD5:
        if name != "train-labels-idx1-ubyte.gz":
            shutil.copy(SHIPPED / name, repo / name)
    monkeypatch.setattr(mnist, "REPO_DIR", repo)
    monkeypatch.setattr(mnist, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.delenv("CAPSDIST_MNIST_DIR", raising=False)
    monkeypatch.setenv("CAPSDIST_MNIST_MIRRORS", "http://127.0.0.1:9/")
    with pytest.raises(SystemExit) as stop:
        train.main([*FIT, f"--trainer.default_root_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{repo} lacks train-labels-idx1-ubyte.gz" in err and "git checkout" in err


def test_guard_skip_mode_drops_bad_steps_then_stops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With max_skips=N, non-finite steps are dropped (weights unchanged) N times, then the run stops."""
    from capsdist.training.guards import NonFiniteGuard

    guard = NonFiniteGuard(max_skips=2)

    class Trainer:  # the three things the guard reads from a trainer, on one device
        strategy = type("S", (), {"reduce_boolean_decision": staticmethod(lambda d, all=True: d)})()
        precision_plugin, optimizers, global_step, current_epoch, precision = None, [], 7, 0, "32-true"

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(module.parameters())
    for _ in range(2):
        module.weight.grad = torch.full_like(module.weight, float("nan"))
        guard.on_before_optimizer_step(Trainer(), module, optimizer)
        assert module.weight.grad is None  # dropped: Adam will not touch the weights
    module.weight.grad = torch.full_like(module.weight, float("inf"))
    with pytest.raises(Exception, match="non-finite gradient at step 7"):
        guard.on_before_optimizer_step(Trainer(), module, optimizer)
