"""Hostile run folders, sharded checkpoints and configs through the commands users run (issue 28 items 1, 2, 8):
nothing is written through a planted link, nothing outside a checkpoint directory is read, nothing a config names
outside capsdist, Lightning and torch is imported; each case is one paragraph with exit 2, refused before the run
writes anything. Every command runs in this process (refusals come before any training: seconds each)."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from capsdist.checkpoint import __main__ as convert
from capsdist.checkpoint import sharded
from capsdist.tools import evaluate
from capsdist.training import cli as train
from tests.conftest import TINY, refused

RUN = [*TINY, "--wandb_mode=disabled", "--trainer.max_steps=1", "--data.train_samples=32"]


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


# ------------------------------------------------------------------------ item 1: nothing written through a link

LINKS = {  # the file a run writes -> the command that wrote through it on main
    ".fit.lock": ["fit"],
    "config.yaml": ["fit", "--ckpt_path=auto"],
    "predictions.csv": ["predict"],
    "wandb_run_id": ["fit", "--ckpt_path=auto", "--wandb_mode=offline"],
    "checkpoints": ["fit"],
}


@pytest.mark.parametrize("name", LINKS)
def test_a_planted_link_in_the_run_folder_is_refused(name: str, tmp_path: Path, capsys) -> None:
    """RUN/NAME -> a file (a folder for checkpoints/) outside: exit 2 naming the link and its target before
    anything is written (main: the lock, config, predictions or W&B id went into the target)."""
    target = tmp_path / ("elsewhere" if name == "checkpoints" else "notes.txt")
    if name == "checkpoints":
        target.mkdir()
        (target / "keep.txt").write_text("a teammate's file\n")
    else:
        target.write_text("precious notes\n")
    before, run = snapshot(target), tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    command, *flags = LINKS[name]
    error = refused(train.main, [command, *RUN, f"--trainer.default_root_dir={run}", *flags], capsys)
    assert f"holds {name}, a symbolic link to {target}" in error and f"Fix: remove it (`rm {run / name}`" in error
    assert snapshot(target) == before and os.listdir(run) == [name]


def test_a_fifo_in_the_run_folder_is_refused(tmp_path: Path, capsys) -> None:
    """config.yaml as a FIFO (writing it would block for ever): refused at the start."""
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "config.yaml")
    error = refused(train.main, ["fit", *RUN, f"--trainer.default_root_dir={run}"], capsys)
    assert "holds config.yaml, a FIFO" in error and os.listdir(run) == ["config.yaml"]


# ------------------------------------------------- item 2: sharded checkpoints read only their own regular files


class _Touch:
    """Unpickled, runs ``touch path``: what a weights_only=False load of a planted meta.pt would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


def _sparse(folder: Path, outside: Path) -> str:
    """A data file grown to 1 GiB by a hole (a few KB on disk) and metadata declaring a 1 GiB tensor in it."""
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # the test's own file: plain pickle is fine
    entry = metadata.state_dict_metadata["state_dict/w"]
    entry.size, entry.chunks[0].sizes = torch.Size([1 << 28]), torch.Size([1 << 28])
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], offset=0, length=1 << 30)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    os.truncate(folder / "__0_0.distcp", 1 << 30)
    return "declares 1,073,741,824 bytes of tensors in"


def _linked(folder: Path, outside: Path) -> str:
    (folder / "__0_0.distcp").rename(outside)
    (folder / "__0_0.distcp").symlink_to(outside)
    return f"it holds __0_0.distcp, a symbolic link to {outside}"


def _fifo(folder: Path, outside: Path) -> str:
    (folder / ".metadata").unlink()
    os.mkfifo(folder / ".metadata")
    return "it holds .metadata, a FIFO"


def _pickled_meta(folder: Path, outside: Path) -> str:
    torch.save({"global_step": 3, "hyper_parameters": _Touch(outside.with_name("MARKER"))}, folder / "meta.pt")
    return "holds the Python object posix.system, which a safe (weights_only) load refuses"


def _huge_item(folder: Path, outside: Path) -> str:
    (folder / ".metadata").write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 1 << 60) + b"ab.")  # 14 bytes, 2^60 declared
    return "its DCP metadata is not a whole pickle (expected 1152921504606846976 bytes in a bytes8"


def _unknown(folder: Path, outside: Path) -> str:
    (folder / "notes.txt").write_text("not a checkpoint file\n")
    return "it holds the file 'notes.txt'"


def _cut_short(folder: Path, outside: Path) -> str:
    (folder / "meta.pt").unlink()
    return "is not a sharded checkpoint (no meta.pt); it was probably cut short during its save"


MALFORMED = {"symlinked .distcp": _linked, "FIFO .metadata": _fifo, "sparse data file": _sparse,
             "pickle in meta.pt": _pickled_meta, "2^60-byte item": _huge_item, "unknown file": _unknown,
             "no meta.pt": _cut_short}  # fmt: skip


@pytest.fixture
def deadline() -> Iterator[None]:
    """Fail a command that blocks (a FIFO read) after 30 s instead of hanging the suite."""

    def expired(*_: object) -> None:
        raise TimeoutError("the command blocked for 30 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.usefixtures("deadline")
@pytest.mark.parametrize("command", ["convert", "evaluate", "fit --ckpt_path"])
@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_sharded_checkpoint_is_refused(case: str, command: str, tmp_path: Path, capsys) -> None:
    """Each malformed NAME.ckpt/ directory: exit 2 with one paragraph naming what is wrong, nothing run, nothing
    written (`fit` leaves no run folder), nothing outside read; at once (main: the link was read and exit 0, the
    FIFO hung, the sparse file allocated 1 GiB, the pickle and the 2^60 bytes were tracebacks)."""
    folder, outside, out, run = (tmp_path / name for name in ("last.ckpt", "outside.bin", "out.ckpt", "run"))
    sharded.save({"state_dict": {"w": torch.ones(64, 64)}, "global_step": 3, "pytorch-lightning_version": "2.6.6"},
                 folder, {})  # fmt: skip
    phrase = MALFORMED[case](folder, outside)
    if command == "convert":
        error = refused(convert.main, ["convert", str(folder), str(out)], capsys)
    elif command == "evaluate":
        error = refused(evaluate.main, ["--ckpt", str(folder), "--device", "cpu"], capsys)
    else:
        error = refused(train.main, ["fit", *RUN, f"--ckpt_path={folder}", f"--trainer.default_root_dir={run}"], capsys)
    assert phrase in error and "Fix: " in error, error
    assert not out.exists() and not run.exists() and not (tmp_path / "MARKER").exists()


# ------------------------------------------------------- item 8: a config imports nothing outside the trusted code

CODE = {  # a config -> the code it names and where
    "callbacks class_path": ({"trainer": {"callbacks": [{"class_path": "planted_code.Callback"}]}},
                             "planted_code.Callback", "trainer.callbacks[0].class_path"),
    "nested init_args": ({"trainer": {"strategy": {"class_path": "pytorch_lightning.strategies.DDPStrategy",
                                                   "init_args": {"cluster_environment": {"class_path": "os.system"}}}}},
                         "os.system", "trainer.strategy.init_args.cluster_environment.class_path"),
    "loggers short form": ({"trainer": {"logger": ["planted_code.Logger"]}}, "planted_code.Logger",
                           "trainer.logger[0]"),
    "nested config file": ({"trainer": "sub.yaml"}, "planted_code.Callback", "callbacks[0].class_path"),
}  # fmt: skip


PLANTED = "from pytorch_lightning.callbacks import Callback\nfrom pytorch_lightning.loggers import CSVLogger as Logger"


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module ``planted_code`` (a callback and a logger) whose import creates the file MARKER
    (returned, not yet there)."""
    marker = tmp_path / "MARKER"
    (tmp_path / "planted_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n{PLANTED}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "planted_code", raising=False)
    monkeypatch.delenv("CAPSDIST_CONFIG_MODULES")  # the suite's own callbacks are not needed here
    return marker


@pytest.mark.parametrize("case", CODE)
def test_a_config_naming_other_code_is_refused_before_importing_it(case: str, planted: Path, tmp_path: Path,
                                                                   capsys) -> None:  # fmt: skip
    """class_path anywhere, the short form, a nested config file: exit 2 naming the code and the opt-in, before the
    import (main: LightningCLI imported planted_code, which ran)."""
    config, name, where = CODE[case]
    (tmp_path / "sub.yaml").write_text(yaml.safe_dump(CODE["callbacks class_path"][0]["trainer"]))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    args = ["fit", "--config", str(tmp_path / "config.yaml"), *RUN, f"--trainer.default_root_dir={run}"]
    error = refused(train.main, args, capsys)
    assert f"the config names the code {name!r} ({where})" in error, error
    assert f"export CAPSDIST_CONFIG_MODULES={name.split('.')[0]}" in error
    assert not planted.exists() and not run.exists()


def test_the_opt_in_imports_the_named_package(planted: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """CAPSDIST_CONFIG_MODULES=planted_code: the user's own code is imported as asked (--print_config parses only)."""
    monkeypatch.setenv("CAPSDIST_CONFIG_MODULES", "planted_code")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(CODE["callbacks class_path"][0]))
    with pytest.raises(SystemExit) as stop:
        train.main(["fit", "--config", str(tmp_path / "config.yaml"), "--print_config"])
    assert stop.value.code == 0 and "class_path: planted_code.Callback" in capsys.readouterr().out
    assert planted.exists()


def test_a_runs_own_config_is_reusable(tmp_path: Path, capsys) -> None:
    """The config.yaml a fit wrote, passed back with --config to continue the run (what capsdist's resume messages
    suggest): accepted, and the run continues."""
    run, guard = tmp_path / "run", "capsdist.training.guards.NonFiniteGuard"
    train.main(["fit", *RUN, "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={run}",
                f"--trainer.callbacks+={guard}"])  # fmt: skip
    assert f"class_path: {guard}" in (run / "config.yaml").read_text()
    train.main(["fit", "--config", str(run / "config.yaml"), "--ckpt_path=last", "--trainer.max_steps=2"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["global_step"] == 2
