"""What a sweep's run shows: a start summary, one persistent line per finished trial, a progress bar over
its grid points and one per busy worker (on a real terminal only), each sweep's table after its last
trial's line, what did not complete, and `ablate status`'s counts and ETA.

Bars are drawn only on a terminal with a size: a log file, `make ... > log 2>&1` and a pseudo-terminal
without a size (some job runners) get the same lines and no carriage returns.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from ablations.grid import Plan, point_counts, point_states
from ablations.terminal import real_terminal
from ablations.trials import grid_point

DASHBOARD_EVERY_S = 30.0  # a study's note and figure are rebuilt at most this often while trials end


def _short(metrics: dict[str, Any]) -> dict[str, str]:
    keys = ("lr", "train_loss", "val_loss", "top1_err")
    return {k: f"{metrics[k]:.3g}" for k in keys if isinstance(metrics.get(k), (int, float))}


def start_summary(loaded: list[tuple[optuna.Study, Plan]], queued: int, workers: int, devices: list[str],
                  shown_url: str, results_dir: Path) -> str:
    """What the run is about to do, before the first trial: so a log says which study, how much work and
    on what, even when the first line of progress is minutes away."""
    lines = []
    for study, plan in loaded:
        points = len(plan.grid())
        lines.append(f"{study.study_name}: {len(plan.labels)} settings x {plan.seeds} seeds = {points} points "
                     f"({plan.profile.name} profile, {plan.config(plan.labels[0], 0).train.epochs} epochs max)")
    lines.append(f"{queued} queued; {workers} worker(s) on {', '.join(devices)}; storage {shown_url}; "
                 f"results in {results_dir}")
    return "\n".join(lines)


def summary(results_dir: Path, url: str, plan: Plan, table: Any = None) -> str:
    """The sweep's table, as the analysis renders it (also written under <results>/<profile>/<sweep>/)."""
    from analysis.table_files import sweep_summary

    return sweep_summary(Path(results_dir), url, plan.sweep, plan.profile.name, table)


def print_table(results_dir: Path, url: str, plan: Plan, table: Any = None) -> None:
    """The sweep's table on stdout (and written beside its results), or a warning if it cannot be built."""
    try:
        text = summary(results_dir, url, plan, table)
    except Exception as e:  # noqa: BLE001 -- a table bug must not hide the sweep's outcome
        tqdm.write(f"warning: could not build the table of {plan.study_name}: {type(e).__name__}: {e}",
                   file=sys.stderr)
        return
    tqdm.write(text, file=sys.stdout)
    sys.stdout.flush()


class Progress:
    """Consumes worker events: a bar over every grid point of the run (done / running / failed), one
    epoch bar per busy worker, and each sweep's table the moment its last point finishes. Without a
    terminal (make in CI, a log file) bars are off and each finished trial is one line instead."""

    def __init__(self, storage: optuna.storages.RDBStorage, loaded: list[tuple[optuna.Study, Plan]],
                 results_dir: Path, url: str, bars: bool | None = None, tables: bool = True):
        self.storage, self.loaded, self.results_dir, self.url = storage, loaded, results_dir, url
        self.tables = tables  # off for a round of `--precision`: only the last round's table is shown
        self.bars = real_terminal() if bars is None else bars
        self.total = sum(len(p.grid()) for _, p in loaded)
        desc = loaded[0][0].study_name if len(loaded) == 1 else f"{len(loaded)} sweeps"
        self.bar = tqdm(total=self.total, desc=desc, unit="trial", position=0, disable=not self.bars,
                        dynamic_ncols=True, file=sys.stderr)
        self.trial_bars: dict[int, tqdm] = {}
        self.printed: set[str] = set()
        self.finished: list[Plan] = []  # sweeps whose last point just finished, their tables not yet out
        self.noted: dict[str, float] = {}  # study -> when its dashboard note was last refreshed
        self.started = time.monotonic()
        self.run_dirs: dict[tuple[str, int], str] = {}  # (study, trial number) -> run dir, from "start"
        self.dashboard_ok = True  # off after the first failure (warned once): the sweep goes on
        self.counts: Counter[str] = Counter()
        self.refresh()
        self.shown = self.bar.n  # finished points when the run started: the next line says one more

    def log(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr)

    def refresh(self, tables: bool = True) -> None:
        """Recount from the storage (other processes finish points too); print the finished sweeps' tables
        unless `tables` is off (the caller prints its trial line first, then calls print_finished)."""
        counts: Counter[str] = Counter()
        self.finished = []
        for study, plan in self.loaded:
            states = point_states(study.get_trials(deepcopy=False), plan.grid())
            counts.update(states.values())
            if (study.study_name not in self.printed
                    and all(s in ("COMPLETE", "FAIL") for s in states.values())):
                self.finished.append(plan)
        self.counts = counts
        self.bar.n = counts["COMPLETE"] + counts["FAIL"]
        self.bar.set_postfix_str(f"done={counts['COMPLETE']} running={counts['RUNNING']} failed={counts['FAIL']}")
        if tables:
            self.print_finished()

    def print_finished(self) -> None:
        """Each sweep that just ended: its table (unless `tables` is off) and the dashboard's views of
        it, from one build of the table."""
        for plan in self.finished:
            if plan.study_name in self.printed:
                continue
            self.printed.add(plan.study_name)
            table = self.dashboard_table(plan)
            if self.tables:
                print_table(self.results_dir, self.url, plan, table)
        self.finished = []

    def dashboard_table(self, plan: Plan) -> Any:
        """Refresh the study's note and figure (analysis/dashboard.py); the table built for them."""
        if not self.dashboard_ok:
            return None
        study = next(s for s, p in self.loaded if p.study_name == plan.study_name)
        try:
            from analysis import dashboard

            self.noted[study.study_name] = time.monotonic()
            return dashboard.refresh(self.storage, study, plan, self.results_dir, self.url)
        except Exception as e:  # noqa: BLE001 -- the dashboard is a view: never worth a sweep
            self.dashboard_ok = False
            self.log(f"warning: dashboard notes are off for this run: {type(e).__name__}: {e}")
            return None

    def dashboard(self, ev: dict[str, Any]) -> None:
        """The trial's note (setting, seed, state) and, as trials end, the study's note and figure with
        our table: at most every DASHBOARD_EVERY_S per study (print_finished refreshes them when the
        sweep ends)."""
        found = [(s, p) for s, p in self.loaded if s.study_name == ev.get("study")]
        if not self.dashboard_ok or not found or "number" not in ev:
            return
        study, plan = found[0]
        try:
            from analysis import dashboard

            run_dir = self.run_dirs.get((ev["study"], ev["number"]))
            dashboard.save_trial_note(study, ev["number"], ev["setting"], ev["seed"], run_dir=run_dir,
                                      value=ev.get("value"), state=ev.get("state", "RUNNING"))
            due = time.monotonic() - self.noted.get(study.study_name, self.started) > DASHBOARD_EVERY_S
            if ev["kind"] == "end" and due and plan not in self.finished:  # a finished one: print_finished
                self.noted[study.study_name] = time.monotonic()
                dashboard.refresh(self.storage, study, plan, self.results_dir, self.url)
        except Exception as e:  # noqa: BLE001 -- the dashboard is a view: never worth a sweep
            self.dashboard_ok = False
            self.log(f"warning: dashboard notes are off for this run: {type(e).__name__}: {e}")

    def start_bar(self, w: int, epochs: int, label: str) -> None:
        bar = self.trial_bars.get(w)
        if bar is None:
            bar = self.trial_bars[w] = tqdm(total=epochs, position=w + 1, unit="ep", leave=False,
                                            dynamic_ncols=True, file=sys.stderr)
        bar.reset(total=epochs)
        bar.set_postfix_str("", refresh=False)  # the previous trial's metrics are not this one's
        bar.set_description(f"  {label}")

    def handle(self, ev: dict[str, Any]) -> None:
        kind, w = ev["kind"], ev.get("worker", 0)
        label = f"{ev.get('setting')} seed{ev.get('seed')}"
        if kind == "start":
            if self.bars:
                self.start_bar(w, ev["epochs"], label)
            self.run_dirs[(ev.get("study"), ev.get("number"))] = ev.get("run_dir")
            self.dashboard(ev)
        elif kind == "epoch" and w in self.trial_bars:
            bar = self.trial_bars[w]
            bar.n = min(ev["epoch"], bar.total or ev["epoch"])
            bar.set_postfix(_short(ev["metrics"]))
        elif kind == "end":
            self.refresh(tables=False)
            # Two workers that finish together both find 2 more points done: one number each.
            done = self.shown = min(self.counts["COMPLETE"] + self.counts["FAIL"], self.shown + 1)
            if ev["state"] == "COMPLETE":  # a line in every mode: bars vanish, the results must not
                self.log(f"[{done}/{self.total}] {ev['study']} {label}: top1_err {ev['value']:.2f}% "
                         f"({ev['seconds']:.0f} s)")
            elif ev["state"] == "FAIL":
                self.log(f"[{done}/{self.total}] {ev['study']} {label}: FAILED: {ev['reason']}")
            self.dashboard(ev)
            self.print_finished()  # a sweep's table comes after its last trial's line
        elif kind == "log":
            self.log(ev["text"].rstrip())
        elif kind == "exit" and w in self.trial_bars:
            self.trial_bars.pop(w).close()

    def close(self) -> None:
        for bar in self.trial_bars.values():
            bar.close()
        self.bar.close()


def outcome(progress: Progress) -> int:
    """Print what did not complete and return the exit status (0 all COMPLETE, 1 otherwise)."""
    progress.refresh()
    problems = []
    for study, plan in progress.loaded:
        trials = study.get_trials(deepcopy=False)
        for (label, seed), state in point_states(trials, plan.grid()).items():
            if state == "COMPLETE":
                continue
            reasons = [t.user_attrs.get("fail_reason") for t in trials
                       if grid_point(t) == (label, seed) and t.state == TrialState.FAIL]
            why = f": {reasons[-1]}" if state == "FAIL" and reasons and reasons[-1] else ""
            problems.append(f"  {study.study_name} {label} seed{seed}: {state}{why}")
    progress.close()
    if problems:
        print(f"{len(problems)} grid point(s) did not complete:", file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------
# ablate status


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def study_status(study: optuna.Study, now: datetime | None = None) -> dict[str, Any]:
    """Counts per grid point (or per trial for a study `ablate run` did not create) and an ETA.

    ETA: the median wall time of a completed trial, times the queued points, plus what the running ones
    still need, spread over as many workers as are running now.
    """
    now = now or datetime.now()
    trials = study.get_trials(deepcopy=False)
    attrs = study.user_attrs
    try:
        counts = Counter(point_counts(trials, [str(x) for x in attrs["settings"]], int(attrs["seeds"])))
    except (KeyError, TypeError, ValueError):  # not a grid study (or not a whole one): count its trials
        counts = Counter(t.state.name for t in trials)
    durations = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                 if t.state == TrialState.COMPLETE and t.datetime_start and t.datetime_complete]
    typical = statistics.median(durations) if durations else None
    running = [t for t in trials if t.state == TrialState.RUNNING]
    eta: float | None = 0.0
    if counts["WAITING"] or counts["RUNNING"]:
        if typical is None:
            eta = None
        else:
            left = sum(max(0.0, typical - (now - t.datetime_start).total_seconds()) for t in running
                       if t.datetime_start)
            eta = (counts["WAITING"] * typical + left) / max(1, len(running))
    return {
        "study": study.study_name,
        "points": sum(counts.values()),
        "done": counts["COMPLETE"],
        "running": counts["RUNNING"],
        "queued": counts["WAITING"],
        "failed": counts["FAIL"],
        "missing": counts["MISSING"],
        "eta": "-" if eta == 0.0 else _fmt_duration(eta),
    }
