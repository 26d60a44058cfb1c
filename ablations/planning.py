"""What `ablate run` and `ablate launch` will train, validated before anything touches the storage:
every sweep x the profile down to building each setting's model (on the meta device) and to what its
data needs (classes, split, data root), and the options that shape the run. Nothing after this fails
on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ablations.datacheck import check_plan_data
from ablations.errors import SpecError
from ablations.grid import Plan
from ablations.schema import MAX_SEEDS
from ablations.spec import load_profile, load_sweep, run_config


def plans_from_args(args: argparse.Namespace) -> list[Plan]:
    """Every sweep x the profile, validated down to building each setting's model (on the meta device)
    and to what its data needs (classes, split, data root): nothing after this fails on bad input."""
    from ablations.patch import check_fits  # timm: imported while `ablate run`'s workers start

    if args.seeds is not None and not 0 < args.seeds <= MAX_SEEDS:
        raise SpecError(f"must be a positive integer up to {MAX_SEEDS} (got {args.seeds})", source="--seeds")
    profile = load_profile(args.profile, args.set)
    profile_source = f"{profile.path} (with --set)" if args.set else str(profile.path)
    plans: list[Plan] = []
    for name in args.sweeps:
        sweep = load_sweep(name)
        same = next((p.sweep for p in plans if p.sweep.name == sweep.name), None)
        if same is not None:
            if Path(same.path or "").resolve() == Path(sweep.path or "").resolve():
                continue  # the same file named twice
            raise SpecError(f"sweep name {sweep.name!r} is also the name of {same.path}: one study per name "
                            "(set `name:` in one of them)", source=sweep.path, key="name")
        for i, setting in enumerate(sweep.settings):
            try:
                cfg = run_config(profile, setting, 0, sweep.name)
                check_fits(cfg.backbone, cfg.se)
            except SpecError as e:
                raise SpecError(e.message, source=sweep.path, key=".".join(
                    p for p in (f"settings[{i}]", e.key) if p)) from None
        check_plan_data(sweep, profile, args.data_root, profile_source, getattr(args, "nproc_per_node", 1))
        plans.append(Plan(sweep, profile, args.seeds or sweep.seeds, tuple(args.set), args.data_root))
    return plans


def check_decode_devices(plans: list[Plan], devices: list[str]) -> None:
    """`data.decode: gpu` on a CPU device, and torch.compile with SyncBN over a device group, refused
    before any study or trial changes."""
    from ablations.data import check_decode_device
    from ablations.devices import is_group
    from ablations.distributed import check_compile_sync_bn

    for plan in plans:
        for device in devices:
            check_decode_device(plan.profile.data, device)
            ranks = len(device.split(",")) if is_group(device) else 1
            check_compile_sync_bn(plan.profile.train, ranks, plan.profile.data.batch_size // ranks)


def check_scale_options(args: argparse.Namespace, workers: int | None = None) -> None:
    if workers is not None and workers <= 0:
        raise SpecError(f"must be a positive integer (got {workers})", source="--workers")
    if args.nproc_per_node < 1:
        raise SpecError(f"must be a positive integer (got {args.nproc_per_node})", source="--nproc-per-node")
