"""Imported by the loader workers' fork server (capsdist.data.workers) before it forks any worker.

The server dies with the process that started it (PR_SET_PDEATHSIG): its workers hold its lifeline, so a training
process killed with SIGKILL would otherwise leave the server and its workers waiting for each other forever; with
the server gone, the workers' watchdog (their parent's PID) ends them within 5 s. The imports make each worker
start ready.
"""

import torch  # noqa: F401  (imported here once, so that no worker imports it)

import capsdist.data.shards  # noqa: F401
import capsdist.data.streams  # noqa: F401
from capsdist.data.workers import die_with_parent

die_with_parent()
