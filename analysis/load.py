"""Results -> one tidy DataFrame: one row per trial, from the Optuna storage and/or the run directories.

The storage is the record of what was scheduled (it knows failed, running and waiting trials); the run
directories are the record of what was trained (final.json). Either alone is enough: a results dir
copied without its database still analyses, and so does a shared PostgreSQL storage whose run dirs live
on another machine. Both hold the same `rundir.FinalRecord` (the worker stores its scalars as the
trial's attrs), and `trial_row` turns either into a row.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from ablations import rundir, storage_url

KEY = ("sweep", "profile", "setting", "seed")
METRICS = rundir.NUMBERS  # top1_err ... epochs, as the final record has them
TEXT = ("device", "git_commit", "run_dir", "fail_reason")
COLUMNS = (*KEY, "state", *METRICS, *TEXT, "trial_number", "study", "source", "datetime_complete")
RECORD_COLUMNS = tuple(c for c in COLUMNS if c in rundir.ATTR_FIELDS)  # what a final record fills in
INCOMPLETE = "INCOMPLETE"  # a run dir with a config but no final.json: interrupted or still training


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
    url = storage_url.existing(results_dir, storage)
    if url is None:
        return {}
    with _open(url) as st:
        return {(a["sweep"], a["profile"]): a for _, a in _studies(st, sweep, profile)}


def trial_row(record: Mapping[str, Any], **where: Any) -> dict[str, Any]:
    """One row of `load_trials`: a trial's record (final.json, or the scalars the worker stored in the
    trial's attrs), and `where` (grid point, state, source, ...)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update({k: record.get(k) for k in RECORD_COLUMNS})
    row.update(where)
    return row


def _storage_record(results_dir: str | Path, attrs: dict[str, Any], point: dict[str, Any],
                    trial: Any) -> Mapping[str, Any]:
    """A storage trial's record: its attrs, where the worker stored it. A COMPLETE trial whose attrs
    lack it (written by some other program) has it in its run dir's final.json, or has only the
    objective, which is the top-1 error."""
    if trial.state.name != "COMPLETE" or set(rundir.ATTR_FIELDS) <= attrs.keys() or point["seed"] is None:
        return attrs
    final = rundir.read_final_json(locate_run_dir(results_dir, {**point, "run_dir": attrs.get("run_dir")}))
    return final if final is not None else {"top1_err": trial.value}


def _storage_rows(results_dir: str | Path, url: str, sweep: str | None, profile: str | None
                  ) -> list[dict[str, Any]]:
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
            point = {"sweep": attrs.get("sweep", study_attrs["sweep"]),
                     "profile": attrs.get("profile", study_attrs["profile"]),
                     "setting": params.get("setting", attrs.get("setting")),
                     "seed": params.get("seed", attrs.get("seed"))}
            rows.append(trial_row(_storage_record(results_dir, attrs, point, t), **point,
                                  run_dir=attrs.get("run_dir"), fail_reason=attrs.get("fail_reason"),
                                  state=t.state.name, trial_number=t.number, study=name, source="storage",
                                  datetime_complete=t.datetime_complete))
    return rows


def _dir_row(run_dir: Path) -> dict[str, Any] | None:
    info, state = rundir.read_final_json(run_dir), "COMPLETE"
    if info is None:
        try:
            info = yaml.safe_load((run_dir / rundir.CONFIG).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return None
        state = INCOMPLETE
    # The label directory is lossy (rundir.label_dir), so the label comes from the file.
    profile, sweep, label_dir, seed = rundir.place(run_dir)
    return trial_row(info, sweep=info.get("sweep") or sweep, profile=info.get("profile") or profile,
                     setting=info.get("setting", label_dir), seed=_as_int(info.get("seed", seed)),
                     state=state, run_dir=str(run_dir), source="run_dir")


def load_trials(results_dir: str | Path, storage: str | None = None, *, sweep: str | None = None,
                profile: str | None = None) -> pd.DataFrame:
    """One row per trial (columns `COLUMNS`), optionally only one sweep and/or profile.

    Storage trials come first. A run dir adds a row only where the storage has no COMPLETE trial for its
    (sweep, profile, setting, seed) -- so a results dir without storage, or a storage that lost a trial
    whose final.json exists, still counts every finished run exactly once.
    """
    url = storage_url.existing(results_dir, storage)
    rows = _storage_rows(results_dir, url, sweep, profile) if url is not None else []
    seen_complete = {tuple(r[k] for k in KEY) for r in rows if r["state"] == "COMPLETE"}
    seen_any = {tuple(r[k] for k in KEY) for r in rows}
    for d in rundir.run_dirs(results_dir, profile, sweep):
        row = _dir_row(d)
        if row is None:
            continue
        key = tuple(row[k] for k in KEY)
        if row["sweep"] != (sweep or row["sweep"]) or row["profile"] != (profile or row["profile"]):
            continue
        if key in seen_complete or (row["state"] == INCOMPLETE and key in seen_any):
            continue
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in METRICS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["seed"] = pd.array([_as_int(s) for s in df["seed"]], dtype="Int64")
    df["trial_number"] = pd.array(df["trial_number"].tolist(), dtype="Int64")
    return df


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
    path = Path(run_dir) / rundir.EXCITATIONS
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
    path = Path(run_dir) / rundir.METRICS
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.EmptyDataError):
        return None


def locate_run_dir(results_dir: str | Path, row: pd.Series | dict) -> Path:
    """A trial's run dir: its canonical place under `results_dir` when that exists, else the recorded path.

    Canonical first because `results_dir` is what the user asked to analyse (a copied results dir must
    not read the original's files); the recorded path covers run dirs kept outside the results dir.
    """
    canonical = rundir.run_dir(results_dir, str(row["profile"]), str(row["sweep"]), str(row["setting"]),
                               int(row["seed"]))
    recorded = row.get("run_dir")
    if not canonical.is_dir() and isinstance(recorded, str) and recorded and Path(recorded).is_dir():
        return Path(recorded)
    return canonical
