"""Results -> one tidy DataFrame: one row per trial, from the Optuna storage and/or the run directories.

The storage is the record of what was scheduled (it knows failed, running and waiting trials); the run
directories are the record of what was trained (final.json). Either alone is enough: a results dir
copied without its database still analyses, and so does a shared PostgreSQL storage whose run dirs live
on another machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ablations import paths, storage_url

KEY = ("sweep", "profile", "setting", "seed")
METRICS = (
    "top1_err", "top5_err", "val_loss", "params_m", "gflops", "params", "macs",
    "train_seconds", "images_per_s", "epochs",
)
TEXT = ("device", "git_commit", "run_dir", "fail_reason")
COLUMNS = (*KEY, "state", *METRICS, *TEXT, "trial_number", "study", "source", "datetime_complete")
INCOMPLETE = "INCOMPLETE"  # a run dir with a config but no final.json: interrupted or still training


def resolve_storage(results_dir: str | Path, storage: str | None) -> str | None:
    """The storage URL to read (the runner's resolver: same default, same driver for postgresql://), or
    None when it is a SQLite file that does not exist: opening it would create an empty database as a
    side effect of reading."""
    return storage_url.existing(results_dir, storage)


def _optuna():
    """optuna, imported quietly: in a notebook without ipywidgets, tqdm (which optuna imports) warns
    about progress bars we never show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="IProgress not found")
        import optuna
    optuna.logging.set_verbosity(logging.WARNING)
    return optuna


@contextlib.contextmanager
def _open(url: str) -> Iterator[Any]:
    """The storage, read and closed: an open SQLite connection keeps the database's write-ahead log
    beside it (optuna.db-wal) until it closes. A storage that cannot be read (a garbage or truncated
    file, no driver, no server) is one line naming it, password masked."""
    with storage_url.reading(url):
        storage = _optuna().storages.RDBStorage(url)
        try:
            yield storage
        finally:
            storage.engine.dispose()


def _studies(storage: Any, sweep: str | None, profile: str | None) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for s in storage.get_all_studies():
        attrs = dict(s.user_attrs)
        # Studies are named f"{sweep}-{profile}"; the attrs are authoritative, the name a fallback.
        name_sweep, _, name_profile = s.study_name.rpartition("-")
        attrs.setdefault("sweep", name_sweep or s.study_name)
        attrs.setdefault("profile", name_profile)
        if (sweep is None or attrs["sweep"] == sweep) and (profile is None or attrs["profile"] == profile):
            out.append((s.study_name, attrs))
    return out


def load_studies(results_dir: str | Path, storage: str | None = None, *, sweep: str | None = None,
                 profile: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """{(sweep, profile): study user attrs} for the studies in the storage (empty without one)."""
    url = resolve_storage(results_dir, storage)
    if url is None:
        return {}
    with _open(url) as st:
        return {(a["sweep"], a["profile"]): a for _, a in _studies(st, sweep, profile)}


def _storage_rows(url: str, sweep: str | None, profile: str | None) -> list[dict[str, Any]]:
    optuna = _optuna()

    rows = []
    with _open(url) as storage:
        trials = {name: (attrs, optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False))
                  for name, attrs in _studies(storage, sweep, profile)}
    for name, (study_attrs, study_trials) in trials.items():
        for t in study_trials:
            attrs = t.user_attrs
            # A WAITING trial queued with enqueue_trial keeps its grid point in system attrs until it runs.
            params = t.params or t.system_attrs.get("fixed_params", {})
            row = {k: attrs.get(k) for k in (*METRICS, *TEXT)}
            row.update(
                sweep=attrs.get("sweep", study_attrs["sweep"]),
                profile=attrs.get("profile", study_attrs["profile"]),
                setting=params.get("setting", attrs.get("setting")),
                seed=params.get("seed", attrs.get("seed")),
                state=t.state.name,
                trial_number=t.number,
                study=name,
                source="storage",
                datetime_complete=t.datetime_complete,
            )
            if row["top1_err"] is None and t.state.name == "COMPLETE":
                row["top1_err"] = t.value  # the objective is top-1 error
            rows.append(row)
    return rows


def run_dirs(results_dir: str | Path, profile: str | None = None, sweep: str | None = None) -> list[Path]:
    """Every <results>/<profile>/<sweep>/<slug>/seed<k>/ that holds a config.yaml or final.json."""
    base = Path(results_dir)
    pattern = f"{profile or '*'}/{sweep or '*'}/*/seed*"
    return sorted(p for p in base.glob(pattern)
                  if p.is_dir() and ((p / "final.json").is_file() or (p / "config.yaml").is_file()))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # missing or half-written by a trainer that died mid-write: not a result
    return data if isinstance(data, dict) else None


def read_final(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's final.json, or None when it has none (or only a torn one)."""
    return _read_json(Path(run_dir) / "final.json")


def _dir_row(run_dir: Path) -> dict[str, Any] | None:
    final = read_final(run_dir)
    if final is not None:
        info, state = final, "COMPLETE"
    else:
        try:
            info = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        state = INCOMPLETE
    # The path encodes profile/sweep/slug/seed<k>; the slug is lossy, so the label comes from the file.
    profile, sweep = run_dir.parent.parent.parent.name, run_dir.parent.parent.name
    seed = info.get("seed", run_dir.name.removeprefix("seed"))
    row = {k: info.get(k) for k in (*METRICS, *TEXT)}
    row.update(
        sweep=info.get("sweep") or sweep,
        profile=info.get("profile") or profile,
        setting=info.get("setting", run_dir.parent.name),
        seed=seed,
        state=state,
        run_dir=str(run_dir),
        source="run_dir",
    )
    return row


def load_trials(results_dir: str | Path, storage: str | None = None, *, sweep: str | None = None,
                profile: str | None = None) -> pd.DataFrame:
    """One row per trial (columns `COLUMNS`), optionally only one sweep and/or profile.

    Storage trials come first. A run dir adds a row only where the storage has no COMPLETE trial for its
    (sweep, profile, setting, seed) -- so a results dir without storage, or a storage that lost a trial
    whose final.json exists, still counts every finished run exactly once.
    """
    url = resolve_storage(results_dir, storage)
    rows = _storage_rows(url, sweep, profile) if url is not None else []
    seen_complete = {tuple(r[k] for k in KEY) for r in rows if r["state"] == "COMPLETE"}
    seen_any = {tuple(r[k] for k in KEY) for r in rows}
    for d in run_dirs(results_dir, profile, sweep):
        row = _dir_row(d)
        if row is None:
            continue
        row["seed"] = _as_int(row["seed"])
        key = tuple(row[k] for k in KEY)
        if row["sweep"] != (sweep or row["sweep"]) or row["profile"] != (profile or row["profile"]):
            continue
        if key in seen_complete or (row["state"] == INCOMPLETE and key in seen_any):
            continue
        rows.append(row)
    _fill_from_run_dirs(results_dir, rows)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in METRICS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["seed"] = pd.array([_as_int(s) for s in df["seed"]], dtype="Int64")
    df["trial_number"] = pd.array(df["trial_number"].tolist(), dtype="Int64")
    return df


def _fill_from_run_dirs(results_dir: str | Path, rows: list[dict[str, Any]]) -> None:
    """Complete storage trials missing metrics take them from their final.json.

    The worker records final.json's values as user attrs before it marks a trial COMPLETE, but a
    storage written by an older or foreign worker may hold only the objective (top-1 error).
    """
    for row in rows:
        if row["source"] != "storage" or row["state"] != "COMPLETE" or row["seed"] is None:
            continue
        if all(row.get(k) is not None for k in ("top5_err", "params_m", "gflops")):
            continue
        final = read_final(locate_run_dir(results_dir, row)) or {}
        for k in (*METRICS, "device", "git_commit"):
            if row.get(k) is None and final.get(k) is not None:
                row[k] = final[k]


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    """The COMPLETE trials, one per (sweep, profile, setting, seed).

    A grid point can be completed twice (a retry racing a stale worker); the latest completion counts.
    """
    done = trials[trials["state"] == "COMPLETE"]
    done = done.sort_values(["datetime_complete", "trial_number"], na_position="first", kind="stable")
    return done.drop_duplicates(list(KEY), keep="last").reset_index(drop=True)


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class Excitations:
    """One run's excitations.npz: per block, [classes x channels] mean and std of the gate over images."""

    run_dir: Path
    blocks: list[str]  # network order, e.g. SE_2_1 ... SE_5_3 (<MODULE>_<stage>_<block>); empty without any
    classes: np.ndarray  # class ids, one per row of every mean/std array
    counts: np.ndarray  # images per class behind each row
    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]


def read_excitations(run_dir: str | Path) -> Excitations | None:
    """The run's excitations, or None when the run has no excitations.npz."""
    path = Path(run_dir) / "excitations.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        blocks = [str(b) for b in z["blocks"]]
        return Excitations(
            run_dir=Path(run_dir),
            blocks=blocks,
            classes=np.asarray(z["classes"]),
            counts=np.asarray(z["counts"]),
            mean={b: np.asarray(z[f"{b}.mean"], dtype=float) for b in blocks},
            std={b: np.asarray(z[f"{b}.std"], dtype=float) for b in blocks},
        )


def read_metrics(run_dir: str | Path) -> pd.DataFrame | None:
    """The run's per-epoch metrics.csv, or None when it has none (yet)."""
    path = Path(run_dir) / "metrics.csv"
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError):
        return None


def locate_run_dir(results_dir: str | Path, row: pd.Series | dict) -> Path:
    """A trial's run dir: its canonical place under `results_dir` when that exists, else the recorded path.

    Canonical first because `results_dir` is what the user asked to analyse (a copied results dir must
    not read the original's files); the recorded path covers run dirs kept outside the results dir.
    """
    slug = paths.label_dir(str(row["setting"]))
    canonical = Path(results_dir) / str(row["profile"]) / str(row["sweep"]) / slug / f"seed{int(row['seed'])}"
    recorded = row.get("run_dir")
    if not canonical.is_dir() and isinstance(recorded, str) and recorded and Path(recorded).is_dir():
        return Path(recorded)
    return canonical
