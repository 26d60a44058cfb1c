"""The run-directory contract: where a run writes, what it writes there, and the record it ends with.

The trainer writes it; the workers, the DDP launcher, the analysis, the report and the tests' fake
trainer read it, all through this module (which imports no torch, so reading results stays cheap).

    <results>/optuna.db                              the default storage
    <results>/launch/<job id>/                       submitit's job files (`ablate launch`)
    <results>/<profile>/<sweep>/<label dir>/seed<k>/ one trial's run directory:
        config.yaml       the resolved RunConfig; a rerun must match it
        metrics.csv       one row per epoch, METRIC_COLUMNS
        checkpoint.pt     after every epoch, or as train.checkpoint_every_* say (checkpoint.prev.pt:
                          the one before; checkpoints.py)
        excitations.npz   the excitation probe (probe.py)
        final.json        a FinalRecord, written last: its presence means the trial is complete
        events.out.tfevents.*  per-epoch scalars for TensorBoard, where it is installed (tensorboard_log.py)
        .lock             held while a trainer works in it (resilience.run_dir_lock)
    <results>/<profile>/<sweep>/table.{md,csv}       the sweep's table when it ends
    <results>/<profile>/{tables,figures,notebooks}/  the analysis; <results>/<profile>/report.html

Sweep and profile names are identifiers, and none of the names the layout itself uses beside them;
labels are free text, mapped to directory names that stay inside their sweep's directory (`label_dir`).
A path that would leave `--results-dir` is refused before anything is created.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ablations.atomic import save_json_atomic, write_text_atomic
from ablations.bundled import ROOT
from ablations.errors import SpecError

CONFIG = "config.yaml"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"
EXCITATIONS = "excitations.npz"
FINAL = "final.json"
LOCK = ".lock"
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "top1_err", "top5_err", "epoch_seconds",
                  "images_per_s")

STORAGE_FILE = "optuna.db"
LAUNCH_DIR = "launch"
REPORT_FILE = "report.html"
ANALYSIS_DIRS = ("tables", "figures", "notebooks")  # beside the sweep directories of a profile
SWEEP_FILES = ("table.md", "table.csv")  # beside the label directories of a sweep
RUN_DIRS = "*/*/*/seed*"  # every run directory below <results>: <profile>/<sweep>/<label dir>/seed<k>
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_NAME = 64  # characters in a sweep or profile name
MAX_LABEL = 100  # characters in a setting label (its directory name is at most as long, in ASCII)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=+-]+")


# ---------------------------------------------------------------------------------------------------
# Names


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


# ---------------------------------------------------------------------------------------------------
# The results tree


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
    return _inside(profile_dir(results_dir, profile), REPORT_FILE)


def run_dirs(results_dir: str | Path, profile: str | None = None, sweep: str | None = None) -> list[Path]:
    """Every run directory under `results_dir` (of one profile and/or sweep) that holds a config or a
    final record, in path order."""
    pattern = f"{profile or '*'}/{sweep or '*'}/*/seed*"
    return sorted(p for p in Path(results_dir).glob(pattern)
                  if p.is_dir() and ((p / FINAL).is_file() or (p / CONFIG).is_file()))


def place(path: Path) -> tuple[str, str, str, int | None]:
    """(profile, sweep, label dir, seed) from a run directory's path; the label dir is lossy (see
    `label_dir`), so the label itself comes from the files."""
    seed = path.name.removeprefix("seed")
    return path.parent.parent.parent.name, path.parent.parent.name, path.parent.name, (
        int(seed) if seed.isdigit() else None)


# ---------------------------------------------------------------------------------------------------
# Per-epoch metrics


def metric_row(**values: float) -> dict[str, float]:
    """One epoch's row of metrics.csv, exactly METRIC_COLUMNS in order (a missing or extra key is a bug
    in whoever builds the row: the trainer, or a test's stand-in for it)."""
    if set(values) != set(METRIC_COLUMNS):
        raise TypeError(f"a metric row has the keys {METRIC_COLUMNS}, not {tuple(values)}")
    return {k: values[k] for k in METRIC_COLUMNS}


def write_metrics(run: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(Path(run) / METRICS, buf.getvalue())


def read_metrics(run: Path) -> list[dict[str, float]]:
    """The epochs written so far (none when there is no metrics.csv yet)."""
    try:
        with (Path(run) / METRICS).open() as f:
            rows = list(csv.DictReader(f))
    except OSError:
        return []
    return [{k: int(v) if k == "epoch" else float(v) for k, v in r.items()} for r in rows]


# ---------------------------------------------------------------------------------------------------
# The final record


@dataclasses.dataclass(frozen=True)
class FinalRecord:
    """What a completed trial reports: final.json, and (its scalars) the Optuna trial's user attrs."""

    top1_err: float  # % on the validation split after the last epoch (the study's objective)
    top5_err: float
    val_loss: float  # cross-entropy without label smoothing
    params_m: float  # params / 1e6, the paper's unit
    gflops: float  # GMACs of one image at the profile's input size (the paper's "GFLOPs")
    params: int
    macs: int
    train_seconds: float  # wall time of the training epochs, over every resumption (no compilation)
    images_per_s: float  # training throughput, harmonic mean over epochs after the first (no compilation)
    epochs: int  # epochs trained (the plateau schedule may stop before train.epochs)
    lr_cuts: tuple[int, ...]  # epochs after which the LR was divided
    device: str  # "cuda:0", or "cuda x4" for a DDP trial
    versions: Mapping[str, str]  # python, torch, timm
    git_commit: str | None
    sweep: str
    profile: str
    setting: str  # the label
    seed: int
    # Later additions, with defaults: records written before them still load.
    compile_seconds: float = 0.0  # train.compile: compiling and warming up, over every resumption
    trials_per_device: int = 1  # trials this one shared its device with, itself included (packing)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lr_cuts": list(self.lr_cuts), "versions": dict(self.versions)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FinalRecord:
        """The record in `data` (keys it does not know are ignored); ValueError if one is missing."""
        missing = [f for f in REQUIRED_FIELDS if f not in data]
        if missing:
            raise ValueError(f"not a final record: no {', '.join(missing)}")
        values = {f: data[f] for f in FIELDS if f in data}
        return cls(**{**values, "lr_cuts": tuple(values["lr_cuts"]), "versions": dict(values["versions"])})

    def to_attrs(self) -> dict[str, Any]:
        """The scalars, as an Optuna trial stores them: its params already say setting and seed."""
        return {f: getattr(self, f) for f in (*ATTR_FIELDS, *LATER_FIELDS)}


FIELDS = tuple(f.name for f in dataclasses.fields(FinalRecord))
REQUIRED_FIELDS = tuple(f.name for f in dataclasses.fields(FinalRecord) if f.default is dataclasses.MISSING)
GRID_POINT = ("setting", "seed")
# The scalars every stored record has; LATER_FIELDS are stored too, but older trials lack them.
ATTR_FIELDS = tuple(f for f in REQUIRED_FIELDS if f not in ("lr_cuts", "versions", *GRID_POINT))
LATER_FIELDS = tuple(f for f in FIELDS if f not in REQUIRED_FIELDS)
NUMBERS = ATTR_FIELDS[:ATTR_FIELDS.index("epochs") + 1]  # the measured numbers, top1_err .. epochs


def write_final(run: Path, record: FinalRecord) -> None:
    save_json_atomic(Path(run) / FINAL, record.to_json())


def read_final_json(run: Path) -> dict[str, Any] | None:
    """final.json as written, or None when there is none (or only a torn or foreign one)."""
    try:
        data = json.loads((Path(run) / FINAL).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # missing, or half-written by a trainer that died mid-write: not a result
    return data if isinstance(data, dict) else None


def read_final(run: Path) -> FinalRecord | None:
    data = read_final_json(run)
    try:
        return None if data is None else FinalRecord.from_json(data)
    except (ValueError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------------
# Provenance


@functools.cache  # the code a process runs is fixed at import: no git subprocess per trial
def git_commit(short: bool = False) -> str | None:
    """The checkout's commit (None outside a git checkout, e.g. an installed wheel)."""
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", *(["--short"] if short else []), "HEAD"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def temp_files(run: Path) -> Iterator[Path]:
    """Temporary files of atomic writes a kill cut short (atomic.py names them `.<name>.<hex>.tmp`)."""
    return Path(run).glob(".*.tmp")
