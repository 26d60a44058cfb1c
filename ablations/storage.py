"""The Optuna storage: opened with retries and heartbeats, and the storage-wide lock that makes every
grid point train exactly once.

Exactly-once rests on one rule: every state change that decides who trains a point (enqueue, pop,
fail + requeue, tell) runs under `grid_lock`. SQLite ignores SELECT ... FOR UPDATE, so without the lock
Optuna's WAITING -> RUNNING step can hand one trial to two processes (optuna/optuna#1014); on
PostgreSQL the lock is an advisory lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from ablations import resilience
from ablations.errors import SpecError
from ablations.storage_url import shown, sqlite_path, storage_error
from ablations.trials import requeue

# pg_advisory_xact_lock takes a bigint; derive a fixed one so every process agrees on it.
PG_LOCK_KEY = int.from_bytes(hashlib.sha1(b"ablations.grid_lock").digest()[:8], "big", signed=True)


def _sqlite_connector(path: Path) -> Callable[[], sqlite3.Connection]:
    """SQLite connections that wait for a busy database instead of failing at once, in WAL mode (readers
    such as the dashboard never block a worker) with synchronous=NORMAL: a commit costs no fsync, which
    is most of the scheduler's per-trial overhead. A commit survives the process being killed; only a
    power cut can lose the last ones, and then recovery requeues and the run dir's final.json remains."""

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return connect


def open_storage(url: str, tables_ready: bool = False) -> optuna.storages.RDBStorage:
    """The RDB storage with heartbeats on; a stale trial is requeued by `trials.requeue` (Optuna's retry
    callback contract). `tables_ready`: the process that started us has just created and checked the
    tables (`ablate run`'s workers), so neither is done again, nor the lock that guards creating them
    taken."""
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(f"cannot create {path.parent}: {e.strerror}", url) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "Trial 3 finished" lines over the bars
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats: "experimental" since 2.9
    kwargs: dict[str, Any] = {"creator": _sqlite_connector(path)} if path is not None else {"pool_pre_ping": True}
    heartbeat_s, grace_s = resilience.heartbeat_s(), resilience.grace_s()

    def connect() -> optuna.storages.RDBStorage:
        # Optuna creating tables in a new database is not safe to do twice at once.
        with contextlib.nullcontext() if tables_ready else _lock(url):
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=requeue, skip_table_creation=tables_ready,
                skip_compatibility_check=tables_ready,
            )

    started = time.monotonic()
    try:  # a database restarting or a network blip must not end a worker that could wait it out
        storage = resilience.with_retries(connect, f"storage {shown(url)}")
    except ImportError as e:
        raise storage_error("no database driver", url, e) from None
    except Exception as e:  # noqa: BLE001 -- any connection failure is a bad --storage to the user
        waited = time.monotonic() - started
        after = f" (gave up after {waited:.0f} s of retries)" if waited >= 1 else ""
        raise storage_error("cannot open storage", url, e, after) from None
    # Closing SQLite's last connection folds its write-ahead log back into the .db file: when the
    # storage is collected, or at exit (also when the CLI skips the interpreter's teardown, cli.exit_fast),
    # so a results dir copied after `ablate run` holds every result in optuna.db alone.
    weakref.finalize(storage, storage.engine.dispose)
    return storage


@contextlib.contextmanager
def _lock(url: str, engine: Any = None) -> Iterator[None]:
    """SQLite: an fcntl lock on `<db>.lock` (the kernel drops it if the holder dies). PostgreSQL: a
    transaction-scoped advisory lock, released on commit or disconnect."""
    path = sqlite_path(url)
    if path is not None:
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock
        return
    import sqlalchemy

    own = engine is None
    engine = engine or sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
            yield
    finally:
        if own:
            engine.dispose()


def grid_lock(storage: optuna.storages.RDBStorage) -> contextlib.AbstractContextManager[None]:
    """Storage-wide mutual exclusion for the state changes that assign grid points."""
    return _lock(storage.url, storage.engine)


def load_named_study(storage: optuna.storages.RDBStorage, name: str) -> optuna.Study:
    """The study called `name`, or one line naming the studies the storage does have."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        have = ", ".join(s.study_name for s in storage.get_all_studies()) or "none"
        raise SpecError(f"no such study in {shown(storage.url)} (have: {have})", source="--study",
                        key=name) from None
