"""`ablate run --precision X [--max-seeds N]`: seeds added in rounds until every comparison resolves X.

A round is an ordinary `supervisor.run` at a larger seed count for every setting of a sweep (so pairs
stay complete): the plan's `seeds` grows, the study's `seeds` attr follows it (`open_study` keeps the
larger count), `enqueue_missing` queues the new points and the workers train them, exactly once, as
for fixed seeds. After each round the rule (`analysis.precision.decide`) reads the stored results and
either stops or names the next seed count. It reads only the spread of the results, never the observed
differences or p-values, so stopping cannot chase significance; the intermediate rounds' tables are not
printed either, only the last one.

Resuming: the grown seed count is in the study, and the rule is re-evaluated from stored results, so
running the same command again after a kill finishes the interrupted round and goes on from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import optuna

from ablations import resilience, supervisor, worker
from ablations.errors import SpecError
from ablations.grid import Plan
from ablations.progress import print_table
from ablations.schema import MAX_SEEDS
from ablations.storage import open_storage
from analysis.precision import DEFAULT_MAX_SEEDS, Decision, decide


def options(args: argparse.Namespace, plans: list[Plan]) -> tuple[float, int] | None:
    """(precision, max seeds) from `--precision` / `--max-seeds`, validated; None without --precision."""
    raw, max_seeds = getattr(args, "precision", None), getattr(args, "max_seeds", None)
    if raw is None:
        if max_seeds is not None:
            raise SpecError("needs --precision (the seeds are fixed without it)", source="--max-seeds")
        return None
    try:
        precision = float(raw)
    except ValueError:
        precision = math.nan
    if not (math.isfinite(precision) and precision > 0):
        raise SpecError(f"must be a positive number of top-1 points (got {raw!r})", source="--precision")
    if max_seeds is None:
        max_seeds = DEFAULT_MAX_SEEDS
    elif not (isinstance(max_seeds, int) or str(max_seeds).isdigit()):
        raise SpecError(f"must be a positive integer (got {max_seeds!r})", source="--max-seeds")
    max_seeds = int(max_seeds)
    if max_seeds > MAX_SEEDS:
        raise SpecError(f"must be at most {MAX_SEEDS}, the seeds any setting can run (got {max_seeds})",
                        source="--max-seeds")
    for plan in plans:
        if max_seeds < plan.seeds:
            where = "--seeds" if getattr(args, "seeds", None) is not None else f"{plan.sweep.name}'s seeds"
            raise SpecError(f"{max_seeds} is below the {plan.seeds} seeds the run starts with ({where})",
                            source="--max-seeds")
    return precision, max_seeds


def run(plans: list[Plan], url: str, results_dir: Path, devices: list[str], workers: int, precision: float,
        max_seeds: int, *, trainer: str | None = None, bars: bool | None = None) -> int:
    """Rounds of `supervisor.run` until every sweep's rule stops; print each sweep's table and outcome.
    Exit status as `supervisor.run` (a round with a failed point ends the loop: rerun to continue)."""
    started = time.monotonic()
    resilience.check_writable(Path(results_dir))
    storage = open_storage(url)
    stored = {p.study_name: resilience.storage_call(lambda p=p: _attrs(storage, p), url) for p in plans}
    seeds = {p.study_name: max(p.seeds, int(stored[p.study_name].get("seeds", 0))) for p in plans}
    pending = list(plans)
    outcomes: dict[str, tuple[Plan, Decision, float]] = {}
    while pending:
        batch = [dataclasses.replace(p, seeds=seeds[p.study_name]) for p in pending]
        status = supervisor.run(batch, url, results_dir, devices, workers, trainer=trainer or worker.TRAINER,
                                bars=bars, tables=False)
        if status != 0:
            print("stopped adding seeds: a grid point did not complete (see above); the same command "
                  "continues from here", file=sys.stderr)
            return status
        pending = []
        for plan in batch:
            decision = decide(_trials(results_dir, url, plan), plan.sweep, precision, max_seeds, plan.seeds)
            record = functools.partial(_record, storage, plan, precision, max_seeds, decision)
            resilience.storage_call(record, url)
            if decision.done:
                outcomes[plan.study_name] = (plan, decision, time.monotonic() - started)
                continue
            worst = decision.worst
            print(f"{plan.study_name}: {plan.seeds} seeds: worst MDE {_points(worst.mde)} ({worst.setting}, "
                  f"{worst.n} pairs) > {precision:g}: next round {decision.next_seeds} seeds",
                  file=sys.stderr)
            seeds[plan.study_name] = decision.next_seeds
            pending.append(plan)
    for plan in plans:
        final, decision, seconds = outcomes[plan.study_name]
        print_table(results_dir, url, final)
        print(outcome_line(final, decision, precision, max_seeds, seconds))
    return 0


def outcome_line(plan: Plan, decision: Decision, precision: float, max_seeds: int, seconds: float) -> str:
    worst = decision.worst
    cap = " (the cap)" if decision.seeds >= max_seeds and not decision.reached else ""
    verdict = "reached" if decision.reached else "not reached"
    where = f"worst MDE {_points(worst.mde)} points, {worst.setting}" if worst else "no comparisons"
    return (f"{plan.study_name}: {decision.seeds} seeds{cap}; precision {precision:g} {verdict} ({where}); "
            f"{seconds:.0f} s")


def _points(x: float) -> str:
    return "undefined" if math.isnan(x) else f"{x:.2f}"


def _attrs(storage: optuna.storages.RDBStorage, plan: Plan) -> dict[str, Any]:
    try:
        return optuna.load_study(study_name=plan.study_name, storage=storage).user_attrs
    except KeyError:
        return {}


def _trials(results_dir: Path, url: str, plan: Plan):
    from analysis.load import load_trials

    return load_trials(results_dir, url, sweep=plan.sweep.name, profile=plan.profile.name)


def _record(storage: optuna.storages.RDBStorage, plan: Plan, precision: float, max_seeds: int,
            decision: Decision) -> None:
    """The study's `precision` attr: the target, and every seed count the rule was evaluated at (the
    audit trail that the seeds were chosen by spread alone), with the latest verdict."""
    study = optuna.load_study(study_name=plan.study_name, storage=storage)
    old = study.user_attrs.get("precision") or {}
    same = old.get("target") == precision and old.get("max_seeds") == max_seeds
    rounds = [s for s in (old.get("rounds") or []) if same and s < decision.seeds] + [decision.seeds]
    worst = decision.worst
    study.set_user_attr("precision", {
        "target": precision, "max_seeds": max_seeds, "rounds": rounds, "reached": decision.reached,
        "worst_setting": worst.setting if worst else None,
        "worst_mde": None if worst is None or math.isnan(worst.mde) else worst.mde,
    })
