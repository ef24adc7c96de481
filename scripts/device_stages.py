"""The device check's service, time-to-accuracy and MultiMNIST stages (scripts/device_check.py runs them).

- service: `python -m capsdist.bench --what service` at batch 128, 512, 2048: the training CLI's images/s against
  the bare loop's (the bench's step plus the same data) on this device, one round each.
- time_to_accuracy: from the paper-model training run's validation curve (10k test digits, wall seconds since
  the fit started): the first time at or above 99.6% and 99.65%, or null when never reached.
- multimnist: `configs/multimnist_onthefly.yaml` with on-device generation for the seconds given, then `test` on
  the fixed test stream of that config (10k overlays): the test error of the paper's MultiMNIST metric.
"""

from __future__ import annotations

import shlex
import sys
from typing import Any

TARGETS = (0.996, 0.9965)


def service_stage(check: Any, device: str, smoke: bool, json_lines: Any) -> None:
    """CLI against bare-loop rates per batch size (capsdist.bench.service)."""
    sizes = [8] if smoke else [128, 512, 2048]
    steps = ["--warmup", "1", "--steps", "2"] if smoke else ["--warmup", "20", "--steps", "60"]
    for size in sizes:
        flags = ["--what", "service", "--batch_size", str(size), "--repetitions", "1", *steps]
        argv = [sys.executable, "-m", "capsdist.bench", "--device", device, *flags]
        code, out = check.run(f"service_b{size}", argv, 240)
        for row in json_lines(out):
            check.emit({**row, "stage": f"service_b{size}"})
        if code not in (0, None):
            check.emit({"what": "service", "batch_size": size, "exit_code": code, "error": "see device_check.log"})


def time_to_accuracy(check: Any, points: list[list[float]], command: str) -> None:
    """Seconds from the fit's start to each target validation accuracy ([step, epoch, acc, elapsed] points)."""
    row: dict[str, Any] = {"what": "time_to_accuracy", "command": command, "validations": len(points)}
    for target in TARGETS:
        hit = next((p for p in points if p[2] >= target and p[3] is not None), None)
        key = f"{target * 100:g}"
        row[f"seconds_to_{key}"] = round(hit[3], 1) if hit else None
        row[f"step_to_{key}"] = hit[0] if hit else None
    row["best_acc"] = max((p[2] for p in points), default=None)
    check.emit(row)


def multimnist_stage(check: Any, device: str, smoke: bool, json_lines: Any, seconds: float) -> None:
    """Train the MultiMNIST on-the-fly config for `seconds` (overlays composed on the device), then test it."""
    run = check.work / "run_multimnist"
    common = "--wandb_mode disabled --trainer.enable_progress_bar false --model.log_images_every_n_steps 0"
    common += f" --data.generate_on_device {str(device == 'cuda').lower()}"
    if smoke:
        common += (
            " --model.conv_channels 8 --model.primary_channels 4 --data.train_samples 256 --data.val_samples 64"
            " --data.batch_size 32 --data.num_workers 0 --trainer.precision 32 --trainer.limit_test_batches 2"
        )
    limit = f"{int(seconds) // 3600:02d}:{int(seconds) // 60 % 60:02d}:{int(seconds) % 60:02d}"
    fit_only = f" --trainer.max_steps -1 --trainer.max_epochs {1 if smoke else 1000} --trainer.max_time 00:{limit}"
    fit_only += " --checkpoint_every_n_steps 0"
    config = ["--config", "configs/multimnist_onthefly.yaml", "--trainer.default_root_dir", str(run)]
    base = [sys.executable, "-m", "capsdist.train"]
    code, out = check.run("multimnist_fit", [*base, "fit", *config, *shlex.split(common + fit_only)], seconds + 120)
    summary = (json_lines(out) or [{}])[-1]
    row = {"what": "multimnist", "exit_code": code, "steps": summary.get("global_step"), "fit": summary}
    last = run / "checkpoints" / "last.ckpt"
    if last.is_file():
        test = [*base, "test", *config, *shlex.split(common), "--ckpt_path", str(last)]
        code, out = check.run("multimnist_test", test, 300)
        metrics = (json_lines(out) or [{}])[-1]
        row.update(test=metrics, test_error=metrics.get("test/error"))
        row["exit_code"] = row["exit_code"] or code  # a failed test fails the stage
    command = "python -m capsdist.train fit --config configs/multimnist_onthefly.yaml" + " " + common + fit_only
    check.emit({**row, "command": command})
