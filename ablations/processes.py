"""Processes of this machine: who is alive (from /proc), who a worker is, and how the project's
processes end together: SIGTERM handled as Ctrl-C, and children that die with the process that
started them, even when it is killed with -9.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (Linux), which tells a live worker from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False  # killed, not yet reaped
    except OSError:
        pass
    return start is None or process_start(pid) in (None, start)


def worker_identity() -> dict[str, Any]:
    """What a worker writes on the trial it claims, so that a dead worker's trial can be told apart."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid),
            "worker": f"{socket.gethostname()}:{pid}"}


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def sigterm_as_interrupt() -> None:
    """`kill` (SIGTERM) takes the same way out as Ctrl-C: running trials are handed back to the queue."""
    signal.signal(signal.SIGTERM, _interrupt)


def die_with_multiprocessing_parent() -> None:
    """A multiprocessing child (forked from a fork server, which is not the process that wants it) is
    killed the moment that process is gone, however it ended: multiprocessing's parent sentinel is a
    pipe the parent holds open, and reads as ready once it is closed."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def die_with_parent(parent: int) -> None:
    """Exit when `parent` (this process's parent) does, even if it is killed with -9 (Linux's
    PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
