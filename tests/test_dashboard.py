"""`ablate dashboard` serves the sweep storage over HTTP; each study's note says what it reproduces."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import ROOT, url_of

from ablations import grid, study_notes
from ablations.spec import load_profile, load_sweep
from ablations.storage import open_storage


def ratio_plan(*overrides: str, sweep: str = "ratio", profile: str = "quick"):
    """The study's plan, built from the files alone: the paper and cifar profiles need a data root that
    `ablate run` would check, and a note does not."""
    loaded = load_sweep(sweep)
    return grid.Plan(loaded, load_profile(profile, overrides), loaded.seeds, tuple(overrides))


def open_with_note(storage, plan):
    """What `ablate run` does: open the study, then save its note."""
    study = grid.open_study(storage, plan)
    study_notes.save_study_note(storage, study, plan)
    return study


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, json.loads(r.read())


def test_note_has_description_and_published_numbers():
    plan = ratio_plan("train.epochs=2")
    note = study_notes.study_note(plan)
    assert note.startswith("## Table 10 (ratio), profile `quick`")
    assert plan.sweep.description.split(".")[0] in note
    assert "| r=16 | 22.28 | 6.03 | – | 28.1 |" in note  # the paper's Table 10 row, GFLOPs not given
    assert "| original | 23.30 | 6.55 |" in note
    assert "`--set train.epochs=2`" in note
    assert "not the absolute errors" in note  # quick is not ImageNet
    assert "`ablate table ratio` tests them" in note


def test_note_says_published_errors_compare_only_for_the_papers_recipe():
    assert "not the absolute errors" not in study_notes.study_note(ratio_plan(profile="paper"))
    assert "not the absolute errors" in study_notes.study_note(ratio_plan(profile="cifar"))
    assert "not the absolute errors" in study_notes.study_note(ratio_plan(profile="paper_sec5"))  # Tables 2-5


def test_note_of_a_sweep_with_its_own_sources():
    note = study_notes.study_note(ratio_plan(sweep="attention", profile="paper"))
    assert note.startswith("## Sweep attention (attention), profile `paper`")
    assert "### Published (each row's source, cited in the sweep file; ImageNet)" in note
    assert "| ECA | 22.52 | 6.32 | 3.86 | 24.4 | ECA-Net (Wang et al., CVPR 2020)" in note
    assert "| GC | – | – | – | – | - |" in note  # no source read: empty, not guessed
    assert "reproduces no table" not in note and "each source's own recipe" in note


def test_note_saved_once_and_rewritten_when_it_changes(tmp_path):
    from optuna_dashboard import get_note

    storage = open_storage(url_of(tmp_path))
    plan = ratio_plan()
    study = open_with_note(storage, plan)
    sid = storage.get_study_id_from_name(study.study_name)
    assert get_note(study) == study_notes.study_note(plan)
    assert study.metric_names == [study_notes.OBJECTIVE]
    open_with_note(storage, plan)
    assert storage.get_study_system_attrs(sid)["dashboard:note_ver"] == 1  # unchanged: not saved again
    more = ratio_plan()
    more = grid.Plan(more.sweep.model_copy(update={"description": "new words"}), more.profile, 5)
    open_with_note(storage, more)
    assert storage.get_study_system_attrs(sid)["dashboard:note_ver"] == 2
    assert "new words" in get_note(study) and "5 seeds" in get_note(study)


@pytest.mark.slow
def test_dashboard_serves_the_study_list_over_http_and_stops_on_sigterm(tmp_path, free_port):
    results = tmp_path / "results"
    storage = open_storage(url_of(results))
    open_with_note(storage, ratio_plan())
    port = free_port
    proc = subprocess.Popen(
        [sys.executable, "-m", "ablations", "dashboard", "--results-dir", str(results), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                status, body = get_json(f"http://127.0.0.1:{port}/api/studies")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline, "dashboard did not come up"
                time.sleep(0.3)
        assert status == 200
        (summary,) = [s for s in body["study_summaries"] if s["study_name"] == "ratio-quick"]
        status, detail = get_json(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}")
        assert status == 200 and "22.28" in detail["note"]["body"]
        proc.send_signal(signal.SIGTERM)  # as Ctrl-C: the server stops and `ablate` exits cleanly
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"optuna-dashboard on sqlite:///{results}/optuna.db: http://127.0.0.1:{port}/" in out
    assert "Traceback" not in out


def test_dashboard_on_a_busy_port_is_a_one_line_error(tmp_path, capsys):
    from ablations import cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = cli.main(["dashboard", "--results-dir", str(tmp_path), "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: --port: cannot listen on 127.0.0.1:") and "in use" in err[-1]


@pytest.mark.parametrize("storage", ["mysql://x@h/db", "sqlite:///:memory:"])
def test_dashboard_rejects_bad_storage(storage, capsys):
    from ablations import cli

    assert cli.main(["dashboard", "--storage", storage]) == 2
    assert capsys.readouterr().err.startswith("error: --storage")



# ---------------------------------------------------------------------------------------------------
# What a finished sweep leaves in the dashboard: our table in the note, a note per trial, the figure


def finished_mini_sweep(tmp_path):
    """A mini sweep (3 settings x 2 seeds) trained by the fake trainer, as `ablate run` trains it."""
    from helpers import FAKE, make_plans, write_sweep

    from ablations import supervisor

    results = tmp_path / "results"
    plans = make_plans(write_sweep(tmp_path), seeds=2)
    assert supervisor.run(plans, url_of(results), results, ["cpu"], 1, trainer=FAKE, bars=False) == 0
    storage = open_storage(url_of(results))
    import optuna

    return results, plans[0], storage, optuna.load_study(study_name="mini-quick", storage=storage)


def test_finished_sweep_leaves_our_table_trial_notes_and_a_figure(tmp_path, fake_trainer):
    from optuna_dashboard import get_note
    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from analysis import dashboard

    results, plan, storage, study = finished_mini_sweep(tmp_path)
    note = get_note(study)
    assert note.startswith(study_notes.study_note(plan))  # the paper's numbers first, ours under them
    ours = note[note.index("### Ours"):]
    means = {}
    for t in study.get_trials(deepcopy=False):
        means.setdefault(t.params["setting"], []).append(t.value)
    for label, values in means.items():  # the measured mean of every setting, as the table prints it
        row = next(line for line in ours.splitlines() if line.startswith(f"| {label}"))
        assert f"{sum(values) / len(values):.2f} ± " in row
    assert "| original (ref) | 2 |" in ours and "Best Trial" in ours and "luckiest seed" in ours
    for t in study.get_trials(deepcopy=False):
        trial_note = get_note(optuna_trial(study, t))
        assert trial_note.startswith(f"## {t.params['setting']}, seed {t.params['seed']}")
        assert f"top-1 error {t.value:.2f}%" in trial_note and t.user_attrs["run_dir"] in trial_note
    sid = storage.get_study_id_from_name(study.study_name)
    figures = get_plotly_graph_objects(storage.get_study_system_attrs(sid))
    figure = json.loads(figures[dashboard.PLOT_ID])
    dots = {tr["name"]: sorted(tr["y"]) for tr in figure["data"] if tr["mode"] == "markers" and tr["name"] in means}
    assert dots == {k: sorted(v) for k, v in means.items()}  # one dot per seed, each its trial's value
    study_notes.save_study_note(storage, study, plan)  # a rerun's start keeps our table
    assert get_note(study) == note
    api = dashboard_api(storage, f"/api/studies/{study._study_id}")  # what the dashboard's page reads
    assert api["note"]["body"] == note
    assert [g["id"] for g in api["plotly_graph_objects"]] == [dashboard.PLOT_ID]


def dashboard_api(storage, path: str) -> dict:
    """GET `path` from optuna-dashboard's WSGI app, in this process (no server, no port)."""
    import io
    from wsgiref.util import setup_testing_defaults

    from optuna_dashboard import wsgi

    environ: dict = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
    setup_testing_defaults(environ)
    status = []
    body = b"".join(wsgi(storage)(environ, lambda s, headers, exc=None: status.append(s)))
    assert status[0].startswith("200"), status
    return json.loads(body)


def optuna_trial(study, frozen):
    import optuna

    return optuna.trial.Trial(study, frozen._trial_id)
