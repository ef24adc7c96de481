"""A Lightning callback for the scale-out tests: records what each rank trained on, and can hold for a signal.

Added to a real `python -m capsdist.train` run through a YAML config (``trainer.callbacks``); each rank writes
``rank<r>-run<k>.json`` (k = SLURM restart count, 0 outside SLURM) with its global step, a digest of every
training/validation sample it saw, and a digest of its parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


def tensor_digest(tensor: torch.Tensor) -> str:
    """Short content hash of a tensor (dtype, shape and values)."""
    data = tensor.detach().cpu().contiguous()
    head = f"{data.dtype}{tuple(data.shape)}".encode()
    return hashlib.sha256(head + data.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


class RankProbe(pl.Callback):
    """Record per-rank samples/steps/params; optionally hold the first run at ``pause_at_step``.

    A held rank writes ``paused-rank<r>`` into ``out_dir`` and sleeps (signals are handled meanwhile) until the
    test creates ``out_dir/resume``, so a signal sent in between arrives at a known step.
    """

    def __init__(
        self, out_dir: str, pause_at_step: int | None = None, pause_timeout: float = 120.0, pause_in: str = "train"
    ) -> None:
        """``out_dir``: where the JSON records and the pause/resume marker files go; ``pause_in``: hold after the
        training batch of ``pause_at_step`` ("train"), in the first validation batch at that step ("val"), or before
        the first training step ("start", with ``pause_at_step`` 0)."""
        self.out_dir = Path(out_dir)
        self.pause_at_step, self.pause_timeout, self.pause_in = pause_at_step, pause_timeout, pause_in
        self.run = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        self.train: list[str] = []
        self.val: list[str] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        """Digest every training sample of this rank."""
        self.train += [tensor_digest(image) for image in batch["image"]]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Hold before the first step if asked."""
        if self.pause_in == "start":
            self._hold(trainer, pl_module)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int, dataloader_idx: int = 0
    ) -> None:
        """Digest every validation sample of this rank (and hold in the first one at the pause step if asked)."""
        self.val += [tensor_digest(image) for image in batch["image"]]
        if self.pause_in == "val" and idx == 0 and not trainer.sanity_checking:
            self._hold(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        """In the first run, hold at ``pause_at_step`` until the test says resume."""
        if self.pause_in == "train":
            self._hold(trainer, pl_module)

    def _hold(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run != 0 or trainer.global_step != self.pause_at_step:
            return
        self._write(trainer, pl_module)
        (self.out_dir / f"paused-rank{trainer.global_rank}").touch()
        deadline = time.monotonic() + self.pause_timeout
        while not (self.out_dir / "resume").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the final record of this rank."""
        self._write(trainer, pl_module)

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [tensor_digest(p) for p in pl_module.state_dict().values()]
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "run": self.run,
            "global_step": trainer.global_step,
            "train": self.train,
            "val": self.val,
            "params": hashlib.sha256("".join(params).encode()).hexdigest()[:16],
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}-run{self.run}.json").write_text(json.dumps(record))


def write_yaml(path: Path, config: dict) -> Path:
    """Write ``config`` as YAML to ``path``; returns the path."""
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def probe_config(path: Path, out: Path, **probe: object) -> Path:
    """A config snippet adding :class:`RankProbe` (recording into ``out``) to the trainer's callbacks."""
    callback = {"class_path": "tests.scale_probe.RankProbe", "init_args": {"out_dir": str(out), **probe}}
    return write_yaml(path, {"trainer": {"callbacks": [callback]}})


def records(out: Path, run: int = 0) -> list[dict]:
    """The probe records of one run, by rank."""
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"rank*-run{run}.json"))]


def wait_paused(out: Path, ranks: int, alive: Any, timeout: float = 180) -> None:
    """Wait until ``ranks`` ranks hold at the pause step; ``alive()`` false (the run ended) fails at once."""
    deadline = time.monotonic() + timeout
    while len(list(out.glob("paused-rank*"))) < ranks:
        if time.monotonic() > deadline or not alive():
            raise AssertionError(f"the run never reached its pause step ({out})")
        time.sleep(0.3)


def train_env(**extra: str) -> dict[str, str]:
    """Environment for training subprocesses: this repo importable, one thread per process, a free port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    repo = str(Path(__file__).resolve().parents[1])
    ports = {"MASTER_PORT": str(port), "CAPSDIST_MASTER_PORT": str(port)}  # several test clusters on one host
    return {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "1", **ports, **extra}
