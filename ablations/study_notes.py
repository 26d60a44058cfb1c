"""The note each study carries for optuna-dashboard (optuna_dashboard.save_note, shown on the study's
page): what it reproduces, the sweep's description, the profile, and the paper's published numbers per
setting. `ablate run` saves it beside the first trials: importing optuna-dashboard takes seconds. As
trials complete, analysis/dashboard.py adds our table under it.
"""

from __future__ import annotations

import hashlib

import optuna

from ablations.grid import Plan

OBJECTIVE = "top1_err (%)"
NOTE_DIGEST = "ablations:note_sha1"  # study system attr: the digest of the note last saved


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def study_note(plan: Plan) -> str:
    """Markdown: the sweep's description and the paper's row for each of its settings."""
    sweep, profile = plan.sweep, plan.profile
    head = f"Table {sweep.table}" if sweep.table is not None else f"Sweep {sweep.name}"
    lines = [
        f"## {head} ({sweep.name}), profile `{profile.name}`",
        "",
        sweep.description or "(no description in the sweep file)",
        "",
        f"**Grid**: {len(plan.labels)} settings × {plan.seeds} seeds. **Objective**: top-1 error (%) on the "
        f"profile's validation split. **Profile**: {profile.description or profile.name}"
        + (f" (with `--set {' '.join(plan.overrides)}`)" if plan.overrides else "") + ".",
    ]
    if sweep.reference:
        lines.append(f"Differences are measured against `{sweep.reference}`; `ablate table {sweep.name}` "
                     "tests them (95% CI, Holm-adjusted p, minimum detectable effect, verdict).")
    own = sweep.has_own_sources
    lines += ["", "### Published (each row's source, cited in the sweep file; ImageNet)" if own else
              "### Published (Hu et al., *Squeeze-and-Excitation Networks*, TPAMI; ImageNet)", ""]
    if sweep.table is None and not own:
        lines.append("This sweep reproduces no table of the paper.")
    else:
        lines += ["| setting | top-1 err (%) | top-5 err (%) | GFLOPs | params (M) |" + (" source |" if own else ""),
                  "|---|---:|---:|---:|---:|" + ("---|" if own else "")]
        for setting in sweep.settings:
            p = sweep.published_numbers(setting.label)
            source = f" {setting.published.source if setting.published else '-'} |" if own else ""
            lines.append(f"| {setting.label} | {_num(p['top1_err'], '.2f')} | {_num(p['top5_err'], '.2f')} | "
                         f"{_num(p['gflops'], '.2f')} | {_num(p['params_m'], '.1f')} |{source}")
    if own:
        lines += ["", "The published column is ImageNet with each source's own recipe; the "
                      f"`{profile.name}` profile compares how the settings rank and differ, not the absolute "
                      "errors."]
    elif sweep.table is not None and sweep.table not in profile.comparable_tables:
        lines += ["", "The published column is ImageNet with the paper's Sec. 6 recipe; the "
                      f"`{profile.name}` profile compares how the settings rank and differ, "
                      "not the absolute errors."]
    return "\n".join(lines) + "\n"


def note_digest(plan: Plan) -> str:
    """What NOTE_DIGEST holds once the note of `plan` is saved (with our table under it or not)."""
    return hashlib.sha1(study_note(plan).encode()).hexdigest()


def save_study_note(storage: optuna.storages.BaseStorage, study: optuna.Study, plan: Plan) -> None:
    """Attach (or update) the study's note and name its objective; a no-op when already current (so a
    rerun keeps the table analysis/dashboard.py wrote under it)."""
    body = study_note(plan)
    digest = note_digest(plan)
    study_id = storage.get_study_id_from_name(study.study_name)
    # Importing optuna_dashboard costs seconds (it pulls in scikit-learn); only pay when the note changed.
    if storage.get_study_system_attrs(study_id).get(NOTE_DIGEST) != digest:
        from optuna_dashboard import save_note

        save_note(study, body)
        storage.set_study_system_attr(study_id, NOTE_DIGEST, digest)
    if study.metric_names != [OBJECTIVE]:
        study.set_metric_names([OBJECTIVE])
