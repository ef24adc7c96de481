"""Every GPU figure capsdist needs, from one call on a lent GPU; run it through scripts/device_check.sh.

Stages, each a subprocess with its own time limit cut from one budget, so a failing or slow stage costs only
itself: the CUDA tests (`pytest -m gpu`), train-step benchmarks (eager / compile / CUDA graphs x fp32 / bf16 x
batch 128, 512, 2048), routing and on-device MultiMNIST rates, default-vs-streaming routing memory
(capsdist.bench.memory), a timed run of the paper MNIST model with the project's own CLI for the minutes left
(exported to safetensors, scored on the 10k test digits by the plain model, and its time to 99.6% / 99.65%), the
training service against a bare loop at batch 128/512/2048, MultiMNIST on the fly, and the paper's MultiMNIST run
with its accuracy per image seen and the FLOP-based time to the paper's 60M images (scripts/device_stages.py).
`--stages` picks which stages run. Every result is a JSON line (stdout and OUT/device_check.jsonl) carrying
`what`, `device_name` and `torch`; subprocess output goes to OUT/device_check.log. DEVICE_CHECK_SMOKE=1 runs
every stage on the CPU with tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from device_stages import (
    max_time,
    multimnist_paper_stage,
    multimnist_stage,
    service_stage,
    time_to_accuracy,
    validations,
)

SMOKE = os.environ.get("DEVICE_CHECK_SMOKE") == "1"
DEVICE = "cpu" if SMOKE or not torch.cuda.is_available() else "cuda"
ROOT = Path(__file__).resolve().parents[1]
TRAIN_BATCH = 32 if SMOKE else 128  # the paper's batch size on the GPU
EPOCH_STEPS = (512 if SMOKE else 60000) // TRAIN_BATCH  # full batches per epoch: lr x0.9 per epoch


class Check:
    """The budget, the output folder and the JSON-lines writer shared by every stage."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.work = Path(tempfile.mkdtemp(prefix="capsdist_device_check_"))  # run folders: too big to bring back
        out.mkdir(parents=True, exist_ok=True)
        self.rows = (out / "device_check.jsonl").open("a")
        self.log = (out / "device_check.log").open("a")
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({os.cpu_count()} cores)"
        self.common = {"device_name": name, "torch": torch.__version__, "smoke": SMOKE}

    def left(self) -> float:
        """Seconds left in the budget."""
        return self.deadline - time.monotonic()

    def emit(self, row: dict) -> None:
        """Print one result row and append it to device_check.jsonl."""
        line = json.dumps({**row, **self.common})
        print(line, flush=True)
        self.rows.write(line + "\n")
        self.rows.flush()

    def run(
        self, what: str, argv: list[str], limit: float, env: dict[str, str] | None = None
    ) -> tuple[int | None, str]:
        """Run a subprocess for at most `limit` seconds (and never past the budget); (exit code or None if it was
        skipped for want of time, stdout)."""
        limit = min(limit, self.left())
        if limit < 5:
            self.emit({"what": what, "skipped": "no time left in the budget"})
            return None, ""
        self.log.write(f"\n===== {what}: {shlex.join(argv)} (limit {limit:.0f} s)\n")
        self.log.flush()
        started = time.monotonic()
        try:
            done = subprocess.run(
                argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=self.log,
                text=True,
                timeout=limit,
            )
            code, stdout = done.returncode, done.stdout
        except subprocess.TimeoutExpired as err:
            code, stdout = 124, (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        self.log.write(stdout)
        self.log.write(f"===== {what}: exit {code} after {time.monotonic() - started:.1f} s\n")
        self.log.flush()
        return code, stdout


def json_lines(text: str) -> list[dict]:
    """The JSON objects printed one per line in `text` (other lines ignored)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def env_stage(check: Check) -> None:
    """What the machine is: CUDA, memory, library versions."""
    import pytorch_lightning

    props = torch.cuda.get_device_properties(0) if DEVICE == "cuda" else None
    check.emit(
        {
            "what": "env",
            "cuda": torch.version.cuda,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1) if props else None,
            "multiprocessors": props.multi_processor_count if props else None,
            "lightning": pytorch_lightning.__version__,
            "python": sys.version.split()[0],
        }
    )


def tests_stage(check: Check) -> None:
    """`pytest -m gpu`: CUDA against CPU (in smoke mode the same tests, CPU against CPU)."""
    # addopts emptied: the GPU machine may lack pytest-xdist, and one GPU gains nothing from parallel workers
    argv = [sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "gpu", "tests/gpu", "-q", "-rf",
            "-p", "no:cacheprovider"]  # fmt: skip
    started = time.monotonic()
    code, out = check.run("gpu_tests", argv, 150, {"CAPSDIST_GPU_TESTS_ON_CPU": "1"} if SMOKE else None)
    counts = {
        k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out.splitlines()[-1] if out else "")
    }
    failed = re.findall(r"^FAILED (\S+)", out, flags=re.M)
    row = {"what": "gpu_tests", "exit_code": code, **counts, "failed_tests": failed}
    check.emit({**row, "seconds": round(time.monotonic() - started, 1)})


def bench(check: Check, what: str, limit: float, flags: list[str]) -> None:
    """Rows of `python -m capsdist.bench` with these flags, or one row saying why there are none."""
    code, out = check.run(what, [sys.executable, "-m", "capsdist.bench", "--device", DEVICE, *flags], limit)
    rows = json_lines(out)
    for row in rows:
        check.emit({**row, "stage": what})
    if code not in (0, None):
        check.emit({"what": what, "exit_code": code, "rows": len(rows), "error": "see device_check.log"})


def bench_stages(check: Check, compiled: bool) -> None:
    """Train-step rows (eager, or compile and CUDA graphs), then routing and on-device generation rates."""
    # smoke: 20-px images (128 primary capsules, not 1152), as a host without native bf16 (AMD Zen 3) emulates
    # bf16 ~50x slower than fp32 and the paper-size bf16 steps alone ran past this stage's 90 s there
    smoke = ["--steps", "1", "--warmup", "1", "--image-size", "20"]
    sizes, steps = ([8], smoke) if SMOKE else ([128, 512, 2048], ["--steps", "10"])
    if not compiled:
        for size in sizes:
            flags = ["--what", "train_step", "--precision", "32,bf16-mixed", "--batch-size", str(size), *steps]
            bench(check, f"bench_eager_b{size}", 90, flags)
        bench(
            check,
            "bench_routing",
            60,
            ["--what", "routing", "--precision", "32,bf16-mixed", "--batch-size", str(sizes[-1]), *steps],
        )
        bench(check, "bench_onthefly", 40, ["--what", "onthefly", "--batch-size", "256" if SMOKE else "65536", *steps])
        return
    if SMOKE:  # compiling the paper model on the CPU takes minutes; the GPU run measures it
        check.emit({"what": "bench_compiled", "skipped": "compile and CUDA graphs are measured on the GPU only"})
        return
    for size, mode in ((512, "--compile"), (512, "--cuda-graphs"), (2048, "--compile"), (2048, "--cuda-graphs")):
        flags = ["--what", "train_step", "--precision", "bf16-mixed", "--batch-size", str(size), mode, *steps]
        bench(check, f"bench{mode[1:].replace('-', '_')}_b{size}", 110, [*flags, "--channels-last"])


def curve(metrics_csv: Path) -> list[list[float]]:
    """[steps done, epoch, val accuracy, elapsed s or None] for every validation row of a Lightning CSV log."""
    return [[p["steps"], p["epoch"], p["acc"], p["elapsed"]] for p in validations(metrics_csv)]


def train_stage(check: Check, reserve_s: float) -> None:
    """The paper MNIST model with the project's CLI for the minutes left, then exported and scored as shipped."""
    run = check.work / "run_mnist"
    limit = max(60.0, check.left() - reserve_s)
    seconds = int(limit - 45)  # Lightning's start, the last validation and checkpoint fit in the rest
    # CapsNet-Keras's recipe (50 epochs, lr x0.9 per epoch) with the paper's model, batch and shifts
    overrides = shlex.split(
        f"--trainer.max_epochs {2 if SMOKE else 50} --trainer.max_steps -1"
        f" --trainer.max_time {max_time(seconds)}"
        f" --model.lr_decay 0.9 --model.lr_decay_steps {EPOCH_STEPS} --model.log_images_every_n_steps 0"
        f" --data.batch_size {TRAIN_BATCH} --data.num_workers {2 if SMOKE else 8}"
        f" --data.pin_memory {str(DEVICE == 'cuda').lower()} --trainer.enable_progress_bar false"
        " --trainer.log_every_n_steps 50 --checkpoint_every_n_steps 0 --wandb_mode disabled"
    )
    if SMOKE:
        overrides += shlex.split(
            "--model.conv_channels 16 --model.primary_channels 4 --trainer.precision 32"
            " --data.train_samples 512 --data.val_samples 256"
        )
    argv = [
        sys.executable,
        "-m",
        "capsdist.train",
        "fit",
        "--config",
        "configs/mnist.yaml",
        "--trainer.default_root_dir",
        str(run),
        *overrides,
    ]
    started = time.monotonic()
    code, out = check.run("train_mnist", argv, limit)
    wall = round(time.monotonic() - started, 1)
    summary = (json_lines(out) or [{}])[-1]
    metrics = sorted(run.glob("csv/version_*/metrics.csv"))
    points = curve(metrics[-1]) if metrics else []
    if metrics:
        (check.out / "train_metrics.csv").write_bytes(metrics[-1].read_bytes())
    steps = summary.get("global_step", 0)
    command = "python -m capsdist.train fit --config configs/mnist.yaml " + shlex.join(overrides)
    row = {
        "what": "train_mnist",
        "exit_code": code,
        "wall_s": wall,
        "steps": steps,
        "batch_size": TRAIN_BATCH,
        "images_per_s_overall": round(steps * TRAIN_BATCH / wall, 1),
        "val_curve": points,
        "summary": summary,
        "command": command,
    }
    check.emit(row)
    time_to_accuracy(check, points, command)
    last = run / "checkpoints" / "last.ckpt"
    if not last.is_file():
        check.emit({"what": "pretrained", "skipped": "training left no last.ckpt"})
        return
    meta = {
        "training_command": command,
        "hardware": check.common["device_name"],
        "train_wall_s": wall,
        "epochs_completed": points[-1][1] + 1 if points else None,
        "torch": torch.__version__,
    }
    weights = check.out / "capsnet-mnist.safetensors"
    argv = [
        sys.executable,
        "-m",
        "capsdist.pretrained",
        "export",
        "--ckpt",
        str(last),
        "--out",
        str(weights),
        "--meta",
        json.dumps(meta),
        "--device",
        DEVICE,
    ]
    code, out = check.run("pretrained", argv, 120)
    for result in json_lines(out):
        check.emit({"what": "pretrained", **{k: v for k, v in result.items() if k != "training_command"}})
    if code not in (0, None):
        check.emit({"what": "pretrained", "exit_code": code, "error": "see device_check.log"})


def memory_stage(check: Check) -> None:
    """Streaming (chunked) against default routing: peak memory and time of one routed layer (capsdist.bench.memory)."""
    sizes = (
        "--default 256 --chunked 256 --ratio 256"
        if SMOKE
        else "--default 1024 4096 16384 --chunked 1024 4096 16384 65536 --ratio 1024 4096 16384"
    )
    argv = [sys.executable, "-m", "capsdist.bench.memory", "--device", DEVICE, *sizes.split()]
    code, out = check.run("bench_memory", argv, 150)
    for row in json_lines(out):
        check.emit(
            {**row, "what": "routing_memory" if "peak_bytes" in row else "routing_time_ratio", "stage": "bench_memory"}
        )
    if code not in (0, None):
        check.emit({"what": "bench_memory", "exit_code": code, "error": "see device_check.log"})


STAGES = ("env", "tests", "train", "bench", "memory", "service", "multimnist", "multimnist_paper", "compiled")


def main(argv: list[str] | None = None) -> None:
    """Run every stage within the budget; exit 1 if any stage reported a failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "device_check_out", help="folder for the results")
    parser.add_argument("--budget", type=float, default=900 if SMOKE else 560, help="seconds for all stages")
    parser.add_argument(
        "--train-reserve",
        type=float,
        default=60 if SMOKE else 200,
        help="seconds kept for the stages after training (export, compiled benchmarks)",
    )
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma list of stages to run, in this order: {','.join(STAGES)} (a short loan runs what is missing)",
    )
    parser.add_argument("--multimnist-seconds", type=float, default=20 if SMOKE else 240, help="MultiMNIST training")
    parser.add_argument(  # a lent GPU gives one call 10 minutes: 6 of training, the rest for the wheels and the start
        "--multimnist-paper-seconds", type=float, default=60 if SMOKE else 360, help="the paper's MultiMNIST run"
    )
    parser.add_argument(
        "--multimnist-paper-val-samples",
        type=int,
        default=32 if SMOKE else 2000,
        help="multimnist_paper: test overlays per validation (the start of the fixed test stream)",
    )
    parser.add_argument(
        "--multimnist-paper-val-every",
        type=int,
        default=2 if SMOKE else 1000,
        help="multimnist_paper: training steps between validations",
    )
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if bad := [s for s in stages if s not in STAGES]:
        parser.error(f"--stages {bad[0]!r} is not one of {','.join(STAGES)}")
    check = Check(Path(args.out), args.budget)
    run = {
        "env": lambda: env_stage(check),
        "tests": lambda: tests_stage(check),
        "train": lambda: train_stage(check, args.train_reserve),  # the shipped model first: benchmarks take the rest
        "bench": lambda: bench_stages(check, compiled=False),
        "memory": lambda: memory_stage(check),
        "service": lambda: service_stage(check, DEVICE, SMOKE, json_lines),
        "multimnist": lambda: multimnist_stage(check, DEVICE, SMOKE, json_lines, args.multimnist_seconds),
        "multimnist_paper": lambda: multimnist_paper_stage(
            check,
            DEVICE,
            SMOKE,
            json_lines,
            args.multimnist_paper_seconds,
            args.multimnist_paper_val_samples,
            args.multimnist_paper_val_every,
        ),
        "compiled": lambda: bench_stages(check, compiled=True),
    }
    for stage in STAGES:
        if stage in stages:
            run[stage]()
    shutil.rmtree(check.work, ignore_errors=True)
    text = (check.out / "device_check.jsonl").read_text()
    failures = [r for r in json_lines(text) if r.get("exit_code") not in (None, 0) or r.get("failed")]
    check.emit({"what": "done", "failures": len(failures), "seconds_left": round(check.left(), 1)})
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
