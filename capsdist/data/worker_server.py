"""Imported by the loader workers' fork server (capsdist.data.workers) before it forks any worker.

The server ignores the job's signals: slurmstepd signals every process of a step, and a server killed by SIGTERM
would orphan its workers, whose PyTorch watchdog (their parent's PID) would then end them mid-stop. The main
process decides how the run stops and kills the workers itself. The imports make each worker start ready.
"""

import torch  # noqa: F401  (imported here once, so that no worker imports it)

import capsdist.data.shards  # noqa: F401
import capsdist.data.streams  # noqa: F401
from capsdist.signals import ignore_job_signals

ignore_job_signals()
