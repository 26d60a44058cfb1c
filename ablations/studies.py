"""Sweeps as Optuna studies: the storage, one study per (sweep, profile), its grid, its lock, its recovery.

A grid point (setting, seed) is a trial whose params are set when it is queued (WAITING), so the
dashboard, `ablate status` and the analysis see every point before it runs. Exactly-once rests on one
rule: every state change that decides who trains a point (enqueue, pop, fail + requeue, tell) runs under
`grid_lock`. SQLite ignores SELECT ... FOR UPDATE, so without the lock Optuna's WAITING -> RUNNING step
can hand one trial to two processes (optuna/optuna#1014); on PostgreSQL the lock is an advisory lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import sqlite3
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from ablations import paths
from ablations.errors import SpecError
from ablations.resilience import grace_s, heartbeat_s, with_retries
from ablations.spec import MAX_SEEDS, Profile, RunConfig, Setting, Sweep, from_validation_error, run_config
from ablations.storage_url import resolve as storage_url  # noqa: F401 -- the runner's name for it
from ablations.storage_url import shown, sqlite_path, storage_error

# Environment knobs (resilience.py), so a fault-injection test can shrink the grace period to seconds.
HEARTBEAT_S = heartbeat_s()  # a worker records a heartbeat this often while it trains
GRACE_S = grace_s()  # silence after which any process may fail + requeue the trial (its worker is gone)
MAX_RETRY = 3  # automatic requeues per grid point; running `ablate run` again re-enqueues beyond that
# Params and attrs that identify a grid point; a requeued trial keeps these and drops the worker's own.
IDENTITY_ATTRS = ("sweep", "profile", "run_dir")
# pg_advisory_xact_lock takes a bigint; derive a fixed one so every process agrees on it.
PG_LOCK_KEY = int.from_bytes(hashlib.sha1(b"ablations.grid_lock").digest()[:8], "big", signed=True)


# ---------------------------------------------------------------------------------------------------
# Storage


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


def open_storage(url: str, checked: bool = False) -> optuna.storages.RDBStorage:
    """The RDB storage with heartbeats on; a stale trial is requeued by `requeue` (Optuna's retry
    callback contract). `checked`: the process that started us has just created and checked the tables
    (`ablate run`'s workers), so neither is done again, nor taken the lock that guards creating them."""
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise storage_error(f"cannot create {path.parent}: {e.strerror}", url) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "Trial 3 finished" lines over the bars
    warnings.filterwarnings("ignore", category=ExperimentalWarning)  # heartbeats: "experimental" since 2.9
    kwargs: dict[str, Any] = {"creator": _sqlite_connector(path)} if path is not None else {"pool_pre_ping": True}

    def connect() -> optuna.storages.RDBStorage:
        # Optuna creating tables in a new database is not safe to do twice at once.
        with contextlib.nullcontext() if checked else _lock(url):
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=requeue, skip_table_creation=checked,
                skip_compatibility_check=checked,
            )

    started = time.monotonic()
    try:  # a database restarting or a network blip must not end a worker that could wait it out
        storage = with_retries(connect, f"storage {shown(url)}")
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


# ---------------------------------------------------------------------------------------------------
# Plans: what one study runs


@dataclass(frozen=True)
class Plan:
    """One (sweep, profile) study: its settings x seeds grid and how each point becomes a RunConfig."""

    sweep: Sweep
    profile: Profile
    seeds: int
    overrides: tuple[str, ...] = ()
    data_root: str | None = None

    @property
    def study_name(self) -> str:
        return f"{self.sweep.name}-{self.profile.name}"

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sweep.settings]

    def grid(self) -> list[tuple[str, int]]:
        # Seed-major: an interrupted sweep has whole seeds of every setting, a usable partial table.
        return [(label, seed) for seed in range(self.seeds) for label in self.labels]

    def setting(self, label: str) -> Setting:
        for s in self.sweep.settings:
            if s.label == label:
                return s
        raise SpecError(f"study has no setting {label!r}", source=self.study_name)

    def config(self, label: str, seed: int) -> RunConfig:
        return run_config(self.profile, self.setting(label), seed, self.sweep.name)

    def run_dir(self, results_dir: str | Path, label: str, seed: int) -> Path:
        return paths.run_dir(results_dir, self.profile.name, self.sweep.name, self.setting(label).label, seed)

    def distributions(self) -> dict[str, Any]:
        return {"setting": CategoricalDistribution(self.labels), "seed": IntDistribution(0, self.seeds - 1)}

    def attrs(self) -> dict[str, Any]:
        """Study user attrs: what the analysis reads, plus the full spec so `ablate worker` on another
        machine trains exactly what this machine would (its sweep files may differ or be absent)."""
        return {
            "sweep": self.sweep.name,
            "profile": self.profile.name,
            "table": self.sweep.table,
            "description": self.sweep.description,
            "reference": self.sweep.reference,
            "settings": self.labels,
            "seeds": self.seeds,
            "overrides": list(self.overrides),
            "data_root": self.data_root,
            "sweep_path": self.sweep.path,
            "sweep_spec": self.sweep.model_dump(mode="json", exclude={"path"}),
            "profile_spec": self.profile.model_dump(mode="json", exclude={"path"}),
        }


def plan_from_attrs(name: str, attrs: dict[str, Any], data_root: str | None = None) -> Plan:
    """Rebuild a study's Plan from its user attrs (`data_root` overrides the stored one)."""
    missing = [k for k in CREATION_ATTRS if k not in attrs]
    if missing:
        raise SpecError(f"this study lacks {', '.join(missing)}: not created by `ablate run`, or its creation "
                        "was interrupted (run its sweep with `ablate run` again to complete it)",
                        source="--study", key=name)
    try:
        plan = Plan(
            sweep=Sweep.model_validate(attrs["sweep_spec"]),
            profile=Profile.model_validate(attrs["profile_spec"]),
            seeds=int(attrs["seeds"]),
            overrides=tuple(attrs.get("overrides") or ()),
            data_root=data_root or attrs.get("data_root"),
        )
    except ValidationError as e:
        err = from_validation_error(e, "")
        raise SpecError(f"its stored spec is not valid here: {err.key}: {err.message}", source="--study",
                        key=name) from None
    except (TypeError, ValueError) as e:  # `seeds` that is no number
        raise SpecError(f"its stored spec is not valid here: {e}", source="--study", key=name) from None
    if not 0 < plan.seeds <= MAX_SEEDS:
        raise SpecError(f"this study holds {plan.seeds} seeds per setting; at most {MAX_SEEDS} can run",
                        source="--study", key=name)
    return plan


# Every attr `Plan.attrs` writes when it creates a study: one missing means the creation was cut short.
CREATION_ATTRS = ("sweep", "profile", "table", "description", "reference", "settings", "seeds", "overrides",
                  "data_root", "sweep_path", "sweep_spec", "profile_spec")


def _what_trains(sweep_spec: dict[str, Any], profile_spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a spec that change results (labels, attention, backbone, data, recipe), not the prose
    (descriptions, a row's published numbers).

    Both specs are re-validated first, so a study stored before a key existed compares equal to the same
    sweep and recipe today (the new key at its default). Each row's backbone is compared as resolved
    (`run_config`): a profile's `families` section changes only the rows of those families."""
    try:
        sweep, profile = Sweep.model_validate(sweep_spec), Profile.model_validate(profile_spec)
        backbones = [run_config(profile, s, 0).backbone.model_dump(mode="json") for s in sweep.settings]
    except ValueError:  # a spec this version cannot read (SpecError included): compare it as stored
        return {"settings": sweep_spec["settings"],
                **{k: profile_spec.get(k) for k in ("backbone", "data", "train")}}
    profile_spec = profile.model_dump(mode="json", exclude={"path"})
    return {"settings": [s.model_dump(mode="json", exclude={"published"}) for s in sweep.settings],
            "backbones": backbones, **{k: profile_spec[k] for k in ("backbone", "data", "train")}}


# ---------------------------------------------------------------------------------------------------
# Studies and the grid


def open_study(storage: optuna.storages.RDBStorage, plan: Plan, *, note: bool = True) -> optuna.Study:
    """Create the plan's study (attrs, dashboard note) or load it, refusing one that trains differently.

    `note=False` leaves the dashboard note to the caller (dashboard.save_study_note), which `ablate run`
    saves beside the training: importing optuna-dashboard takes seconds.
    """
    from ablations.dashboard import save_study_note

    with grid_lock(storage):  # two `ablate run`s starting together must not both create it
        try:
            study = optuna.load_study(study_name=plan.study_name, storage=storage)
        except KeyError:
            study = optuna.create_study(study_name=plan.study_name, storage=storage, direction="minimize")
        if _unfinished(study):
            # Created just now, or by a run killed between two of its attrs (Optuna writes one at a time):
            # nothing was queued yet, so this plan's attrs complete it.
            for key, value in plan.attrs().items():
                study.set_user_attr(key, value)
            if note:
                save_study_note(storage, study, plan)
            return study
    old = study.user_attrs
    new = plan.attrs()
    if "sweep_spec" in old and _what_trains(old["sweep_spec"], old["profile_spec"]) != _what_trains(
            new["sweep_spec"], new["profile_spec"]):
        raise SpecError(
            f"study {plan.study_name} in {shown(storage.url)} was created from different settings or profile "
            f"(--set {' '.join(old.get('overrides') or []) or '(none)'}); rerun with the same sweep and "
            "options, or use another --results-dir / --storage",
            source=plan.sweep.path or plan.sweep.name)
    # Prose and the seed count may grow between runs; the grid of earlier runs stays in the study.
    new["seeds"] = max(int(old.get("seeds", 0)), plan.seeds)
    if old.get("data_root") and not plan.data_root:
        new["data_root"] = old["data_root"]
    for key, value in new.items():
        if old.get(key) != value:
            study.set_user_attr(key, value)
    if note:
        save_study_note(storage, study, plan)
    return study


def _unfinished(study: optuna.Study) -> bool:
    """A study whose creation did not get to the end: some creation attr missing and no trial queued
    (a study of someone else's, with trials and its own attrs, is left alone)."""
    attrs = study.user_attrs
    return any(k not in attrs for k in CREATION_ATTRS) and not study.get_trials(deepcopy=False)


def grid_point(trial: FrozenTrial) -> tuple[str, int] | None:
    if "setting" not in trial.params or "seed" not in trial.params:
        return None
    return str(trial.params["setting"]), int(trial.params["seed"])


# A point's state is the most advanced of its trials' states.
_RANK = {TrialState.COMPLETE: 4, TrialState.RUNNING: 3, TrialState.WAITING: 2, TrialState.FAIL: 1}
STATES = ("COMPLETE", "RUNNING", "WAITING", "FAIL", "MISSING")


def point_states(trials: Iterable[FrozenTrial], grid: Iterable[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """{(setting, seed): COMPLETE | RUNNING | WAITING | FAIL | MISSING} for every point of `grid`."""
    best: dict[tuple[str, int], TrialState] = {}
    for t in trials:
        p = grid_point(t)
        if p is not None and t.state in _RANK and (p not in best or _RANK[t.state] > _RANK[best[p]]):
            best[p] = t.state
    return {p: (best[p].name if p in best else "MISSING") for p in grid}


def point_counts(trials: Iterable[FrozenTrial], labels: Iterable[str], seeds: int) -> dict[str, int]:
    """How many points of the labels x seeds grid are in each of STATES, without listing the grid: a
    study's stored seed count is counted, never materialised."""
    labels = set(labels)
    best: dict[tuple[str, int], TrialState] = {}
    for t in trials:
        p = grid_point(t)
        if p is None or p[0] not in labels or not 0 <= p[1] < seeds or t.state not in _RANK:
            continue
        if p not in best or _RANK[t.state] > _RANK[best[p]]:
            best[p] = t.state
    counts = dict.fromkeys(STATES, 0)
    for state in best.values():
        counts[state.name] += 1
    counts["MISSING"] = len(labels) * seeds - len(best)
    return counts


def enqueue_missing(study: optuna.Study, plan: Plan) -> int:
    """Queue every grid point that has no COMPLETE, RUNNING or WAITING trial (failed ones get another
    go). Call under `grid_lock`. Returns how many were queued."""
    states = point_states(study.get_trials(deepcopy=False), plan.grid())
    todo = [p for p, s in states.items() if s in ("FAIL", "MISSING")]
    dists = plan.distributions()
    study.add_trials([
        optuna.trial.create_trial(
            state=TrialState.WAITING, params={"setting": label, "seed": seed}, distributions=dists,
            user_attrs={"sweep": plan.sweep.name, "profile": plan.profile.name},
        )
        for label, seed in todo
    ])
    return len(todo)


_study_ids: weakref.WeakKeyDictionary[optuna.storages.RDBStorage, dict[str, int]] = weakref.WeakKeyDictionary()


def study_id(storage: optuna.storages.RDBStorage, study: optuna.Study) -> int:
    """The study's database id, looked up once per storage object (nothing here deletes a study)."""
    ids = _study_ids.setdefault(storage, {})
    if study.study_name not in ids:
        ids[study.study_name] = storage.get_study_id_from_name(study.study_name)
    return ids[study.study_name]


def trial_id(storage: optuna.storages.RDBStorage, study: optuna.Study, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(study_id(storage, study), number)


def trials_in(storage: optuna.storages.RDBStorage, study: optuna.Study,
              states: tuple[TrialState, ...]) -> list[FrozenTrial]:
    """`study`'s trials in `states`, filtered by the database. Not `study.get_trials(states=...)`: its
    cache reloads every unfinished trial on each call whatever the states asked for, which on a freshly
    queued sweep is every grid point (5 ms at 18 points, 50 ms at 300, several calls per trial)."""
    return storage.get_all_trials(study_id(storage, study), deepcopy=False, states=states)


def pop_waiting(storage: optuna.storages.RDBStorage, study: optuna.Study) -> FrozenTrial | None:
    """Claim the oldest WAITING grid trial (WAITING -> RUNNING). Call under `grid_lock`.

    Not `study.ask()`: with an empty queue it creates a fresh param-less trial, which for a grid is a
    phantom RUNNING trial; this is the same atomic state transition without that fallback.
    """
    for t in trials_in(storage, study, (TrialState.WAITING,)):
        if grid_point(t) is None:
            continue  # someone else's enqueue_trial; not a grid point
        tid = trial_id(storage, study, t.number)
        try:
            if storage.set_trial_state_values(tid, TrialState.RUNNING):
                return storage.get_trial(tid)
        except UpdateFinishedTrialError:
            continue
    return None


# ---------------------------------------------------------------------------------------------------
# Recovery: trials whose worker is gone


def requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a failed trial's grid point again, as Optuna's RetryHeartbeatStaleTrialCallback does (same
    system attrs: failed_trial, retry_history), minus the dead worker's attrs. The retry trains into the
    same run dir, so it resumes from the checkpoint there."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return False
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k in IDENTITY_ATTRS},
        system_attrs={"failed_trial": history[0], "retry_history": history},
    ))
    return True


def fail(storage: optuna.storages.RDBStorage, tid: int, reason: str) -> bool:
    """Mark a trial FAILED with `fail_reason`; False if someone else finished it first."""
    try:
        storage.set_trial_user_attr(tid, "fail_reason", reason[:1000])
        return storage.set_trial_state_values(tid, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False


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
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": process_start(pid),
            "worker": f"{socket.gethostname()}:{pid}"}


def recover(storage: optuna.storages.RDBStorage, study: optuna.Study,
            running: list[FrozenTrial] | None = None) -> list[int]:
    """Fail and requeue RUNNING trials whose worker is gone. Call under `grid_lock`, with the `running`
    trials if the caller has just read them. Returns their numbers.

    - this host, dead pid: at once (a killed `ablate run` resumes without waiting for a grace period);
    - any host, heartbeat older than GRACE_S: Optuna's fail_stale_trials, whose callback is `requeue`;
    - no worker attrs at all, older than GRACE_S: died between claiming the trial and its first heartbeat.
    """
    if running is None:
        running = trials_in(storage, study, (TrialState.RUNNING,))
    before = {t.number for t in running}
    host = socket.gethostname()
    now = datetime.now()
    for t in running:
        a = t.user_attrs
        if a.get("host") == host and isinstance(a.get("pid"), int):
            if process_alive(a["pid"], a.get("pid_start")):
                continue
            reason = f"worker {a.get('worker')} died"
        elif "worker" not in a and t.datetime_start and now - t.datetime_start > timedelta(seconds=GRACE_S):
            reason = "claimed by a worker that died before its first heartbeat"
        else:
            continue
        if fail(storage, trial_id(storage, study, t.number), reason):
            requeue(study, storage.get_trial(trial_id(storage, study, t.number)))
    optuna.storages.fail_stale_trials(study)
    # Every change to a trial's state happens under grid_lock, which we hold: those gone from RUNNING
    # since `running` was read were failed here.
    return sorted(before - {t.number for t in trials_in(storage, study, (TrialState.RUNNING,))})
