"""The notebooks execute headless on a small results dir, and show exactly what `ablate table` prints."""

from __future__ import annotations

import shutil

import nbformat
import pytest
from helpers import PROFILE, make_results

from ablations.cli import main
from analysis.execute import INJECTED_TAG, execute_all, notebooks, with_results

TABLES = (10, 11, 12, 13, 14, 15, 16)


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_one_notebook_per_table_and_one_for_the_figures():
    names = [p.stem for p in notebooks()]
    assert sorted(n.split("_")[0] for n in names if n.startswith("table")) == [f"table{t}" for t in TABLES]
    assert "fig6_fig7_excitations" in names


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.stem)
def test_notebooks_hold_no_analysis_logic(path):
    """Cells call the analysis API; loops, conditionals and definitions belong in `analysis`."""
    nb = nbformat.read(path, as_version=4)
    assert "parameters" in _code(nb)[0].metadata.get("tags", [])
    for cell in _code(nb):
        for line in cell.source.splitlines():
            assert not line.lstrip().startswith(("def ", "for ", "while ", "class ", "if ", "lambda")), line
        assert not cell.get("outputs")  # committed without outputs: they would be stale results


@pytest.mark.slow
def test_execute_every_notebook_and_match_ablate_table(tmp_path, capsys):
    results = make_results(tmp_path / "results")
    run, skipped = with_results(results, PROFILE, None)  # ratio and squeeze have results, no other table
    assert sorted(p.stem for p in skipped) == [p.stem for p in notebooks()
                                               if p.stem.startswith("table") and p.stem[5:7] not in ("10", "11")]
    executed = execute_all(results, PROFILE, None, paths=run)
    assert [e.error for e in executed] == [None] * len(run) and len(run) == 3
    out = {e.source.stem: nbformat.read(e.output, as_version=4) for e in executed}
    assert all(e.output.parent == results / PROFILE / "notebooks" for e in executed)

    for name, nb in out.items():
        injected = [c for c in nb.cells if INJECTED_TAG in c.metadata.get("tags", [])]
        assert len(injected) == 1 and str(results.resolve()) in injected[0].source
        errors = [o for c in _code(nb) for o in c.outputs if o.output_type == "error"]
        assert errors == [], name

    # The notebook's printed table is byte-for-byte what `ablate table ratio` prints.
    printed = "".join(o.text for c in _code(out["table10_ratio"]) for o in c.outputs
                      if o.output_type == "stream" and o.name == "stdout")
    assert main(["table", "ratio", "--results-dir", str(results), "--profile", PROFILE]) == 0
    assert printed == capsys.readouterr().out
    assert "| r=16 | 3 |" in printed
    # ... and the CSV the notebook wrote is `ablate table --format csv`.
    assert main(["table", "ratio", "--results-dir", str(results), "--format", "csv"]) == 0
    assert (results / PROFILE / "tables" / "table10.csv").read_text() == capsys.readouterr().out
    assert not (results / PROFILE / "tables" / "table13.md").exists()  # no empty table written
    # load_trials, the entry point a researcher adapts, shows every trial of the sweep.
    frames = [o["data"]["text/plain"] for c in _code(out["table10_ratio"]) for o in c.outputs
              if "text/html" in o.get("data", {}) and "train_seconds" in o["data"]["text/plain"]]
    assert len(frames) == 1 and "RUNNING" in frames[0] and "FAIL" in frames[0]

    figs = out["fig6_fig7_excitations"]
    images = [o for c in _code(figs) for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # Fig. 6, Fig. 7, class specificity
    tables = [o["data"]["text/plain"] for c in _code(figs) for o in c.outputs
              if "text/html" in o.get("data", {})]
    assert len(tables) == 2 and "class_spread" in tables[1] and "SE_5_3" in tables[0]
    assert (results / PROFILE / "figures" / "fig_class_specificity.png").is_file()
    assert (results / PROFILE / "figures" / "fig6_excitations.png").is_file()
    assert (results / PROFILE / "figures" / "fig7_excitation_spread.pdf").is_file()
    plots = [o for c in _code(out["table11_squeeze"]) for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(plots) == 2  # the table's plot and the one to adapt


def test_a_failing_notebook_is_reported_and_its_copy_kept(tmp_path):
    broken = tmp_path / "broken.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise RuntimeError('boom')")])
    nbformat.write(nb, broken)
    (done,) = execute_all(tmp_path, PROFILE, None, paths=[broken])
    assert done.error is not None and "boom" in done.error
    kept = nbformat.read(done.output, as_version=4)
    assert any(o.output_type == "error" for o in kept.cells[-1].outputs)


@pytest.mark.slow
def test_cli_notebooks_exit_status(tmp_path, capsys, monkeypatch):
    import analysis.execute as ex

    results = tmp_path / "results"
    shutil.copytree(make_results(tmp_path / "src"), results)
    broken = tmp_path / "broken.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1/0")]), broken)
    monkeypatch.setattr(ex, "notebooks", lambda: [broken])
    assert main(["notebooks", "--results-dir", str(results)]) == 1
    assert "broken.ipynb: FAILED" in capsys.readouterr().out
