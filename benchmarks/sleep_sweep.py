"""The scheduler alone: `ablate run`'s code path with a trainer that only sleeps, timed from outside.

    python benchmarks/sleep_sweep.py --workers 2 --epoch-s 1.0 --seeds 4 --json out.json

Runs the tests' mini sweep (3 settings x --seeds, 2 epochs each) through `supervisor.run` with
`tests/helpers.fake_train`, which sleeps --epoch-s per epoch and otherwise keeps the real trainer's
contract (on_epoch per epoch, final.json). Every second of wall time beyond the sleeping is
the scheduler's: interpreter and worker start-up, validation, Optuna claims and writes, heartbeats,
progress, the table. The trials' own timestamps (Optuna's datetime_start / datetime_complete) split
that into a fixed start-up and shut-down per run and an overhead per trial.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any heavy import: start-up counts

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 2


def trial_timeline(url: str, busy_s: Callable[[FrozenTrial], float]) -> dict:
    """Per-trial overhead from the study's timestamps: each trial's span (claim to COMPLETE) beyond
    `busy_s(trial)`, its working time, and the gap between one trial's end and the next claim on the
    same worker. Medians, so the first trial of a worker (lazy imports, cold caches) does not count."""
    import optuna

    from ablations.storage import open_storage

    storage = open_storage(url)
    (summary,) = storage.get_all_studies()
    trials = sorted(optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(),
                    key=lambda t: t.datetime_start)
    inside = [(t.datetime_complete - t.datetime_start).total_seconds() - busy_s(t) for t in trials]
    by_worker: dict[int, list] = {}
    for t in trials:
        by_worker.setdefault(t.user_attrs["pid"], []).append(t)
    gaps = [(b.datetime_start - a.datetime_complete).total_seconds()
            for ts in by_worker.values() for a, b in zip(ts, ts[1:])]
    first = min(t.datetime_start for t in trials).timestamp()
    last = max(t.datetime_complete for t in trials).timestamp()
    return {"trials": len(trials), "workers_seen": len(by_worker), "first_start": first, "last_complete": last,
            "trial_phase_s": last - first, "inside_trial_s": statistics.median(inside),
            "between_trials_s": statistics.median(gaps) if gaps else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--epoch-s", type=float, default=1.0, help="seconds each epoch sleeps")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    os.environ["FAKE_EPOCH_S"] = str(args.epoch_s)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    os.environ["PYTHONPATH"] = os.pathsep.join(sys.path[:2] + [os.environ.get("PYTHONPATH", "")])

    from helpers import FAKE, make_plans, url_of, write_sweep

    from ablations import atomic, cli, supervisor, worker

    if args.workers > 1:  # as `ablate run` does: the workers' imports overlap the validation
        worker.process_context(FAKE)

    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp) / "results"
        plans = make_plans(write_sweep(Path(tmp), seeds=args.seeds), f"train.epochs={EPOCHS}")
        url = url_of(results)
        status = supervisor.run(plans, url, results, ["cpu"], args.workers, trainer=FAKE, bars=False)
        ended = time.time()
        if status != 0:
            sys.exit(f"sleep sweep failed (exit {status})")
        line = trial_timeline(url, lambda t: EPOCHS * args.epoch_s)
    wall = ended - STARTED
    out = {"workers": args.workers, "epoch_s": args.epoch_s, "trial_s": EPOCHS * args.epoch_s, "wall_s": wall,
           "startup_s": line.pop("first_start") - STARTED, "shutdown_s": ended - line.pop("last_complete"),
           **line}
    out["overhead_per_trial_s"] = out["inside_trial_s"] + out["between_trials_s"]
    out["own_analysis_s"] = time.time() - ended  # this script's, after the run: not part of `ablate run`
    atomic.write_atomic(args.json, json.dumps(out, indent=2))
    cli.exit_fast(0)  # as `ablate run` ends (its wall time includes the exit)


if __name__ == "__main__":
    main()
