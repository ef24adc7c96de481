"""Shared test settings, fixtures and checks: tiny models, the shipped MNIST, small shard sets, the SLURM cluster.

Markers (registered in pyproject.toml): ``slow`` (minutes-long runs), ``slurm`` (needs the SLURM packages that
scripts/install_slurm.sh installs), ``gpu`` (needs CUDA; skipped without it).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Before torch loads OpenMP (it reads this once): idle OpenMP threads sleep instead of spinning. The suite runs 4
# xdist workers and their subprocesses on 2 cores, where spinning threads took 40% of the CPU: 3 tiny fits side by
# side took 45 CPU-s in 24 s by default, 27 CPU-s in 14 s with PASSIVE (2-core Xeon, 2026-12-07). Thread counts, and
# so every computed number, are unchanged; subprocesses inherit it through os.environ.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from capsdist.cluster import signals
from capsdist.core import startup

REPO = Path(__file__).resolve().parents[1]
# the suite's own callbacks (tests.faults, tests.scale_probe) in --config files, here and in every subprocess
os.environ.setdefault("CAPSDIST_CONFIG_MODULES", "tests")
SHIPPED = REPO / "data" / "mnist"

# A tiny CapsNet for the training CLI, as flags ...
TINY = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
    "--model.conv_channels=32",
    "--model.primary_channels=8",
    "--model.caps_layers=[[10, 8]]",
    "--model.decoder_hidden=[64, 128]",
    "--model.lr=0.003",
    "--data.source=mnist",
    "--data.batch_size=32",
    "--data.num_workers=0",
]
# ... an even smaller one as a config's model section (subprocess runs, many ranks) ...
TINY_MODEL = {
    "conv_channels": 8,
    "primary_channels": 4,
    "primary_dim": 4,
    "decoder_hidden": [16, 32],
    "log_images_every_n_steps": 0,
}
# ... and as CapsNet arguments for the model's unit tests.
TINY_NET = dict(conv_channels=16, primary_channels=4, primary_dim=4, caps_layers=[(10, 6)], decoder_hidden=(32, 48))


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m ...` subprocesses: this checkout importable (not an installed copy)."""
    return {**os.environ, "PYTHONPATH": str(REPO), **extra}


def tiny_checkpoint(path: Path, data: dict, image_size: int = 28, num_targets: int = 1) -> Path:
    """A capsdist checkpoint of a tiny untrained model (TINY_MODEL) with the given saved data settings."""
    from capsdist.training.module import CapsNetModule  # Lightning: only for the tests that write one

    module = CapsNetModule(num_targets=num_targets, image_size=image_size, **TINY_MODEL)
    torch.save(
        {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "global_step": 0,
         "datamodule_hyper_parameters": data},
        path,
    )  # fmt: skip
    return path


def refused(main: Callable[[list[str]], object], args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command's ``main(args)`` in this process (``python -m ...`` less the interpreter's start, seconds of
    imports: refusals come before any work) and check it refuses: exit 2, one ``capsdist: error:`` paragraph, no
    traceback, and nothing left behind that the real process's exit would have ended (a process group, a child
    process). Returns that line."""
    children = set(child_pids(os.getpid()))
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("capsdist: error:")]
    assert stop.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert not torch.distributed.is_initialized() and set(child_pids(os.getpid())) <= children
    return errors[0]


def make_shards(out: Path, split: str, count: int, shard_size: int, seed: int = 1) -> Path:
    """Write ``count`` MultiMNIST samples of ``split`` from the shipped MNIST as shards of ``shard_size``."""
    from data_prep.multimnist import generate

    plan = {"split": split, "per_digit": None, "num_samples": count, "shard_size": shard_size, "seed": seed}
    generate(SHIPPED, out, plan, workers=1)
    return out


def image_shards(out: Path, size: int, channels: int, count: int, ext: str = "png", classes: int = 4,
                 seed: int = 0, per_shard: int = 16) -> Path:  # fmt: skip
    """``count`` learnable labelled images written by webdataset's own ShardWriter into ``out`` (as a user would):
    noise with a bright square in quadrant ``class % 4`` of channel ``class % channels``, keys ``ext`` and ``cls``
    (``ext`` png or jpg: the array as ShardWriter encodes it; npy: H x W x C)."""
    import numpy as np  # here, not at the top: most test modules never write image shards
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng, side = np.random.default_rng(seed), size // 4
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(count):
            label = int(rng.integers(classes))
            image = rng.integers(0, 48, size=(size, size, channels), dtype=np.uint8)
            top, left = (label % 4 // 2) * size // 2, (label % 2) * size // 2
            top, left = top + int(rng.integers(side // 2 + 1)), left + int(rng.integers(side // 2 + 1))
            image[top : top + side, left : left + side, label % channels] = 255
            sink.write({"__key__": f"{i:06d}", ext: image if channels > 1 or ext == "npy" else image[..., 0],
                        "cls": label})  # fmt: skip
    return out


def u8(x: torch.Tensor) -> torch.Tensor:
    """Back to integer pixel values."""
    return (x * 255).round().to(torch.int16)


def check_format(batch: dict[str, torch.Tensor], b: int, k: int, size: int) -> None:
    """The contract's batch dict: keys, shapes, dtypes, value range."""
    assert set(batch) == {"image", "labels", "recon"}
    assert batch["image"].shape == (b, 1, size, size) and batch["image"].dtype == torch.float32
    assert batch["labels"].shape == (b, k) and batch["labels"].dtype == torch.int64
    assert batch["recon"].shape == (b, k, 1, size, size) and batch["recon"].dtype == torch.float32
    assert batch["image"].min() >= 0 and batch["image"].max() <= 1 and batch["image"].max() > 0.9


def check_multimnist(batch: dict[str, torch.Tensor]) -> None:
    """input = clip(digit0 + digit1), labels differ, each digit lies wholly inside the 36x36 canvas."""
    x, r = u8(batch["image"][:, 0]), u8(batch["recon"][:, :, 0])
    assert torch.equal(x, (r[:, 0] + r[:, 1]).clamp(max=255))
    assert (batch["labels"][:, 0] != batch["labels"][:, 1]).all()


def epoch_batches(loader: Any, epoch: int, state: dict[str, int] | None = None) -> list[dict]:
    """All batches of one epoch, optionally resumed from a loader state."""
    loader.set_epoch(epoch)
    if state:
        loader.load_state_dict(state)
    return list(loader)


def same_batches(a: list[dict], b: list[dict]) -> bool:
    """Batch lists equal tensor for tensor."""
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def child_pids(pid: int) -> list[int]:
    """The processes ``pid`` started (Linux's /proc children list)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


# The files that take over a minute on 2 cores, longest first: pytest-xdist (`--dist loadfile`, pyproject's addopts)
# hands whole files to its workers in collection order, so these start first and no long file is left for the end.
# Summed test durations of the 3-worker README run, 2026-12-07 (2-core Xeon, load 1-5 from other jobs; 16 min 30 s):
# preemption 386 s, device_check 303, resume 194, resume_exact 188, large_run 178, capsule_parallel_training 176,
# train 158 (in-process fits; it had been left for the end), restarts 156, hostile_files 94 (its refusals now run
# in-process), wheel 90.
LONGEST_FIRST = ["test_preemption.py", "test_device_check.py", "test_resume.py", "test_resume_exact.py",
                 "test_large_run.py", "test_capsule_parallel_training.py", "test_train.py", "test_restarts.py",
                 "test_hostile_files.py", "test_wheel.py"]


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[object]:
    """Collection (torch, Lightning and W&B, imported by the test modules) runs with the garbage collector paused
    and freezes what it imported, as capsdist's programs start (capsdist.core.startup): every test's collections
    then skip those ~400,000 objects. The unit tier's CPU went 105-125 -> 75-98 s (2-core Xeon, 2-3 runs each)."""
    with startup.collector_paused():
        return (yield)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tiers: every test under tests/integration/ (CLIs, Lightning runs, subprocesses, SLURM, torchrun) is
    ``slow``, so ``-m "not slow"`` is the unit tier, the contributor loop. The longest files first (for xdist).
    Skip ``gpu`` tests on machines without CUDA (device_check's CPU smoke run keeps them, CPU against CPU)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available() or os.environ.get("CAPSDIST_GPU_TESTS_ON_CPU"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for tests of tiny tensors, restored afterwards: on a loaded 2-core machine every op of a
    multi-threaded run waits in thread barriers, which makes many-small-op tests (gradcheck, chunked routing)
    ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_inherited_wandb_service() -> Iterator[None]:
    """A W&B run in the test process leaves WANDB_SERVICE in os.environ; subprocesses and SLURM jobs that inherit it
    log through this process's service, which resolves their relative run folders against its own cwd."""
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(autouse=True)
def _no_stop_left_behind() -> Iterator[None]:
    """Each test starts with no recorded stop: one that records a stop in this process (a real SIGTERM, the
    time-limit check) would otherwise stop the next in-process fit of its xdist worker at once (exit 143)."""
    yield
    signals.restore()


@pytest.fixture(scope="session")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 600 images of the shipped MNIST test split."""
    from capsdist.data import mnist

    images, labels = mnist.load(SHIPPED, "test")
    return torch.from_numpy(images[:600]), torch.from_numpy(labels[:600]).long()


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 MultiMNIST test samples in uneven shards of 30, 30, 30, 10 (with manifest.json)."""
    return make_shards(tmp_path_factory.mktemp("shards"), "test", 100, 30)


class Dripping:
    """A local HTTP server that answers every GET with a 1 MiB body sent one byte per ``interval`` seconds: a shard
    host that stalls without ever timing out a read. ``url(name)``; ``requests`` lists the paths asked for, and
    ``requested`` is set at the first request."""

    def __init__(self, interval: float = 0.2) -> None:
        self.requests: list[str] = []
        self.requested, self.closing = threading.Event(), threading.Event()
        server = self

        class Drip(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                server.requested.set()
                self.send_response(200)
                self.send_header("Content-Length", str(1 << 20))
                self.end_headers()
                while not server.closing.is_set():
                    try:
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                    except OSError:  # the reader gave up
                        return
                    time.sleep(interval)

            def log_message(self, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Drip)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def url(self, name: str) -> str:
        """The URL of a (dripping) shard ``name``."""
        return f"http://127.0.0.1:{self.http.server_address[1]}/{name}"

    def close(self) -> None:
        """End every response and stop serving."""
        self.closing.set()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def dripping() -> Iterator[Dripping]:
    """A shard host that drips bytes (``Dripping``), closed after the test."""
    server = Dripping()
    yield server
    server.close()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real single-host SLURM cluster (see tests/slurm_cluster.py), started once per session.

    The packages come from scripts/install_slurm.sh (a step of .ci/run); this fixture never installs anything.
    """
    from tests.slurm_cluster import SlurmCluster, missing_reason

    reason = missing_reason()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"SLURM must run in CI: {reason}. Fix: run `bash scripts/install_slurm.sh` first.")
        pytest.skip(f"{reason}; install with `bash scripts/install_slurm.sh`")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()
