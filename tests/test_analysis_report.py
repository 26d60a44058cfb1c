"""The HTML report is one self-contained file holding every table and figure."""

from __future__ import annotations

import base64
import io
import re

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from helpers import PROFILE  # noqa: E402
from PIL import Image  # noqa: E402

pytestmark = pytest.mark.slow  # the report writes every table and figure first


@pytest.fixture(scope="module")
def report(built_report):
    return built_report


def test_report_is_self_contained(report):
    _, html = report
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html and "<script" not in html  # nothing fetched when opened offline
    for s in srcs:
        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as img:
            assert img.format == "PNG" and img.size[0] > 600


def test_report_has_every_table_figure_definition_and_environment(report):
    results, html = report
    assert html.count('<figure class="table"') == 2  # the two tables with results
    for needle in ("Table 10 (ratio, profile quick)", "Table 11 (squeeze, profile quick)",
                   'alt="fig6_excitations"', 'alt="fig7_excitation_spread"', 'alt="table10_top1"',
                   'alt="fig_class_specificity"',
                   'alt="fig4_training_ratio"', "RuntimeError: out of memory",  # failed trials listed
                   "reference: original", "reduction: 16",  # sweep YAML
                   "dataset: digits",  # profile YAML
                   "abc1234", "optuna", "python"):  # code version the trials ran, versions here
        assert needle in html, needle
    # Everything embedded was also written as files.
    assert (results / PROFILE / "tables" / "table10.html").is_file()
    assert (results / PROFILE / "figures" / "fig6_excitations.pdf").is_file()
