"""Paper Tables 10-16 from trials: one row per setting, in the sweep file's (= the paper's) order.

`build_table` turns a trials DataFrame into a `Table` (it reads nothing but, at most, the profile file
and one run dir's config.yaml to learn the number of classes); `load_table` reads results first;
render.py turns a Table into text and table_files.py puts it on disk. Missing seeds never raise: the row
shows the seeds it has and `Table.missing` says which are absent and why (failed, running, waiting,
never started).

Each row is tested against the sweep's reference row (`stats.compare`, paired over shared seeds or
Welch), Holm-adjusted over the table's comparisons of that metric, and given a `stats` verdict. Top-5
error is shown only for data sets with more than 10 classes: with 10 or fewer it is ~0 in most runs
and says nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from ablations.errors import SpecError
from ablations.schema import Sweep
from ablations.spec import SWEEPS_DIR, load_profile, load_sweep
from analysis import load, stats

TOP5_MIN_CLASSES = 11  # top-5 error is shown from this many classes up


def _summary_columns(metric: str) -> tuple[str, ...]:
    return (f"{metric}_mean", f"{metric}_std", f"{metric}_ci_low", f"{metric}_ci_high")


def _test_columns(metric: str) -> tuple[str, ...]:
    return (f"d_{metric}", f"d_{metric}_ci_low", f"d_{metric}_ci_high", f"p_{metric}", f"p_{metric}_adj",
            f"mde_{metric}")


def columns(top5: bool) -> tuple[str, ...]:
    """CSV column order: what a row says about one setting (the top-5 ones only when `top5`)."""
    return (
        "setting", "reference", "n", "seeds",
        *_summary_columns("top1"), *(_summary_columns("top5") if top5 else ()),
        *_test_columns("top1"), "verdict", *(_test_columns("top5") if top5 else ()),
        "params_m", "gflops", "images_per_s",
        "paper_top1", *(("paper_top5",) if top5 else ()), "paper_params_m", "paper_gflops",
        "missing_seeds",
    )


COLUMNS = columns(top5=True)  # every column a table can have
TEXT_COLUMNS = ("setting", "reference", "seeds", "verdict", "missing_seeds")


@dataclass(frozen=True)
class Missing:
    setting: str
    seed: int
    why: str  # "not started", "FAIL: <reason>", "RUNNING", "WAITING", "INCOMPLETE"


@dataclass(frozen=True)
class ProfileFacts:
    """What the analysis needs to know about the profile behind a table's results."""

    num_classes: int | None  # None: nowhere to be found (top-5 is then shown)
    comparable_tables: tuple[int, ...]  # paper tables whose published column this recipe reproduces

    @property
    def shows_top5(self) -> bool:
        return self.num_classes is None or self.num_classes >= TOP5_MIN_CLASSES


@dataclass
class Table:
    sweep: Sweep
    profile: str
    rows: pd.DataFrame  # columns `columns(show_top5)`, one row per setting in sweep order
    runs: pd.DataFrame  # the completed trials behind the rows (load.completed), for per-seed plots
    expected_seeds: list[int]
    missing: list[Missing] = field(default_factory=list)
    unknown_settings: list[str] = field(default_factory=list)  # results whose label the sweep lacks
    paired: bool = stats.PAIRED
    facts: ProfileFacts = ProfileFacts(None, ())
    comparisons: dict[str, stats.Comparison] = field(default_factory=dict)  # top-1, non-reference rows

    @property
    def show_top5(self) -> bool:
        return self.facts.shows_top5

    @property
    def recipe_note(self) -> str | None:
        """Why the published column is not an error to match, when this profile's recipe is not the paper's."""
        if self.sweep.has_own_sources:
            return ("The published column is ImageNet as each row's source in the sweep file reports it, "
                    f"each with its own recipe; profile {self.profile} compares ranks and directions only, "
                    "not errors.")
        if self.sweep.table is None or self.sweep.table in self.facts.comparable_tables:
            return None
        return (f"The published column is ImageNet with the paper's Sec. 6 recipe; profile {self.profile} "
                "compares ranks and directions only, not errors.")

    def per_seed(self, metric: str = "top1_err") -> pd.DataFrame:
        """Seeds x settings (sweep order) of one metric: the input of `stats.seed_correlation`."""
        wide = self.runs.pivot_table(index="seed", columns="setting", values=metric, aggfunc="first")
        return wide.reindex(columns=[s for s in self.rows["setting"] if s in wide.columns])

    def seed_correlation(self) -> stats.SeedCorrelation | None:
        """Top-1 correlation across seeds with the reference row (None without one, or without its results)."""
        wide = self.per_seed()
        if self.sweep.reference is None or self.sweep.reference not in wide.columns:
            return None
        return stats.seed_correlation(wide, self.sweep.reference)

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


def _classes_in_run_dirs(runs: pd.DataFrame) -> int | None:
    for run_dir in runs.get("run_dir", pd.Series(dtype=object)).dropna():
        try:
            config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # absent (the run dir lives on another machine) or damaged: try the next
        classes = (config.get("backbone") or {}).get("num_classes") if isinstance(config, dict) else None
        if classes is not None:
            return int(classes)
    return None


def profile_facts(profile: str, study_attrs: dict | None, runs: pd.DataFrame) -> ProfileFacts:
    """Number of classes and comparable tables of the profile the results were trained with.

    Looked up in this order, the first that has it wins:
      1. the study attrs' `profile_spec` (what the study trained, `--set` overrides included):
         `backbone.num_classes`, `comparable_tables`;
      2. the profile file, `ablations.spec.load_profile(profile)`, if it loads;
      3. the number of classes only: `backbone.num_classes` in a run dir's config.yaml.
    Unknown classes stay None; unknown comparable tables are () (published errors not comparable).
    """
    spec = (study_attrs or {}).get("profile_spec") or {}
    classes = (spec.get("backbone") or {}).get("num_classes")
    comparable = spec.get("comparable_tables")
    if classes is None or comparable is None:
        try:
            file = load_profile(profile)
        except SpecError:
            file = None
        if file is not None:
            classes = file.backbone.num_classes if classes is None else classes
            comparable = file.comparable_tables if comparable is None else comparable
    if classes is None:
        classes = _classes_in_run_dirs(runs)
    return ProfileFacts(None if classes is None else int(classes), tuple(int(t) for t in comparable or ()))


def _by_seed(runs: pd.DataFrame, metric: str) -> pd.Series:
    return runs.set_index(runs["seed"].astype(int))[metric].astype(float)


def _test_cells(metric: str, c: stats.Comparison | None) -> dict[str, float]:
    """The comparison's cells without its Holm-adjusted p (that needs the whole table); NaN for none."""
    values = (math.nan,) * 5 if c is None else (c.delta, c.ci_low, c.ci_high, c.p, c.mde)
    names = (f"d_{metric}", f"d_{metric}_ci_low", f"d_{metric}_ci_high", f"p_{metric}", f"mde_{metric}")
    return dict(zip(names, values))


def build_table(trials: pd.DataFrame, sweep: Sweep, profile: str, study_attrs: dict | None = None,
                paired: bool = stats.PAIRED) -> Table:
    """The table for `sweep` on `profile` from a trials frame (`load.load_trials` columns).

    `paired`: test each row against the reference over the seeds both have (True) or with Welch's
    unpaired t-test (False). The verdict column is empty when the sweep names no reference row.
    """
    mine = trials[(trials["sweep"] == sweep.name) & (trials["profile"] == profile)]
    done = load.completed(mine)
    seeds = expected_seeds(sweep, study_attrs, mine["seed"].dropna().astype(int).tolist())
    labels = [s.label for s in sweep.settings]
    runs_of = {label: done[done["setting"] == label].sort_values("seed") for label in labels}
    facts = profile_facts(profile, study_attrs, done)
    top5 = facts.shows_top5
    metrics = {"top1": "top1_err", **({"top5": "top5_err"} if top5 else {})}

    comparisons: dict[str, dict[str, stats.Comparison]] = {m: {} for m in metrics}
    if sweep.reference is not None:
        for m, metric in metrics.items():
            ref = _by_seed(runs_of[sweep.reference], metric)
            for label in labels:
                if label != sweep.reference:
                    comparisons[m][label] = stats.compare(_by_seed(runs_of[label], metric), ref, paired)
    adjusted = {m: dict(zip(c, stats.holm([x.p for x in c.values()]))) for m, c in comparisons.items()}

    rows, missing = [], []
    for label in labels:
        runs = runs_of[label]
        have = set(runs["seed"].astype(int))
        absent = [s for s in seeds if s not in have]
        for s in absent:
            attempts = mine[(mine["setting"] == label) & (mine["seed"] == s)]
            missing.append(Missing(label, s, _why(attempts)))
        is_ref = label == sweep.reference
        paper = sweep.published_numbers(label)
        row = {"setting": label, "reference": is_ref, "n": len(runs),
               "seeds": " ".join(str(s) for s in sorted(have))}
        for m, metric in metrics.items():
            summary = stats.summarize(runs[metric], bounds=stats.ERROR_RANGE)
            row.update(zip(_summary_columns(m), (summary.mean, summary.std, summary.ci_low, summary.ci_high)))
            row.update(_test_cells(m, comparisons[m].get(label)))
            row[f"p_{m}_adj"] = adjusted[m].get(label, math.nan)
        row["verdict"] = ("" if sweep.reference is None
                          else stats.verdict(comparisons["top1"].get(label), row["p_top1_adj"]))
        row.update({
            # Architecture numbers are identical across seeds; the first recorded one stands for all.
            "params_m": _first(runs["params_m"]), "gflops": _first(runs["gflops"]),
            "images_per_s": float(runs["images_per_s"].mean()) if len(runs) else math.nan,
            "paper_top1": paper["top1_err"], "paper_top5": paper["top5_err"],
            "paper_params_m": paper["params_m"], "paper_gflops": paper["gflops"],
            "missing_seeds": " ".join(str(s) for s in absent),
        })
        rows.append(row)
    cols = columns(top5)
    frame = pd.DataFrame(rows).reindex(columns=list(cols))
    for col in cols:
        if col not in TEXT_COLUMNS and col != "n":
            frame[col] = frame[col].astype(float)
    unknown = sorted(set(done["setting"].dropna()) - set(labels))
    runs = done[done["setting"].isin(labels)].reset_index(drop=True)
    return Table(sweep, profile, frame, runs, seeds, missing, unknown, paired, facts, comparisons["top1"])


def load_table(results_dir: str | Path, storage: str | None, sweep: Sweep, profile: str,
               paired: bool = stats.PAIRED) -> Table:
    """Read the sweep's trials (storage and/or run dirs) and build its table."""
    trials = load.load_trials(results_dir, storage, sweep=sweep.name, profile=profile)
    studies = load.load_studies(results_dir, storage, sweep=sweep.name, profile=profile)
    return build_table(trials, sweep, profile, studies.get((sweep.name, profile)), paired)


def all_sweeps() -> list[Sweep]:
    """The sweep files in sweeps/, paper tables first in table order."""
    sweeps = [load_sweep(p) for p in sorted(SWEEPS_DIR.glob("*.yaml"))]
    return sorted(sweeps, key=lambda s: (s.table is None, s.table or 0, s.name))
