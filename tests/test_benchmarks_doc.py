"""BENCHMARKS.md is rendered from benchmarks/results.json, and rendering keeps its hand-written notes."""

from __future__ import annotations

import json
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import render_benchmarks  # noqa: E402


def test_the_measured_part_of_benchmarks_md_is_what_results_json_renders_to():
    text = (ROOT / "BENCHMARKS.md").read_text()
    measured = text.split(render_benchmarks.BEGIN, 1)[1].split(render_benchmarks.END, 1)[0]
    figures = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    assert measured.strip() == render_benchmarks.render(figures).strip()


def test_rendering_keeps_the_hand_written_notes_and_replaces_the_figures():
    previous = render_benchmarks.with_hand_written_part("old figures\n", None)
    previous = previous.replace("(none yet)", "SE's FCs read 10 MB of weights per image (89 -> 84 ms).")
    again = render_benchmarks.with_hand_written_part("new figures\n", previous)
    assert "new figures" in again and "old figures" not in again
    assert again.endswith("SE's FCs read 10 MB of weights per image (89 -> 84 ms).\n")
    assert again.count(render_benchmarks.BEGIN) == again.count(render_benchmarks.END) == 1
