"""What a run prints: a start summary, one persistent line per finished trial in every mode (log file,
pseudo-terminal without a size, terminal), the table after the last trial's line, no carriage returns
outside a real terminal, and bars that never show the previous trial's metrics."""

from __future__ import annotations

import os
import pty
import re
import sys
import threading
from pathlib import Path

import pytest
from helpers import FAKE, TINY_SET, make_plans, url_of, write_sweep

from ablations import supervisor, train
from ablations.progress import Progress
from ablations.storage import open_storage
from ablations.terminal import real_terminal


def run_into(stream, tmp_path: Path, monkeypatch) -> None:
    """`ablate run` of a mini sweep on the fake trainer with stdout and stderr both on `stream`, as
    `make ablation-<axis> > log 2>&1` runs it: bars decided by the terminal (bars=None), the table
    printed when the sweep ends. In this process: a second interpreter would import torch and timm again."""
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(sys, "stderr", stream)
    results = tmp_path / "results"
    plans = make_plans(write_sweep(tmp_path), seeds=2)
    assert supervisor.run(plans, url_of(results), results, ["cpu"], 1, trainer=FAKE) == 0
    stream.flush()


def check_run_output(text: str, points: int) -> None:
    assert "\r" not in text, "carriage returns: progress bars were drawn into a log"
    lines = text.splitlines()
    assert lines[0].startswith("mini-quick: 3 settings x 2 seeds = 6 points")
    assert "6 queued; 1 worker(s) on cpu" in lines[1]
    trial_lines = [i for i, line in enumerate(lines) if re.match(rf"\[\d/{points}\] mini-quick ", line)]
    assert [lines[i].split()[0] for i in trial_lines] == [f"[{k}/{points}]" for k in range(1, points + 1)]
    assert all("top1_err" in lines[i] for i in trial_lines)
    table = next(i for i, line in enumerate(lines) if line.lstrip().startswith("original (ref)"))
    assert table > trial_lines[-1], "the table was printed before the last trial's line"


def test_run_into_a_log_file_writes_one_line_per_trial_and_no_carriage_returns(tmp_path, monkeypatch,
                                                                                 fake_trainer):
    with open(tmp_path / "log", "w") as log:
        run_into(log, tmp_path, monkeypatch)
    check_run_output((tmp_path / "log").read_text(), 6)


def test_run_under_a_pseudo_terminal_without_a_size_prints_every_line(tmp_path, monkeypatch, fake_trainer):
    main, sub = pty.openpty()  # a new pty reports 0 x 0, as some job runners leave it
    chunks: list[bytes] = []

    def read() -> None:  # drain the pty as it fills (its buffer is a few kB)
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the writing end is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with os.fdopen(sub, "w", buffering=1) as terminal:
        assert terminal.isatty()
        run_into(terminal, tmp_path, monkeypatch)
    reader.join(timeout=10)
    os.close(main)
    text = b"".join(chunks).decode().replace("\r\n", "\n")  # the pty's own newline translation
    check_run_output(text, 6)


def test_a_pty_without_a_size_is_no_terminal_for_bars(tmp_path):
    main, sub = pty.openpty()
    try:
        with os.fdopen(os.dup(sub), "w") as stream:
            assert stream.isatty() and not real_terminal(stream)
    finally:
        os.close(main)
        os.close(sub)
    with open(tmp_path / "log", "w") as f:
        assert not real_terminal(f)


def test_trainer_batch_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch, tmp_path):
    with open(tmp_path / "log", "w") as f:
        monkeypatch.setattr(sys, "stderr", f)
        with train._progress(10, "epoch 1/2", True) as bar:
            assert bar.disable  # `ablate train 2> log`: epoch lines only, no bar frames


def test_a_new_trials_bar_starts_without_the_last_trials_metrics(tmp_path, capsys):
    results = tmp_path / "results"
    plans = make_plans(write_sweep(tmp_path), *TINY_SET)
    from ablations.grid import open_study

    storage = open_storage(url_of(results))
    study = open_study(storage, plans[0])
    progress = Progress(storage, [(study, plans[0])], results, url_of(results), bars=True)
    base = {"worker": 0, "study": study.study_name, "setting": "r=16", "seed": 0}
    progress.handle({**base, "kind": "start", "epochs": 2})
    progress.handle({**base, "kind": "epoch", "epoch": 1,
                     "metrics": {"lr": 0.05, "train_loss": 1.5, "val_loss": 1.2, "top1_err": 40.0}})
    bar = progress.trial_bars[0]
    assert "lr=0.05" in bar.postfix and "top1_err=40" in bar.postfix  # the learning rate is shown
    progress.handle({**base, "seed": 1, "kind": "start", "epochs": 2})
    assert not bar.postfix and "seed1" in bar.desc
    progress.close()


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_real_terminal_is_false_under_pytests_capture(stream):
    assert not real_terminal(getattr(sys, stream))
