"""A real, throwaway single-host SLURM cluster for tests: munged, MariaDB, slurmdbd, slurmctld and slurmd.

Everything (keys, sockets, state, spool, logs, database) lives in one temporary folder; the daemons run in the
foreground as children of the test process, on free ports, so clusters on one host do not collide and
teardown is a terminate/wait of the processes started here. slurmdbd + MariaDB are there because Slurm 22.05's
``sacct`` reads only from slurmdbd (its ``--completion`` mode is gone); a jobcomp/filetxt log is kept too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Debian package -> one executable it ships (used to decide whether anything must be installed).
PACKAGES = {
    "munge": "munged",
    "slurmctld": "slurmctld",
    "slurmd": "slurmd",
    "slurm-client": "sbatch",
    "slurmdbd": "slurmdbd",
    "mariadb-server": "mariadbd",
}
CLUSTER_NAME = "capsdist"
# Terminal job states as printed by `sacct`/`squeue` (CANCELLED may carry a suffix such as "by 0").
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
SACCT_FORMAT = "JobID,JobName,State,ExitCode,Elapsed,NNodes,NTasks,AllocCPUS,Start,End"


def _sbin_path() -> str:
    """PATH with the sbin folders added: the daemons live there and CI's PATH may lack them."""
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _which(exe: str) -> str | None:
    return shutil.which(exe, path=_sbin_path())


def _exe(name: str) -> str:
    """Absolute path of an executable (sbin included), or the bare name to let the OS report it missing."""
    return _which(name) or name


def missing_reason() -> str | None:
    """Why the cluster cannot start here (packages missing), or None; scripts/install_slurm.sh installs them."""
    missing = [pkg for pkg, exe in PACKAGES.items() if _which(exe) is None]
    return f"SLURM packages {missing} are not installed" if missing else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(check, what: str, timeout: float, interval: float = 0.25) -> None:
    """Poll ``check()`` until it is truthy; raise with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _node_spec(node: str) -> str:
    """This host's hardware as ``slurmd -C`` detects it, as the value of a slurm.conf NodeName line."""
    detected = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True)
    fields = [f for f in detected.stdout.splitlines()[0].split() if not f.startswith("NodeName=")]
    return " ".join([node, "NodeAddr=127.0.0.1", *fields, "State=UNKNOWN"])


def _write_conf(path: Path, settings: dict[str, object]) -> None:
    """Write a SLURM ``Key=Value`` configuration file."""
    path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))


@dataclass
class SlurmCluster:
    """Handle on a running test cluster: its config, client environment and daemon processes."""

    root: Path
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (and, through sbatch's default --export=ALL, for the jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": _sbin_path()}

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        proc = subprocess.run(cmd, env=env or self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SlurmCluster:
        """Write the configuration and start every daemon, returning once the node is idle."""
        for sub in ("etc", "log", "state", "spool", "munge", "db"):
            (self.root / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.root / "run").mkdir(mode=0o755, exist_ok=True)  # munged wants its socket folder traversable
        try:
            self._start_munge()
            db_port = self._start_mariadb()
            dbd_port, ctld_port, slurmd_port = free_port(), free_port(), free_port()
            self._write_confs(db_port, dbd_port, ctld_port, slurmd_port)
            self._spawn("slurmdbd", ["slurmdbd", "-D"])
            _wait_until(lambda: self._ok("sacctmgr", "-n", "list", "cluster"), "slurmdbd", 60)
            self.run("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME)
            self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
            self._spawn("slurmd", ["slurmd", "-D", "-N", self.node])
            _wait_until(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False), "node idle", 90)
        except Exception as err:
            self.stop()
            logs = "\n".join(self.logs(name) for name in ("slurmdbd", "slurmctld", "slurmd"))
            raise RuntimeError(f"SLURM test cluster failed to start: {err}\n{logs}") from err
        return self

    def stop(self) -> None:
        """Cancel leftover jobs (their steps outlive slurmd otherwise), then stop the daemons in reverse order."""
        if self.procs and (self.root / "etc" / "slurm.conf").exists():
            self.run("scancel", f"--user={os.getuid()}", check=False)
            with contextlib.suppress(TimeoutError):  # KillWait (10 s) lets SIGTERM-ignoring tasks end first
                _wait_until(lambda: not self.run("squeue", "-h", check=False).strip(), "jobs to end", 30)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def _spawn(self, name: str, cmd: Sequence[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - owned by the child for its life
        proc = subprocess.Popen([_exe(cmd[0]), *cmd[1:]], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited at start ({proc.returncode}): {self.logs(name)}")
        self.procs.append(proc)

    def _ok(self, *cmd: str) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True, timeout=30).returncode == 0

    def _start_munge(self) -> None:
        key, run = self.root / "munge" / "munge.key", self.root / "run"
        subprocess.run([_exe("mungekey"), "--create", "--force", f"--keyfile={key}"], check=True)
        self._spawn(
            "munged",
            ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
             f"--pid-file={run / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
             f"--seed-file={self.root / 'munge' / 'munged.seed'}"],
        )  # fmt: skip
        _wait_until(self.munge_socket.exists, "munged socket", 30)

    @property
    def munge_socket(self) -> Path:
        return self.root / "run" / "munge.socket"

    def _start_mariadb(self) -> int:
        """Start a private MariaDB for slurmdbd: no grant tables, so it listens on 127.0.0.1 only."""
        datadir, run, port = self.root / "db", self.root / "run", free_port()
        subprocess.run(
            [_exe("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, capture_output=True,
        )  # fmt: skip
        self._spawn(
            "mariadbd",
            ["mariadbd", "--no-defaults", f"--datadir={datadir}", "--user=root", "--skip-grant-tables",
             f"--port={port}", "--bind-address=127.0.0.1", f"--socket={run / 'mysqld.sock'}",
             f"--pid-file={run / 'mysqld.pid'}", "--skip-log-bin", "--innodb-buffer-pool-size=64M"],
        )  # fmt: skip

        def _accepting() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        _wait_until(_accepting, "mariadbd", 60)
        return port

    def _write_confs(self, db_port: int, dbd_port: int, ctld_port: int, slurmd_port: int) -> None:
        run, log, auth = self.root / "run", self.root / "log", f"socket={self.munge_socket}"
        dbd_conf = self.root / "etc" / "slurmdbd.conf"
        _write_conf(dbd_conf, {
            "AuthType": "auth/munge", "AuthInfo": auth, "DbdHost": "localhost", "DbdAddr": "127.0.0.1",
            "DbdPort": dbd_port, "SlurmUser": "root", "StorageType": "accounting_storage/mysql",
            "StorageHost": "127.0.0.1", "StoragePort": db_port, "StorageUser": "root",
            "StorageLoc": "capsdist_acct", "PidFile": run / "slurmdbd.pid", "LogFile": log / "slurmdbd.log",
        })  # fmt: skip
        dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read
        _write_conf(self.conf, {
            "ClusterName": CLUSTER_NAME, "SlurmctldHost": f"{self.node}(127.0.0.1)",
            "SlurmctldPort": ctld_port, "SlurmdPort": slurmd_port, "SlurmUser": "root", "SlurmdUser": "root",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
            "AuthType": "auth/munge", "AuthInfo": f"{auth},cred_expire=5", "CredType": "cred/munge",
            "StateSaveLocation": self.root / "state", "SlurmdSpoolDir": self.root / "spool",
            "SlurmctldPidFile": run / "slurmctld.pid", "SlurmdPidFile": run / "slurmd.pid",
            "SlurmctldLogFile": log / "slurmctld.log", "SlurmdLogFile": log / "slurmd.log",
            "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none", "MpiDefault": "none",
            "SelectType": "select/cons_tres", "SelectTypeParameters": "CR_Core",
            "SchedulerType": "sched/backfill", "SchedulerParameters": "sched_interval=2,bf_interval=1",
            "ReturnToService": 2, "JobRequeue": 1, "KillWait": 10, "MinJobAge": 600,
            "AccountingStorageType": "accounting_storage/slurmdbd", "AccountingStorageHost": "127.0.0.1",
            "AccountingStoragePort": dbd_port,
            # with auth/munge this names the munged socket used towards slurmdbd (AuthInfo is not used there)
            "AccountingStoragePass": self.munge_socket, "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/filetxt", "JobCompLoc": log / "jobcomp.txt",
            "NodeName": _node_spec(self.node),
            "PartitionName": "debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        })  # fmt: skip

    # ------------------------------------------------------------------ jobs
    def sbatch(
        self, script: Path, *script_args: str, options: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> int:
        """Submit ``script`` with sbatch ``options`` and ``script_args``; return the job id."""
        out = self.run("sbatch", "--parsable", *options, str(script), *script_args, env={**self.env, **(env or {})})
        return int(out.strip().split(";")[0])

    def job_state(self, job_id: int) -> str:
        """The job's current state according to slurmctld (``scontrol show job``)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id))
        return next(f.split("=", 1)[1] for f in out.split() if f.startswith("JobState="))

    def wait_for_state(self, job_id: int, states: Iterable[str], timeout: float) -> str:
        """Wait until the job is in one of ``states`` (or a terminal state) and return that state."""
        wanted = (*states, *TERMINAL_STATES)
        seen = [""]

        def _reached() -> bool:
            seen[0] = self.job_state(job_id)
            return seen[0].startswith(wanted)

        try:
            _wait_until(_reached, f"job {job_id} to reach {list(states) or 'an end'}", timeout, 0.5)
        except TimeoutError as err:
            raise TimeoutError(f"{err}; it is {seen[0]}") from None
        return seen[0]

    def sacct(self, job_id: int) -> list[str]:
        """The job's accounting lines, every run of a requeued job included (``sacct --duplicates``)."""
        fmt = f"--format={SACCT_FORMAT}"
        out = self.run("sacct", "-j", str(job_id), "--duplicates", "--noheader", "--parsable2", fmt)
        return out.strip().splitlines()

    def logs(self, name: str) -> str:
        """Tail of a daemon's log, for error messages."""
        files = [self.root / "log" / f"{name}.out", self.root / "log" / f"{name}.log"]
        return "\n".join(f.read_text(errors="replace")[-2000:] for f in files if f.exists())
