"""`ablate table | tables | figures | notebooks | report`: parse nothing (ablations.cli did), call the API.

Each takes the argparse Namespace (profile, results_dir, storage; table also sweep and format; figures
also channels) and
returns an exit status. Bad input (unknown sweep or profile, a results dir that does not exist) raises
SpecError, which `ablate` prints as one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ablations.errors import SpecError


def _agg() -> None:
    """Headless: draw with Agg unless the caller already chose a backend (e.g. inside a notebook)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")


def _profile(args: argparse.Namespace) -> str:
    """The profile's name (results live under it); a YAML path or unknown name is checked like `run`."""
    from ablations.spec import load_profile

    return load_profile(args.profile).name


def _results_dir(args: argparse.Namespace, must_exist: bool = True) -> Path:
    """The results directory to read. Without --storage it must hold the default storage or run
    directories (anything else would read as a sweep that never ran); with one, the run directories
    may live elsewhere."""
    from ablations.options import check_results_dir

    path = Path(args.results_dir)
    if args.storage is None:
        return check_results_dir(path, run_dirs_suffice=True)
    if must_exist and not path.is_dir():
        raise SpecError("no such results directory", source="--results-dir", key=str(path))
    return path


def _require_results(results_dir: Path, storage: str | None, profile: str) -> None:
    from analysis import load

    trials = load.load_trials(results_dir, storage, profile=profile)
    if not (trials["state"] == "COMPLETE").any():
        raise SpecError(f"no completed trials for profile {profile!r} (run a sweep first)",
                        source=str(results_dir))


def cli_table(args: argparse.Namespace) -> int:
    """Print one table; a table without results still prints, listing what is missing."""
    from ablations.spec import load_sweep
    from analysis.render import render
    from analysis.tables import load_table

    sweep = load_sweep(args.sweep)
    table = load_table(_results_dir(args, must_exist=False), args.storage, sweep, _profile(args))
    sys.stdout.write(render(table, args.format))
    return 0


def cli_tables(args: argparse.Namespace) -> int:
    from analysis.table_files import tables_dir, write_all_tables

    results_dir, profile = _results_dir(args), _profile(args)
    _require_results(results_dir, args.storage, profile)
    written = write_all_tables(results_dir, args.storage, profile)
    for t in written:
        k = len(t.missing)
        incomplete = f" ({k} seed{'s' if k > 1 else ''} missing)" if k else ""
        print(f"{t.title}: {tables_dir(results_dir, profile) / t.stem}.{{md,csv,tex,html}}{incomplete}")
    return 0


def _channels(args: argparse.Namespace) -> int | str:
    from analysis.excitations import CHANNELS_EXPECTED, parse_channels

    try:
        count = parse_channels(args.channels)
    except ValueError:
        raise SpecError(CHANNELS_EXPECTED, source="--channels", key=str(args.channels)) from None
    return "all" if count is None else count


def cli_figures(args: argparse.Namespace) -> int:
    _agg()
    from analysis.figures import write_figures

    channels = _channels(args)
    results_dir, profile = _results_dir(args), _profile(args)
    _require_results(results_dir, args.storage, profile)
    for path in write_figures(results_dir, args.storage, profile, channels=channels):
        print(path)
    return 0


def cli_notebooks(args: argparse.Namespace) -> int:
    """Execute every notebook; exit 1 if any cell fails (its executed copy still holds the traceback)."""
    from analysis.execute import execute_all, table_sweep, with_results

    results_dir, profile = _results_dir(args), _profile(args)
    run, skipped = with_results(results_dir, profile, args.storage)
    for path in skipped:
        print(f"{path.name}: skipped (no completed trial of {table_sweep(path)} on profile {profile})")
    failed = 0
    for done in execute_all(results_dir, profile, args.storage, paths=run):
        status = "ok" if done.error is None else f"FAILED: {done.error}"
        failed += done.error is not None
        print(f"{done.source.name}: {status} -> {done.output}")
    return 1 if failed else 0


def cli_report(args: argparse.Namespace) -> int:
    _agg()
    from analysis.report import write_report

    results_dir, profile = _results_dir(args), _profile(args)
    _require_results(results_dir, args.storage, profile)
    print(write_report(results_dir, args.storage, profile))
    return 0
