"""Trainer: LR schedules, optimizer groups, the run-directory contract, resume (simulated and kill -9)
with bit-identical deterministic CPU results, divergence, the `ablate train` command and its errors,
and the quick profile's accuracy acceptance."""

from __future__ import annotations

import csv
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY_SET, env, set_options, tiny_cfg

from ablations import cli
from ablations.complexity import complexity
from ablations.errors import SpecError, TrialFailed
from ablations.patch import build_model
from ablations.rundir import METRIC_COLUMNS
from ablations.schedule import lr_at, plateau
from ablations.schema import TrainSpec
from ablations.spec import load_profile
from ablations.train import precise_bn, train

FINAL_KEYS = {"top1_err", "top5_err", "val_loss", "params_m", "gflops", "params", "macs", "train_seconds",
              "images_per_s", "epochs", "lr_cuts", "device", "versions", "git_commit", "sweep", "profile", "setting",
              "seed", "compile_seconds", "trials_per_device"}
TIMING = ("epoch_seconds", "images_per_s")


def read_metrics(path: Path) -> list[dict[str, str]]:
    with (path / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


# --------------------------------------------------------------------------------------------------
# Recipe pieces


def test_lr_warmup_then_cosine_to_zero():
    spec = TrainSpec(epochs=4, lr=0.4, warmup_epochs=1, schedule="cosine")
    lrs = [lr_at(s, spec, steps_per_epoch=10) for s in range(40)]
    assert lrs[:10] == pytest.approx([0.04 * (i + 1) for i in range(10)])  # linear, per step
    assert lrs[10] == pytest.approx(0.4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[25] == pytest.approx(0.4 * 0.5 * (1 + np.cos(np.pi * 15 / 30)))
    assert lrs[-1] < 0.01


def test_lr_step_and_constant():
    step = TrainSpec(epochs=100, lr=0.6, schedule="step", step_every=30, step_gamma=0.1)
    assert lr_at(0, step, 5) == pytest.approx(0.6)
    assert lr_at(30 * 5 - 1, step, 5) == pytest.approx(0.6)
    assert lr_at(30 * 5, step, 5) == pytest.approx(0.06)
    assert lr_at(95 * 5, step, 5) == pytest.approx(0.6e-3)
    const = TrainSpec(lr=0.3, schedule="constant", warmup_epochs=0.5)
    assert lr_at(0, const, 4) == pytest.approx(0.15) and lr_at(9, const, 4) == pytest.approx(0.3)


class _Batches:
    """Training batches as precise_bn reads them: `train_batches(epoch, seed)`."""

    def __init__(self, batches):
        self.batches = batches

    def train_batches(self, epoch, seed):
        yield from self.batches


def test_precise_bn_averages_batch_statistics_and_leaves_momentum():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    batches = [(torch.randn(8, 3, 5, 5) * (i + 1) + i, None) for i in range(4)]
    model.eval()
    precise_bn(model, _Batches(batches), epoch=0, seed=0, batches=3, amp=lambda: torch.no_grad())
    bn = model[1]
    with torch.no_grad():
        feats = [model[0](x) for x, _ in batches[:3]]  # only the first 3 batches count
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)
    assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3
    before = bn.running_mean.clone()
    precise_bn(model, _Batches(batches), epoch=0, seed=0, batches=0, amp=lambda: torch.no_grad())
    torch.testing.assert_close(bn.running_mean, before)  # 0 batches: untouched


# --------------------------------------------------------------------------------------------------
# Run directory


def test_run_directory_contract(tmp_path):
    cfg = tiny_cfg()
    (tmp_path / ".checkpoint.pt.cut-short.tmp").write_bytes(b"half a checkpoint")  # killed mid-write
    seen = []
    final = train(cfg, tmp_path, progress=False, on_epoch=seen.append)
    assert set(json.loads((tmp_path / "final.json").read_text())) == FINAL_KEYS
    assert json.loads((tmp_path / "final.json").read_text()) == final.to_json()
    assert (tmp_path / "config.yaml").read_text() == cfg.to_yaml()
    rows = read_metrics(tmp_path)
    assert list(rows[0]) == list(METRIC_COLUMNS) and [r["epoch"] for r in rows] == ["1", "2"]
    assert [list(r) for r in seen] == [list(METRIC_COLUMNS)] * 2  # on_epoch gets the metrics.csv row
    assert [r["epoch"] for r in seen] == [1, 2] and float(rows[-1]["top1_err"]) == final.top1_err
    assert 0 <= final.top1_err <= 100 and 0 <= final.top5_err <= final.top1_err
    assert final.epochs == 2 and final.device == "cpu" and final.seed == 3
    assert final.lr_cuts == ()  # cosine
    assert set(final.versions) == {"python", "torch", "timm"}
    c = complexity(build_model(cfg.backbone, cfg.se), 8, 3)
    assert (final.params, final.macs) == (c.params, c.macs)
    assert final.gflops == pytest.approx(c.macs / 1e9)
    assert final.images_per_s > 0 and final.train_seconds > 0
    assert final.compile_seconds == 0 and final.trials_per_device == 1  # eager, alone on its device

    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * 4 and len(ckpt["metrics"]) == 2
    assert {"model", "optimizer", "rng"} <= set(ckpt)

    with np.load(tmp_path / "excitations.npz", allow_pickle=False) as z:
        assert z["blocks"].tolist() == ["SE_2_1", "SE_3_1", "SE_4_1", "SE_5_1"]
        assert z["classes"].tolist() == [0, 1, 2, 3] and z["counts"].tolist() == [4, 4, 4, 4]
        assert z["SE_5_1.mean"].shape == (4, 64)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"checkpoint.pt", "config.yaml", "excitations.npz", "final.json", "metrics.csv"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temp files, stale or new


def test_atomic_write_failing_midway_keeps_the_old_file(tmp_path):
    from ablations.atomic import torch_save_atomic, write_bytes_with

    target = tmp_path / "checkpoint.pt"
    torch_save_atomic(target, {"epoch": 1})

    def dies_halfway(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_bytes_with(target, dies_halfway)
    assert torch.load(target, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_rerun_of_finished_trial_returns_final_without_training(tmp_path):
    first = train(tiny_cfg(), tmp_path, progress=False)
    stamp = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    calls = []
    again = train(tiny_cfg(), tmp_path, progress=False, on_epoch=calls.append)
    assert again == first and calls == []
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == stamp


def test_config_mismatch_is_refused(tmp_path):
    train(tiny_cfg(), tmp_path, progress=False)
    with pytest.raises(SpecError, match=r"different config \(train.epochs: 2 -> 3\)"):
        train(tiny_cfg(epochs=3), tmp_path, progress=False)


class Interrupt(Exception):
    pass


def test_resume_after_interrupt_is_bit_identical(tmp_path):
    cfg = tiny_cfg(epochs=3, deterministic=True)
    whole = train(cfg, tmp_path / "whole", progress=False)

    def stop_after_first(row):
        if row["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "cut", progress=False, on_epoch=stop_after_first)
    assert not (tmp_path / "cut" / "final.json").exists() and len(read_metrics(tmp_path / "cut")) == 1
    epochs_run = []
    resumed = train(cfg, tmp_path / "cut", progress=False, on_epoch=lambda r: epochs_run.append(r["epoch"]))
    assert epochs_run == [2, 3]
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(read_metrics(tmp_path / "whole"))
    for key in ("top1_err", "top5_err", "val_loss", "epochs", "params"):
        assert getattr(resumed, key) == getattr(whole, key)
    a = np.load(tmp_path / "whole" / "excitations.npz")
    b = np.load(tmp_path / "cut" / "excitations.npz")
    assert np.array_equal(a["SE_3_1.mean"], b["SE_3_1.mean"])


PLATEAU = {"schedule": "plateau", "patience": 1, "max_cuts": 1, "step_gamma": 0.1, "epochs": 12,
           "plateau_threshold": 0.9, "deterministic": True}  # a 90% drop per epoch to count: plateaus soon


def test_plateau_schedule_cuts_stops_early_and_resumes_bit_identically(tmp_path):
    cfg = tiny_cfg(**PLATEAU)
    whole = train(cfg, tmp_path / "whole", progress=False)
    rows = read_metrics(tmp_path / "whole")
    rule = plateau([float(r["val_loss"]) for r in rows], 1, 0.9, 1)
    assert rule.stop == whole.epochs == len(rows) < 12  # stopped by the rule, not the cap
    assert rule.cuts == whole.lr_cuts and len(whole.lr_cuts) == 1
    (cut,) = whole.lr_cuts
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[:cut] == [pytest.approx(0.05)] * cut  # warmup ends within epoch 1
    assert lrs[cut:] == [pytest.approx(0.005)] * (len(rows) - cut)  # the metrics show the cut

    def stop_at(epoch):
        def hook(row):
            if row["epoch"] == epoch:
                raise Interrupt
        return hook

    for epoch in (cut, rule.stop):  # killed right after the cut, then right after the last epoch
        with pytest.raises(Interrupt):
            train(cfg, tmp_path / "cut", progress=False, on_epoch=stop_at(epoch))
    assert not (tmp_path / "cut" / "final.json").exists()
    trained = []
    resumed = train(cfg, tmp_path / "cut", progress=False, on_epoch=trained.append)
    assert trained == []  # the stored losses say the rule had stopped: nothing more to train
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(rows)
    for key in ("top1_err", "top5_err", "val_loss", "epochs", "lr_cuts"):
        assert getattr(resumed, key) == getattr(whole, key)


def test_diverging_loss_stops_the_trial(tmp_path):
    with pytest.raises(TrialFailed, match="training loss is (nan|inf).*diverged"):
        train(tiny_cfg(lr=1e8), tmp_path, progress=False)
    assert not (tmp_path / "final.json").exists()


def test_overflowing_validation_fails_the_trial(tmp_path, monkeypatch):
    """A finite training loss with non-finite validation logits (an unbounded gate can do this in eval
    mode) is a diverged trial, not an error rate."""
    import ablations.train as train_module

    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: (math.inf, 90.0, 50.0))
    with pytest.raises(TrialFailed, match="validation loss is inf after epoch 1.*diverged"):
        train(tiny_cfg(), tmp_path, progress=False)
    assert not (tmp_path / "final.json").exists()


def test_threads_and_determinism_are_restored(tmp_path):
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    train(tiny_cfg(deterministic=True, epochs=1), tmp_path, progress=False)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


# --------------------------------------------------------------------------------------------------
# ablate train


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_a_sweep_row(tmp_path, capsys):
    sets = set_options(TINY_SET)
    code, out, _ = run_cli(["train", "--sweep", "squeeze", "--setting", "max", "--out", str(tmp_path),
                            "--seed", "2", *sets], capsys)
    assert code == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert (final["sweep"], final["setting"], final["seed"]) == ("squeeze", "max", 2)
    assert "squeeze: max" in (tmp_path / "config.yaml").read_text()
    assert "top-1 error" in out and f"{final['top1_err']:.2f}%" in out


def test_cli_default_is_standard_se_r16(tmp_path, capsys):
    sets = set_options([*TINY_SET, "train.epochs=1"])
    code, _, _ = run_cli(["train", "--out", str(tmp_path), *sets], capsys)
    assert code == 0
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["sweep"] == "" and final["profile"] == "quick"
    text = (tmp_path / "config.yaml").read_text()
    assert "reduction: 16" in text and "position: standard" in text and "squeeze: avg" in text


@pytest.mark.parametrize(("extra", "needle"), [
    (["--set", "data.dataset=cifar10"], "data.root"),
    (["--set", "data.dataset=cifar10", "--data-root", "{tmp}/missing"], "data.root: no such directory"),
    (["--set", "data.dataset=cifar10", "--data-root", "{tmp}"], "data.root"),  # malformed: no batches
    (["--set", "data.dataset=imagefolder", "--data-root", "{tmp}"], "data.root"),
    (["--set", "data.dataset=mnist"], "data.dataset"),
    (["--set", "data.input_size=4"], "data.input_size: 4 is too small"),
    (["--set", "train.epochs=0"], "train.epochs"),
    (["--set", "train.schedule=plateu"], "train.schedule"),
    (["--set", "train.patience=0"], "train.patience: Input should be greater than 0 (got 0)"),
    (["--set", "train.max_cuts=-1"], "train.max_cuts: Input should be greater than or equal to 0"),
    (["--set", "train.plateau_threshold=-0.1"], "train.plateau_threshold"),
    (["--set", "train.plateau_threshold=1"], "train.plateau_threshold"),
    (["--set", "train.patience=soon"], "train.patience"),
    (["--set", "train.epochz=3"], "--set: train.epochz: unknown key"),
    (["--setting", "max"], "--setting: needs --sweep"),
    (["--sweep", "squeeze", "--setting", "nope"], "--setting: unknown label 'nope'"),
    (["--device", "cuda:7"], "--device"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, needle):
    (tmp_path / "garbage.txt").write_text("not a data set")
    argv = ["train", "--out", str(tmp_path / "run"), *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err
    assert not (tmp_path / "run" / "final.json").exists()


def test_cli_diverged_trial_exits_1(tmp_path, capsys):
    sets = set_options(TINY_SET)
    code, _, err = run_cli(["train", "--out", str(tmp_path), *sets, "--set", "train.lr=1e8"], capsys)
    assert code == 1
    assert err.replace("\r", "\n").splitlines()[-1].startswith("error: trial failed: training loss is")


# --------------------------------------------------------------------------------------------------
# End to end on the quick profile, as a user runs it


def ablate_train(out: Path, *extra: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ablations", "train", "--profile", "quick", "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


@pytest.mark.slow
def test_kill_9_mid_epoch_then_rerun_continues_and_matches(tmp_path):
    extra = ("--set", "train.epochs=3", "--set", "train.deterministic=true")
    whole = ablate_train(tmp_path / "whole", *extra)
    cut = ablate_train(tmp_path / "cut", *extra)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and cut.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), cut.communicate()[1][-2000:]
    time.sleep(0.3)  # into epoch 2 (an epoch takes seconds)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert cut.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "final.json").exists()
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert done in (1, 2)

    rerun = ablate_train(tmp_path / "cut", *extra)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    finished = [k for k in (1, 2, 3) if re.search(rf"epoch {k}/3  lr \S+  train_loss", err)]
    assert finished == list(range(done + 1, 4))  # continued after the checkpoint, to the end
    whole.communicate(timeout=300)
    assert whole.returncode == 0
    a = json.loads((tmp_path / "whole" / "final.json").read_text())
    b = json.loads((tmp_path / "cut" / "final.json").read_text())
    assert b["epochs"] == 3
    for key in ("top1_err", "top5_err", "val_loss"):
        assert a[key] == b[key]
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(read_metrics(tmp_path / "whole"))


@pytest.mark.slow
def test_quick_profile_reaches_3_percent(tmp_path):
    start = time.monotonic()
    proc = ablate_train(tmp_path)
    out, err = proc.communicate(timeout=600)
    wall = time.monotonic() - start
    assert proc.returncode == 0, err[-2000:]
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["top1_err"] <= 3.0, final
    assert final["epochs"] == load_profile("quick").train.epochs
    assert "top-1 error" in out
    print(f"quick profile: top-1 error {final['top1_err']:.2f}% in {wall:.1f} s wall")
