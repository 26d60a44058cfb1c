"""A `Table` as text: Markdown, CSV, LaTeX, HTML and a fixed-width terminal form.

All human-readable forms share one cell formatting (`display_frame`), so the Markdown a notebook shows
and the one `ablate table` prints are the same string. CSV keeps the numbers unformatted.
"""

from __future__ import annotations

import html
import math
import re

import pandas as pd

from analysis.tables import Table

DASH = "—"


def _num(x: float, digits: int = 2) -> str:
    return DASH if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _sig(x: float | None) -> str:
    """3 significant digits: 28.1 M params on ImageNet and 0.372 M on the quick profile both read well."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:#.3g}".rstrip(".")  # '#' keeps 0.380 aligned with 0.419; rstrip turns "100." into "100"


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return DASH
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _ci(low: float, high: float) -> str:
    return DASH if math.isnan(low) else f"[{low:.2f}, {high:.2f}]"


def _delta(d: float) -> str:
    return DASH if math.isnan(d) else f"{d:+.2f}"


def _p(p: float) -> str:
    if math.isnan(p):
        return DASH
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _rate(x: float) -> str:
    return DASH if math.isnan(x) else f"{x:,.0f}"


def display_frame(table: Table) -> pd.DataFrame:
    """Formatted cells with the paper's column names (errors in %, params in M, GFLOPs = GMACs)."""
    r = table.rows
    label = [f"{s} (ref)" if ref else s for s, ref in zip(r["setting"], r["reference"])]
    return pd.DataFrame({
        "setting": label,
        "n": r["n"].astype(str),
        "top-1 err": [_pm(m, s) for m, s in zip(r["top1_mean"], r["top1_std"])],
        "top-1 95% CI": [_ci(lo, hi) for lo, hi in zip(r["top1_ci_low"], r["top1_ci_high"])],
        "Δ top-1": r["d_top1"].map(_delta),
        "p (top-1)": r["p_top1"].map(_p),
        "top-5 err": [_pm(m, s) for m, s in zip(r["top5_mean"], r["top5_std"])],
        "Δ top-5": r["d_top5"].map(_delta),
        "p (top-5)": r["p_top5"].map(_p),
        "params (M)": r["params_m"].map(_sig),
        "GFLOPs": r["gflops"].map(_sig),
        "images/s": r["images_per_s"].map(_rate),
        "paper top-1": r["paper_top1"].map(_num),
        "paper top-5": r["paper_top5"].map(_num),
        "paper params (M)": r["paper_params_m"].map(lambda x: _num(x, 1)),
        "paper GFLOPs": r["paper_gflops"].map(_num),
    })


def caption(table: Table) -> str:
    ref = f" Δ and Welch's t-test p are against {table.sweep.reference!r}." if table.sweep.reference else ""
    return (f"{table.title}. {table.sweep.description} Errors in %, mean ± sample std over seeds, "
            f"95% CI from Student's t.{ref} GFLOPs are multiply-accumulates.").replace("  ", " ").strip()


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
    return (text.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace(DASH, "--")
            .replace("<0.001", r"$<$0.001"))


def _tex_cell(text: str) -> str:
    # A minus sign, not a hyphen, in front of negative numbers (deltas).
    return re.sub(r"^-(?=\d)", "$-$", _tex(text))


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
    lines += [rf"\par\footnotesize {_tex(n)}" for n in notes(table)]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def _html(table: Table) -> str:
    df = display_frame(table)
    body = df.to_html(index=False, escape=True, border=0, classes="ablation-table")
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes(table))
    return (f'<figure class="table" id="{html.escape(table.stem)}">\n'
            f"<figcaption>{html.escape(caption(table))}</figcaption>\n{body}\n"
            + (f'<ul class="missing">{items}</ul>\n' if items else "") + "</figure>\n")


def _text(table: Table) -> str:
    """Compact fixed-width form for a terminal: the paper's columns without the test statistics."""
    df = display_frame(table)[["setting", "n", "top-1 err", "top-5 err", "params (M)", "GFLOPs",
                               "paper top-1", "paper top-5", "paper params (M)", "paper GFLOPs"]]
    lines = [table.title, df.to_string(index=False), *notes(table)]
    return "\n".join(lines) + "\n"


RENDERERS = {"md": _markdown, "csv": _csv, "latex": _latex, "html": _html, "text": _text}


def render(table: Table, fmt: str) -> str:
    return RENDERERS[fmt](table)
