"""Canaries for every private API capsdist uses, one test per dependency seam (capsdist/compat/): each names the
attribute and the version its seam was written for, so an upgrade that moves one fails here, by name, instead of
silently running without the behaviour it gave (an unshielded W&B service, an unbounded YAML loader...)."""

from __future__ import annotations

import importlib
import inspect
import sys
from argparse import ArgumentError
from importlib.metadata import version
from multiprocessing import forkserver
from typing import Literal

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ThroughputMonitor
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.core.optimizer import LightningOptimizer
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loops.fit_loop import _FitLoop
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy

from capsdist.compat import dataloader as dataloader_seam
from capsdist.compat import dcp, lightning
from capsdist.compat import forkserver as forkserver_seam
from capsdist.compat import jsonargparse as jsonargparse_seam
from capsdist.compat import wandb as wandb_seam


def _has(owner: object, name: str, written_for: str, package: str) -> None:
    assert hasattr(owner, name), (
        f"{package} {version(package)} has no {getattr(owner, '__name__', type(owner).__name__)}.{name}, which "
        f"capsdist/compat was written against ({package} {written_for}): adapt the seam"
    )


def test_lightning_private_attributes_exist() -> None:
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)
    for owner, name in [
        (trainer, "_logger_connector"),
        (trainer._logger_connector, "should_update_logs"),
        (trainer._logger_connector, "on_batch_end"),
        (trainer._logger_connector, "update_train_step_metrics"),
        (trainer, "_checkpoint_connector"),
        (trainer._checkpoint_connector, "_get_loops_state_dict"),
        (trainer._checkpoint_connector, "hpc_save_path"),
        (trainer.fit_loop, "_can_stop_early"),
        (trainer.fit_loop.epoch_loop.val_loop.batch_progress.total, "processed"),
        (trainer.fit_loop.epoch_loop, "_num_ready_batches_reached"),
        (pl.LightningModule(), "_log_hyperparams"),
        (pl.LightningDataModule(), "_log_hyperparams"),
        (WandbLogger(offline=True, mode="disabled"), "_experiment"),
        (LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)), "_optimizer"),
        (ThroughputMonitor(lambda b: 1), "_samples"),
        (ThroughputMonitor(lambda b: 1), "_batches"),
    ]:
        _has(owner, name, lightning.WRITTEN_FOR, "pytorch-lightning")


@pytest.mark.parametrize(
    ("base", "method"),
    [(LightningCLI, "_parse_ckpt_path"), (FSDPStrategy, "_setup_model"), (DDPStrategy, "_setup_model"),
     (ThroughputMonitor, "_update"), (_FitLoop, "done")],
)  # fmt: skip
def test_lightning_private_methods_capsdist_overrides_exist(base: type, method: str) -> None:
    """An override of a method the base no longer has would silently never run."""
    _has(base, method, lightning.WRITTEN_FOR, "pytorch-lightning")
    assert "_ddp_kwargs" in inspect.getsource(DDPStrategy.__init__), "DDPStrategy no longer keeps _ddp_kwargs"


def test_wandb_launcher_takes_the_core_path_from_wandb_util() -> None:
    """The W&B shield redirects ``get_core_path`` in the launcher module; if the launcher stops taking it from
    there, the service would start unshielded and die with the job's first SIGTERM."""
    import wandb.util

    launcher = importlib.import_module(wandb_seam.LAUNCHER)
    assert getattr(launcher, "get_core_path", None) is wandb.util.get_core_path, (
        f"wandb {version('wandb')}: {wandb_seam.LAUNCHER}.get_core_path is not wandb.util's "
        f"(capsdist/compat/wandb.py was written for wandb {wandb_seam.WRITTEN_FOR})"
    )


def test_wandb_launch_step_and_its_staged_inputs_are_where_the_seam_looks() -> None:
    """The seam skips ``Run._detect_and_apply_job_inputs`` while LAUNCH_INPUTS is not imported: the method must
    still exist and still take its inputs from that module's StagedLaunchInputs, or the skip would drop inputs a
    W&B Launch job staged (or patch nothing)."""
    from wandb.sdk.wandb_run import Run

    _has(Run, wandb_seam.LAUNCH_STEP, wandb_seam.WRITTEN_FOR, "wandb")
    step = getattr(Run, wandb_seam.LAUNCH_STEP)
    source = inspect.getsource(getattr(step, "__wrapped__", step))  # wandb's own, also once the seam has wrapped it
    assert f"from {wandb_seam.LAUNCH_INPUTS} import StagedLaunchInputs" in source, source
    staged = importlib.import_module(wandb_seam.LAUNCH_INPUTS).StagedLaunchInputs
    assert callable(getattr(staged, "apply", None)) and callable(getattr(staged, "add_staged_input", None))


def test_wandb_launch_step_runs_only_where_an_input_can_be_staged(monkeypatch: pytest.MonkeyPatch) -> None:
    """After skip_unstaged_launch_inputs, the step imports nothing while LAUNCH_INPUTS was never imported, and runs
    W&B's own (applying the staged inputs) once it has been."""
    from wandb.sdk.wandb_run import Run

    wandb_seam.skip_unstaged_launch_inputs()
    wandb_seam.skip_unstaged_launch_inputs()  # idempotent: wrapped once
    step = getattr(Run, wandb_seam.LAUNCH_STEP)
    assert not hasattr(step.__wrapped__, "__wrapped__")
    monkeypatch.delitem(sys.modules, wandb_seam.LAUNCH_INPUTS, raising=False)
    step(object())
    assert wandb_seam.LAUNCH_INPUTS not in sys.modules
    staged = importlib.import_module(wandb_seam.LAUNCH_INPUTS).StagedLaunchInputs
    applied = []
    monkeypatch.setattr(staged, "apply", lambda self, run: applied.append(run))
    run = object()
    step(run)
    assert applied == [run]


def test_dcp_private_names_exist() -> None:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    _has(ShardedTensor, "_init_from_local_shards_and_global_metadata", dcp.WRITTEN_FOR, "torch")
    for (module, name), value in dcp.PRIVATE_METADATA_CLASSES.items():
        assert getattr(importlib.import_module(module), name) is value, f"torch {torch.__version__}: {module}.{name}"


def test_torch_dataloader_private_names_exist() -> None:
    """The loader's checked waits and expendable workers override and read these (the stop tests in
    tests/unit/test_shard_faults.py run them with a worker)."""
    from torch.utils.data import DataLoader
    from torch.utils.data._utils import signal_handling
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    iterator = _MultiProcessingDataLoaderIter
    for owner, name in [(DataLoader, "_get_iterator"), (iterator, "_try_get_data"), (iterator, "_shutdown_workers"),
                        (signal_handling, "_remove_worker_pids")]:  # fmt: skip
        _has(owner, name, dataloader_seam.WRITTEN_FOR, "torch")
    assert "timeout" in inspect.signature(iterator._try_get_data).parameters
    source = inspect.getsource(iterator)
    assert all(f"self.{name} =" in source for name in ("_shutdown", "_workers", "_worker_pids_set")), torch.__version__


def test_jsonargparse_private_loader_exists() -> None:
    module = importlib.import_module("jsonargparse._loaders_dumpers")
    for name in ("get_yaml_default_loader", "yaml_load"):
        _has(module, name, jsonargparse_seam.WRITTEN_FOR, "jsonargparse")


def test_jsonargparse_errors_still_name_what_the_short_usage_errors_read() -> None:
    """The option strings are argparse's table, and jsonargparse's messages for an unknown flag, config key,
    subcommand and Literal value still have the shape the "did you mean" hints are read from."""
    from jsonargparse import ArgumentParser

    class Parser(jsonargparse_seam.ShortUsageErrors, ArgumentParser):
        pass

    parser = Parser(exit_on_error=False)
    parser.add_argument("--data.batch_size", type=int, default=1)
    parser.add_argument("--source", type=Literal["mnist", "multimnist_shards"], default="mnist")
    _has(parser, "_option_string_actions", jsonargparse_seam.WRITTEN_FOR, "jsonargparse")
    assert "--data.batch_size" in jsonargparse_seam.option_strings(parser)
    for argv, hint in [
        (["--data.batchsize", "3"], "did you mean --data.batch_size?"),
        (["--source", "mnst"], "did you mean mnist?"),
        (["--nothing_like_it"], ""),
    ]:
        with pytest.raises(ArgumentError) as error:
            parser.parse_args(argv)
        assert jsonargparse_seam.suggestion(str(error.value), parser) == hint, str(error.value)
    message = "argument subcommand: invalid choice: 'fti' (choose from 'fit', 'validate', 'test', 'predict')"
    assert jsonargparse_seam.suggestion(message, parser) == "did you mean fit?"
    message = "Subcommand 'fit' does not accept option 'data.batchsize'"
    assert jsonargparse_seam.suggestion(message, parser) == "did you mean data.batch_size?"


def test_forkserver_private_names_exist() -> None:
    """capsdist.compat.forkserver registers the server it forks where ``ensure_running`` looks for one; on a Python
    without these names (or with 3.14's authenticated protocol) ``usable`` is False and runs use the standard server."""
    python = sys.version.split()[0]
    for name in forkserver_seam.SERVER_ATTRIBUTES:
        assert hasattr(forkserver._forkserver, name), (
            f"Python {python}: multiprocessing.forkserver.ForkServer has no {name} (capsdist/compat/forkserver.py was "
            f"written for {forkserver_seam.WRITTEN_FOR}): adapt the seam"
        )
    assert list(inspect.signature(forkserver.main).parameters) == forkserver_seam.MAIN_PARAMETERS, (
        f"Python {python}: multiprocessing.forkserver.main takes "
        f"{list(inspect.signature(forkserver.main).parameters)} (capsdist/compat/forkserver.py was written for "
        f"{forkserver_seam.WRITTEN_FOR}: {forkserver_seam.MAIN_PARAMETERS})"
    )
    assert forkserver_seam.usable() == (sys.version_info < (3, 14))
