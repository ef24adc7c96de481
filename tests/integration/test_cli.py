"""The command-line surface as a user meets it: test/predict after fit, refused optimizer flags, a quiet console
and a short log when stdout is a file, the console scripts, one flag style across the tools, help on every flag."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest
import torch

from capsdist.training.cli import main
from tests.conftest import REPO, SHIPPED, TINY, TINY_MODEL, subprocess_env

FIT = [*TINY, "--data.train_samples=64", "--data.val_samples=64", "--trainer.max_steps=2", "--wandb_mode=disabled"]


def json_lines(out: str) -> list[dict]:
    """The JSON objects a CLI printed, one per line."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a tiny model trained 2 steps."""
    root = tmp_path_factory.mktemp("run")
    main(["fit", *FIT, f"--trainer.default_root_dir={root}"])
    return root


def test_test_scores_the_checkpoint_on_the_test_digits(trained: Path, capsys: pytest.CaptureFixture) -> None:
    """README's `test --ckpt_path best` runs: test/* metrics printed (JSON) and logged (CSV) for that checkpoint."""
    capsys.readouterr()
    main(["test", *FIT, f"--trainer.default_root_dir={trained}", "--ckpt_path=best", "--trainer.limit_test_batches=3"])
    result = json_lines(capsys.readouterr().out)[-1]
    assert Path(result["checkpoint"]).name.startswith("best-")
    assert 0 <= result["test/acc"] <= 1 and result["test/error"] == pytest.approx(1 - result["test/acc"], abs=1e-4)
    logged = [row for f in (trained / "csv").rglob("metrics.csv") for row in csv.DictReader(f.read_text().splitlines())]
    assert any(row.get("test/acc") for row in logged)


def test_predict_writes_one_row_per_test_digit(trained: Path, capsys: pytest.CaptureFixture) -> None:
    """`predict` writes predictions.csv: MNIST's test labels in order, the longest capsule as the prediction."""
    from capsdist.data import mnist

    capsys.readouterr()
    run = [f"--trainer.default_root_dir={trained}", "--ckpt_path=last", "--trainer.limit_predict_batches=2"]
    main(["predict", *FIT, *run])
    result = json_lines(capsys.readouterr().out)[-1]
    rows = list(csv.DictReader(Path(result["predictions"]).read_text().splitlines()))
    assert result["rows"] == len(rows) == 64  # 2 batches of 32
    _, labels = mnist.load(SHIPPED, "test")
    assert [int(r["label_0"]) for r in rows] == labels[:64].tolist()
    lengths = torch.tensor([[float(r[f"length_{j}"]) for j in range(10)] for r in rows])
    assert [int(r["prediction_0"]) for r in rows] == lengths.argmax(dim=1).tolist()


def test_each_source_has_a_test_split(shards: Path, tmp_path: Path) -> None:
    """MNIST: all 10k test digits; on the fly: the fixed 10k test stream; shards: test_shards, else val_shards."""
    from capsdist.data.modules import CapsDataModule

    mnist_data = CapsDataModule(source="mnist", batch_size=100, num_workers=0, val_samples=64)
    mnist_data.setup("test")
    assert sum(len(b["labels"]) for b in mnist_data.test_dataloader()) == 10000
    onthefly = CapsDataModule(source="multimnist_onthefly", batch_size=500, num_workers=0, val_samples=1000)
    onthefly.setup("test")
    assert len(onthefly.test_dataloader()) == 20 and len(onthefly.val_dataloader()) == 2
    first = next(iter(onthefly.test_dataloader()))
    assert torch.equal(first["image"], next(iter(onthefly.val_dataloader()))["image"])  # one fixed test stream
    for test_shards in (str(shards), None):
        data = CapsDataModule(source="multimnist_shards", val_shards=str(shards), test_shards=test_shards,
                              batch_size=10, num_workers=0)  # fmt: skip
        assert sum(len(b["labels"]) for b in data.test_dataloader()) == 100


@pytest.mark.parametrize("how", ["flag", "config"])
def test_optimizer_and_scheduler_are_refused(how: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """LightningCLI's --optimizer would silently replace the paper's Adam schedule: refused, the fix named."""
    if how == "flag":
        extra = ["--optimizer=SGD"]
    else:
        (tmp_path / "sched.yaml").write_text("lr_scheduler:\n  class_path: torch.optim.lr_scheduler.StepLR\n")
        extra = [f"--config={tmp_path / 'sched.yaml'}"]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *FIT, f"--trainer.default_root_dir={tmp_path}", *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "capsdist: error: --optimizer/--lr_scheduler" in err and "--model.lr_decay" in err
    assert not (tmp_path / "checkpoints").exists()


NOISE = ["litlogger", "fit(ckpt_path", "`__len__`", "skip_none", "JsonargparseDeprecationWarning", "LeafSpec"]


@pytest.mark.slow
def test_fit_into_a_log_file_is_quiet_and_short(tmp_path: Path) -> None:
    """stdout a file (as under SLURM): no bar redrawn per step, one line per log_every_n_steps; none of the warnings
    every run used to print."""
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({"model": TINY_MODEL}))
    argv = ["fit", f"--config={config}", "--trainer.accelerator=cpu", "--trainer.max_steps=20",
            "--trainer.log_every_n_steps=10", "--trainer.enable_model_summary=false", "--data.batch_size=16",
            "--data.num_workers=0", "--data.train_samples=320", "--data.val_samples=32", "--wandb_mode=disabled",
            f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    with open(tmp_path / "out.log", "w") as out:
        proc = subprocess.run([sys.executable, "-W", "default", "-m", "capsdist.train", *argv], stdout=out,
                              stderr=subprocess.PIPE, text=True, env=subprocess_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "out.log").read_text()
    assert [noise for noise in NOISE if noise in proc.stderr] == [], proc.stderr
    assert "\r" not in log and len(log) < 1500, log  # the tqdm bar wrote ~150 bytes a step
    assert "step 10/20" in log and "step 20/20" in log and '"global_step": 20' in log
    losses = re.findall(r"step (10|20)/20 .*train/loss=([\d.]+)", log)  # each line shows its own step's loss
    assert [step for step, _ in losses] == ["10", "20"] and losses[0][1] != losses[1][1], log


def test_console_scripts_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Each [project.scripts] entry resolves and runs as pip's wrapper calls it: main() with sys.argv."""
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]\n")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, re.M))
    names = {"capsdist-train", "capsdist-evaluate", "capsdist-figures", "capsdist-shards", "capsdist-pretrained"}
    assert names <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as exit_:
            getattr(import_module(module), function)()
        assert exit_.value.code in (0, None), name
        assert "usage:" in capsys.readouterr().out, name


def test_one_flag_style_with_the_old_spellings_kept() -> None:
    """The tools' flags use the training CLI's underscores (--batch_size as --data.batch_size); the documented
    hyphenated spellings still parse to the same values."""
    from capsdist.bench import cli as bench
    from data_prep import multimnist

    for parser in (bench.build_parser(), multimnist.build_parser()):
        for action in parser._actions:
            first = next((o for o in action.option_strings if o.startswith("--")), None)
            assert first is None or "-" not in first[2:], first
    old = ["--batch-size", "8", "--image-size", "36", "--data-samples", "50", "--channels-last"]
    assert bench.parse_args(old) == bench.parse_args([o.replace("-", "_").replace("__", "--") for o in old])
    old = ["--mnist-dir", "x", "--num-samples", "5", "--shard-size", "2", "--out", "y"]
    new = [o.replace("-", "_").replace("__", "--") for o in old]
    assert multimnist.build_parser().parse_args(old) == multimnist.build_parser().parse_args(new)


def test_model_flags_have_help(capsys: pytest.CaptureFixture) -> None:
    """Every --model.* flag in `fit --help` says what it is (docstring Args of CapsNetModule and CapsNet)."""
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    entries = out[out.index("\n  --model.") :].split("\n  --model.")[1:]
    helps = {}
    for entry in entries:  # "name METAVAR  help..." or "name METAVAR\n   help...": the help follows 2+ spaces
        first, *rest = entry.split("\n")
        parts = re.split(r"\s{2,}", first.strip(), maxsplit=1)
        helps[parts[0].split()[0]] = " ".join([*parts[1:], *rest]).strip()
    bare = [name for name, text in helps.items() if text.startswith("(type:")]
    assert len(helps) >= 15 and bare == [], bare


@pytest.mark.parametrize(
    ("argv", "named", "last"),
    [(["fit", "--data.batchsize", "3"], "--data.batchsize", "did you mean --data.batch_size?"),
     (["fti"], "'fti'", "did you mean fit?"),
     ([], "{fit,validate,test,predict}", 'error: expected "subcommand" to be one of')],
    ids=["flag", "subcommand", "no arguments"],
)  # fmt: skip
def test_a_mistyped_or_missing_subcommand_or_flag_is_a_short_usage_error(
    argv: list[str], named: str, last: str, capsys: pytest.CaptureFixture
) -> None:
    """No arguments, an unknown flag or subcommand: a few lines, exit 2, naming what is wrong and the closest valid
    flag or subcommand (an unknown flag printed fit's 96-line usage with no hint; no arguments, a traceback)."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and named in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith(last) and len(err.splitlines()) <= 4, err


def test_training_cli_workers_print_no_runpy_warning(tmp_path: Path) -> None:
    """`python -m capsdist.train` with loader workers: no "'capsdist.train' found in sys.modules" RuntimeWarning from
    each worker (the entry point is not preloaded by name: capsdist.data.workers.main_imports)."""
    flags = ["--config", str(REPO / "configs" / "quickstart.yaml"), "--data.num_workers", "2", "--trainer.max_steps",
             "2", "--data.val_samples", "64", "--data.train_samples", "256", "--wandb_mode", "disabled",
             f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "capsdist.train", "fit", *flags], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=subprocess_env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RuntimeWarning" not in done.stderr
