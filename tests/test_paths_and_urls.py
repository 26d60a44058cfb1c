"""Security: nothing a sweep names escapes --results-dir, and no storage password reaches people.

The end-to-end search for a known password in everything printed or written is tests/test_no_leaks.py
(it needs a PostgreSQL server); here are the pieces it rests on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import FAKE, make_plans, url_of

from ablations import cli, rundir, storage_url, supervisor
from ablations.errors import SpecError
from ablations.spec import load_sweep

HOSTILE_LABELS = ["..", ".", "../../x", "/abs/y", "-rf", "табл1"]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def _one_line(rc: int, err: str, *expected: str) -> None:
    assert rc == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# Names and labels


@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", "a/b", "tables", "9lives", "a-b", ""])
def test_a_sweep_name_that_is_no_identifier_is_refused_before_anything_is_created(name, tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": name, "settings": [{"label": "a"}]}))
    before = files_under(tmp_path)
    rc, err = _cli(capsys, "run", sweep, "--results-dir", tmp_path / "results")
    _one_line(rc, err, f"{sweep}: name: sweep name")
    assert files_under(tmp_path) == before and not (tmp_path / "results").exists()


@pytest.mark.parametrize("name", ["../p", "/tmp/p", "launch"])
def test_a_profile_name_that_is_no_identifier_is_refused(name, tmp_path, capsys):
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": name}))
    rc, err = _cli(capsys, "run", "ratio", "--profile", profile, "--results-dir", tmp_path / "results")
    _one_line(rc, err, f"{profile}: name: profile name")
    assert not (tmp_path / "results").exists()


def test_hostile_labels_train_inside_their_sweep_directory(tmp_path):
    sweep = tmp_path / "hostile.yaml"
    sweep.write_text(yaml.safe_dump({"seeds": 1, "settings": [{"label": x, "se": False} for x in HOSTILE_LABELS]}))
    results = tmp_path / "results"
    plans = make_plans(sweep)
    before = files_under(tmp_path)
    assert supervisor.run(plans, url_of(results), results, ["cpu"], 1, trainer=FAKE, bars=False) == 0
    written = files_under(tmp_path) - before
    assert written and all(results in p.parents for p in written)
    sweep_dir = results / "quick" / "hostile"
    run_dirs = sorted(p.parent for p in written if p.name == "final.json")
    assert len(run_dirs) == len(HOSTILE_LABELS)
    assert all(d.parent.parent == sweep_dir and d.name == "seed0" for d in run_dirs)
    assert len({d.parent.name for d in run_dirs}) == len(HOSTILE_LABELS)  # one directory each
    assert {rundir.label_dir(x) for x in HOSTILE_LABELS} == {d.parent.name for d in run_dirs}


@pytest.mark.parametrize(("label", "directory"), [
    ("..", "__"), (".", "_"), ("r=16", "r=16"), ("SE-PRE", "SE-PRE"), ("a b/c", "a_b_c"), ("-x", "_x"),
    ("table.md", "table.md_"), ("", "_"),
])
def test_label_directories(label, directory):
    assert rundir.label_dir(label) == directory


@pytest.mark.parametrize("labels", [["a/b", "a_b"], ["SE", "se"], ["..", "__"]])
def test_labels_sharing_a_directory_are_refused(labels, tmp_path):
    sweep = tmp_path / "clash.yaml"
    sweep.write_text(yaml.safe_dump({"settings": [{"label": x} for x in labels]}))
    with pytest.raises(SpecError, match="map to the same directory name"):
        load_sweep(sweep)


def test_over_long_labels_are_refused_with_the_limit(tmp_path, capsys):
    sweep = tmp_path / "long.yaml"
    sweep.write_text(yaml.safe_dump({"settings": [{"label": "x" * 300}]}))
    rc, err = _cli(capsys, "run", sweep, "--results-dir", tmp_path / "results")
    _one_line(rc, err, "settings[0].label: label is 300 characters long; at most 100")
    assert not (tmp_path / "results").exists()
    sweep.write_text(yaml.safe_dump({"settings": [{"label": "x" * rundir.MAX_LABEL}]}))
    assert load_sweep(sweep).settings[0].slug == "x" * rundir.MAX_LABEL


def test_every_path_helper_stays_inside_the_results_dir(tmp_path):
    r = tmp_path / "results"
    for made in (rundir.run_dir(r, "quick", "ratio", "../../..", 0), rundir.sweep_dir(r, "quick", "ratio"),
                 rundir.analysis_dir(r, "quick", "tables"), rundir.report_file(r, "quick"),
                 rundir.launch_dir(r), rundir.storage_file(r)):
        assert r in made.parents
    for bad in (lambda: rundir.run_dir(r, "quick", "../x", "a", 0), lambda: rundir.profile_dir(r, "/etc"),
                lambda: rundir.run_dir(r, "quick", "ratio", "a", -1), lambda: rundir._inside(r, "..", "x")):
        with pytest.raises(SpecError):
            bad()


# ---------------------------------------------------------------------------------------------------
# Storage URLs as people see them


@pytest.mark.parametrize("url", [
    "postgresql://ablate:s3cret@db:5432/sweeps",
    "postgresql+psycopg2://ablate:s3cret@db/sweeps",
    "postgresql://ablate:s3cret@db:notaport/sweeps",  # SQLAlchemy cannot parse it
    "postgresql://ablate:p@ss:s3cret@db/sweeps",  # nor this
    "postgresql://db/sweeps?user=ablate&password=s3cret",
    "postgresql://db/sweeps?sslmode=require&PASSWORD=s3cret",
])
def test_shown_masks_the_password(url):
    text = storage_url.shown(url)
    assert "s3cret" not in text and storage_url.MASK in text and "sweeps" in text


def test_storage_errors_mask_the_password(capsys):
    for url, expected in (("mysql://u:s3cret@localhost/x", "unsupported backend 'mysql'"),
                          ("postgresql://u:s3cret@h:abc/db", "the port must be a number in 1..65535"),
                          ("postgresql://u:s3cret@h:99999/db", "the port must be a number in 1..65535 (got 99999)")):
        rc, err = _cli(capsys, "status", "--storage", url)
        _one_line(rc, err, "--storage: ", expected)
        assert "s3cret" not in err and "***" in err


def test_scrub_masks_a_password_a_driver_echoes():
    url = "postgresql://u:s3cret@h/db"
    assert storage_url.scrub(f"failed for {url}: password s3cret rejected", url).count("s3cret") == 0


def test_reading_resolves_storage_as_running_does(tmp_path):
    """The analysis and `ablate status` read through `existing`, the runner opens `resolve`'s URL."""
    pg = "postgresql://u:pw@db:5432/x"
    assert storage_url.existing(tmp_path, pg) == storage_url.resolve(tmp_path, pg)
    assert storage_url.existing(tmp_path, pg).startswith("postgresql+psycopg")  # the driver the runner uses
    assert storage_url.existing(tmp_path, None) is None  # no optuna.db: nothing to read, nothing created
    (tmp_path / "optuna.db").touch()
    assert storage_url.existing(tmp_path, None) == storage_url.resolve(tmp_path, None)


def test_the_dashboard_banner_masks_the_password(tmp_path, monkeypatch, capsys):
    import optuna_dashboard

    from ablations import cli_run, storage

    served = []

    class Server:  # serves nothing: the banner is printed before serving starts
        def __init__(self, host, port, app):
            served.append(port)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def serve_forever(self):
            return None

    monkeypatch.setattr(optuna_dashboard, "wsgi", lambda storage: None)
    monkeypatch.setattr(cli_run, "make_server", Server)
    monkeypatch.setattr(storage, "open_storage", lambda url, tables_ready=False: object())
    rc = cli.main(["dashboard", "--storage", "postgresql://u:s3cret@db/x", "--port", "8123"])
    err = capsys.readouterr().err
    assert rc == 0 and served == [8123]
    assert "s3cret" not in err and "://u:***@db/x" in err


def test_executed_notebooks_record_the_storage_masked(monkeypatch):
    import nbformat

    from analysis.execute import inject_parameters

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]})])
    inject_parameters(nb, {"RESULTS_DIR": "/r", "PROFILE": "quick", "STORAGE": "postgresql://u:s3cret@db/x"})
    text = nbformat.writes(nb)
    assert "s3cret" not in text and "u:***@db/x" in text
    namespace: dict = {}
    monkeypatch.delenv("STORAGE", raising=False)
    exec(nb.cells[1].source, namespace)  # the kernel reads the real URL from its environment
    assert namespace["STORAGE"] is None and namespace["PROFILE"] == "quick"
