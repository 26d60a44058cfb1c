"""A small results dir in the trainer/scheduler data contract, written without training anything.

Contents (profile "quick"):
- ratio (Table 10): an Optuna study + run dirs; 6 settings x seeds 0-2. r=4 seed 1 failed once and
  then completed on retry; r=32 seed 2 only failed (so it is missing); r=8 seed 2 is still RUNNING.
- squeeze (Table 11): run dirs only, no study (the results-dir fallback); max seed 2 never started.
- excitations.npz in every ratio run dir (ResNet-50 topology names SE_2_1..SE_5_3; empty for `original`).
Metrics are deterministic functions of (setting, seed) so tests can recompute them by hand. Each has a
seed-dependent wobble that differs between settings, so per-seed differences to the reference vary
(a paired test has a spread to work with) and Table 10 on top-1 mixes verdicts: four rows `better`,
r=32 `no detected difference`, and r=2 with raw p < 0.05 that Holm lifts above 0.05.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import yaml

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


def slug(label: str) -> str:
    from ablations.spec import Setting

    return Setting(label=label).slug


def final_info(sweep: str, setting: str, seed: int, base: float, run_dir: Path) -> dict:
    return {
        "top1_err": top1(base, seed), "top5_err": top5(base, seed), "val_loss": 0.1 + 0.01 * seed,
        "params_m": PARAMS.get(setting, 0.38), "gflops": 0.0123, "params": 380000, "macs": 12300000,
        "train_seconds": 60.0 + seed, "images_per_s": 1000.0 + 10 * seed, "epochs": EPOCHS,
        "device": "cpu", "git_commit": "abc1234", "sweep": sweep, "profile": PROFILE, "setting": setting,
        "seed": seed, "run_dir": str(run_dir),
    }


def blocks(has_se: bool) -> list[str]:
    return [f"SE_{s}_{j}" for s, n in LAYERS.items() for j in range(1, n + 1)] if has_se else []


def excitations(path: Path, has_se: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = blocks(has_se)
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


def run_dir(root: Path, sweep: str, setting: str, seed: int, base: float, *, npz: bool) -> Path:
    d = root / PROFILE / sweep / slug(setting) / f"seed{seed}"
    d.mkdir(parents=True)
    info = final_info(sweep, setting, seed, base, d)
    (d / "config.yaml").write_text(yaml.safe_dump({"sweep": sweep, "profile": PROFILE, "setting": setting,
                                                   "seed": seed}))
    (d / "final.json").write_text(json.dumps(info))
    lines = ["epoch,lr,train_loss,val_loss,top1_err,top5_err,epoch_seconds,images_per_s"]
    for e in range(EPOCHS):
        err = info["top1_err"] + 10.0 / (e + 1)
        lines.append(f"{e},{0.1 / (e + 1):.4f},{base / (e + 1) + 0.01 * seed:.4f},{base / 2 / (e + 1):.4f},"
                     f"{err:.4f},{err / 4:.4f},15.0,1000.0")
    (d / "metrics.csv").write_text("\n".join(lines) + "\n")
    if npz:
        excitations(d / "excitations.npz", setting != "original", seed)
    return d


def dist():
    return {"setting": optuna.distributions.CategoricalDistribution(list(RATIO)),
            "seed": optuna.distributions.IntDistribution(0, 2)}


def make_results(root: Path) -> Path:
    """Write the fixture under `root` (which becomes the results dir) and return it."""
    root.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"ratio-{PROFILE}", storage=f"sqlite:///{root / 'optuna.db'}")
    for k, v in {"sweep": "ratio", "profile": PROFILE, "table": 10, "description": "ratio",
                 "settings": list(RATIO), "seeds": 3}.items():
        study.set_user_attr(k, v)
    for setting, base in RATIO.items():
        for seed in range(3):
            params = {"setting": setting, "seed": seed}
            if (setting, seed) in {("r=4", 1), ("r=32", 2)}:
                study.add_trial(optuna.trial.create_trial(
                    state=optuna.trial.TrialState.FAIL, params=params, distributions=dist(),
                    user_attrs={"sweep": "ratio", "profile": PROFILE, "setting": setting, "seed": seed,
                                "fail_reason": "RuntimeError: out of memory"}))
                if setting == "r=32":
                    continue
            if (setting, seed) == ("r=8", 2):
                study.add_trial(optuna.trial.create_trial(
                    state=optuna.trial.TrialState.RUNNING, params=params, distributions=dist(),
                    user_attrs={"sweep": "ratio", "profile": PROFILE, "setting": setting, "seed": seed}))
                continue
            d = run_dir(root, "ratio", setting, seed, base, npz=True)
            info = final_info("ratio", setting, seed, base, d)
            study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE, value=info["top1_err"], params=params,
                distributions=dist(), user_attrs=info))
    for setting, base in SQUEEZE.items():
        for seed in range(3):
            if (setting, seed) != ("max", 2):
                run_dir(root, "squeeze", setting, seed, base, npz=False)
    return root
