"""One self-contained HTML report per profile: every table and figure (PNG embedded as base64), the sweep
and profile definitions, failed trials, and the environment the trials ran in and the report was made in.

It writes the tables and figures first (the same files `make tables figures` writes) and embeds those
files, so the report can never disagree with them.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ablations import rundir, storage_url
from ablations.atomic import write_atomic
from ablations.spec import PROFILES_DIR
from ablations.storage_url import shown
from ablations.units import DASH
from analysis import load
from analysis.figures import figures_dir, write_figures
from analysis.render import render
from analysis.table_files import write_all_tables
from analysis.tables import Table

PACKAGES = ("torch", "timm", "optuna", "numpy", "pandas", "scipy", "matplotlib", "seaborn", "pydantic")
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 12.5px; margin: 0.5em 0; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e3e3e3; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
thead th { border-bottom: 2px solid #999; background: #f6f6f6; }
figcaption { font-size: 13px; color: #444; max-width: 1100px; margin-bottom: 0.4em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 12px; }
ul.missing { color: #a33; font-size: 13px; }
nav a { margin-right: 1em; }
.table-scroll { overflow-x: auto; max-width: 100%; }
.table-scroll th:first-child, .table-scroll td:first-child { position: sticky; left: 0; background: #fff;
  box-shadow: 1px 0 0 #ccc; }
.table-scroll thead th:first-child { background: #f6f6f6; }
"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text)}</pre>"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _kv_table(pairs: dict[str, str]) -> str:
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs.items())
    return f"<table>{rows}</table>"


def _trial_environment(results_dir: Path, trials: pd.DataFrame) -> str:
    """Where each sweep's trials ran: devices, code versions, and one resolved run config."""
    done = load.completed(trials)
    parts = []
    for sweep, runs in done.groupby("sweep", sort=True):
        devices = ", ".join(sorted({str(d) for d in runs["device"].dropna()})) or "unknown"
        commits = ", ".join(sorted({str(c) for c in runs["git_commit"].dropna()})) or "unknown"
        parts.append(f"<h3>{html.escape(str(sweep))}</h3>"
                     + _kv_table({"devices": devices, "git commits": commits,
                                  "completed trials": str(len(runs)),
                                  "train time (sum)": f"{runs['train_seconds'].sum() / 60:.1f} min"}))
        first = runs.sort_values(["setting", "seed"]).iloc[0]
        run_dir = load.locate_run_dir(results_dir, first)
        final = rundir.read_final(run_dir)
        if final is not None:  # the trainer's own record of its software
            parts.append(f"<p>Software of {html.escape(str(first['setting']))} seed {int(first['seed'])}:</p>"
                         + _kv_table({str(k): str(v) for k, v in final.versions.items()}))
        config = run_dir / rundir.CONFIG
        if config.is_file():
            parts.append(f"<p>Resolved configuration of {html.escape(str(first['setting']))} seed "
                         f"{int(first['seed'])} (<code>config.yaml</code>):</p>" + _pre(config.read_text()))
    return "\n".join(parts)


def _failures(trials: pd.DataFrame) -> str:
    failed = trials[trials["state"] == "FAIL"]
    if failed.empty:
        return "<p>No failed trials.</p>"
    view = failed[["sweep", "setting", "seed", "trial_number", "fail_reason"]].fillna("")
    return view.to_html(index=False, border=0)


RUN_COLUMNS = {"setting": "setting", "seed": "seed", "state": "state", "top1_err": "top-1 err (%)",
               "epochs": "epochs", "train_seconds": "time (s)", "images_per_s": "images/s"}


def _runs(results_dir: Path, profile: str, trials: pd.DataFrame) -> str:
    """Every trial of every sweep, one row each, linking its run directory (relative to the report, so
    the results dir can move): what a reader opens to see one seed's curves, config and checkpoint."""
    if trials.empty:
        return "<p>No trials.</p>"
    here = rundir.report_file(results_dir, profile).parent
    parts = []
    for sweep, runs in trials.sort_values(["sweep", "setting", "seed"]).groupby("sweep", sort=True):
        head = "".join(f"<th>{html.escape(c)}</th>" for c in [*RUN_COLUMNS.values(), "run directory"])
        rows = []
        for _, r in runs.iterrows():
            cells = [_run_cell(k, r[k]) for k in RUN_COLUMNS]
            d = load.locate_run_dir(results_dir, r)
            link = (f'<a href="{html.escape(os.path.relpath(d, here))}/">{html.escape(d.name)}</a>' if d.is_dir()
                    else DASH)
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in [*cells, link]) + "</tr>")
        parts.append(f"<h3>{html.escape(str(sweep))}</h3><div class='table-scroll'><table class='runs'>"
                     f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")
    return "\n".join(parts)


def _run_cell(key: str, value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return DASH
    if key == "top1_err":
        return f"{value:.2f}"
    if key in ("train_seconds", "images_per_s", "epochs"):
        return f"{float(value):,.0f}"
    return html.escape(str(value))


def _table_section(table: Table, fig_dir: Path) -> str:
    # The section's id differs from the table's own (render's <figure id=stem>): ids are unique.
    parts = [f'<h2 id="section-{table.stem}">{html.escape(table.title)}</h2>', render(table, "html")]
    for name in (f"{table.stem}_top1", f"{table.stem}_edf", f"fig4_training_{table.sweep.name}"):
        png = fig_dir / f"{name}.png"
        if png.is_file():
            parts.append(_img(png, name))
    if table.sweep.path and Path(table.sweep.path).is_file():
        parts.append(f"<details><summary>Sweep definition <code>{html.escape(Path(table.sweep.path).name)}"
                     f"</code></summary>{_pre(Path(table.sweep.path).read_text())}</details>")
    return "\n".join(parts)


def build_report(results_dir: str | Path, storage: str | None, profile: str) -> str:
    """The report's HTML (writes the tables and figures it embeds)."""
    results_dir = Path(results_dir)
    tables = write_all_tables(results_dir, storage, profile)
    write_figures(results_dir, storage, profile)
    fig_dir = figures_dir(results_dir, profile)
    trials = load.load_trials(results_dir, storage, profile=profile)

    counts = trials["state"].value_counts().to_dict()
    nav = " ".join(f'<a href="#section-{t.stem}">{html.escape(t.title.split(" (")[0])}</a>' for t in tables)
    body = [
        f"<h1>SE ablations: profile {html.escape(profile)}</h1>",
        f"<p>Results: <code>{html.escape(str(results_dir.resolve()))}</code>; storage: "
        f"<code>{html.escape(shown(storage_url.existing(results_dir, storage)))}</code>; generated "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}. Trials: "
        + ", ".join(f"{n} {html.escape(str(s))}" for s, n in sorted(counts.items())) + ".</p>",
        f"<nav>{nav} <a href='#excitations'>Fig. 6/7, class specificity</a> "
        "<a href='#runs'>Runs</a> <a href='#environment'>Environment</a></nav>",
        *(_table_section(t, fig_dir) for t in tables),
        '<h2 id="excitations">Fig. 6 and 7: excitations; class specificity by depth</h2>',
    ]
    for name, caption in (("fig6_excitations", "Fig. 6: mean excitation per channel for four classes and "
                           "the image-weighted average over all classes, on 50 sampled channels per block."),
                          ("fig7_excitation_spread", "Fig. 7: mean ± std of the excitation over the images of "
                           "one class."),
                          ("fig_class_specificity", "Class specificity by depth (Sec. 7.2): per SE block, the "
                           "std across classes of the class-mean gate (mean over channels) and the mean "
                           "|class-mean gate − 0.5|; thin lines are seeds, the thick line their mean. The "
                           "paper reports nearly class-agnostic gates early (SE_2_3), increasingly "
                           "class-specific ones with depth (SE_4_6, SE_5_1) and saturation at SE_5_2.")):
        png = fig_dir / f"{name}.png"
        body.append(f"<figure><figcaption>{caption}</figcaption>{_img(png, name)}</figure>" if png.is_file()
                    else f"<p>{name}: no completed run with SE excitations.</p>")
    body += ["<h2>Failed trials</h2>", _failures(trials),
             '<h2 id="runs">Runs</h2>', _runs(results_dir, profile, trials)]
    profile_yaml = PROFILES_DIR / f"{profile}.yaml"
    body += ['<h2 id="environment">Environment</h2>', "<h3>Profile</h3>",
             _pre(profile_yaml.read_text()) if profile_yaml.is_file() else "<p>(profile file not found)</p>",
             _trial_environment(results_dir, trials),
             "<h3>This report was made with</h3>",
             _kv_table({"analysis git commit": rundir.git_commit(short=True) or "unknown", **_versions()})]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>SE ablations: {html.escape(profile)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(results_dir: str | Path, storage: str | None, profile: str) -> Path:
    """<results>/<profile>/report.html."""
    return write_atomic(rundir.report_file(results_dir, profile), build_report(results_dir, storage, profile))
