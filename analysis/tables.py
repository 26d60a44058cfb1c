"""Paper Tables 10-16 from trials: one row per setting, in the sweep file's (= the paper's) order.

`build_table` is pure (trials DataFrame -> `Table`); `load_table` reads results first; `write_table`
and `sweep_summary` put the rendered forms on disk. Missing seeds never raise: the row shows the seeds
it has and `Table.missing` says which are absent and why (failed, running, waiting, never started).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ablations import paths
from ablations.paper import published_row
from ablations.runio import write_atomic
from ablations.spec import SWEEPS_DIR, Sweep, load_sweep
from analysis import load, stats

# CSV column order: what a row says about one setting.
COLUMNS = (
    "setting", "reference", "n", "seeds",
    "top1_mean", "top1_std", "top1_ci_low", "top1_ci_high",
    "top5_mean", "top5_std", "top5_ci_low", "top5_ci_high",
    "d_top1", "p_top1", "d_top5", "p_top5",
    "params_m", "gflops", "images_per_s",
    "paper_top1", "paper_top5", "paper_params_m", "paper_gflops",
    "missing_seeds",
)
FORMATS = {"md": "md", "csv": "csv", "latex": "tex", "html": "html"}  # format -> file extension


@dataclass(frozen=True)
class Missing:
    setting: str
    seed: int
    why: str  # "not started", "FAIL: <reason>", "RUNNING", "WAITING", "INCOMPLETE"


@dataclass
class Table:
    sweep: Sweep
    profile: str
    rows: pd.DataFrame  # columns COLUMNS, one row per setting in sweep order
    runs: pd.DataFrame  # the completed trials behind the rows (load.completed), for per-seed plots
    expected_seeds: list[int]
    missing: list[Missing] = field(default_factory=list)
    unknown_settings: list[str] = field(default_factory=list)  # results whose label the sweep lacks

    @property
    def stem(self) -> str:
        return f"table{self.sweep.table}" if self.sweep.table is not None else f"table_{self.sweep.name}"

    @property
    def title(self) -> str:
        head = f"Table {self.sweep.table}" if self.sweep.table is not None else f"Sweep {self.sweep.name}"
        return f"{head} ({self.sweep.name}, profile {self.profile})"

    @property
    def has_results(self) -> bool:
        return bool((self.rows["n"] > 0).any())


def expected_seeds(sweep: Sweep, study_attrs: dict | None, observed: list[int]) -> list[int]:
    """Seeds every setting should have: the study's `seeds` attr (a count or a list), else the sweep's
    count, as 0..k-1; plus any seed some trial of the sweep actually used, so a run with `--seeds 5`
    and no study still reports seeds 3 and 4 as missing where a setting lacks them."""
    declared = (study_attrs or {}).get("seeds", sweep.seeds)
    base = list(declared) if isinstance(declared, (list, tuple)) else list(range(int(declared)))
    return sorted({int(s) for s in base} | {int(s) for s in observed})


def _why(trials: pd.DataFrame) -> str:
    """The latest non-complete attempt at one grid point, in words."""
    if trials.empty:
        return "not started"
    last = trials.sort_values("trial_number", na_position="first", kind="stable").iloc[-1]
    if last["state"] == "FAIL" and isinstance(last["fail_reason"], str) and last["fail_reason"]:
        return f"FAIL: {last['fail_reason']}"
    return str(last["state"])


def _first(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.iloc[0]) if len(values) else math.nan


def build_table(trials: pd.DataFrame, sweep: Sweep, profile: str, study_attrs: dict | None = None) -> Table:
    """The table for `sweep` on `profile` from a trials frame (`load.load_trials` columns)."""
    mine = trials[(trials["sweep"] == sweep.name) & (trials["profile"] == profile)]
    done = load.completed(mine)
    seeds = expected_seeds(sweep, study_attrs, mine["seed"].dropna().astype(int).tolist())
    labels = [s.label for s in sweep.settings]
    ref = done[done["setting"] == sweep.reference] if sweep.reference else done.iloc[0:0]

    rows, missing = [], []
    for label in labels:
        runs = done[done["setting"] == label].sort_values("seed")
        have = set(runs["seed"].astype(int))
        absent = [s for s in seeds if s not in have]
        for s in absent:
            attempts = mine[(mine["setting"] == label) & (mine["seed"] == s)]
            missing.append(Missing(label, s, _why(attempts)))
        top1, top5 = stats.summarize(runs["top1_err"]), stats.summarize(runs["top5_err"])
        is_ref = label == sweep.reference
        d1, p1 = (math.nan, math.nan) if is_ref else stats.welch(runs["top1_err"], ref["top1_err"])
        d5, p5 = (math.nan, math.nan) if is_ref else stats.welch(runs["top5_err"], ref["top5_err"])
        paper = published_row(sweep.table, label)
        rows.append({
            "setting": label, "reference": is_ref, "n": len(runs),
            "seeds": " ".join(str(s) for s in sorted(have)),
            "top1_mean": top1.mean, "top1_std": top1.std, "top1_ci_low": top1.ci_low,
            "top1_ci_high": top1.ci_high,
            "top5_mean": top5.mean, "top5_std": top5.std, "top5_ci_low": top5.ci_low,
            "top5_ci_high": top5.ci_high,
            "d_top1": d1, "p_top1": p1, "d_top5": d5, "p_top5": p5,
            # Architecture numbers are identical across seeds; the first recorded one stands for all.
            "params_m": _first(runs["params_m"]), "gflops": _first(runs["gflops"]),
            "images_per_s": float(runs["images_per_s"].mean()) if len(runs) else math.nan,
            "paper_top1": paper["top1_err"], "paper_top5": paper["top5_err"],
            "paper_params_m": paper["params_m"], "paper_gflops": paper["gflops"],
            "missing_seeds": " ".join(str(s) for s in absent),
        })
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in COLUMNS[4:-1]:
        frame[col] = frame[col].astype(float)
    unknown = sorted(set(done["setting"].dropna()) - set(labels))
    runs = done[done["setting"].isin(labels)].reset_index(drop=True)
    return Table(sweep, profile, frame, runs, seeds, missing, unknown)


def load_table(results_dir: str | Path, storage: str | None, sweep: Sweep, profile: str) -> Table:
    """Read the sweep's trials (storage and/or run dirs) and build its table."""
    trials = load.load_trials(results_dir, storage, sweep=sweep.name, profile=profile)
    studies = load.load_studies(results_dir, storage, sweep=sweep.name, profile=profile)
    return build_table(trials, sweep, profile, studies.get((sweep.name, profile)))


def tables_dir(results_dir: str | Path, profile: str) -> Path:
    return paths.analysis_dir(results_dir, profile, "tables")


def write_table(table: Table, results_dir: str | Path) -> list[Path]:
    """<results>/<profile>/tables/table<N>.{md,csv,tex,html}."""
    from analysis.render import render

    out = tables_dir(results_dir, table.profile)
    return [write_atomic(out / f"{table.stem}.{ext}", render(table, fmt)) for fmt, ext in FORMATS.items()]


def all_sweeps() -> list[Sweep]:
    """The sweep files in sweeps/, paper tables first in table order."""
    sweeps = [load_sweep(p) for p in sorted(SWEEPS_DIR.glob("*.yaml"))]
    return sorted(sweeps, key=lambda s: (s.table is None, s.table or 0, s.name))


def write_all_tables(results_dir: str | Path, storage: str | None, profile: str) -> list[Table]:
    """Write every table that has at least one completed trial; return those tables."""
    written = []
    for sweep in all_sweeps():
        table = load_table(results_dir, storage, sweep, profile)
        if table.has_results:
            write_table(table, results_dir)
            written.append(table)
    return written


def sweep_summary(results_dir: Path, storage: str | None, sweep: Sweep, profile: str) -> str:
    """What the scheduler prints when a sweep ends; also writes <results>/<profile>/<sweep>/table.{md,csv}."""
    from analysis.render import render

    table = load_table(results_dir, storage, sweep, profile)
    out = paths.sweep_dir(results_dir, profile, sweep.name)
    write_atomic(out / "table.md", render(table, "md"))
    write_atomic(out / "table.csv", render(table, "csv"))
    return render(table, "text")
