"""Shared-storage workers on a real PostgreSQL server: the grid lock across processes, several `ablate run`s
and `ablate worker`s joining one study, each grid point COMPLETE exactly once."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
from helpers import (
    SMALL_QUICK,
    ablate,
    completes_per_point,
    create_study,
    hold_grid_lock,
    load_study,
    make_plans,
    run_sweep_in_process,
    write_sweep,
)
from optuna.trial import TrialState

from ablations.storage import grid_lock, open_storage
from ablations.storage_url import resolve

pytestmark = pytest.mark.slow  # a PostgreSQL server and several processes per test


def test_grid_lock_excludes_other_processes(pg_url):
    url = resolve(".", pg_url)
    storage = open_storage(url)
    ctx = mp.get_context("spawn")
    stamps = ctx.Queue()
    holder = ctx.Process(target=hold_grid_lock, args=(url, 1.5, stamps))
    holder.start()
    kind, held_at = stamps.get(timeout=60)
    assert kind == "held"
    with grid_lock(storage):
        got_it = time.time()
    kind, released_at = stamps.get(timeout=60)
    holder.join(30)
    assert kind == "released" and holder.exitcode == 0
    assert got_it >= released_at - 0.05, "two processes held the grid lock at once"
    assert got_it - held_at >= 1.4


def test_three_runs_at_once_complete_every_point_exactly_once(tmp_path, pg_url):
    url = resolve(".", pg_url)
    plans = make_plans(write_sweep(tmp_path, seeds=3))
    ctx = mp.get_context("spawn")
    results = tmp_path / "results"
    # Started together: each creates-or-loads the study and queues the grid under the advisory lock.
    procs = [ctx.Process(target=run_sweep_in_process, args=(plans, url, str(results), "0.3")) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    study = load_study(url)
    grid = plans[0].grid()
    assert completes_per_point(study) == {p: 1 for p in grid}
    assert len(study.trials) == len(grid) == 9  # nothing queued twice, nothing failed or retried
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2  # the work was actually shared


@pytest.mark.slow
def test_three_ablate_workers_join_one_study(tmp_path, pg_url):
    """`ablate worker --study NAME --storage postgresql://...`, three times, real trainer: each grid point
    trained once, by whichever worker claimed it."""
    plans = make_plans(write_sweep(tmp_path, settings=[{"label": "r=16", "reduction": 16},
                                                       {"label": "original", "se": False}], seeds=2),
                       *SMALL_QUICK, "train.epochs=1")
    create_study(resolve(".", pg_url), plans)
    results = tmp_path / "results"
    procs = [ablate("worker", "--study", "mini-quick", "--storage", pg_url, "--results-dir", str(results),
                    "--device", "cpu") for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    study = load_study(resolve(".", pg_url))
    assert completes_per_point(study) == {p: 1 for p in plans[0].grid()}
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    for t in study.trials:
        assert (results / "quick" / "mini" / t.params["setting"] / f"seed{t.params['seed']}" / "final.json").is_file()
        assert t.value == t.user_attrs["top1_err"] and list(t.intermediate_values) == [1]
    status = ablate("status", "--storage", pg_url)
    out, err = status.communicate(timeout=120)
    assert status.returncode == 0, err
    row = next(line.split() for line in out.splitlines() if line.startswith("mini-quick"))
    assert row[1:7] == ["4", "4", "0", "0", "0", "0"]  # points, done, running, queued, failed, missing
