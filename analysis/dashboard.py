"""What optuna-dashboard shows of a sweep, so that it reads as an ablation rather than an optimisation:
the study note with our table beside the paper's (refreshed as trials complete), a note on every trial
naming its setting and seed, and the table as a Plotly figure (per-seed errors per setting, mean and CI).

The dashboard's own "Best Trial" and hyper-parameter importance treat seeds as something to optimise; the
note says what they are worth. Run by `ablate run` / `ablate worker` as each trial ends (progress.py).
"""

from __future__ import annotations

from pathlib import Path

import optuna

from ablations.grid import Plan
from ablations.study_notes import NOTE_DIGEST, note_digest, study_note
from analysis.render import display_frame
from analysis.tables import Table, load_table

PLOT_ID = "ablation-table"  # the figure's id: saved again under it, never a second copy
OURS = ("setting", "n", "top-1 err", "Δ top-1 [95% CI]", "p (Holm)", "verdict", "params", "FLOPs (MACs)",
        "paper top-1", "paper params", "paper FLOPs")
BEST_TRIAL = ("The dashboard's **Best Trial** is the single luckiest seed and its **hyper-parameter "
              "importance** splits the spread between `setting` and `seed`: neither says whether settings "
              "differ. The table above does (Δ, its CI and the Holm-adjusted test).")


def ours_markdown(table: Table) -> str:
    """Our table as Markdown: mean ± std over seeds, Δ with its CI, Holm p, verdict, the paper's columns."""
    if not table.has_results:
        return "### Ours\n\nNo trial has completed yet.\n"
    df = display_frame(table)
    df = df[[c for c in OURS if c in df.columns]]
    head = "| " + " | ".join(df.columns) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(df.columns))) + "|"
    body = ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in df.astype(str).values.tolist()]
    return "\n".join([f"### Ours ({table.profile} profile; errors in %, mean ± std over seeds)", "", head, align,
                      *body, "", BEST_TRIAL]) + "\n"


def table_figure(table: Table):
    """Per-seed top-1 errors of every setting (one dot per seed, hover names it), each row's mean with
    its 95% CI, and the reference's mean as a line: what the table's Δ and verdict summarise."""
    import plotly.graph_objects as go

    # Plain lists throughout: plotly encodes numpy arrays as base64 typed arrays, which older plotly.js
    # (the one a dashboard bundles) does not read.
    rows, runs = table.rows, table.runs
    fig = go.Figure()
    for _, r in rows.iterrows():
        mine = runs[runs["setting"] == r["setting"]].sort_values("seed")
        fig.add_trace(go.Scatter(
            x=[r["setting"]] * len(mine), y=mine["top1_err"].tolist(), mode="markers", name=r["setting"],
            text=[f"seed {int(s)}" for s in mine["seed"]], hovertemplate="%{x} %{text}: %{y:.2f}%<extra></extra>",
            marker={"size": 10, "opacity": 0.8}, showlegend=False))
    fig.add_trace(go.Scatter(
        x=rows["setting"].tolist(), y=rows["top1_mean"].tolist(), mode="markers", name="mean, 95% CI",
        marker={"symbol": "line-ew-open", "size": 24, "color": "black", "line": {"width": 2}},
        error_y={"type": "data", "symmetric": False, "array": (rows["top1_ci_high"] - rows["top1_mean"]).tolist(),
                 "arrayminus": (rows["top1_mean"] - rows["top1_ci_low"]).tolist(), "color": "black"}))
    ref = rows[rows["reference"]]
    if len(ref) and ref["n"].iloc[0] > 0:
        fig.add_hline(y=float(ref["top1_mean"].iloc[0]), line_dash="dot", annotation_position="bottom left",
                      annotation_text=f"{ref['setting'].iloc[0]} (reference) mean")
    fig.update_layout(title=f"{table.title}: top-1 error per seed", xaxis_title="setting", legend={"y": -0.25},
                      yaxis_title="top-1 error (%)", template="plotly_white")
    return fig


def trial_note(label: str, seed: int, *, run_dir: str | None = None, value: float | None = None,
               state: str = "RUNNING") -> str:
    lines = [f"## {label}, seed {seed}", "", f"- **State**: {state}"
             + (f"; top-1 error {value:.2f}%" if value is not None else "")]
    if run_dir:
        lines.append(f"- **Run directory**: `{run_dir}`")
    lines += ["", "One seed of one setting: compare settings in the study's table (the study note), "
                  "not trial by trial."]
    return "\n".join(lines) + "\n"


def save_trial_note(study: optuna.Study, number: int, label: str, seed: int, **kw) -> None:
    from optuna_dashboard import save_note

    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    save_note(optuna.trial.Trial(study, trial._trial_id), trial_note(label, seed, **kw))


def refresh(storage: optuna.storages.BaseStorage, study: optuna.Study, plan: Plan, results_dir: Path,
            url: str) -> Table:
    """Save the study note (the paper's numbers and ours) and the table's figure; returns the table
    (built once, so the caller prints the same one)."""
    from optuna_dashboard import save_note, save_plotly_graph_object

    table = load_table(results_dir, url, plan.sweep, plan.profile.name)
    save_note(study, study_note(plan) + "\n" + ours_markdown(table))
    study_id = storage.get_study_id_from_name(study.study_name)
    storage.set_study_system_attr(study_id, NOTE_DIGEST, note_digest(plan))  # current: a rerun keeps it
    if table.has_results:
        save_plotly_graph_object(study, table_figure(table), graph_object_id=PLOT_ID)
    return table
