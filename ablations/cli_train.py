"""`ablate train`, `complexity` and `config`: the commands that need a profile and no storage. One setting
trained into a directory; every setting of a sweep counted (params and MACs) beside the paper's numbers;
the effective profile printed with what each key means."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ablations.devices import is_group
from ablations.errors import SpecError, TrialFailed
from ablations.schema import SESpec, Setting
from ablations.spec import load_profile, load_sweep, run_config
from ablations.units import macs_text, params_text

DEFAULT_LABEL = "SE r=16"


def cli_train(args: argparse.Namespace) -> int:
    """One setting (standard SE r=16, or --sweep/--setting's row) into --out; a device group trains it
    on several devices under torchrun."""
    profile = load_profile(args.profile, args.set)
    if args.sweep is None:
        if args.setting is not None:
            raise SpecError("needs --sweep (the file the label comes from)", key="--setting")
        setting, sweep_name = Setting(label=DEFAULT_LABEL, se=SESpec()), ""
    else:
        sweep = load_sweep(args.sweep)
        labels = [s.label for s in sweep.settings]
        if args.setting not in labels:
            what = "required with --sweep" if args.setting is None else f"unknown label {args.setting!r}"
            raise SpecError(f"{what} (one of: {', '.join(labels)})", source=sweep.path, key="--setting")
        setting, sweep_name = sweep.settings[labels.index(args.setting)], sweep.name
    if not 0 <= args.seed < 2**31:
        raise SpecError(f"must be in 0..{2**31 - 1} (got {args.seed})", key="--seed")
    cfg = run_config(profile, setting, args.seed, sweep=sweep_name)
    if is_group(args.device):
        from ablations.ddp import launch as trainer
        from ablations.distributed import check_compile_sync_bn

        ranks = len(args.device.split(","))
        check_compile_sync_bn(cfg.train, ranks, cfg.data.batch_size // ranks)
    else:
        from ablations.train import train as trainer
    from ablations.tensorboard_log import EpochScalars

    scalars = EpochScalars(Path(args.out))
    try:
        final = trainer(cfg, Path(args.out), device=args.device, data_root=args.data_root, on_epoch=scalars)
    except TrialFailed as e:
        print(f"error: trial failed: {e}", file=sys.stderr)
        return 1
    finally:
        scalars.close()
    print(f"{cfg.setting} (profile {cfg.profile}, seed {cfg.seed}): top-1 error {final.top1_err:.2f}%  "
          f"top-5 error {final.top5_err:.2f}%  val loss {final.val_loss:.4f}")
    print(f"{params_text(final.params_m)} params  {macs_text(final.gflops)} MACs  {final.epochs} epochs  "
          f"{final.train_seconds:.1f} s training  {final.images_per_s:.0f} images/s on "
          f"{final.device}  -> {args.out}")
    return 0


def _count(cfg):
    """Params and MACs of one row, counted on the meta device (shapes only: no memory, no init time); a
    plug-in that cannot run there is counted on real CPU tensors."""
    import torch

    from ablations.complexity import complexity
    from ablations.patch import build_model
    from ablations.schema import PLUGIN

    plugin = cfg.se is not None and PLUGIN.fullmatch(cfg.se.attention)
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                model = build_model(cfg.backbone, cfg.se)
            return complexity(model, cfg.data.input_size, cfg.backbone.in_chans)
        except SpecError:
            raise
        except Exception:  # noqa: BLE001 - only a plug-in gets its second try, on the CPU
            if not plugin or device == "cpu":
                raise
    raise AssertionError("unreachable")


def complexity_rows(sweep_name: str, profile_name: str, overrides: list[str]) -> list[dict]:
    """One row per setting: exact params/MACs, the paper's precision, and the published values."""
    sweep = load_sweep(sweep_name)
    profile = load_profile(profile_name, overrides)
    rows = []
    for i, setting in enumerate(sweep.settings):
        cfg = run_config(profile, setting, seed=0, sweep=sweep.name)
        try:
            c = _count(cfg)
        except SpecError as e:
            raise e.within(sweep.path, f"settings[{i}]") from None
        paper = sweep.published_numbers(setting.label)
        rows.append({
            "setting": setting.label,
            "params_m": round(c.params_m, 1),  # the paper's precision
            "gflops": round(c.gflops, 2),
            "paper_params_m": paper["params_m"],
            "paper_gflops": paper["gflops"],
            "params": c.params,  # exact
            "macs": c.macs,
        })
    return rows


def cli_complexity(args: argparse.Namespace) -> int:
    import pandas as pd

    rows = complexity_rows(args.sweep, args.profile, args.set)
    df = pd.DataFrame(rows)
    if args.format == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        print(complexity_text(rows))
    return 0


def complexity_text(rows: list[dict]) -> str:
    """The table for people: exact counts in units that scale (a quick-profile row's 430 k params and
    5.18 M MACs, not 0.4 and 0.01 on every row), the paper's beside them, a dash where it has none."""
    import pandas as pd

    from ablations.units import scaled

    return pd.DataFrame({
        "setting": [r["setting"] for r in rows],
        "params": [scaled(r["params"]) for r in rows],
        "FLOPs (MACs)": [scaled(r["macs"]) for r in rows],
        "paper params": [params_text(r["paper_params_m"]) for r in rows],
        "paper FLOPs": [macs_text(r["paper_gflops"]) for r in rows],
    }).to_string(index=False)


def cli_config(args: argparse.Namespace) -> int:
    from ablations.config_doc import profile_yaml

    sys.stdout.write(profile_yaml(load_profile(args.profile, args.set), args.set))
    return 0
