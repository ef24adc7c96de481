"""Which checkpoint a run resumes from, when a resume is refused, and writing checkpoints that a kill never tears.

The rule (README "Training"): ``fit`` into a run folder that already holds checkpoints refuses unless resuming
is asked for (``--ckpt_path last|best|auto|PATH``) or the process is a restart of the fit that owns the folder (a
SLURM requeue of its job, a torchrun restart of its launch). "last" is the checkpoint with the highest global step
among hpc_ckpt_N, last, interrupted and snapshot files (never a step-0 file), not Lightning's newest-file /
hpc-first choice; "auto" is "last" if the folder holds one, else a fresh run. A resume is exact or refused: the
checks here run before anything is written (model identity, the data settings that define the training stream,
the trainer settings that define the optimizer's steps, the loader placement); the learning-rate settings may
change and apply from the resume step (CapsNetModule).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, Checkpoint

from capsdist.checkpoint.sharded import OLD, read_full, read_meta
from capsdist.compat.lightning import loops_state, stops_mid_epoch
from capsdist.core.errors import CapsdistError
from capsdist.core.files import atomic_save, atomic_write
from capsdist.data.loader import ResumableLoader, check_state
from capsdist.data.settings import FREE_ON_RESUME
from capsdist.model.capsnet import MODEL_ARGS
from capsdist.training.module import CheckpointMismatchError

_STARTED = time.time()  # this process's start (the import of the training CLI): older temp files are stale
JOB_FILE = "slurm_job"  # in the run folder: the launch (SLURM job, torchrun) that owns it, for automatic restarts
# model settings a resumed run must share with its checkpoint (the rest, e.g. image logging, may change)
IDENTITY_KEYS = (*MODEL_ARGS, "num_targets", "recon_weight")
# data settings that do not change the training stream are free to change on resume (capsdist.data.settings: the
# table's ``free``); all others are refused; num_workers is checked against the loader state, where the stream
# depends on it
TRAINER_KEY = "capsdist_trainer"  # in every checkpoint a fit writes: trainer_settings() of the run


class ResumeError(CapsdistError):
    """A run folder or checkpoint that cannot be (re)started from as asked."""


def remove_stale_temps(folder: Path) -> None:
    """Remove checkpoint temp files (``.NAME.ckpt.XXXX.tmp``) left in ``folder`` by a save killed mid-write: those
    last written before this process started (a save in progress elsewhere keeps writing, so is newer)."""
    for temp in folder.glob(".*.ckpt.*.tmp"):
        with contextlib.suppress(OSError):  # gone already (another rank's cleanup)
            if temp.is_file() and temp.stat().st_mtime < _STARTED:
                temp.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`atomic_save` (Lightning's own moves a ``$TMPDIR`` file, no fsync); a
    sharded checkpoint directory loads whole, so a plain (one-process, DDP) run resumes a capsule-parallel one."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """A file as Lightning loads it; a sharded ``NAME.ckpt/`` directory as the one file `convert` would write."""
        return read_full(path) if Path(path).is_dir() else super().load_checkpoint(path, map_location, weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically, removing temp files of saves killed earlier."""
        remove_stale_temps(Path(path).parent)
        atomic_save(checkpoint, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint memory-mapped and ``weights_only``; a torn or foreign file is a one-paragraph error. A
    sharded checkpoint directory gives its meta.pt (everything but the tensors)."""
    path = Path(path)
    try:
        if path.is_dir():
            return read_meta(path)  # the directory checked whole; its refusals say what is wrong
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except CapsdistError:
        raise
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/... for damaged files
        raise ResumeError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:160]}); it "
            "was probably cut short by a kill or a full disk. Fix: move it out of the run folder and resume from "
            "another checkpoint (`--ckpt_path last` picks the newest remaining one, or pass a path)."
        ) from None


def checkpoint_files(root: str | Path) -> list[Path]:
    """Every ``*.ckpt`` under the run folder (hpc_ckpt_N at its top, the others in checkpoints/): files, and
    directories (sharded checkpoints); and every ``.NAME.ckpt.old``, a checkpoint a sharded save moved aside (a
    kill before the new one was renamed in leaves it the only copy: capsdist.checkpoint.sharded)."""
    root = Path(root)
    found = [*root.rglob("*.ckpt"), *root.rglob(OLD.format("*.ckpt"))] if root.is_dir() else []
    return sorted(p for p in found if p.is_file() or p.is_dir())


def newest(root: str | Path) -> tuple[Path, int] | None:
    """(path, global step) of the checkpoint with the highest step under ``root``; step-0 files never count.

    Ties (e.g. last.ckpt and snapshot-step=N.ckpt of one step) go to the most recently written file.
    """
    steps = []
    for path in checkpoint_files(root):
        step = int(read_checkpoint(path).get("global_step", 0))
        if step > 0:
            steps.append((step, path.stat().st_mtime, path))
    if not steps:
        return None
    step, _, path = max(steps)
    return path, step


def best(root: str | Path) -> Path | None:
    """The ``best-*.ckpt`` of the run (the latest written if several)."""
    found = sorted(Path(root).rglob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve(ckpt_path: str, root: str | Path) -> tuple[Path, int]:
    """``last``/``best``/a path -> (checkpoint path, its global step); a missing one is a ResumeError."""
    if ckpt_path == "last":
        found = newest(root)
        if found is None:
            raise ResumeError(
                f"--ckpt_path last: {root} holds no checkpoint past step 0. Fix: check trainer.default_root_dir "
                "(the run folder of the run to resume), or drop --ckpt_path to start a fresh run."
            )
        return found
    path = best(root) if ckpt_path == "best" else Path(ckpt_path)
    if path is None or not path.exists():  # a directory: a sharded checkpoint
        raise ResumeError(
            f"--ckpt_path {ckpt_path}: no such checkpoint (run folder {root}). Fix: pass `last`, `best` or the path "
            "of a .ckpt that training wrote."
        )
    return path, int(read_checkpoint(path).get("global_step", 0))


def job_id() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for an array task), or None outside a SLURM batch job."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def launch_id() -> str | None:
    """Who restarts this command: the SLURM job (array task), or the torchrun launch (its rendezvous id; the
    agent's host and PID where the id is torchrun's default "none"); None for a plain command."""
    if job := job_id():
        return job
    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if run is None:
        return None
    return f"torchrun-{run}" if run != "none" else f"torchrun-{socket.gethostname()}-{os.getppid()}"


def _restart_name() -> str:
    """The log's name for a restart by the launcher."""
    if job := job_id():
        return f"SLURM requeue of job {job}"
    return f"torchrun restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '?')} ({launch_id()})"


def owning_job(root: str | Path) -> str | None:
    """The launch (SLURM job, torchrun) recorded in the run folder by the fit that trains in it, or None."""
    marker = Path(root) / JOB_FILE
    return marker.read_text().strip() if marker.is_file() else None


def claim(root: str | Path) -> None:
    """Record this launch as the run folder's owner, so that its restarts resume by themselves."""
    job = launch_id()
    if job:
        atomic_write(Path(root) / JOB_FILE, lambda f: f.write(f"{job}\n".encode()))


def plan(ckpt_path: str | None, root: str | Path) -> tuple[str | None, str]:
    """What ``fit`` resumes from (None: a fresh run; else last/best/a path for :func:`resolve`) and why, from
    ``--ckpt_path`` and the folder alone (nothing is written); a fresh fit into a used folder is refused.

    ``auto`` resumes the newest state if there is one, else starts fresh. Under torchrun ``last`` means the same:
    torchrun reruns one command line, and users who put ``--ckpt_path last`` in it must not fail on the first
    attempt (elsewhere ``last`` in a folder without checkpoints is a mistyped folder, and refused). A restart of
    the launch that owns the folder (SLURM requeue, torchrun restart) resumes without any flag.
    """
    elastic = "TORCHELASTIC_RESTART_COUNT" in os.environ
    if ckpt_path == "auto" or (ckpt_path == "last" and elastic):
        found = newest(root)
        if found is None:
            return None, f"a fresh run (--ckpt_path {ckpt_path}: no checkpoint past step 0 yet)"
        return "last", f"--ckpt_path {ckpt_path}: resuming"
    files = checkpoint_files(root)
    if ckpt_path is None and files:
        owner = launch_id()
        if owner is None or owning_job(root) != owner:
            raise refuse_reused_folder(root, files)
        if newest(root) is None:
            return None, f"{_restart_name()}, no checkpoint past step 0: a fresh run"
        return "last", f"{_restart_name()}, resuming by itself"
    return (None, "a fresh run") if ckpt_path is None else (str(ckpt_path), "resuming")


def how_to_resume(root: str | Path, finished: bool = False) -> str:
    """The sentence printed at every stop (and by capsdist.training.stop): the exact flag that continues this run."""
    more = " with a larger --trainer.max_steps (or max_epochs)" if finished else ""
    return (
        f"capsdist: to continue this run ({root}), rerun the same command{more} plus `--ckpt_path last` "
        "(with slurm/*.sbatch: the same sbatch line plus `--ckpt_path last`; a scheduler that always reruns one "
        "line can pass `--ckpt_path auto` from the start)."
    )


def refuse_reused_folder(root: Path, files: list[Path]) -> ResumeError:
    """The error for a fresh ``fit`` into a folder that already holds checkpoints."""
    shown = ", ".join(str(p.relative_to(root)) for p in files[:4]) + (" ..." if len(files) > 4 else "")
    return ResumeError(
        f"the run folder {root} already holds checkpoints ({shown}), and this fit was not asked to resume. "
        "Nothing there was changed. Fix: add `--ckpt_path last` to continue that run from its newest checkpoint, "
        "or start a fresh run in another folder (`--trainer.default_root_dir runs/NEW_NAME`)."
    )


def _differ(saved: dict[str, Any], configured: dict[str, Any], keys: Any) -> dict[str, str]:
    """``{key: "saved vs configured"}`` for the keys whose values differ (compared as JSON)."""
    plain = {k: (json.dumps(saved.get(k)), json.dumps(configured.get(k))) for k in keys}
    return {k: f"{a} vs {b}" for k, (a, b) in plain.items() if a != b}


def check_identity(checkpoint: dict[str, Any], path: Path, model: dict[str, Any], data: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another experiment (model settings or data source that differ), or with
    data settings that change the training stream (the resumed epoch would not continue where it stopped)."""
    saved = checkpoint.get("hyper_parameters", {})
    differ = _differ(saved, model, [k for k in IDENTITY_KEYS if k in saved or k in model])
    theirs = checkpoint.get("datamodule_hyper_parameters", {})
    if theirs.get("source") is not None and data.get("source") is not None and theirs["source"] != data["source"]:
        differ["data.source"] = f"{theirs['source']} vs {data['source']}"
    if differ:
        raise CheckpointMismatchError(
            f"{path} was written by a different model or experiment than the one configured (settings checkpoint "
            f"vs configured: {differ}), so resuming it would continue another run. Fix: resume with the settings "
            "of the run that wrote it (its config.yaml is in that run folder), or start a fresh run in a new "
            "folder without --ckpt_path."
        )
    stream = _differ(theirs, data, sorted((set(theirs) & set(data)) - FREE_ON_RESUME))
    if stream:
        flags = " ".join(f"--data.{k} {json.dumps(theirs[k])}" for k in stream)
        raise CheckpointMismatchError(
            f"{path} was trained on another data stream than the one configured (data settings checkpoint vs "
            f"configured: {stream}): the resumed run would not see the batches the interrupted one had left, so it "
            f"would not be the run it continues. Fix: resume with the checkpoint's settings ({flags}; the run "
            "folder's config.yaml holds them all), or start a fresh run in a new folder without --ckpt_path."
        )


def trainer_settings(trainer: pl.Trainer) -> dict[str, Any]:
    """The trainer settings that define the optimizer's steps, as the trainer resolved them (``32`` is
    ``32-true``; clipping off is ``gradient_clip_val`` 0 whether None or 0 was given, with no algorithm).

    precision sets the numbers every step computes with; accumulate_grad_batches how many batches make one step;
    gradient_clip_val/algorithm what each step applies; limit_train_batches the epoch's length, so where the data
    stream's epochs (their shuffles and shifts) begin. Free to change, not recorded: max_steps/max_epochs/max_time
    (how far to train), validation and logging settings (no weight depends on them), the device (a requeue may land
    on another kind of node), and deterministic/benchmark (which kernels compute a step, not what it computes;
    a run without deterministic is not bit-reproducible in the first place, resumed or not)."""
    clip = float(trainer.gradient_clip_val or 0)
    algorithm = trainer.gradient_clip_algorithm  # None: Lightning's default, "norm"
    return {
        "precision": str(trainer.precision),
        "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        "gradient_clip_val": clip,
        "gradient_clip_algorithm": str(getattr(algorithm, "value", algorithm) or "norm") if clip else None,
        "limit_train_batches": trainer.limit_train_batches,
    }


class RecordTrainerSettings(Callback):
    """Write :func:`trainer_settings` into every checkpoint of a fit (under ``TRAINER_KEY``), for
    :func:`check_trainer` when the run is resumed."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Record this run's settings."""
        checkpoint[TRAINER_KEY] = trainer_settings(trainer)


def check_trainer(checkpoint: dict[str, Any], path: Path, configured: dict[str, Any]) -> None:
    """Refuse to resume with trainer settings that change the optimizer's steps (:func:`trainer_settings`), naming
    each with the checkpoint's value and the configured one. A checkpoint written before capsdist recorded them has
    no record, and resumes as before: its settings are unknown, and refusing would strand every older run."""
    saved = checkpoint.get(TRAINER_KEY)
    if saved is None:
        return
    differ = _differ(saved, configured, sorted(set(saved) & set(configured)))
    if differ:
        flags = " ".join(f"--trainer.{k} {_flag_value(saved[k])}" for k in differ if saved[k] is not None)
        raise CheckpointMismatchError(
            f"{path} was trained with other trainer settings than the ones configured (checkpoint vs configured: "
            f"{differ}): they change the optimizer's steps (precision their numbers, accumulation the batches in "
            "each, clipping what each applies, limit_train_batches where the data's epochs begin), so the resumed "
            f"run would not be the run it continues. Fix: resume with the checkpoint's settings ({flags}; the run "
            "folder's config.yaml holds them all), or start a fresh run in a new folder without --ckpt_path."
        )


def _flag_value(value: Any) -> str:
    """A setting's value as a command-line flag takes it (strings bare, the rest as JSON)."""
    return value if isinstance(value, str) else json.dumps(value)


def check_loader(checkpoint: dict[str, Any], world_size: int, num_workers: int, needs_same_workers: bool) -> None:
    """Refuse, before anything is written, a loader state that this placement cannot resume exactly."""
    fit_loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    for state in fit_loop.get("combined_loader", []):
        if isinstance(state, dict) and state.get("version") is not None:
            check_state(state, world_size, num_workers, needs_same_workers, "training")


def remove_stale_hpc(root: str | Path, below_step: int, keep: Path | None = None) -> None:
    """Remove the hpc_ckpt_N checkpoints at the top of the run folder whose step is below ``below_step``
    (superseded), but ``keep``; a sharded one is a directory."""
    for path in Path(root).glob("hpc_ckpt_*.ckpt"):
        if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", path.name) and path != keep:
            try:
                step = int(read_checkpoint(path).get("global_step", 0))
            except CapsdistError:
                step = -1  # a torn (or refused) hpc checkpoint is superseded by anything
            if step < below_step and path.is_dir():
                shutil.rmtree(path)
            elif step < below_step:
                path.unlink(missing_ok=True)


def rewind_untrained(trainer: pl.Trainer) -> None:
    """Before a crash save: un-count the batch a step failed on (fetched, never trained: an exception in the
    forward, backward or before the optimizer step), so the loader state matches the weights' step."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    untrained = progress.ready - progress.processed
    loaders = trainer.train_dataloader
    for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
        if untrained > 0 and isinstance(loader, ResumableLoader):
            loader.rewind(untrained)


class EpochPosition(Checkpoint):
    """Keep a fit's last checkpoints mid-epoch when it stops mid-epoch (max_steps, max_time, early stopping).

    Lightning ends the epoch when a fit stops early: every save after the last training batch (epoch-end
    snapshot, best, the final last.ckpt) would record the next epoch, and `--ckpt_path last` with a larger
    max_steps would skip the rest of this one. Those saves get the loop state of the last training batch
    instead (what a snapshot at that batch holds; a resume from it is exact). ``trained`` says whether this
    process took any step (a resumed fit with nothing left to do writes no new last.ckpt).
    """

    def __init__(self) -> None:
        self.loops: dict[str, Any] | None = None
        self.step = self.start = -1
        self.trained = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember where this process started (0, or the step resumed from)."""
        self.start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any) -> None:
        """After the batch that ends the fit mid-epoch, keep the loop state of this moment (Lightning 2.6.6's
        loop internals: the stop conditions of its training epoch loop)."""
        self.trained = self.trained or trainer.global_step > self.start
        if stops_mid_epoch(trainer):
            self.loops = loops_state(trainer)
            self.step = trainer.global_step

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A save at the step the fit stopped at mid-epoch records that batch's loop state."""
        if self.loops is not None and trainer.global_step == self.step:
            checkpoint["loops"] = copy.deepcopy(self.loops)


def init_restarted_process_group(trainer: pl.Trainer) -> None:
    """On a torchrun restart, join the default process group through keys of this attempt only.

    torch 2.13's torchrun reuses its store across restarts, and a restarted rank can read the previous attempt's
    gloo addresses (seen here: rank 0 dialling the dead rank's old port until connectFullMesh gives up, or a hang).
    Lightning skips its own init when the group exists, so capsdist creates it under an attempt prefix first."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    strategy = trainer.strategy
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or trainer.world_size < 2:
        return
    if not torch.distributed.is_available() or torch.distributed.is_initialized():
        return
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    backend = getattr(strategy, "process_group_backend", None) or ("nccl" if strategy.root_device.type == "cuda"
                                                                     else "gloo")  # fmt: skip
    torch.distributed.init_process_group(
        backend,
        store=torch.distributed.PrefixStore(f"capsdist/attempt_{restart}", store),
        rank=trainer.global_rank,
        world_size=trainer.world_size,
    )
