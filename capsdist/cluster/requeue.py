"""How a stopped task leaves, in the job's terms: the exit code per stop request, the marks the batch script of
capsdist's templates reads (slurm/launch.sh), and the requeue. Lightweight (no torch): a stop during startup
(capsdist.train) leaves through it before the heavy imports are done; capsdist.training.stop after a save."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from capsdist.cluster.signals import EXIT_CODES, INTERRUPT, REQUEUE, TERMINATE

NAMES = {REQUEUE: "requeue (SIGUSR1 or time limit)", INTERRUPT: "Ctrl-C (SIGINT)", TERMINATE: "SIGTERM"}


def job_id() -> str | None:
    """This SLURM job's id (``<array job>_<task>`` for an array task), or None outside a SLURM batch job."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def leave(request: int, rank_zero: bool, under_slurm: bool, said: str) -> tuple[int, str]:
    """The exit code for ``request`` and a note for the log, after leaving the marks (rank 0; they hold ``said``,
    what was saved, for the batch script's log line) and requeueing (rank 0, on SIGUSR1). Under the templates
    (``CAPSDIST_REQUEUE=batch``) the tasks end 0 and the batch script sets the job's exit from the marks: a
    routine requeue's step reads COMPLETED in sacct, not FAILED 75 or 143; a SIGTERM to the steps alone still
    fails the job through the stop mark (its code, 143, is the batch script's)."""
    code, note = EXIT_CODES[request], ""
    if request != INTERRUPT and os.environ.get("CAPSDIST_REQUEUE") == "batch":
        if rank_zero and request == TERMINATE and os.environ.get("CAPSDIST_STOP_MARK"):
            Path(os.environ["CAPSDIST_STOP_MARK"]).write_text(said)
        code = 0
    if rank_zero and request == REQUEUE:
        note, code = _requeue(under_slurm, said)
    return code, note


def _requeue(under_slurm: bool, said: str) -> tuple[str, int]:
    """Requeue this job if we are the ones to; returns a log note and the exit code."""
    job = job_id()
    if not under_slurm or not job:
        return "not under SLURM: nothing to requeue", EXIT_CODES[REQUEUE]
    if os.environ.get("CAPSDIST_REQUEUE") == "batch":  # the mark is what the batch script reads: exit 0
        if os.environ.get("CAPSDIST_REQUEUE_MARK"):
            Path(os.environ["CAPSDIST_REQUEUE_MARK"]).write_text(said)
        return f"the batch script requeues job {job}", 0
    if shutil.which("scontrol") is None:
        print(
            "capsdist: warning: no `scontrol` in the task environment (a container?): cannot requeue from here. "
            f"Exiting with {EXIT_CODES[REQUEUE]}; requeue from the batch script as slurm/launch.sh does, or "
            f"have the site requeue that code (slurm.conf RequeueExit={EXIT_CODES[REQUEUE]}).",
            file=sys.stderr,
        )
        return "no scontrol to requeue with", EXIT_CODES[REQUEUE]
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    return f"`scontrol requeue {job}` -> {result.returncode} {result.stderr.strip()}", EXIT_CODES[REQUEUE]


def leave_at_startup(request: int) -> int:
    """A stop that came before the fit began (imports, argument parsing, data checks, the checkpoint's reading), or
    during validate/test/predict (they take no step): nothing was trained, so nothing is saved; say so on rank 0
    and return the exit code (:func:`leave`). The rank and whether this is an srun task come from the
    environment, as Lightning reads them."""
    rank_zero = os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")) == "0"
    srun_task = "SLURM_NTASKS" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    said = "nothing saved: stopped before any training step"
    code, note = leave(request, rank_zero, srun_task, said)
    if rank_zero:
        print(f"capsdist: {NAMES[request]} before any training step -> stopped at once, nothing "
              f"saved (nothing trained in this process); {note or 'exiting'} (exit code {code})", file=sys.stderr,
              flush=True)  # fmt: skip
    return code
