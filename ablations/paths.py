"""Every path a run writes, resolved in one place, and never outside `--results-dir`.

Layout:

    <results>/optuna.db                              the default storage
    <results>/launch/<job id>/                       submitit's job files (`ablate launch`)
    <results>/<profile>/<sweep>/<label dir>/seed<k>/ one trial's run directory
    <results>/<profile>/<sweep>/table.{md,csv}       the sweep's table when it ends
    <results>/<profile>/{tables,figures,notebooks}/  the analysis; <results>/<profile>/report.html

Sweep and profile names are identifiers, and not one of the names the layout itself uses beside them;
labels are free text, mapped to directory names that stay inside their sweep's directory (`label_dir`).
A name that would leave its parent is refused before anything is created.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ablations.errors import SpecError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME = 64  # characters in a sweep or profile name
MAX_LABEL = 100  # characters in a setting label (its directory name is at most as long, in ASCII)
STORAGE_FILE = "optuna.db"
LAUNCH_DIR = "launch"
ANALYSIS_DIRS = ("tables", "figures", "notebooks")  # beside the sweep directories of a profile
SWEEP_FILES = ("table.md", "table.csv")  # beside the label directories of a sweep
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


def name_problem(name: object, kind: str) -> str | None:
    """Why `name` cannot name a sweep or profile (`kind`), or None when it can."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return (f"{kind} name {name!r} must be an identifier (letters, digits and _, not starting with a "
                "digit)")
    if len(name) > MAX_NAME:
        return f"{kind} name is {len(name)} characters long; at most {MAX_NAME}"
    reserved = ANALYSIS_DIRS if kind == "sweep" else (LAUNCH_DIR,)
    if name.lower() in reserved:
        return f"{kind} name {name!r} is taken by the results layout (not one of {', '.join(reserved)})"
    return None


def check_name(name: object, kind: str, source: str | None = None) -> str:
    problem = name_problem(name, kind)
    if problem is not None:
        raise SpecError(problem, source=source, key="name")
    return str(name)


def label_problem(label: str) -> str | None:
    if len(label) > MAX_LABEL:
        return f"label is {len(label)} characters long; at most {MAX_LABEL}"
    return None


def label_dir(label: str) -> str:
    """A label's directory name: letters, digits and `_ . = + -` are kept, every other run of characters
    becomes `_`; leading `.`s and `-`s become `_`s (so `..` is `__`, never the parent); a name the sweep's
    own files use gets a trailing `_`. Two labels of a sweep with the same directory name (ignoring
    case) are refused by the sweep's validation."""
    name = _UNSAFE.sub("_", label)
    name = re.sub(r"^[.-]+", lambda m: "_" * len(m.group()), name) or "_"
    return f"{name}_" if name.lower() in SWEEP_FILES else name


def _inside(results_dir: str | Path, *parts: str) -> Path:
    """`results_dir / parts`, refusing (lexically, so a symlinked results tree still works) any path
    that would leave `results_dir`."""
    base = Path(results_dir)
    path = base.joinpath(*parts)
    root = os.path.normpath(os.path.abspath(base))
    if os.path.commonpath([root, os.path.normpath(os.path.abspath(path))]) != root:
        raise SpecError(f"{'/'.join(parts)} would leave the results directory", source="--results-dir",
                        key=str(base))
    return path


def storage_file(results_dir: str | Path) -> Path:
    return _inside(results_dir, STORAGE_FILE)


def launch_dir(results_dir: str | Path) -> Path:
    return _inside(results_dir, LAUNCH_DIR)


def profile_dir(results_dir: str | Path, profile: str) -> Path:
    return _inside(results_dir, check_name(profile, "profile"))


def sweep_dir(results_dir: str | Path, profile: str, sweep: str) -> Path:
    return _inside(results_dir, check_name(profile, "profile"), check_name(sweep, "sweep"))


def run_dir(results_dir: str | Path, profile: str, sweep: str, label: str, seed: int) -> Path:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SpecError(f"a seed is an integer >= 0 (got {seed!r})", source="--seeds")
    return _inside(sweep_dir(results_dir, profile, sweep), label_dir(label), f"seed{seed}")


def analysis_dir(results_dir: str | Path, profile: str, kind: str) -> Path:
    """<results>/<profile>/<kind> for kind in tables, figures, notebooks."""
    if kind not in ANALYSIS_DIRS:
        raise ValueError(f"not an analysis directory: {kind!r}")
    return _inside(profile_dir(results_dir, profile), kind)


def report_file(results_dir: str | Path, profile: str) -> Path:
    return _inside(profile_dir(results_dir, profile), "report.html")


# ---------------------------------------------------------------------------------------------------
# Directory options


def check_dir_option(path: str | Path, option: str) -> None:
    """A directory option (--results-dir, --out, --logs) must name a directory or nothing yet, with no
    file on the way to it: otherwise the first write would end in a traceback."""
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
    `run_dirs_suffice`, at least one run directory): reading anything else would report nothing, as if
    the sweeps had not run."""
    p = Path(results_dir)
    check_dir_option(p, "--results-dir")
    if not p.is_dir():
        raise SpecError("no such results directory (start a sweep with `ablate run`, or name another "
                        "with --results-dir)", source="--results-dir", key=str(p))
    if (p / STORAGE_FILE).is_file():
        return p
    if run_dirs_suffice and any(d.is_dir() for d in p.glob("*/*/*/seed*")):
        return p
    what = f"no {STORAGE_FILE}" + ("" if not run_dirs_suffice else " and no run directories")
    raise SpecError(f"not a results directory ({what}; give --storage for a database elsewhere)",
                    source="--results-dir", key=str(p))
