"""A `Table` as text: Markdown, CSV, LaTeX, HTML and a fixed-width terminal form.

All human-readable forms share one cell formatting (`display_frame`) and the same lines under the table
(`stat_notes`: the test behind Δ/p/MDE/verdict, and whether the published column is comparable), so the
Markdown a notebook shows and the one `ablate table` prints are the same string. CSV keeps the numbers
unformatted.
"""

from __future__ import annotations

import html
import math
import re

import pandas as pd

from ablations.units import DASH, macs_text, params_text
from analysis import stats
from analysis.tables import Table


def _num(x: float, digits: int = 2) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return DASH
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _ci(low: float, high: float) -> str:
    return DASH if math.isnan(low) else f"[{low:.2f}, {high:.2f}]"


def _delta(d: float, low: float = math.nan, high: float = math.nan) -> str:
    """`+0.31 [-0.52, +1.14]`; the bracket only where the CI is defined."""
    if math.isnan(d):
        return DASH
    return f"{d:+.2f}" if math.isnan(low) else f"{d:+.2f} [{low:+.2f}, {high:+.2f}]"


def _p(p: float) -> str:
    if math.isnan(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _rate(x: float) -> str:
    return DASH if math.isnan(x) else f"{x:,.0f}"


def _tests(r: pd.DataFrame, key: str, suffix: str) -> dict[str, list[str] | pd.Series]:
    """Δ [CI], p, Holm-adjusted p and MDE of one metric (`key`: top1 | top5); `suffix` names top-5's."""
    name = f"top-{key[-1]}"
    return {
        f"Δ {name} [95% CI]": [_delta(d, lo, hi) for d, lo, hi in
                               zip(r[f"d_{key}"], r[f"d_{key}_ci_low"], r[f"d_{key}_ci_high"])],
        f"p{suffix}": r[f"p_{key}"].map(_p),
        f"p{suffix} (Holm)": r[f"p_{key}_adj"].map(_p),
        f"MDE{suffix}": r[f"mde_{key}"].map(_num),
    }


def display_frame(table: Table) -> pd.DataFrame:
    """Formatted cells with the paper's column names: errors in %; params and FLOPs (the paper's
    "GFLOPs": multiply-accumulates) in units that scale, 28.1 M and 430 k, 3.87 G and 5.46 M."""
    r, top5 = table.rows, table.show_top5
    label = [f"{s} (ref)" if ref else s for s, ref in zip(r["setting"], r["reference"])]
    cells: dict[str, pd.Series | list[str]] = {
        "setting": label,
        "n": r["n"].astype(str),
        "top-1 err": [_pm(m, s) for m, s in zip(r["top1_mean"], r["top1_std"])],
        "top-1 95% CI": [_ci(lo, hi) for lo, hi in zip(r["top1_ci_low"], r["top1_ci_high"])],
    }
    if top5:
        cells["top-5 err"] = [_pm(m, s) for m, s in zip(r["top5_mean"], r["top5_std"])]
    cells.update(_tests(r, "top1", ""))
    cells["verdict"] = r["verdict"].fillna("")
    if top5:
        cells.update(_tests(r, "top5", " top-5"))
    cells.update({
        "params": r["params_m"].map(params_text),
        "FLOPs (MACs)": r["gflops"].map(macs_text),
        "images/s": r["images_per_s"].map(_rate),
        "paper top-1": r["paper_top1"].map(_num),
    })
    if top5:
        cells["paper top-5"] = r["paper_top5"].map(_num)
    cells["paper params"] = r["paper_params_m"].map(params_text)
    cells["paper FLOPs"] = r["paper_gflops"].map(macs_text)
    return pd.DataFrame(cells)


def caption(table: Table) -> str:
    return (f"{table.title}. {table.sweep.description} Errors in %, mean ± sample std over seeds, "
            "95% CI from Student's t. FLOPs are multiply-accumulates, as the paper's GFLOPs.").replace("  ", " ").strip()


def _range(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def test_note(table: Table) -> str | None:
    """The test behind Δ, p, p (Holm), MDE and verdict, in one line (None without a reference row)."""
    ref = table.sweep.reference
    if ref is None:
        return None
    tested = [c for c in table.comparisons.values() if c.enough_seeds]
    if table.paired:
        how = (f"paired t-test on the per-seed differences, over the seeds each row shares with it "
               f"(n = {_range([c.n for c in tested])} pairs)" if tested else "paired t-test over shared seeds")
    else:
        how = (f"Welch's unpaired t-test (n = {_range([c.n for c in tested])} runs vs {tested[0].n_ref})"
               if tested else "Welch's unpaired t-test")
    k1 = int(table.rows["p_top1"].notna().sum())
    family = f"Holm over k = {k1} top-1 comparison{'s' if k1 != 1 else ''}"
    if table.show_top5:
        k5 = int(table.rows["p_top5"].notna().sum())
        family += f" (top-5: its own family, k = {k5})"
    corr = table.seed_correlation()
    evidence = ("" if corr is None or math.isnan(corr.mean)
                else f" Seed-to-seed correlation with the reference: mean r = {corr.mean:.2f}.")
    return (f"Δ = row − {ref!r} (points of error) with its 95% CI; {how}; two-sided, "
            f"alpha = {stats.ALPHA:g}; p (Holm): {family}. MDE: the smallest |Δ| these seeds detect with "
            f"{stats.POWER:.0%} power at the observed spread. Verdict better/worse only where p (Holm) < "
            f"{stats.ALPHA:g}; '{stats.TOO_FEW_SEEDS}': fewer than 2 {'pairs' if table.paired else 'runs a side'}."
            + evidence)


def stat_notes(table: Table) -> list[str]:
    """The lines under every form of the table: the test, and the recipe caveat where it applies."""
    return [line for line in (test_note(table), table.recipe_note) if line]


def notes(table: Table) -> list[str]:
    """One line per setting with missing seeds, plus results the sweep file no longer names."""
    out = []
    grouped: dict[str, dict[str, list[int]]] = {}  # setting -> why -> seeds, in table order
    for m in table.missing:
        grouped.setdefault(m.setting, {}).setdefault(m.why, []).append(m.seed)
    for setting, reasons in grouped.items():
        items = [f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} ({why})"
                 for why, seeds in reasons.items()]
        out.append(f"missing: {setting}: {'; '.join(items)}")
    if table.unknown_settings:
        out.append(f"results for settings not in the sweep file (not shown): {', '.join(table.unknown_settings)}")
    if not table.has_results:
        out.insert(0, "no completed trials yet")
    return out


def _markdown(table: Table) -> str:
    df = display_frame(table)
    cells = [[c.replace("|", "\\|") for c in row] for row in df.astype(str).values.tolist()]
    head = "| " + " | ".join(df.columns) + " |"
    align = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(df.columns))) + "|"
    body = ["| " + " | ".join(row) + " |" for row in cells]
    lines = [f"**{table.title}**", "", head, align, *body, "", caption(table)]
    for line in stat_notes(table):
        lines += ["", line]
    extra = notes(table)
    if extra:
        lines += ["", *[f"- {n}" for n in extra]]
    return "\n".join(lines) + "\n"


def _csv(table: Table) -> str:
    # %.6g keeps every digit a reader could want while avoiding 22.280000000000001 float noise.
    return table.rows.to_csv(index=False, float_format="%.6g", lineterminator="\n")


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def _tex(text: str) -> str:
    text = re.sub(r"[&%$#_{}~^\\]", lambda m: _LATEX_ESCAPES[m.group()], text)
    return (text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("−", "$-$").replace(DASH, "--")
            .replace("<0.001", r"$<$0.001"))


def _tex_cell(text: str) -> str:
    # A minus sign, not a hyphen, in front of negative numbers (deltas and their CI bounds).
    return re.sub(r"(?<![\w.])-(?=\d)", "$-$", _tex(text))


def _latex(table: Table) -> str:
    df = display_frame(table)
    cols = "l" + "r" * (len(df.columns) - 1)
    lines = [
        r"% requires \usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        r"\scriptsize",
        rf"\caption{{{_tex(caption(table))}}}",
        rf"\label{{tab:{table.stem}-{table.profile}}}",
        rf"\begin{{tabular}}{{{cols}}}",
        r"\toprule",
        " & ".join(_tex(c) for c in df.columns) + r" \\",
        r"\midrule",
        *(" & ".join(_tex_cell(c) for c in row) + r" \\" for row in df.astype(str).values.tolist()),
        r"\bottomrule",
        r"\end{tabular}",
    ]
    lines += [rf"\par\footnotesize {_tex(n)}" for n in (*stat_notes(table), *notes(table))]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _html(table: Table) -> str:
    df = display_frame(table)
    body = df.to_html(index=False, escape=True, border=0, classes="ablation-table")
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(table))
    paragraphs = "".join(f'<p class="stats-note">{html.escape(n)}</p>\n' for n in stat_notes(table))
    # A wide table scrolls inside its box (the setting column stays in view), not the whole page.
    return (f'<figure class="table" id="{html.escape(table.stem)}">\n'
            f'<figcaption>{html.escape(caption(table))}</figcaption>\n<div class="table-scroll">{body}</div>\n'
            f"{paragraphs}"
            + (f'<ul class="missing">{items}</ul>\n' if items else "") + "</figure>\n")


def _text(table: Table) -> str:
    """Fixed-width form for a terminal: errors, the top-1 test, complexity and the paper's columns
    (top-5's tests and the CI of the mean stay in the files)."""
    df = display_frame(table).drop(columns=["top-1 95% CI", "images/s", "Δ top-5 [95% CI]", "p top-5",
                                            "p top-5 (Holm)", "MDE top-5"], errors="ignore")
    lines = [table.title, df.to_string(index=False), *stat_notes(table), *notes(table)]
    return "\n".join(lines) + "\n"


RENDERERS = {"md": _markdown, "csv": _csv, "latex": _latex, "html": _html, "text": _text}


def render(table: Table, fmt: str) -> str:
    return RENDERERS[fmt](table)
