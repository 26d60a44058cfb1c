"""The README's "Your own attention module" example, taken from the README itself, counted and run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from ablations.cli_train import complexity_rows

ROOT = Path(__file__).resolve().parent.parent
PAPER_MAPS = [(3, 256, 56), (4, 512, 28), (6, 1024, 14), (3, 2048, 7)]  # ResNet-50 blocks, C, H at 224


def readme_example(tmp_path: Path) -> Path:
    """Write the section's Python and YAML blocks to tmp_path as the files their first lines name."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Your own attention module", 1)[1].split("\n## ", 1)[0]
    blocks = dict(re.findall(r"```(python|yaml)\n(.*?)```", section, flags=re.S))
    assert set(blocks) == {"python", "yaml"}
    (tmp_path / "mygates.py").write_text(blocks["python"])
    (tmp_path / "mine.yaml").write_text(blocks["yaml"])
    assert blocks["python"].startswith("# mygates.py") and blocks["yaml"].startswith("# mine.yaml")
    return tmp_path / "mine.yaml"


def test_readme_plugin_counts(tmp_path, monkeypatch):
    sweep = readme_example(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = {r["setting"]: r for r in complexity_rows(str(sweep), "paper", [])}
    plain = rows["ResNet-50"]
    gate = rows["ChannelGate"]
    assert gate["params"] - plain["params"] == sum(n * 2 * c for n, c, _ in PAPER_MAPS)  # scale + shift
    assert gate["macs"] - plain["macs"] == sum(n * 2 * c * h * h for n, c, h in PAPER_MAPS)  # as declared
    post = rows["ChannelGate-POST"]
    assert post["params"] - plain["params"] == sum(n * 2 * c for n, c, _ in PAPER_MAPS[2:])  # stages 4, 5


@pytest.mark.slow
def test_readme_plugin_runs_a_quick_sweep_end_to_end(tmp_path):
    sweep = readme_example(tmp_path)
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "ablations", "run", str(sweep), "--profile", "quick",
                           "--seeds", "1", "--set", "train.epochs=1", "--results-dir", str(results)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for label in ("ResNet-50", "SE", "ChannelGate", "ChannelGate-POST"):
        assert label in proc.stdout  # the printed table
    study = optuna.load_study(study_name="mine-quick", storage=f"sqlite:///{results}/optuna.db")
    assert sorted(t.params["setting"] for t in study.get_trials(states=(TrialState.COMPLETE,))) == sorted(
        ["ResNet-50", "SE", "ChannelGate", "ChannelGate-POST"])
    runs = results / "quick" / "mine"
    with np.load(runs / "ChannelGate" / "seed0" / "excitations.npz") as z:
        blocks = z["blocks"].tolist()
        assert blocks[0] == "ChannelGate_2_1" and blocks[-1] == "ChannelGate_5_3" and len(blocks) == 16
        gates = z["ChannelGate_5_3.mean"]
        assert gates.shape == (10, 256) and ((gates > 0) & (gates < 1)).all()
    with np.load(runs / "ChannelGate-POST" / "seed0" / "excitations.npz") as z:
        assert z["blocks"].tolist() == [*(f"ChannelGate_4_{j}" for j in range(1, 7)),
                                        *(f"ChannelGate_5_{j}" for j in range(1, 4))]
