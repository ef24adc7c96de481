"""Which checkpoint a run resumes from, and writing checkpoints so that a kill never leaves a torn file.

The rule (README "Training"): ``fit`` into a run folder that already holds checkpoints refuses unless resuming
is asked for (``--ckpt_path last|best|PATH``) or the process is the SLURM requeue of the job that owns the
folder. "last" is the checkpoint with the highest global step among hpc_ckpt_N, last, interrupted and
snapshot files (never a step-0 file), not Lightning's newest-file / hpc-first choice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from capsdist import CapsdistError
from capsdist.checkpoint import MODEL_ARGS
from capsdist.module import CheckpointMismatchError
from capsdist.sharded_checkpoint import read_meta

_STARTED = time.time()  # this process's start (the import of the training CLI): older temp files are stale
JOB_FILE = "slurm_job"  # in the run folder: the SLURM job (array task) id that owns it, for automatic requeue
# model settings a resumed run must share with its checkpoint (the rest, e.g. image logging, may change)
IDENTITY_KEYS = (*MODEL_ARGS, "num_targets", "recon_weight")


class ResumeError(CapsdistError):
    """A run folder or checkpoint that cannot be (re)started from as asked."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the destination folder, fsync, then rename over ``path``.

    The temp file lives beside the target so the rename never crosses filesystems (a mounted runs/ stays
    atomic); a kill mid-write leaves the old file intact plus a ``.tmp`` that the next save in that folder removes.
    A full disk or a file-size limit leaves the old file intact and is the one-paragraph write error (exit 2),
    not torch's ``inline_container.cc`` RuntimeError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; checkpoints follow the umask like other files
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = _disk_full(err)
        if full is not None:  # torch wraps the write's OSError in a RuntimeError: user_errors' disk-full paragraph
            raise OSError(full.errno, full.strerror, full.filename or str(path)) from err
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash of the node
    finally:
        os.close(dir_fd)


def _disk_full(err: BaseException | None) -> OSError | None:
    """The out-of-space error (disk full, quota, file-size limit) behind ``err``, if any; the earliest one that
    names a file when a save on the way out (interrupted.ckpt) failed like the first (cause/context chain)."""
    found = None
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            found = err if found is None or err.filename else found
        err = err.__cause__ or err.__context__
    return found


def remove_stale_temps(folder: Path) -> None:
    """Remove checkpoint temp files (``.NAME.ckpt.XXXX.tmp``) left in ``folder`` by a save killed mid-write: those
    last written before this process started (a save in progress elsewhere keeps writing, so is newer)."""
    for temp in folder.glob(".*.ckpt.*.tmp"):
        with contextlib.suppress(OSError):  # gone already (another rank's cleanup)
            if temp.is_file() and temp.stat().st_mtime < _STARTED:
                temp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with :func:`atomic_save` (Lightning's own moves a ``$TMPDIR`` file, no fsync)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        atomic_save(checkpoint, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint memory-mapped and ``weights_only``; a torn or foreign file is a one-paragraph error. A
    sharded checkpoint directory gives its meta.pt (everything but the tensors)."""
    path = Path(path)
    try:
        if path.is_dir():
            return read_meta(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError/UnpicklingError/EOFError/... for damaged files
        raise ResumeError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:160]}); it "
            "was probably cut short by a kill or a full disk. Fix: move it out of the run folder and resume from "
            "another checkpoint (`--ckpt_path last` picks the newest remaining one, or pass a path)."
        ) from None


def checkpoint_files(root: str | Path) -> list[Path]:
    """Every ``*.ckpt`` under the run folder (hpc_ckpt_N at its top, the others in checkpoints/): files, and
    directories (sharded checkpoints)."""
    root = Path(root)
    return sorted(p for p in root.rglob("*.ckpt") if p.is_file() or p.is_dir()) if root.is_dir() else []


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
    if path is None or not path.is_file():
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


def owning_job(root: str | Path) -> str | None:
    """The SLURM job id recorded in the run folder by the job that trains in it, or None."""
    marker = Path(root) / JOB_FILE
    return marker.read_text().strip() if marker.is_file() else None


def claim(root: str | Path) -> None:
    """Record this SLURM job as the run folder's owner, so its requeues resume by themselves."""
    job = job_id()
    if job:
        marker = Path(root) / JOB_FILE
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{JOB_FILE}.{os.getpid()}")
        tmp.write_text(job + "\n")
        os.replace(tmp, marker)


def refuse_reused_folder(root: Path, files: list[Path]) -> ResumeError:
    """The error for a fresh ``fit`` into a folder that already holds checkpoints."""
    shown = ", ".join(str(p.relative_to(root)) for p in files[:4]) + (" ..." if len(files) > 4 else "")
    return ResumeError(
        f"the run folder {root} already holds checkpoints ({shown}), and this fit was not asked to resume. "
        "Nothing there was changed. Fix: add `--ckpt_path last` to continue that run from its newest checkpoint, "
        "or start a fresh run in another folder (`--trainer.default_root_dir runs/NEW_NAME`)."
    )


def check_identity(checkpoint: dict[str, Any], path: Path, model: dict[str, Any], data: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of another experiment: model settings or data source that differ."""
    saved = checkpoint.get("hyper_parameters", {})
    plain = {k: (json.dumps(saved.get(k)), json.dumps(model.get(k))) for k in IDENTITY_KEYS}
    differ = {k: f"{a} vs {b}" for k, (a, b) in plain.items() if a != b and (k in saved or k in model)}
    theirs = checkpoint.get("datamodule_hyper_parameters", {}).get("source")
    if theirs is not None and data.get("source") is not None and theirs != data["source"]:
        differ["data.source"] = f"{theirs} vs {data['source']}"
    if differ:
        raise CheckpointMismatchError(
            f"{path} was written by a different model or experiment than the one configured (settings checkpoint "
            f"vs configured: {differ}), so resuming it would continue another run. Fix: resume with the settings "
            "of the run that wrote it (its config.yaml is in that run folder), or start a fresh run in a new "
            "folder without --ckpt_path."
        )


def stale_hpc(root: str | Path, below_step: int) -> list[Path]:
    """hpc_ckpt_N files at the top of the run folder whose step is below ``below_step`` (superseded)."""
    found = []
    for path in Path(root).glob("hpc_ckpt_*.ckpt"):
        if re.fullmatch(r"hpc_ckpt_\d+\.ckpt", path.name):
            try:
                step = int(read_checkpoint(path).get("global_step", 0))
            except ResumeError:
                step = -1  # a torn hpc file is superseded by anything
            if step < below_step:
                found.append(path)
    return found
