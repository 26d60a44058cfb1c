"""Directory options checked before anything runs: a path that cannot be a directory, or a results
directory that holds no results, is one line now instead of a traceback at the first write (or a
table that reports nothing, as if the sweeps had not run)."""

from __future__ import annotations

from pathlib import Path

from ablations import rundir
from ablations.errors import SpecError


def check_dir_option(path: str | Path, option: str) -> None:
    """A directory option (--results-dir, --out, --logs) must name a directory or nothing yet, with no
    file on the way to it."""
    p = Path(path)
    try:
        if p.exists() and not p.is_dir():
            raise SpecError("not a directory", source=option, key=str(p))
        for parent in p.absolute().parents:
            if parent.exists():
                if not parent.is_dir():
                    raise SpecError(f"lies under {parent}, which is a file", source=option, key=str(p))
                break
    except OSError as e:  # a name too long for the file system, a loop of links
        raise SpecError(f"unusable path: {e.strerror or e}", source=option, key=str(p)) from None


def check_results_dir(results_dir: str | Path, *, run_dirs_suffice: bool = False) -> Path:
    """A results directory to read: it exists, is a directory, and holds the default storage (or, where
    `run_dirs_suffice`, at least one run directory)."""
    p = Path(results_dir)
    check_dir_option(p, "--results-dir")
    if not p.is_dir():
        raise SpecError("no such results directory (start a sweep with `ablate run`, or name another "
                        "with --results-dir)", source="--results-dir", key=str(p))
    if (p / rundir.STORAGE_FILE).is_file():
        return p
    if run_dirs_suffice and any(d.is_dir() for d in p.glob(rundir.RUN_DIRS)):
        return p
    what = f"no {rundir.STORAGE_FILE}" + ("" if not run_dirs_suffice else " and no run directories")
    raise SpecError(f"not a results directory ({what}; give --storage for a database elsewhere)",
                    source="--results-dir", key=str(p))


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise SpecError(f"must be a port number in 1..65535 (got {port})", source="--port")
