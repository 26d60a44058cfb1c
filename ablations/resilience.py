"""Surviving the machine: timing knobs from the environment, storage retries, results-dir checks.

Workers outlive hiccups that are not their fault (a database restarting, a network blip) and stop,
with one line, on those that will not pass (a read-only or full results directory). Either way a grid
point is never left FAILED because of the machine it happened to run on: the attempt is handed back
to the queue and resumes from its checkpoint wherever it is claimed next.

Knobs (environment variables, so spawned workers, torchrun ranks and SLURM jobs inherit them):

    ABLATE_HEARTBEAT_S        seconds between a running trial's heartbeats (default 10)
    ABLATE_GRACE_S            heartbeat silence after which a trial is retried elsewhere (default 120)
    ABLATE_STORAGE_ATTEMPTS   tries to reach the storage before giving up (default 4: 1+2+4 s of waiting)
    ABLATE_STORAGE_BACKOFF_S  wait after the first failed try, doubled after each (default 1; cap 30)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ablations import rundir
from ablations.errors import ResultsDirError, RunDirBusy, SpecError, first_line

T = TypeVar("T")
BACKOFF_CAP_S = 30.0
# errno values that mean "this directory cannot take our files", not "this trial is broken".
UNWRITABLE = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
              errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file size limit exceeded"}


def env_number(name: str, default: float, *, integer: bool = False) -> float:
    """A positive number from the environment; a bad value is a one-line SpecError naming the variable."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = -1
    if not value > 0:
        kind = "integer" if integer else "number"
        raise SpecError(f"must be a positive {kind} (got {raw!r})", source="environment", key=name)
    return value


def heartbeat_s() -> float:
    return env_number("ABLATE_HEARTBEAT_S", 10.0)


def grace_s() -> float:
    return env_number("ABLATE_GRACE_S", 120.0)


def storage_attempts() -> int:
    return int(env_number("ABLATE_STORAGE_ATTEMPTS", 4, integer=True))


def storage_backoff_s() -> float:
    return env_number("ABLATE_STORAGE_BACKOFF_S", 1.0)


def check_environment() -> None:
    """Every knob, read now: a bad value is one line before anything starts, not when first needed
    (the knobs are read where they are used, so a test or a job can set them at any time)."""
    heartbeat_s(), grace_s(), storage_attempts(), storage_backoff_s()


# ---------------------------------------------------------------------------------------------------
# Storage


def transient(exc: BaseException) -> bool:
    """Whether a storage error may pass by itself (server down or restarting, network, busy SQLite), as
    opposed to one no retry fixes (no driver, bad URL, wrong password, no such database)."""
    import sqlalchemy.exc

    # Optuna wraps a failed commit in StorageInternalError: the driver's error is further down the chain.
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and not isinstance(
            exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    if exc is None or id(exc) in seen:
        return False
    text = str(exc).lower()
    permanent = ("authentication failed", "password", "does not exist", "no such", "permission denied",
                 "unable to open database file")
    return not any(p in text for p in permanent)


def with_retries(action: Callable[[], T], what: str, *, attempts: int | None = None,
                 backoff_s: float | None = None, log: Callable[[str], None] | None = None) -> T:
    """`action()`, retried with exponential backoff while it fails transiently. The last failure, or the
    first permanent one, propagates."""
    attempts = int(attempts or storage_attempts())
    wait = backoff_s if backoff_s is not None else storage_backoff_s()
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as e:
            if attempt == attempts or not transient(e):
                raise
            log(f"warning: {what}: {first_line(e)}; retry {attempt}/{attempts - 1} in {wait:g} s")
            time.sleep(wait)
            wait = min(BACKOFF_CAP_S, wait * 2)
    raise AssertionError("unreachable")  # the loop returns or raises


# ---------------------------------------------------------------------------------------------------
# Results directory


def unwritable_oserror(exc: BaseException | None) -> OSError | None:
    """The OSError in `exc`'s chain that says a directory cannot take files (torch wraps them)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in UNWRITABLE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def unwritable(exc: BaseException) -> str | None:
    """Why `exc` says the results directory cannot take files (None: some other failure)."""
    err = unwritable_oserror(exc)
    return None if err is None else UNWRITABLE[err.errno]


def results_dir_error(path: Path, exc: BaseException, outcome: str) -> ResultsDirError:
    """One line for a results directory that cannot take a file: which file, why, what became of the work."""
    os_error = unwritable_oserror(exc)
    where = os_error.filename if os_error is not None and os_error.filename else None
    what = f"cannot write {where}" if where and str(where) != str(path) else "cannot write files there"
    return ResultsDirError(f"{what}: {unwritable(exc)}; {outcome} (free space or fix permissions, then "
                           "start again)", source="--results-dir", key=str(path))


def check_writable(results_dir: Path) -> None:
    """Fail before claiming any trial when the results directory cannot take a file."""
    probe = Path(results_dir) / f".write-probe-{os.getpid()}"
    try:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)  # a few blocks: an exactly-full disk fails here, not mid-epoch
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if unwritable(e) is None:
            raise
        e.filename = None  # not our probe's name: the directory is what the user must fix
        raise results_dir_error(Path(results_dir), e, "no trial was claimed") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------------
# One trainer per run directory


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, wait_s: float, poll_s: float = 0.5) -> Iterator[None]:
    """Exclusive use of `run_dir` while a trial trains in it, so a retried trial can never write over
    a worker that was only presumed dead (stopped, partitioned from the database): the retry waits up
    to `wait_s` for it, then gives up with RunDirBusy. A flock, so a killed holder releases it at once
    (on NFS, when its lease expires)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / rundir.LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = path.read_text().strip() or "another process"
                    raise RunDirBusy(f"{run_dir} is in use by {holder}") from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # drops the flock


def storage_call(action: Callable[[], T], url: str) -> T:
    """`action()` on a storage a worker already uses, retried with backoff while it is unreachable (a
    database restart, a network blip); still unreachable after that: a one-line StorageError, and the
    worker stops (its trial is retried elsewhere after the grace period)."""
    from ablations.storage_url import shown, storage_error

    try:
        return with_retries(action, f"storage {shown(url)}")
    except Exception as e:
        if not transient(e):
            raise
        raise storage_error("lost the storage", url, e) from None
