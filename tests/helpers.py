"""What the tests share: tiny configs, a mini sweep and its study, a fake trainer with the real one's
contract, subprocess and polling helpers, and a results directory written without training anything.

A plain module (no pytest import): spawned worker processes import it (`FAKE`), and so do the scripts
some tests run. The fixtures built on it are in conftest.py.

The fake trainer resumes from `checkpoint.json` in its run dir, sleeps FAKE_EPOCH_S per epoch (so a test
can kill it mid-epoch), appends one line per (re)start to calls.log (pid, start epoch, data root, epochs),
fails on FAKE_NAN_SETTING / crashes on FAKE_CRASH_SETTING, emits the real trainer's metric rows and writes
a real final record last (and its pid to `final.pid`). Its top-1 error is a fixed function of (setting,
seed), plus FAKE_NOISE times a standard normal draw seeded by (setting, seed): a spread that is the same
on every rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from ablations import rundir, storage_url
from ablations.errors import TrialFailed
from ablations.grid import enqueue_missing, open_study
from ablations.planning import plans_from_args
from ablations.schema import BackboneSpec, DataSpec, RunConfig, SESpec, TrainSpec
from ablations.storage import grid_lock, open_storage
from ablations.trials import grid_point

ROOT = Path(__file__).resolve().parent.parent
FAKE = "helpers:fake_train"
FAKE_ENV = ("FAKE_NAN_SETTING", "FAKE_EPOCH_S", "FAKE_CRASH_SETTING", "FAKE_NOISE")
SETTINGS = [{"label": "r=16", "reduction": 16}, {"label": "r=8", "reduction": 8},
            {"label": "original", "se": False}]
# The quick profile shrunk to seconds per trial on one CPU thread (digits, 1 block per stage).
SMALL_QUICK = ["train.epochs=2", "backbone.layers=[1,1,1,1]"]
# The quick profile turned into tiny_cfg()'s network and data (a second or two per trial).
TINY_SET = ["backbone.layers=[1,1,1,1]", "backbone.channels=[16,16,16,16]", "backbone.num_classes=4",
            "data.dataset=synthetic", "data.synthetic_size=64", "data.input_size=8", "data.batch_size=16",
            "train.epochs=2", "train.threads=1"]


def set_options(overrides: list[str]) -> list[str]:
    """`--set` options for the command line."""
    return [x for s in overrides for x in ("--set", s)]


def tiny_cfg(data: dict | None = None, **train_kw) -> RunConfig:
    """A 4-class ResNet of one 16-channel block per stage on 64 synthetic 8x8 images: a trial of two
    epochs takes about a second on one CPU thread."""
    return RunConfig(
        sweep="", profile="test", setting="SE", seed=3, se=SESpec(),
        backbone=BackboneSpec(layers=(1, 1, 1, 1), channels=(16, 16, 16, 16), small_stem=True, num_classes=4),
        data=DataSpec(**{"dataset": "synthetic", "synthetic_size": 64, "input_size": 8, "batch_size": 16,
                         **(data or {})}),
        train=TrainSpec(**{"epochs": 2, "lr": 0.05, "threads": 1, "warmup_epochs": 0.5, **train_kw}),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket is closed


def assert_same_as_timm(ours, reference) -> None:
    """`ours` (our patched model) computes exactly what `reference` (timm's own model) does: the same
    module tree, and after loading its weights the same outputs in eval mode, and in train mode the same
    outputs (batch statistics) and gradients of the input and of every parameter."""
    import torch

    state = reference.state_dict()
    assert set(ours.state_dict()) == set(state)  # the same module tree, key by key
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    reference.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
    reference.train(), ours.train()
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_r, out_o = reference(xr), ours(xo)
    torch.testing.assert_close(out_o, out_r, rtol=0, atol=0)
    out_r.square().sum().backward()
    out_o.square().sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=0, atol=0)
    grads = dict(reference.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[key].grad, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------------
# The fake trainer


def fake_train(cfg, out_dir, *, device=None, data_root=None, progress=True, on_epoch=None) -> rundir.FinalRecord:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = rundir.read_final(out)
    if done is not None:
        return done
    ckpt = out / "checkpoint.json"
    start = json.loads(ckpt.read_text())["epoch"] if ckpt.exists() else 0
    with open(out / "calls.log", "a") as f:  # one line per time this run was (re)started
        f.write(f"{os.getpid()} {start} {data_root} {cfg.train.epochs}\n")
    for epoch in range(start + 1, cfg.train.epochs + 1):
        time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0")))
        if cfg.setting == os.environ.get("FAKE_NAN_SETTING"):
            raise TrialFailed(f"loss became nan at epoch {epoch}")
        if cfg.setting == os.environ.get("FAKE_CRASH_SETTING"):
            raise RuntimeError("a bug in the trainer")
        ckpt.write_text(json.dumps({"epoch": epoch}))
        if on_epoch is not None:
            on_epoch(rundir.metric_row(epoch=epoch, lr=0.1, train_loss=1.0 / epoch, val_loss=2.0 / epoch,
                                       top1_err=50.0 / epoch, top5_err=10.0 / epoch, epoch_seconds=0.01,
                                       images_per_s=100.0))
    noise = float(os.environ.get("FAKE_NOISE", "0")) * random.Random(f"{cfg.setting}|{cfg.seed}").gauss(0, 1)
    final = rundir.FinalRecord(
        top1_err=10.0 + cfg.seed + len(cfg.setting) / 10 + noise, top5_err=1.5, val_loss=0.5, params_m=0.4,
        gflops=0.01, params=400000, macs=10_000_000, train_seconds=0.1, images_per_s=100.0,
        epochs=cfg.train.epochs, lr_cuts=(), device=device or "cpu", versions={"torch": "x"}, git_commit="abc",
        sweep=cfg.sweep, profile=cfg.profile, setting=cfg.setting, seed=cfg.seed)
    rundir.write_final(out, final)
    (out / "final.pid").write_text(str(os.getpid()))
    return final


# ---------------------------------------------------------------------------------------------------
# A mini sweep and its study


def write_sweep(directory: Path, settings=None, *, seeds: int = 2, name: str = "mini", **extra) -> Path:
    """A Table-10 sweep of `settings` (default SETTINGS; `original` is the reference when present)."""
    settings = SETTINGS if settings is None else settings
    data = {"description": "a tiny test sweep", "table": 10, "seeds": seeds, "settings": settings}
    if any(s["label"] == "original" for s in settings):
        data["reference"] = "original"
    data.update(extra)
    path = Path(directory) / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def make_plans(sweep: Path, *overrides: str, seeds: int | None = None, data_root: str | None = None):
    """What `ablate run <sweep> --set train.epochs=3 --set <overrides>` would train (validated)."""
    args = argparse.Namespace(sweeps=[str(sweep)], profile="quick", set=["train.epochs=3", *overrides],
                              seeds=seeds, data_root=data_root)
    return plans_from_args(args)


def url_of(results: Path) -> str:
    """The default storage of a results directory."""
    return storage_url.resolve(results, None)


def create_study(url: str, plans) -> optuna.Study:
    """What `ablate run` does before training: the study, its attrs and its queued grid."""
    storage = open_storage(url)
    (plan,) = plans
    study = open_study(storage, plan)
    with grid_lock(storage):
        enqueue_missing(study, plan)
    return study


def load_study(where: str | Path, name: str = "mini-quick") -> optuna.Study:
    """A study by storage URL, or in a results directory's default storage."""
    url = where if isinstance(where, str) else url_of(where)
    return optuna.load_study(study_name=name, storage=open_storage(url))


def completes_per_point(study: optuna.Study) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        p = grid_point(t)
        out[p] = out.get(p, 0) + 1
    return out


def calls(run_dir: Path) -> list[list[str]]:
    log = Path(run_dir) / "calls.log"
    return [line.split() for line in log.read_text().splitlines()] if log.exists() else []


# ---------------------------------------------------------------------------------------------------
# Processes


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def ablate(*argv: str, **extra_env: str) -> subprocess.Popen:
    """`ablate ...` as its own process (stdout and stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "ablations", *argv], cwd=ROOT, env=env(**extra_env),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    """Poll until `predicate()` returns something truthy (returned); fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except Exception:  # noqa: BLE001 -- no database / study / file yet
            value = None
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_sweep_in_process(plans, url: str, results: str, epoch_s: str = "0", workers: int = 1) -> None:
    """Spawn target: one `ablate run` (fake trainer) on `url`."""
    from ablations import supervisor

    os.environ["FAKE_EPOCH_S"] = epoch_s
    sys.exit(supervisor.run(plans, url, Path(results), ["cpu"], workers, trainer=FAKE, bars=False))


def hold_grid_lock(url: str, seconds: float, stamps) -> None:
    """Spawn target: take the storage-wide grid lock, note when, keep it `seconds`, note the release."""
    storage = open_storage(url)
    with grid_lock(storage):
        stamps.put(("held", time.time()))
        time.sleep(seconds)
        stamps.put(("released", time.time()))


def work_in_process(url: str, results: str, epoch_s: str = "0") -> None:
    """Spawn target: one worker (fake trainer) on every study in `url`, until nothing is left to do."""
    from ablations import worker

    os.environ["FAKE_EPOCH_S"] = epoch_s
    names = [s.study_name for s in optuna.get_all_study_summaries(url)]
    worker.work(url, names, results_dir=results, device="cpu", data_root=None, emit=lambda ev: None,
                trainer=FAKE)


# ---------------------------------------------------------------------------------------------------
# A results directory in the run-directory contract, written without training anything
#
# Profile "quick":
# - ratio (Table 10): an Optuna study + run dirs; 6 settings x seeds 0-2. r=4 seed 1 failed once and
#   then completed on retry; r=32 seed 2 only failed (so it is missing); r=8 seed 2 is still RUNNING.
# - squeeze (Table 11): run dirs only, no study (the results-dir fallback); max seed 2 never started.
# - excitations.npz in every ratio run dir (ResNet-50 topology names SE_2_1..SE_5_3; empty for `original`).
# Metrics are deterministic functions of (setting, seed) so tests can recompute them by hand. Each has a
# seed-dependent wobble that differs between settings, so per-seed differences to the reference vary
# (a paired test has a spread to work with) and Table 10 on top-1 mixes verdicts: four rows `better`,
# r=32 `no detected difference`, and r=2 with raw p < 0.05 that Holm lifts above 0.05.

PROFILE = "quick"
LAYERS = {2: 3, 3: 4, 4: 6, 5: 3}  # ResNet-50 blocks per stage
WIDTHS = {2: 32, 3: 64, 4: 128, 5: 256}  # quick profile block output channels
CLASSES = 10
EPOCHS = 4
RATIO = {"r=2": 2.0, "r=4": 2.2, "r=8": 2.4, "r=16": 2.3, "r=32": 2.9, "original": 3.5}  # base top-1
SQUEEZE = {"max": 3.1, "avg": 2.6}
PARAMS = {"r=2": 0.61, "r=4": 0.48, "r=8": 0.41, "r=16": 0.38, "r=32": 0.37, "original": 0.36}


def top1(base: float, seed: int) -> float:
    return base + 0.1 * seed + 0.5 * math.sin(5 * base + 2 * seed)


def top5(base: float, seed: int) -> float:
    return base / 4 + 0.05 * seed + 0.1 * math.cos(3 * base + seed)


def results_record(sweep: str, setting: str, seed: int, base: float) -> rundir.FinalRecord:
    return rundir.FinalRecord(
        top1_err=top1(base, seed), top5_err=top5(base, seed), val_loss=0.1 + 0.01 * seed,
        params_m=PARAMS.get(setting, 0.38), gflops=0.0123, params=380000, macs=12300000,
        train_seconds=60.0 + seed, images_per_s=1000.0 + 10 * seed, epochs=EPOCHS, lr_cuts=(), device="cpu",
        versions={"python": "3", "torch": "2", "timm": "1"}, git_commit="abc1234", sweep=sweep, profile=PROFILE,
        setting=setting, seed=seed)


def se_block_names(has_se: bool) -> list[str]:
    return [f"SE_{s}_{j}" for s, n in LAYERS.items() for j in range(1, n + 1)] if has_se else []


def write_excitations(path: Path, has_se: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = se_block_names(has_se)
    arrays: dict[str, np.ndarray] = {
        "blocks": np.array(names, dtype=str),
        "classes": np.arange(CLASSES),
        "counts": rng.integers(20, 40, size=CLASSES),
    }
    for name in names:
        stage = int(name.split("_")[1])
        c = WIDTHS[stage]
        # Like the paper's finding: early blocks class-agnostic, late blocks class-specific.
        shared = rng.uniform(-1, 1, size=c)
        specific = rng.uniform(-1, 1, size=(CLASSES, c))
        w = (stage - 2) / 3
        logits = (1 - w) * shared + w * 2 * specific + 0.1 * rng.normal(size=(CLASSES, c))
        arrays[f"{name}.mean"] = (1 / (1 + np.exp(-2 * logits))).astype(np.float32)
        arrays[f"{name}.std"] = rng.uniform(0.0, 0.1, size=(CLASSES, c)).astype(np.float32)
    np.savez(path, **arrays)


def write_run_dir(root: Path, sweep: str, setting: str, seed: int, base: float, *, npz: bool) -> Path:
    d = rundir.run_dir(root, PROFILE, sweep, setting, seed)
    d.mkdir(parents=True)
    record = results_record(sweep, setting, seed, base)
    (d / rundir.CONFIG).write_text(yaml.safe_dump({"sweep": sweep, "profile": PROFILE, "setting": setting,
                                                   "seed": seed}))
    rundir.write_final(d, record)
    rundir.write_metrics(d, [rundir.metric_row(
        epoch=e, lr=0.1 / (e + 1), train_loss=base / (e + 1) + 0.01 * seed, val_loss=base / 2 / (e + 1),
        top1_err=record.top1_err + 10.0 / (e + 1), top5_err=(record.top1_err + 10.0 / (e + 1)) / 4,
        epoch_seconds=15.0, images_per_s=1000.0) for e in range(EPOCHS)])
    if npz:
        write_excitations(d / rundir.EXCITATIONS, setting != "original", seed)
    return d


def _ratio_distributions() -> dict:
    return {"setting": optuna.distributions.CategoricalDistribution(list(RATIO)),
            "seed": optuna.distributions.IntDistribution(0, 2)}


def make_results(root: Path) -> Path:
    """Write the results directory described above under `root` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"ratio-{PROFILE}", storage=f"sqlite:///{root / rundir.STORAGE_FILE}")
    for k, v in {"sweep": "ratio", "profile": PROFILE, "table": 10, "description": "ratio",
                 "settings": list(RATIO), "seeds": 3}.items():
        study.set_user_attr(k, v)
    identity = {"sweep": "ratio", "profile": PROFILE}
    for setting, base in RATIO.items():
        for seed in range(3):
            params = {"setting": setting, "seed": seed}
            if (setting, seed) in {("r=4", 1), ("r=32", 2)}:
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.FAIL, params=params, distributions=_ratio_distributions(),
                    user_attrs={**identity, "fail_reason": "RuntimeError: out of memory"}))
                if setting == "r=32":
                    continue
            if (setting, seed) == ("r=8", 2):
                study.add_trial(optuna.trial.create_trial(
                    state=TrialState.RUNNING, params=params, distributions=_ratio_distributions(),
                    user_attrs=identity))
                continue
            d = write_run_dir(root, "ratio", setting, seed, base, npz=True)
            record = results_record("ratio", setting, seed, base)
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.COMPLETE, value=record.top1_err, params=params,
                distributions=_ratio_distributions(), user_attrs={**record.to_attrs(), "run_dir": str(d)}))
    for setting, base in SQUEEZE.items():
        for seed in range(3):
            if (setting, seed) != ("max", 2):
                write_run_dir(root, "squeeze", setting, seed, base, npz=False)
    return root
