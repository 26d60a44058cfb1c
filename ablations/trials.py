"""The trials of a study in a storage: reading them by state, and the state changes that decide who
trains a grid point (claim, fail, requeue). Callers hold `storage.grid_lock` around every state change
that assigns a point (see grid.py).

A grid point (setting, seed) is a trial's params; a trial without them is someone else's
(`enqueue_trial`, `study.ask`) and never handed out here.
"""

from __future__ import annotations

import weakref
from typing import Any

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

MAX_RETRY = 3  # automatic requeues per grid point; running `ablate run` again re-enqueues beyond that
# Params and attrs that identify a grid point; a requeued trial keeps these and drops the worker's own.
IDENTITY_ATTRS = ("sweep", "profile", "run_dir")

_study_ids: weakref.WeakKeyDictionary[Any, dict[str, int]] = weakref.WeakKeyDictionary()


def grid_point(trial: FrozenTrial) -> tuple[str, int] | None:
    if "setting" not in trial.params or "seed" not in trial.params:
        return None
    return str(trial.params["setting"]), int(trial.params["seed"])


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


def fail(storage: optuna.storages.RDBStorage, tid: int, reason: str) -> bool:
    """Mark a trial FAILED with `fail_reason`; False if someone else finished it first."""
    try:
        storage.set_trial_user_attr(tid, "fail_reason", reason[:1000])
        return storage.set_trial_state_values(tid, TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False


def requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue a failed trial's grid point again, as Optuna's RetryHeartbeatStaleTrialCallback does (same
    system attrs: failed_trial, retry_history), minus the dead worker's attrs. The retry trains into the
    same run dir, so it resumes from the checkpoint there. False after MAX_RETRY requeues."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > MAX_RETRY:
        return False
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k in IDENTITY_ATTRS},
        system_attrs={"failed_trial": history[0], "retry_history": history},
    ))
    return True
