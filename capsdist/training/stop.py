"""How a fit stops early: SIGUSR1 (time limit), SIGTERM (preemption, requeue, scancel, node drain) and Ctrl-C.

The handlers (capsdist.cluster.signals, installed first thing by the CLI) only record the request: no collective may run
inside one (a rank interrupted mid-step would wait in it while another sits in the backward all-reduce). All
ranks agree on the strongest request with one all-reduce at each point where a stop can be honoured, wherever
the signal lands:
  - after a training batch: save one checkpoint together, at that step;
  - during validation (checked after every validation batch): abandon the pass and save the last completed
    training step, marked so that the resumed run redoes that validation (:func:`_redo_validation`);
  - before the first step (setup, sanity check, ``on_train_start``): nothing new to save; just leave;
  - while the main thread waits for data that does not come (a stalled shard read with 0 loader workers, or the
    wait for a worker's batch; a run of one rank only: the data loader raises ``StopRequested``): as at the
    boundary the wait comes before (the last training step saved, or, in validation, as during validation);
  - during the end-of-fit work: the final state is saved as usual, the optional figures are skipped.
Then W&B is marked preempting and finished (its service survives the signal: capsdist.cluster.wandb_shield), the summary
line printed, and the process exits with a code that says why (capsdist.cluster.requeue), so a supervisor never
mistakes a stopped run for a finished one. On SIGUSR1 the job is requeued: by the batch script when it runs
under capsdist's templates (they requeue on the tasks' request from the host, where ``scontrol`` exists even when
the tasks run in a container), else by rank 0's ``scontrol requeue``. SIGTERM is never requeued from here: SLURM
requeues preempted jobs itself, and a cancelled job must stay so.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from capsdist.cluster import signals
from capsdist.cluster.requeue import NAMES, leave
from capsdist.cluster.signals import INTERRUPT, REQUEUE
from capsdist.compat.lightning import hpc_save_path, log_step_values, redo_final_validation
from capsdist.training.nosync import agree_max
from capsdist.training.resume import how_to_resume, remove_stale_hpc
from capsdist.training.run import finish_wandb


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
    """Turn USR1/TERM/INT into one checkpoint at a common boundary and an exit code (module docstring).

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
        self.val_seconds = 0.0
        self.trained = False  # whether this process took a training step (else a stop has nothing new to save)
        self._val_progress: dict | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Own the signals while fitting (the CLI installed them already; Lightning then leaves them alone); a fit
        resumed from a stop during its last validation redoes that pass (:func:`_redo_validation`)."""
        if stage == "fit":
            signals.install()
            redo_final_validation(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Honour a stop that came during setup or the sanity check: leave before the first step."""
        signals.install()
        if request := self._agreed():
            self._stop(trainer, request, save=False)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Restore the handlers that were there before (an in-process caller may fit again)."""
        if stage == "fit":
            signals.restore()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Time the validation pass (for the time-limit check) and remember its progress before the first batch."""
        self._val_started = time.monotonic()
        self._val_progress = copy.deepcopy(trainer.fit_loop.epoch_loop.val_loop.batch_progress.state_dict())

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        """A stop during validation (or the sanity check) abandons the pass (class docstring)."""
        if trainer.state.fn != "fit":
            return
        if request := self._agreed():
            self._stop(trainer, request, save=self.trained and not trainer.sanity_checking)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember how long validation took; a completed pass has no batch in flight (a redone one, see
        :func:`_redo_validation`, would otherwise keep its first batch counted twice and look interrupted again)."""
        if not trainer.sanity_checking:
            self.val_seconds = time.monotonic() - self._val_started
            total = trainer.fit_loop.epoch_loop.val_loop.batch_progress.total
            total.ready = total.started = total.processed
        self._val_progress = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """If any rank has a request (or time is short): save on all ranks, then stop with the request's code."""
        self.trained = True
        if self.job_end is not None and self.job_end - time.time() < self.lead_s + self.val_seconds:
            signals.raise_request(REQUEUE)
        if request := self._agreed():
            self._end_step(trainer, pl_module, outputs, batch, batch_idx)
            self._stop(trainer, request)

    def _end_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *hook_args: Any) -> None:
        """Finish the stopping step as the loop would have (its later callbacks' and the module's
        ``on_train_batch_end``, its values to the loggers, a stop making it a logging step): the history has no gap."""
        trainer.should_stop = True
        later = trainer.callbacks[trainer.callbacks.index(self) + 1 :]
        for callback in later:
            callback.on_train_batch_end(trainer, pl_module, *hook_args)
        pl_module.on_train_batch_end(*hook_args)
        log_step_values(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A stop honoured while the data loader waited (``StopRequested``): save and report as the boundary before
        the wait would; Lightning then re-raises it, which exits with the stop's code."""
        if isinstance(exception, signals.StopRequested) and trainer.state.fn == "fit":
            save = self.trained and not trainer.sanity_checking
            exception.code = self._finish(trainer, signals.request(), save=save)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A checkpoint written during validation resumes by redoing that validation pass."""
        if self._val_progress is not None and not trainer.sanity_checking:
            _redo_validation(checkpoint, self._val_progress)

    @staticmethod
    def _agreed() -> int:
        """The strongest request of any rank, agreed on the host (a gloo all-reduce, no device sync:
        capsdist.training.nosync);
        every rank calls it at the same point."""
        return agree_max(signals.request())

    def _stop(self, trainer: pl.Trainer, request: int, save: bool = True) -> None:
        """Save (``save``), report and exit with the request's code (every rank, at the same point)."""
        raise TrainingStopped(self._finish(trainer, request, save))

    def _finish(self, trainer: pl.Trainer, request: int, save: bool) -> int:
        """Save the state reached (``save``), say so, finish W&B; the exit code."""
        started = time.monotonic()
        under_slurm = SLURMEnvironment.detect()
        path = None
        if save and under_slurm:  # Lightning's naming; rank 0 picks the number for everyone
            hpc = hpc_save_path(trainer, trainer.default_root_dir)
            path = Path(trainer.strategy.broadcast(hpc)).resolve()
        elif save:
            path = self.interrupted.resolve()
        if path is not None:
            trainer.save_checkpoint(path, weights_only=False)  # returns on every rank once the file is complete
        if trainer.is_global_zero and path and under_slurm:
            remove_stale_hpc(path.parent, trainer.global_step + 1, keep=path)
        where = "during validation, " if trainer.validating and not trainer.sanity_checking else ""
        saved = f"saved {path} at step {trainer.global_step}" if path else "nothing new to save (no step taken)"
        code, note = leave(request, trainer.is_global_zero, under_slurm, saved)  # marks, requeue
        if trainer.is_global_zero:
            rank_zero_info(
                f"capsdist: {NAMES[request]} -> {where}{saved} in {time.monotonic() - started:.1f} s; "
                f"{note or 'exiting'} (exit code {code})"
            )
            print(fit_summary(trainer, stopped=NAMES[request], checkpoint=str(path) if path else None,
                              exit_code=code), flush=True)  # fmt: skip
            rank_zero_info(how_to_resume(trainer.default_root_dir))  # a requeue resumes by itself; anything else
        # W&B's service is shielded from the signal (capsdist.cluster.wandb_shield); a failure must not crash
        try:
            finish_wandb(trainer, preempting=request != INTERRUPT, exit_code=code)
        except Exception as err:
            rank_zero_warn(f"capsdist: the W&B run was not finished cleanly ({err}); its local files are kept")
        return code


def _redo_validation(checkpoint: dict, before: dict) -> None:
    """Mark a checkpoint saved mid-validation as "restarted mid evaluation, at its first batch": on resume Lightning
    2.6 goes back into that validation pass (instead of skipping it as done) and, its per-pass counters reset,
    runs it whole. ``before``: the validation loop's batch progress when the pass started."""
    progress = copy.deepcopy(before)
    for counter in ("total", "current"):
        progress[counter]["ready"] = progress[counter]["completed"] + 1
        progress[counter]["started"] = progress[counter]["completed"] + 1
        progress[counter]["processed"] = progress[counter]["completed"]
    checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"] = progress
