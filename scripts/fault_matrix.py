"""The fault matrix: every way a job stops x every strategy, on a private SLURM cluster, one JSON line per cell.

    PYTHONPATH=$PWD python scripts/fault_matrix.py                     # the whole matrix (~30 min on 2 cores)
    PYTHONPATH=$PWD python scripts/fault_matrix.py ddp:requeue_val     # one cell (strategy:stop)

Needs the SLURM packages (scripts/install_slurm.sh). Each cell submits slurm/single_node.sbatch with 2 tasks, the
tiny config of tests/slurm_jobs.py and W&B offline (no --run_name: a resubmission is the same sbatch line plus
`--ckpt_path last`), holds the ranks at a known step (tests/scale_probe.py), stops the job, and reports: the final
state, the sacct lines, the step it resumed from, the steps lost, whether the final weights equal an uninterrupted
run of the same strategy, W&B (one run id with history through the last step; every segment finished, judged apart),
the seconds the save took and the job was down (the stopped run's end to the next run's start), and any process
left. The torchrun cells run the same config under `torchrun --standalone --nproc-per-node 2 --max-restarts 1`
(tests/torchrun_jobs.py, no SLURM), kill -9 rank 1 at the pause step and report torchrun's exit code and the step
the restart resumed from by itself. CI runs a slice of it (tests/integration/test_preemption.py, test_restarts.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from capsdist.training.resume import JOB_FILE
from tests.conftest import REPO
from tests.scale_probe import probe_config, records, wait_paused, write_yaml
from tests.slurm_cluster import SlurmCluster, missing_reason
from tests.slurm_jobs import MAX_STEPS, PAUSE_AT, SLURM_CONFIG, STEPS_PER_EPOCH, job_log, sacct, submit
from tests.torchrun_jobs import torchrun, torchrun_command, torchrun_env
from tests.wandb_records import finished_records, read_run, wandb_files

STRATEGIES = {
    "ddp": ["--data.num_workers=2"],  # loader workers on, as the templates default to with more CPUs
    "fsdp": ["--config", str(REPO / "configs" / "strategy" / "fsdp.yaml")],
    "capsule_parallel": ["--config", str(REPO / "configs" / "strategy" / "capsule_parallel.yaml")],
}
STOPS = ["requeue_train", "requeue_val", "usr1_start", "scancel_resubmit", "kill9_resubmit", "torchrun_restart"]


def _wandb(root: Path) -> dict:
    """W&B under ``root``: one run id with history through the last step; every segment finished (exit record).
    Judged apart: a segment killed by SIGKILL cannot finish, yet the run's id and history can go on."""
    files = wandb_files(root)
    runs = [read_run(f) for f in files]
    last = max((row.get("trainer/global_step", -1) for r in runs for row in r["history"]), default=-1)
    ended = [any(r.WhichOneof("record_type") == "exit" for r in finished_records(f.parent, 10)) for f in files]
    ids = {r["run"]["id"] for r in runs if "run" in r}  # a segment killed early may hold no run record yet
    return {
        "wandb_one_run": len(ids) == 1 and last >= MAX_STEPS - 1,
        "wandb_segments_without_run_record": sum("run" not in r for r in runs),
        "wandb_all_finished": bool(files) and all(ended),
        "wandb_segments": len(files),
        "wandb_last_step": last,
    }


def _kill_tasks(tmp: Path) -> None:
    """kill -9 every training process of the cell (their working directory is the cell's folder)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(proc / "cwd").startswith(str(tmp)) and b"capsdist.train" in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            continue


def cell(cluster: SlurmCluster, base: Path, strategy: str, stop: str, reference: dict) -> dict:
    """Run one cell; returns its JSON-able result."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{strategy}-{stop}-", dir=base))
    result: dict = {"cell": f"{strategy}:{stop}"}
    if stop == "torchrun_restart":
        return result | _torchrun_cell(tmp, strategy, reference)
    where = {"requeue_val": "val", "usr1_start": "start"}.get(stop, "train")
    # capsule parallelism: both ranks read the same batches, so an epoch (and its validation) is twice as long
    epoch = 2 * STEPS_PER_EPOCH if strategy == "capsule_parallel" else STEPS_PER_EPOCH
    step = {"val": epoch, "start": 0}.get(where, PAUSE_AT)
    out, name = tmp / "probe", f"fm-{strategy}"
    # no --run_name: the folder is the experiment's hash (slurm/launch.sh), which the resubmission must find again
    args = [*STRATEGIES[strategy], "--checkpoint_every_n_steps=3"]
    probe = probe_config(tmp / "p.yaml", out, pause_at_step=step, pause_in=where)
    job = submit(cluster, tmp, name, probe, *args)
    wait_paused(out, 2, lambda: cluster.job_state(job) in ("PENDING", "RUNNING"))
    command = {
        "requeue_train": ["scontrol", "requeue", str(job)],
        "requeue_val": ["scontrol", "requeue", str(job)],
        "usr1_start": ["scancel", "--signal=USR1", str(job)],
        "scancel_resubmit": ["scancel", str(job)],
    }.get(stop)
    if command:
        cluster.run(*command)
    else:
        _kill_tasks(tmp)
    time.sleep(1)
    (out / "resume").touch()
    jobs = [job]
    if stop in ("scancel_resubmit", "kill9_resubmit"):
        cluster.wait_for_state(job, [], timeout=120)
        jobs.append(submit(cluster, tmp, name, probe, *args, "--ckpt_path", "last"))  # the same line plus the flag
    result["state"] = cluster.wait_for_state(jobs[-1], [], timeout=300)
    result["sacct"] = [line for j in jobs for line in sacct(cluster, j) if "." not in line.split("|")[0]]
    log = "".join(job_log(tmp, name, j) for j in jobs)
    saves = re.findall(r"saved \S+ at step \d+ in ([\d.]+) s", log)
    result["save_s"] = float(saves[0]) if saves else None  # from the stop request to the complete checkpoint
    result["down_s"] = _downtime(result["sacct"])
    resumed = re.findall(r"resuming (?:by itself )?from \S+ at step (\d+)", log)
    result["resumed_from"] = int(resumed[-1]) if resumed else (0 if log.count("a fresh run") > 1 else None)
    result["steps_lost"] = None if result["resumed_from"] is None else step - result["resumed_from"]
    # a resubmission is a new job (restart count 0): its records overwrite the stopped run's
    final = records(out) if len(jobs) > 1 else records(out, 1)
    result["folders"] = sorted(p.name for p in (tmp / "runs").iterdir())  # one: the resubmission found the folder
    return result | _outcome(final, reference.get(strategy), tmp / "runs", tmp)


def _outcome(final: list[dict], reference: list[dict] | None, runs: Path, tmp: Path) -> dict:
    """Weights against the uninterrupted run, W&B, and the processes left under ``tmp``."""
    result: dict = {}
    if final and reference:
        result["weights_equal"] = [r["params"] for r in final] == [r["params"] for r in reference]
    result |= _wandb(runs)
    time.sleep(3)
    result["left"] = [p.name for p in Path("/proc").glob("[0-9]*") if _cwd_under(p, tmp)]
    return result


def _torchrun_args(tmp: Path, strategy: str, probe: Path) -> list[str]:
    """The SLURM cells' tiny config, the probe and the strategy, on top of tests/torchrun_jobs.py's command."""
    config = write_yaml(tmp / "tiny-slurm.yaml", SLURM_CONFIG)
    return ["--config", str(config), "--config", str(probe), *STRATEGIES[strategy], "--checkpoint_every_n_steps=3"]


def _torchrun_cell(tmp: Path, strategy: str, reference: dict) -> dict:
    """torchrun --max-restarts 1; kill -9 rank 1 while the ranks hold at PAUSE_AT; the restart resumes by itself."""
    out, root, log = tmp / "probe", tmp / "run", tmp / "torchrun.log"
    probe = probe_config(tmp / "p.yaml", out, pause_at_step=PAUSE_AT)
    with log.open("w") as sink:
        launcher = subprocess.Popen(torchrun_command(root, *_torchrun_args(tmp, strategy, probe)), env=torchrun_env(),
                                    stdout=sink, stderr=subprocess.STDOUT, cwd=tmp)  # fmt: skip
        wait_paused(out, 2, lambda: launcher.poll() is None)
        killed, killed_at = _kill_rank(launcher.pid, 1), time.time()
        time.sleep(1)
        (out / "resume").touch()
        code = launcher.wait(timeout=600)
    text = log.read_text(errors="replace")
    resumed = re.findall(r"torchrun restart (\d+) .*?resuming by itself from \S+ at step (\d+)", text)
    result: dict = {"state": f"exit {code}", "killed_pid": killed, "restarts": [int(n) for n, _ in resumed]}
    result["resumed_from"] = int(resumed[-1][1]) if resumed else None
    result["steps_lost"] = None if result["resumed_from"] is None else PAUSE_AT - result["resumed_from"]
    if resumed:  # kill -9 to the restart claiming the folder again (torchrun's wait for the survivor, imports, setup)
        result["down_s"] = round((root / JOB_FILE).stat().st_mtime - killed_at, 1)
    if code != 0:
        result["log_tail"] = text[-1500:]
    return result | _outcome(records(out), reference.get(f"torchrun:{strategy}"), root, tmp)


def _kill_rank(launcher: int, rank: int) -> int | None:
    """kill -9 the training process of ``rank`` (a child of the launcher; not its loader workers); its pid."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            os.kill(int(proc.name), signal.SIGKILL)
            return int(proc.name)
    return None


def _downtime(lines: list[str]) -> float | None:
    """Seconds between the end of the stopped run and the start of the run that finished (sacct Start/End)."""
    from datetime import datetime

    if len(lines) < 2:
        return None
    end, start = lines[0].split("|")[-1], lines[-1].split("|")[-2]
    return (datetime.fromisoformat(start) - datetime.fromisoformat(end)).total_seconds()


def _cwd_under(proc: Path, tmp: Path) -> bool:
    try:
        return os.readlink(proc / "cwd").startswith(str(tmp))
    except OSError:
        return False


def _torchrun_reference(base: Path, strategy: str) -> list[dict]:
    """An uninterrupted torchrun run of the strategy: its final probe records."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{strategy}-torchrun-ref-", dir=base))
    probe = probe_config(tmp / "p.yaml", tmp / "probe")
    torchrun(tmp / "run", tmp / "torchrun.log", *_torchrun_args(tmp, strategy, probe), cwd=tmp)
    return records(tmp / "probe")


def _reference(cluster: SlurmCluster, base: Path, strategy: str) -> list[dict]:
    """An uninterrupted job of the strategy: its final probe records."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{strategy}-ref-", dir=base))
    args = [*STRATEGIES[strategy], "--checkpoint_every_n_steps=3"]
    job = submit(cluster, tmp, f"fm-{strategy}", probe_config(tmp / "p.yaml", tmp / "probe"), *args)
    cluster.wait_for_state(job, [], timeout=300)
    return records(tmp / "probe")


def main(argv: list[str]) -> None:
    """Run the cells named in ``argv`` (strategy:stop), or all of them; one JSON line each."""
    if reason := missing_reason():
        sys.exit(f"fault_matrix: {reason}; run scripts/install_slurm.sh")
    cells = [a.split(":") for a in argv] or [[s, t] for s in STRATEGIES for t in STOPS]
    base = Path(tempfile.mkdtemp(prefix="fault-matrix-"))
    cluster = SlurmCluster(base / "slurm").start()
    try:
        reference = {s: _reference(cluster, base, s) for s in {s for s, t in cells if t != "torchrun_restart"}}
        for s in {s for s, t in cells if t == "torchrun_restart"}:
            reference[f"torchrun:{s}"] = _torchrun_reference(base, s)
        for strategy, stop in cells:
            try:
                print(json.dumps(cell(cluster, base, strategy, stop, reference)), flush=True)
            except Exception as err:  # a failed cell is a result too; go on with the next
                print(json.dumps({"cell": f"{strategy}:{stop}", "error": repr(err)[:500]}), flush=True)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
