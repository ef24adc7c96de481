"""What slurmstepd does to every process of a step, without SLURM: SIGTERM/SIGINT/SIGUSR1 to W&B's service and to
the DataLoader workers. The run's W&B history must survive whole, and the workers must keep serving batches
(the main process owns the stop: capsdist.cluster.signals, capsdist.cluster.wandb_shield)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, child_pids, subprocess_env
from tests.scale_probe import probe_config, train_env, wait_paused
from tests.wandb_records import finished_records, read_run, wandb_files

JOB_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
NUMBERS = """
import torch
from torch.utils.data import IterableDataset


class Numbers(IterableDataset):
    num_batches = 6

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        yield from range(info.id, self.num_batches, info.num_workers)
"""  # a ResumableLoader's dataset, in a module its workers can import: the workers share 6 batches
LOADER = "import json\nfrom numbers_dataset import Numbers\nfrom capsdist.data.loader import ResumableLoader\n"
STARTED = LOADER + "batches = iter(ResumableLoader(Numbers(), num_workers=2))\nnext(batches)\n"  # workers running
# how `python -m capsdist.train` starts: its loader server forked from the program (capsdist.data.workers.fork_server)
FORKED = "from capsdist.data.workers import fork_server\nassert fork_server()\n"
SERVERS = {"standard": "", "forked": FORKED}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    return [d for c in child_pids(pid) for d in (c, *_descendants(c))]


def _run(code: str, tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """Start ``code`` in a Python subprocess; returns it once it printed "ready", with its descendants."""
    (tmp_path / "numbers_dataset.py").write_text(NUMBERS)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(WANDB_MODE="offline"))  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    return proc, _descendants(proc.pid)


def test_wandb_service_survives_the_job_signals(tmp_path: Path) -> None:
    """The service capsdist starts (through RunWandbLogger) is shielded: SIGTERM, SIGINT and SIGUSR1 sent to it and
    to its shim do nothing, every row logged before and after them is in the offline file, the run finishes
    preempting, and the service leaves with the training process."""
    proc, helpers = _run(
        """
        from pathlib import Path
        from capsdist.training.run import RunWandbLogger
        run = RunWandbLogger(Path("run"), save_dir=str(Path("run").resolve()), project="p").experiment
        for i in range(50):
            run.log({"i": i})
        print("ready", flush=True)
        input()
        for i in range(50, 100):
            run.log({"i": i})
        run.mark_preempting()
        run.finish(exit_code=143)
        """,
        tmp_path,
    )
    assert any(b"wandb-core" in Path(f"/proc/{p}/cmdline").read_bytes() for p in helpers), helpers
    for pid in helpers:
        for sig in JOB_SIGNALS:
            os.kill(pid, sig)
    proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0
    (file,) = wandb_files(tmp_path / "run")
    kinds = [r.WhichOneof("record_type") for r in finished_records(file.parent, 10)]
    assert "preempting" in kinds and "exit" in kinds
    assert [row["i"] for row in read_run(file)["history"]] == list(range(100))
    assert not _alive(helpers)


def _alive(pids: list[int], within: float = 10.0) -> list[int]:
    """Those of ``pids`` that still run (neither gone nor a zombie) after up to ``within`` seconds: a helper ends
    with the main process through PR_SET_PDEATHSIG or its watchdog, a moment after that process has exited."""
    deadline = time.monotonic() + within
    while (left := [p for p in pids if _state(p) != "Z"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _loader_workers(main: int) -> list[int]:
    """The workers of the loader of process ``main``: its fork server's children (capsdist.data.workers); the
    server is multiprocessing's own interpreter, or a fork of ``main`` showing its command line (FORKED)."""
    line = Path(f"/proc/{main}/cmdline").read_bytes()
    lines = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in child_pids(main)}
    (server,) = [p for p, cmd in lines.items() if b"multiprocessing.forkserver" in cmd or cmd == line]
    return child_pids(server)


@pytest.mark.parametrize("server", SERVERS)
def test_loader_workers_ignore_the_job_signals(tmp_path: Path, server: str) -> None:
    """A ResumableLoader with 2 workers: the job's signals sent to every process below the main one (the workers'
    fork server, its workers, multiprocessing's resource tracker) neither kill them nor reach the main process as
    "DataLoader worker ... exited unexpectedly"; the epoch completes with every batch."""
    proc, helpers = _run(
        SERVERS[server]
        + LOADER
        + """
seen = []
for i, x in enumerate(ResumableLoader(Numbers(), num_workers=2)):
    seen.append(int(x))
    if i == 1:  # both workers have started (and run their worker_init_fn)
        print("ready", flush=True)
        input()
print(json.dumps(sorted(seen)), flush=True)
""",
        tmp_path,
    )
    assert len(_loader_workers(proc.pid)) == 2
    for pid in helpers:
        for sig in JOB_SIGNALS:
            os.kill(pid, sig)
    out, _ = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0 and json.loads(out.splitlines()[-1]) == list(range(6))
    assert not _alive(helpers)


@pytest.mark.parametrize("server", SERVERS)
def test_killed_main_process_leaves_no_loader_process(tmp_path: Path, server: str) -> None:
    """SIGKILL to the main process (the OOM killer, a second scancel): its loader's fork server and workers, which
    ignore the job's signals, still end within seconds instead of waiting for each other forever."""
    proc, helpers = _run(
        SERVERS[server] + STARTED + 'print("ready", flush=True)\ninput()\n',
        tmp_path,
    )
    assert len(_loader_workers(proc.pid)) == 2
    proc.kill()
    proc.wait()
    assert not _alive(helpers, within=15), helpers  # the workers' watchdog looks every 5 s


def test_a_crash_with_loader_workers_exits(tmp_path: Path) -> None:
    """An exception escapes while the loader's workers run (its traceback keeps the iterator alive): the process
    exits with the error instead of waiting forever at exit for workers that ignore multiprocessing's SIGTERM."""
    (tmp_path / "numbers_dataset.py").write_text(NUMBERS)
    code = STARTED + 'raise RuntimeError("a crash mid-epoch")\n'
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=90,
                          env=subprocess_env())  # fmt: skip
    assert proc.returncode == 1 and "a crash mid-epoch" in proc.stderr, proc.stderr[-2000:]


def test_a_worker_ends_with_its_training_process_even_if_its_exit_would_hang(tmp_path: Path) -> None:
    """``leave_with``: a process whose exit would hang forever (a non-daemon thread that never returns, as a loader
    worker joining its queue's feeder thread into a pipe nobody reads) still ends within seconds of its owner's
    SIGKILL."""
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    code = textwrap.dedent(f"""
        import threading, time
        from capsdist.cluster.signals import leave_with
        threading.Thread(target=time.sleep, args=(600,)).start()  # non-daemon: a normal exit would wait for it
        leave_with({owner.pid})
        print("ready", flush=True)
    """)
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=subprocess_env())
    assert worker.stdout.readline().strip() == "ready"
    owner.kill()
    owner.wait()
    started = time.monotonic()
    assert worker.wait(timeout=10) == 0
    assert time.monotonic() - started < 3


def test_the_training_program_forks_its_loader_server_whose_workers_ignore_the_job_signals(tmp_path: Path) -> None:
    """`python -m capsdist.train fit` with 2 loader workers (MultiMNIST composed on the fly) forks its loader
    server from itself as it starts, so no second interpreter imports torch for it; the job's signals sent to
    that server and its workers leave the run going, and it finishes every step."""
    out = tmp_path / "probe"
    args = [
        *TINY, "--data.num_workers=2", "--data.source=multimnist_onthefly", "--data.train_samples=256",
        "--data.val_samples=32", "--wandb_mode=disabled", "--trainer.max_steps=6",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--config", str(probe_config(tmp_path / "probe.yaml", out, pause_at_step=2)),
    ]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "capsdist.train", "fit", *args], env=train_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_paused(out, 1, lambda: proc.poll() is None)
    workers = _loader_workers(proc.pid)
    lines = [Path(f"/proc/{p}/cmdline").read_bytes() for p in _descendants(proc.pid)]
    assert len(workers) >= 2 and not any(b"multiprocessing.forkserver" in line for line in lines), lines
    server = int(Path(f"/proc/{workers[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the worker's parent
    assert Path(f"/proc/{server}/cmdline").read_bytes() == Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    for pid in [server, *workers]:
        for sig in JOB_SIGNALS:
            os.kill(pid, sig)
    (out / "resume").touch()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and '"global_step": 6' in output, output[-3000:]
