"""Every use of multiprocessing's private fork-server API, in one place: the loader workers' fork server started as
a fork of the program itself (``start_forked``), so that it holds torch as the program imported it, without a fresh
interpreter importing it again, ~1.5 CPU-s per run (capsdist.data.workers.fork_server).

Written for CPython 3.10-3.13: ``forkserver._forkserver`` (the process's ForkServer) with its ``_lock``,
``_forkserver_address``, ``_forkserver_alive_fd`` and ``_forkserver_pid`` (what ``ensure_running`` records after it
starts a server, and checks to reuse it), and ``forkserver.main(listener_fd, alive_r, preload, main_path, sys_path)``
(the server's loop). 3.14 adds an authentication key to the server's protocol: there, and wherever these names are
missing, ``usable`` is False and multiprocessing starts its own server. tests/unit/test_compat.py has the canary.
"""

from __future__ import annotations

import inspect
import os
import socket
import sys
from collections.abc import Callable
from multiprocessing import connection, forkserver

WRITTEN_FOR = "3.11"
SERVER_ATTRIBUTES = ("_lock", "_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid")
MAIN_PARAMETERS = ["listener_fd", "alive_r", "preload", "main_path", "sys_path"]


def usable() -> bool:
    """Whether this Python's fork server has the private names and protocol ``start_forked`` relies on."""
    server = getattr(forkserver, "_forkserver", None)
    return (
        sys.version_info < (3, 14)
        and all(hasattr(server, name) for name in SERVER_ATTRIBUTES)
        and list(inspect.signature(forkserver.main).parameters) == MAIN_PARAMETERS
    )


def start_forked(in_child: Callable[[], None]) -> None:
    """Fork this process into multiprocessing's fork server and register it as this process's server (a later
    ``ensure_running`` reuses it). The child keeps standard streams and the server's two descriptors, closes every
    other, runs ``in_child`` and serves forks until every client is gone; it never returns."""
    server = forkserver._forkserver
    with server._lock:  # no resource tracker yet: a worker's request to the server starts it (capsdist's at setup)
        with socket.socket(socket.AF_UNIX) as listener:
            address = connection.arbitrary_address("AF_UNIX")
            listener.bind(address)
            os.chmod(address, 0o600)
            listener.listen()
            alive_r, alive_w = os.pipe()  # clients hold the write end; its EOF tells the server they are gone
            for stream in (sys.stdout, sys.stderr):
                stream.flush()  # else the child's streams would write the parent's buffered text again
            pid = os.fork()
            if pid == 0:
                _serve(listener.fileno(), alive_r, in_child)
            os.close(alive_r)
        server._forkserver_address = address
        server._forkserver_alive_fd = alive_w
        server._forkserver_pid = pid


def _serve(listener_fd: int, alive_r: int, in_child: Callable[[], None]) -> None:
    """The forked child: what ``ensure_running``'s fresh interpreter would hold, then the server's loop."""
    try:
        keep = sorted({listener_fd, alive_r})
        for low, high in zip([2, *keep], [*keep, os.sysconf("SC_OPEN_MAX")], strict=True):
            os.closerange(low + 1, high)
        in_child()
        forkserver.main(listener_fd, alive_r, [], None, None)
    finally:
        os._exit(0)  # never the parent's atexit handlers or its buffered streams
