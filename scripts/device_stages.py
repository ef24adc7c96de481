"""The device check's service, time-to-accuracy and MultiMNIST stages (scripts/device_check.py runs them).

- service: `python -m capsdist.bench --what service` at batch 128, 512, 2048: the training CLI's images/s against
  the bare loop's (the bench's step plus the same data) on this device, one round each.
- time_to_accuracy: from the paper-model training run's validation curve (10k test digits, wall seconds since
  the fit started): the first time at or above 99.6% and 99.65%, or null when never reached.
- multimnist: `configs/multimnist_onthefly.yaml` with on-device generation for the seconds given, then `test` on
  the fixed test stream of that config (10k overlays): the test error of the paper's MultiMNIST metric.
- multimnist_paper: the paper's MultiMNIST run (`configs/multimnist.yaml` + `configs/multimnist_onthefly.yaml`,
  bf16-mixed, overlays composed on the device) for the seconds given, validated on the start of the fixed test
  stream every K steps: one `multimnist_paper_val` row per validation (accuracy per image seen), then a
  `multimnist_paper_estimate` row: the training FLOPs per image the training CLI counts (the ratio of the FLOP/s
  and images/s it logs), the FLOP/s achieved and the hours to the paper's 60M training overlays at the rate
  measured.
"""

from __future__ import annotations

import csv
import shlex
import sys
from pathlib import Path
from typing import Any

from capsdist.core.paper import MULTIMNIST_TEST_ERROR, MULTIMNIST_TRAIN_IMAGES

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


def max_time(seconds: float) -> str:
    """Lightning's --trainer.max_time value (DD:HH:MM:SS) for `seconds`."""
    whole = int(seconds)
    return f"00:{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def onthefly_flags(device: str) -> str:
    """The flags of every on-the-fly MultiMNIST stage: no W&B, progress bar or images; overlays composed on a GPU."""
    common = "--wandb_mode disabled --trainer.enable_progress_bar false --model.log_images_every_n_steps 0"
    return common + f" --data.generate_on_device {str(device == 'cuda').lower()}"


def validations(metrics_csv: Path) -> list[dict[str, Any]]:
    """Every validation of a Lightning CSV log: steps done (Lightning logs a validation at the step before its
    count goes up), epoch, val/acc, val/digit_acc, seconds since the fit started (WallClock's time/elapsed_s, or
    None) and the training images/s and FLOP/s logged last before it (ThroughputMonitor's, validations excluded)."""
    points: list[dict[str, Any]] = []
    rates: dict[str, float | None] = {"train_images_per_s": None, "train_flops_per_s": None}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            if row.get("train/device/samples_per_sec"):
                rates["train_images_per_s"] = float(row["train/device/samples_per_sec"])
                flops = row.get("train/device/flops_per_sec")
                rates["train_flops_per_s"] = float(flops) if flops else None
            if row.get("val/acc"):
                points.append(
                    {
                        "steps": int(row["step"]) + 1,
                        "epoch": int(row["epoch"]),
                        "acc": float(row["val/acc"]),
                        "digit_acc": float(row["val/digit_acc"]) if row.get("val/digit_acc") else None,
                        "elapsed": float(row["time/elapsed_s"]) if row.get("time/elapsed_s") else None,
                        **rates,
                    }
                )
    return points


def multimnist_stage(check: Any, device: str, smoke: bool, json_lines: Any, seconds: float) -> None:
    """Train the MultiMNIST on-the-fly config for `seconds` (overlays composed on the device), then test it."""
    run = check.work / "run_multimnist"
    common = onthefly_flags(device)
    if smoke:
        common += (
            " --model.conv_channels 8 --model.primary_channels 4 --data.train_samples 256 --data.val_samples 64"
            " --data.batch_size 32 --data.num_workers 0 --trainer.precision 32 --trainer.limit_test_batches 2"
        )
    fit_only = f" --trainer.max_steps -1 --trainer.max_epochs {1 if smoke else 1000}"
    fit_only += f" --trainer.max_time {max_time(seconds)} --checkpoint_every_n_steps 0"
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


def multimnist_paper_stage(
    check: Any, device: str, smoke: bool, json_lines: Any, seconds: float, val_samples: int, val_every: int
) -> None:
    """The paper's MultiMNIST run for `seconds`, validated on `val_samples` test overlays every `val_every` steps:
    a row per validation (accuracy per image seen), then the counted FLOPs and the time to the paper's images."""
    run = check.work / "run_multimnist_paper"
    batch, precision = (16, "32") if smoke else (128, "bf16-mixed")  # the paper's batch; the config's precision
    seconds = max(10.0, min(seconds, check.left() - 120))  # Lightning's start and last validation fit in the rest
    flags = onthefly_flags(device) + f" --trainer.max_time {max_time(seconds)} --checkpoint_every_n_steps 0"
    flags += f" --trainer.check_val_every_n_epoch null --trainer.val_check_interval {val_every}"
    flags += f" --data.val_samples {val_samples} --data.batch_size {batch} --trainer.precision {precision}"
    if smoke:
        flags += (
            " --model.conv_channels 8 --model.primary_channels 4 --model.decoder_hidden [16] --data.num_workers 0"
            " --trainer.max_steps 4 --trainer.log_every_n_steps 1 --trainer.num_sanity_val_steps 0"
        )
    configs = "--config configs/multimnist.yaml --config configs/multimnist_onthefly.yaml"
    argv = [sys.executable, "-m", "capsdist.train", "fit", *configs.split(), "--trainer.default_root_dir", str(run)]
    code, out = check.run("multimnist_paper_fit", [*argv, *shlex.split(flags)], seconds + 120)
    metrics = sorted(run.glob("csv/version_*/metrics.csv"))
    points = [p for p in validations(metrics[-1]) if p["elapsed"]] if metrics else []  # WallClock logs in fit
    for before, point in zip([None, *points], points, strict=False):
        steps, wall = (before["steps"], before["elapsed"]) if before else (0, 0.0)
        check.emit(
            {
                "what": "multimnist_paper_val",
                "images_seen": point["steps"] * batch,
                "steps": point["steps"],
                "wall_s": round(point["elapsed"], 1),
                "val_acc": point["acc"],  # both digits right: the paper's metric (its 5.2% error is 0.948)
                "val_error": round(1 - point["acc"], 5),
                "val_digit_acc": point["digit_acc"],
                # since the last validation, which it includes; training alone: ThroughputMonitor's last rate
                "images_per_s": round((point["steps"] - steps) * batch / (point["elapsed"] - wall), 1),
                "train_images_per_s": point["train_images_per_s"],
            }
        )
    summary = (json_lines(out) or [{}])[-1]
    row = {"what": "multimnist_paper", "exit_code": code, "validations": len(points), "fit": summary}
    check.emit({**row, "command": f"python -m capsdist.train fit {configs} {flags}"})
    if points:
        paper_estimate(check, points[-1], batch)


def paper_estimate(check: Any, last: dict[str, Any], batch: int) -> None:
    """The FLOP/s the run achieved and the hours to the paper's 60M training overlays at its measured rates, from
    its `last` validation: the training FLOPs per image are those the training CLI counts for ThroughputMonitor."""
    train_rate, flops_rate = last["train_images_per_s"], last["train_flops_per_s"]
    per_image = round(flops_rate / train_rate) if flops_rate and train_rate else None
    wall_rate = last["steps"] * batch / last["elapsed"]  # Lightning's start and the validations included
    check.emit(
        {
            "what": "multimnist_paper_estimate",
            "train_flops_per_image": per_image,  # forward + backward (capsdist.training.diagnostics)
            "images_seen": last["steps"] * batch,
            "val_acc": last["acc"],
            "train_images_per_s": round(train_rate, 1) if train_rate else None,
            "wall_images_per_s": round(wall_rate, 1),
            "achieved_flops_per_s": round(flops_rate) if flops_rate else None,
            "paper_test_error": MULTIMNIST_TEST_ERROR,
            "paper_images": MULTIMNIST_TRAIN_IMAGES,
            "paper_flops": per_image * MULTIMNIST_TRAIN_IMAGES if per_image else None,
            "paper_hours_at_train_rate": hours(MULTIMNIST_TRAIN_IMAGES, train_rate),
            "paper_hours_at_wall_rate": hours(MULTIMNIST_TRAIN_IMAGES, wall_rate),
        }
    )


def hours(images: int, images_per_s: float | None) -> float | None:
    """Hours to train on `images` images at `images_per_s`, or None without a rate."""
    return round(images / images_per_s / 3600, 2) if images_per_s else None
