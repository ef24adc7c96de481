"""How a fit stops early: SIGUSR1 (time limit), SIGTERM (preemption, requeue, scancel, node drain) and Ctrl-C.

Every such stop is handled the same way: the signal handler only records it (no collective may run there: a
rank interrupted mid-step would wait in it while another sits in the backward all-reduce); after the current
training batch all ranks agree on the strongest request with one all-reduce, save one checkpoint together,
finish W&B, print the summary line and leave before any validation pass, with an exit code that says why
(:data:`EXIT_CODES`), so a supervisor never mistakes a stopped run for a finished one. On SIGUSR1 the job is
requeued: by the batch script when it runs under capsdist's templates (they requeue on exit code 75 from the
host, where ``scontrol`` exists even when the tasks run in a container), else by rank 0's ``scontrol requeue``.
SIGTERM is never requeued from here: SLURM requeues preempted jobs itself, and a cancelled job must stay so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from capsdist.nosync import agree_max
from capsdist.resume import job_id, stale_hpc
from capsdist.run import finish_wandb

# request kinds in rising priority (ranks agree on the max): requeue (USR1 or the time-limit check), Ctrl-C, SIGTERM
REQUEUE, INTERRUPT, TERMINATE = 1, 2, 3
# exit code per request: 75 (EX_TEMPFAIL) = saved, requeue me; 130/143 = the shell's codes for SIGINT/SIGTERM
EXIT_CODES = {REQUEUE: 75, INTERRUPT: 130, TERMINATE: 143}
NAMES = {REQUEUE: "requeue (SIGUSR1 or time limit)", INTERRUPT: "Ctrl-C (SIGINT)", TERMINATE: "SIGTERM"}


class TrainingStopped(SystemExit):
    """Raised on every rank after the stop checkpoint is written; exits the process with the stop's code."""


def fit_summary(trainer: pl.Trainer, **extra: Any) -> str:
    """The fit's outcome as one JSON line: step, validation metrics, best checkpoint and ``extra``."""
    summary = {
        "global_step": trainer.global_step,
        **{k: round(float(v), 5) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
        "data_skipped": int(trainer.callback_metrics.get("data/skipped", 0)),  # corrupt samples, all ranks
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None) or None,
        **extra,
    }
    return json.dumps(summary)


class GracefulStop(pl.Callback):
    """Turn USR1/TERM/INT into one checkpoint at a common step boundary and an exit code (module docstring).

    ``interrupted``: where a stop outside SLURM saves; under SLURM the checkpoint is ``hpc_ckpt_N.ckpt`` in the
    run folder and older hpc files are deleted once it is complete. ``job_end``/``lead_s`` (the templates set
    ``CAPSDIST_JOB_END`` and ``CAPSDIST_STOP_LEAD_S``): when the time left is below ``lead_s`` plus the last
    validation's duration, stop for requeue now instead of starting a validation that cannot finish.
    """

    def __init__(self, interrupted: str | Path, job_end: float | None = None, lead_s: float | None = None) -> None:
        """See the class docstring; ``job_end`` is a Unix time."""
        self.interrupted = Path(interrupted)
        env_end = os.environ.get("CAPSDIST_JOB_END", "")
        self.job_end = job_end if job_end is not None else (float(env_end) if env_end.isdigit() else None)
        self.lead_s = lead_s if lead_s is not None else float(os.environ.get("CAPSDIST_STOP_LEAD_S", "90"))
        self.request = 0
        self.val_seconds = 0.0
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        kind = {signal.SIGUSR1: REQUEUE, signal.SIGINT: INTERRUPT}.get(signal.Signals(signum), TERMINATE)
        self.request = max(self.request, kind)
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once (Lightning then saves nothing past step 0)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Own the signals while fitting; Lightning then leaves SIGUSR1 alone."""
        if stage == "fit":
            self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Lightning has registered its SIGTERM handler (a broadcast inside the handler) by now: replace it."""
        self._install()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Restore the handlers that were there before fit."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Time the validation pass (for the time-limit check)."""
        self._val_started = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember how long validation took."""
        if not trainer.sanity_checking:
            self.val_seconds = time.monotonic() - self._val_started

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """If any rank has a request (or time is short): save on all ranks, then stop with the request's code."""
        if self.job_end is not None and self.job_end - time.time() < self.lead_s + self.val_seconds:
            self.request = max(self.request, REQUEUE)
        request = agree_max(self.request)  # on the host: no device sync per step (capsdist.nosync)
        if request:
            self._stop(trainer, request)

    def _stop(self, trainer: pl.Trainer, request: int) -> None:
        started = time.monotonic()
        under_slurm = SLURMEnvironment.detect()
        if under_slurm:  # Lightning's naming; rank 0 picks the number for everyone
            hpc = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
            path = Path(trainer.strategy.broadcast(hpc)).resolve()
        else:
            path = self.interrupted.resolve()
        trainer.save_checkpoint(path, weights_only=False)  # returns on every rank once the file is complete
        code = EXIT_CODES[request]
        note = ""
        if trainer.is_global_zero:
            for stale in stale_hpc(path.parent, trainer.global_step + 1) if under_slurm else []:
                if stale != path:
                    stale.unlink(missing_ok=True)
            if request == REQUEUE:
                note, code = self._requeue(under_slurm)
            rank_zero_info(
                f"capsdist: {NAMES[request]} -> saved {path} at step {trainer.global_step} in "
                f"{time.monotonic() - started:.1f} s; {note or 'exiting'} (exit code {code})"
            )
            print(fit_summary(trainer, stopped=NAMES[request], checkpoint=str(path), exit_code=code), flush=True)
        try:  # the step's SIGTERM also reaches W&B's service process; its loss must not turn into a crash
            finish_wandb(trainer)
        except Exception as err:
            rank_zero_warn(f"capsdist: the W&B run was not finished cleanly ({err}); its local files are kept")
        raise TrainingStopped(code)

    def _requeue(self, under_slurm: bool) -> tuple[str, int]:
        """Requeue this job if we are the ones to; returns a log note and the exit code."""
        job = job_id()
        if not under_slurm or not job:
            return "not under SLURM: nothing to requeue", EXIT_CODES[REQUEUE]
        if os.environ.get("CAPSDIST_REQUEUE") == "batch":
            if os.environ.get("CAPSDIST_REQUEUE_MARK"):
                Path(os.environ["CAPSDIST_REQUEUE_MARK"]).touch()
            return f"the batch script requeues job {job}", EXIT_CODES[REQUEUE]
        if shutil.which("scontrol") is None:
            rank_zero_warn(
                "capsdist: no `scontrol` in the task environment (a container?): cannot requeue from here. "
                f"Exiting with {EXIT_CODES[REQUEUE]}; requeue from the batch script as slurm/launch.sh does, or "
                f"have the site requeue that code (slurm.conf RequeueExit={EXIT_CODES[REQUEUE]})."
            )
            return "no scontrol to requeue with", EXIT_CODES[REQUEUE]
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        return f"`scontrol requeue {job}` -> {result.returncode} {result.stderr.strip()}", EXIT_CODES[REQUEUE]

