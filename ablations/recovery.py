"""Recovery: trials whose worker is gone are failed and queued again, so that no grid point waits
forever for a dead process. The retry trains into the same run directory and resumes from its
checkpoint (trials.requeue).
"""

from __future__ import annotations

import socket
from datetime import datetime, timedelta

import optuna
from optuna.trial import FrozenTrial, TrialState

from ablations import resilience
from ablations.processes import process_alive
from ablations.trials import fail, requeue, trial_id, trials_in


def recover(storage: optuna.storages.RDBStorage, study: optuna.Study,
            running: list[FrozenTrial] | None = None) -> list[int]:
    """Fail and requeue RUNNING trials whose worker is gone. Call under `grid_lock`, with the `running`
    trials if the caller has just read them. Returns their numbers.

    - this host, dead pid: at once (a killed `ablate run` resumes without waiting for a grace period);
    - any host, heartbeat older than the grace period (ABLATE_GRACE_S): Optuna's fail_stale_trials,
      whose callback is `requeue`;
    - no worker attrs at all, older than the grace period: died between claiming the trial and its first
      heartbeat.
    """
    if running is None:
        running = trials_in(storage, study, (TrialState.RUNNING,))
    before = {t.number for t in running}
    host = socket.gethostname()
    now = datetime.now()
    grace = timedelta(seconds=resilience.grace_s())
    for t in running:
        a = t.user_attrs
        if a.get("host") == host and isinstance(a.get("pid"), int):
            if process_alive(a["pid"], a.get("pid_start")):
                continue
            reason = f"worker {a.get('worker')} died"
        elif "worker" not in a and t.datetime_start and now - t.datetime_start > grace:
            reason = "claimed by a worker that died before its first heartbeat"
        else:
            continue
        if fail(storage, trial_id(storage, study, t.number), reason):
            requeue(study, storage.get_trial(trial_id(storage, study, t.number)))
    optuna.storages.fail_stale_trials(study)
    # Every change to a trial's state happens under grid_lock, which we hold: those gone from RUNNING
    # since `running` was read were failed here.
    return sorted(before - {t.number for t in trials_in(storage, study, (TrialState.RUNNING,))})
