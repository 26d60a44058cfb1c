"""Tables on disk: every form of a table under <results>/<profile>/tables/, and the sweep's own table
beside its run directories when a sweep ends (what `ablate run` prints)."""

from __future__ import annotations

from pathlib import Path

from ablations import rundir
from ablations.atomic import write_atomic
from ablations.schema import Sweep
from analysis.render import render
from analysis.tables import Table, all_sweeps, load_table

FORMATS = {"md": "md", "csv": "csv", "latex": "tex", "html": "html"}  # format -> file extension


def tables_dir(results_dir: str | Path, profile: str) -> Path:
    return rundir.analysis_dir(results_dir, profile, "tables")


def write_table(table: Table, results_dir: str | Path) -> list[Path]:
    """<results>/<profile>/tables/table<N>.{md,csv,tex,html}."""
    out = tables_dir(results_dir, table.profile)
    return [write_atomic(out / f"{table.stem}.{ext}", render(table, fmt)) for fmt, ext in FORMATS.items()]


def write_all_tables(results_dir: str | Path, storage: str | None, profile: str) -> list[Table]:
    """Write every table that has at least one completed trial; return those tables."""
    written = []
    for sweep in all_sweeps():
        table = load_table(results_dir, storage, sweep, profile)
        if table.has_results:
            write_table(table, results_dir)
            written.append(table)
    return written


def sweep_summary(results_dir: Path, storage: str | None, sweep: Sweep, profile: str,
                  table: Table | None = None) -> str:
    """What the scheduler prints when a sweep ends; also writes <results>/<profile>/<sweep>/table.{md,csv}.
    `table`: the sweep's table when the caller has built it already (the dashboard's note shows it too)."""
    table = table if table is not None else load_table(results_dir, storage, sweep, profile)
    out = rundir.sweep_dir(results_dir, profile, sweep.name)
    for name in rundir.SWEEP_FILES:  # table.md, table.csv
        write_atomic(out / name, render(table, Path(name).suffix.removeprefix(".")))
    return render(table, "text")
