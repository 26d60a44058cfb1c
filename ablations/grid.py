"""Sweeps as Optuna studies: one study per (sweep, profile), holding its settings x seeds grid.

A grid point (setting, seed) is a trial whose params are set when it is queued (WAITING), so the
dashboard, `ablate status` and the analysis see every point before it runs. A study's user attrs hold
the whole sweep and profile (`Plan.attrs`), so a worker on another machine trains exactly what the
machine that created it queued.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError

from ablations import rundir
from ablations.errors import SpecError
from ablations.schema import MAX_SEEDS, Profile, RunConfig, Setting, Sweep
from ablations.spec import from_validation_error, run_config
from ablations.storage import grid_lock
from ablations.storage_url import shown
from ablations.trials import grid_point


@dataclass(frozen=True)
class Plan:
    """One (sweep, profile) study: its settings x seeds grid and how each point becomes a RunConfig."""

    sweep: Sweep
    profile: Profile
    seeds: int
    overrides: tuple[str, ...] = ()
    data_root: str | None = None

    @property
    def study_name(self) -> str:
        return f"{self.sweep.name}-{self.profile.name}"

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sweep.settings]

    def grid(self) -> list[tuple[str, int]]:
        # Seed-major: an interrupted sweep has whole seeds of every setting, a usable partial table.
        return [(label, seed) for seed in range(self.seeds) for label in self.labels]

    def setting(self, label: str) -> Setting:
        for s in self.sweep.settings:
            if s.label == label:
                return s
        raise SpecError(f"study has no setting {label!r}", source=self.study_name)

    def config(self, label: str, seed: int) -> RunConfig:
        return run_config(self.profile, self.setting(label), seed, self.sweep.name)

    def run_dir(self, results_dir: str | Path, label: str, seed: int) -> Path:
        return rundir.run_dir(results_dir, self.profile.name, self.sweep.name, self.setting(label).label, seed)

    def distributions(self) -> dict[str, Any]:
        return {"setting": CategoricalDistribution(self.labels), "seed": IntDistribution(0, self.seeds - 1)}

    def attrs(self) -> dict[str, Any]:
        """Study user attrs: what the analysis reads, plus the full spec so `ablate worker` on another
        machine trains exactly what this machine would (its sweep files may differ or be absent)."""
        return {
            "sweep": self.sweep.name,
            "profile": self.profile.name,
            "table": self.sweep.table,
            "description": self.sweep.description,
            "reference": self.sweep.reference,
            "settings": self.labels,
            "seeds": self.seeds,
            "overrides": list(self.overrides),
            "data_root": self.data_root,
            "sweep_path": self.sweep.path,
            "sweep_spec": self.sweep.model_dump(mode="json", exclude={"path"}),
            "profile_spec": self.profile.model_dump(mode="json", exclude={"path"}),
        }


def plan_from_attrs(name: str, attrs: dict[str, Any], data_root: str | None = None) -> Plan:
    """Rebuild a study's Plan from its user attrs (`data_root` overrides the stored one)."""
    missing = [k for k in CREATION_ATTRS if k not in attrs]
    if missing:
        raise SpecError(f"this study lacks {', '.join(missing)}: not created by `ablate run`, or its creation "
                        "was interrupted (run its sweep with `ablate run` again to complete it)",
                        source="--study", key=name)
    try:
        plan = Plan(
            sweep=Sweep.model_validate(attrs["sweep_spec"]),
            profile=Profile.model_validate(attrs["profile_spec"]),
            seeds=int(attrs["seeds"]),
            overrides=tuple(attrs.get("overrides") or ()),
            data_root=data_root or attrs.get("data_root"),
        )
    except ValidationError as e:
        err = from_validation_error(e, "")
        raise SpecError(f"its stored spec is not valid here: {err.key}: {err.message}", source="--study",
                        key=name) from None
    except (TypeError, ValueError) as e:  # `seeds` that is no number
        raise SpecError(f"its stored spec is not valid here: {e}", source="--study", key=name) from None
    if not 0 < plan.seeds <= MAX_SEEDS:
        raise SpecError(f"this study holds {plan.seeds} seeds per setting; at most {MAX_SEEDS} can run",
                        source="--study", key=name)
    return plan


# Every attr `Plan.attrs` writes when it creates a study: one missing means the creation was cut short.
CREATION_ATTRS = ("sweep", "profile", "table", "description", "reference", "settings", "seeds", "overrides",
                  "data_root", "sweep_path", "sweep_spec", "profile_spec")


def _what_trains(sweep_spec: dict[str, Any], profile_spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a spec that change results (labels, attention, backbone, data, recipe), not the prose
    (descriptions, a row's published numbers).

    Both specs are re-validated first, so a study stored before a key existed compares equal to the same
    sweep and recipe today (the new key at its default). Each row's backbone is compared as resolved
    (`run_config`): a profile's `families` section changes only the rows of those families."""
    try:
        sweep, profile = Sweep.model_validate(sweep_spec), Profile.model_validate(profile_spec)
        backbones = [run_config(profile, s, 0).backbone.model_dump(mode="json") for s in sweep.settings]
    except (ValueError, SpecError):  # a spec this version cannot read: compare it as stored
        return {"settings": sweep_spec["settings"],
                **{k: profile_spec.get(k) for k in ("backbone", "data", "train")}}
    profile_spec = profile.model_dump(mode="json", exclude={"path"})
    return {"settings": [s.model_dump(mode="json", exclude={"published"}) for s in sweep.settings],
            "backbones": backbones, **{k: profile_spec[k] for k in ("backbone", "data", "train")}}


def open_study(storage: optuna.storages.RDBStorage, plan: Plan) -> optuna.Study:
    """Create the plan's study (its attrs) or load it, refusing one that trains differently. Its
    dashboard note is study_notes.py's."""
    with grid_lock(storage):  # two `ablate run`s starting together must not both create it
        try:
            study = optuna.load_study(study_name=plan.study_name, storage=storage)
        except KeyError:
            study = optuna.create_study(study_name=plan.study_name, storage=storage, direction="minimize")
        if _unfinished(study):
            # Created just now, or by a run killed between two of its attrs (Optuna writes one at a time):
            # nothing was queued yet, so this plan's attrs complete it.
            for key, value in plan.attrs().items():
                study.set_user_attr(key, value)
            return study
    old = study.user_attrs
    new = plan.attrs()
    if "sweep_spec" in old and _what_trains(old["sweep_spec"], old["profile_spec"]) != _what_trains(
            new["sweep_spec"], new["profile_spec"]):
        raise SpecError(
            f"study {plan.study_name} in {shown(storage.url)} was created from different settings or profile "
            f"(--set {' '.join(old.get('overrides') or []) or '(none)'}); rerun with the same sweep and "
            "options, or use another --results-dir / --storage",
            source=plan.sweep.path or plan.sweep.name)
    # Prose and the seed count may grow between runs; the grid of earlier runs stays in the study.
    new["seeds"] = max(int(old.get("seeds", 0)), plan.seeds)
    if old.get("data_root") and not plan.data_root:
        new["data_root"] = old["data_root"]
    for key, value in new.items():
        if old.get(key) != value:
            study.set_user_attr(key, value)
    return study


def _unfinished(study: optuna.Study) -> bool:
    """A study whose creation did not get to the end: some creation attr missing and no trial queued
    (a study of someone else's, with trials and its own attrs, is left alone)."""
    attrs = study.user_attrs
    return any(k not in attrs for k in CREATION_ATTRS) and not study.get_trials(deepcopy=False)


# A point's state is the most advanced of its trials' states.
_RANK = {TrialState.COMPLETE: 4, TrialState.RUNNING: 3, TrialState.WAITING: 2, TrialState.FAIL: 1}
STATES = ("COMPLETE", "RUNNING", "WAITING", "FAIL", "MISSING")


def point_states(trials: Iterable[FrozenTrial], grid: Iterable[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """{(setting, seed): COMPLETE | RUNNING | WAITING | FAIL | MISSING} for every point of `grid`."""
    best: dict[tuple[str, int], TrialState] = {}
    for t in trials:
        p = grid_point(t)
        if p is not None and t.state in _RANK and (p not in best or _RANK[t.state] > _RANK[best[p]]):
            best[p] = t.state
    return {p: (best[p].name if p in best else "MISSING") for p in grid}


def point_counts(trials: Iterable[FrozenTrial], labels: Iterable[str], seeds: int) -> dict[str, int]:
    """How many points of the labels x seeds grid are in each of STATES, without listing the grid: a
    study's stored seed count is counted, never materialised."""
    labels = set(labels)
    best: dict[tuple[str, int], TrialState] = {}
    for t in trials:
        p = grid_point(t)
        if p is None or p[0] not in labels or not 0 <= p[1] < seeds or t.state not in _RANK:
            continue
        if p not in best or _RANK[t.state] > _RANK[best[p]]:
            best[p] = t.state
    counts = dict.fromkeys(STATES, 0)
    for state in best.values():
        counts[state.name] += 1
    counts["MISSING"] = len(labels) * seeds - len(best)
    return counts


def enqueue_missing(study: optuna.Study, plan: Plan) -> int:
    """Queue every grid point that has no COMPLETE, RUNNING or WAITING trial (failed ones get another
    go). Call under `grid_lock`. Returns how many were queued."""
    states = point_states(study.get_trials(deepcopy=False), plan.grid())
    todo = [p for p, s in states.items() if s in ("FAIL", "MISSING")]
    dists = plan.distributions()
    study.add_trials([
        optuna.trial.create_trial(
            state=TrialState.WAITING, params={"setting": label, "seed": seed}, distributions=dists,
            user_attrs={"sweep": plan.sweep.name, "profile": plan.profile.name},
        )
        for label, seed in todo
    ])
    return len(todo)
