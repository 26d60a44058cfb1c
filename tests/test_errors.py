"""The two error families: what a user can fix ends the command with one line and status 2; a run that
does not work out (a diverged trial, a lost claim) never does."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_cfg

from ablations import cli, errors
from ablations.errors import (
    ClaimLost,
    ResultsDirError,
    RunDirBusy,
    RunFailure,
    SpecError,
    StorageError,
    TrialFailed,
    UserError,
)
from ablations.train import train


@pytest.mark.parametrize("kind", [SpecError, StorageError, ResultsDirError])
def test_user_errors_are_one_line_naming_source_and_key(kind):
    e = kind("cannot read:\n  no such\rthing", source="--storage", key="sqlite:///x\n.db")
    assert isinstance(e, UserError) and not isinstance(e, RunFailure)
    assert str(e) == "--storage: sqlite:///x .db: cannot read: no such thing"
    moved = e.within(key_prefix="settings[0]")
    assert type(moved) is kind and moved.key == "settings[0].sqlite:///x .db"


@pytest.mark.parametrize("kind", [TrialFailed, ClaimLost, RunDirBusy])
def test_run_failures_are_not_user_errors(kind):
    assert issubclass(kind, RunFailure) and not issubclass(kind, UserError)


def test_the_cli_exits_2_on_every_user_error_and_lets_run_failures_through(monkeypatch, capsys):
    from ablations import cli_train

    for kind, expected in ((StorageError, 2), (ResultsDirError, 2)):
        def raises(args, kind=kind):
            raise kind("gone", source="--results-dir", key="r")

        monkeypatch.setattr(cli_train, "cli_complexity", raises)
        assert cli.main(["complexity", "ratio"]) == expected
        assert capsys.readouterr().err == "error: --results-dir: r: gone\n"

    def fails(args):
        raise ClaimLost("trial 3 was retried elsewhere")

    monkeypatch.setattr(cli_train, "cli_complexity", fails)
    with pytest.raises(ClaimLost):  # a bug to report with its traceback, not a bad input
        cli.main(["complexity", "ratio"])
    assert errors.first_line(ValueError("")) == "ValueError"


def test_a_checkpoint_of_another_format_is_an_error_not_damage(tmp_path):
    """A readable checkpoint another version of the program wrote is kept and named, never overwritten."""
    torch.save({"format": 99, "epoch": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(SpecError, match=r"checkpoint.pt: checkpoint of another format; delete it to start over"):
        train(tiny_cfg(), tmp_path, progress=False)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["format"] == 99
    assert not (tmp_path / "checkpoint.pt.damaged").exists()
