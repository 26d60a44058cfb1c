"""What a sweep's data needs, checked before any study exists.

The trainer checks the same things when it loads the data, but by then a study holds the grid and the
first trial has FAILED. Here they are checked from what is cheap to know: the class count of each data
set (a folder listing for imagefolder), the digits' class sizes, that the data root exists. Nothing is
loaded, downloaded or created.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ablations.errors import SpecError
from ablations.schema import DataSpec, Profile, RunConfig, Setting, Sweep
from ablations.spec import run_config

CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}  # fixed by the data set itself
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_TRAIN_IMAGES = 50_000


@dataclass(frozen=True)
class DataFacts:
    classes: int | None  # None: any (synthetic makes as many as the backbone has)
    train_images: int | None  # None: not counted (image folders can hold millions)
    rgb: bool


def _class_folders(split: Path) -> list[str]:
    with os.scandir(split) as entries:  # what torchvision's ImageFolder takes for classes
        return sorted(e.name for e in entries if e.is_dir())


def _digits_split(spec: DataSpec, source: str) -> int:
    """Training images of the digits' stratified split; refuses a val_fraction that leaves a class
    without training or validation images (data.stratified_split would quietly keep one of each)."""
    import numpy as np

    from ablations.data import _digits

    _, labels = _digits()
    train = 0
    for c, n in zip(*np.unique(labels, return_counts=True)):
        n_val = round(spec.val_fraction * n)
        if n_val < 1 or n_val >= n:
            left = "validation" if n_val < 1 else "training"
            raise SpecError(f"{spec.val_fraction} leaves digit class {c} ({n} images) without {left} images",
                            source=source, key="data.val_fraction")
        train += n - n_val
    return train


def facts(spec: DataSpec, data_root: str | None, source: str) -> DataFacts:
    """The data set's classes and training size, from files only. `data_root` (--data-root) overrides
    `data.root`; errors name whichever was given."""
    if spec.dataset == "digits":
        return DataFacts(CLASSES["digits"], _digits_split(spec, source), rgb=False)
    if spec.dataset == "synthetic":
        return DataFacts(None, spec.synthetic_size, rgb=False)
    root_source, root_key = ("--data-root", None) if data_root is not None else (source, "data.root")
    raw = data_root if data_root is not None else spec.root
    if raw is None:
        raise SpecError(f"{spec.dataset} needs a data root (--data-root or data.root)", source=source,
                        key="data.root")
    root = Path(raw).expanduser()
    where = f"{root_key}: {root}" if root_key else str(root)

    def bad(message: str) -> SpecError:
        return SpecError(message, source=root_source, key=where)

    if not root.is_dir():
        if spec.dataset in CIFAR_FOLDERS and spec.download:
            return DataFacts(CLASSES[spec.dataset], CIFAR_TRAIN_IMAGES, rgb=True)  # torchvision creates it
        raise bad(f"no such directory ({spec.dataset} reads its files from there)")
    if spec.dataset in CIFAR_FOLDERS:
        folder = CIFAR_FOLDERS[spec.dataset]
        if not (root / folder).is_dir() and not spec.download:
            raise bad(f"has no {folder}/ ({spec.dataset} in torchvision's python format; "
                      "data.download=true fetches it where the network allows)")
        return DataFacts(CLASSES[spec.dataset], CIFAR_TRAIN_IMAGES, rgb=True)
    splits = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise bad(f"has no {split}/ folder (ImageNet layout: train/<class>/*.png, val/<class>/*.png)")
        splits[split] = _class_folders(root / split)
    if splits["train"] != splits["val"]:
        raise bad("train/ and val/ have different class folders")
    if not splits["train"]:
        raise bad("train/ has no class folders")
    return DataFacts(len(splits["train"]), None, rgb=True)


def check_plan_data(sweep: Sweep, profile: Profile, data_root: str | None, profile_source: str,
                    nproc: int = 1) -> None:
    """Every setting of `sweep` against the profile's data: classes, input channels and size, batch.
    `profile_source` names the profile in errors (its file, and whether --set changed it)."""
    from ablations.stride import check_input_size

    spec = profile.data
    data = facts(spec, data_root, profile_source)
    if spec.batch_size % nproc:
        raise SpecError(f"{spec.batch_size} is not divisible by {nproc} processes (--nproc-per-node)",
                        source=profile_source, key="data.batch_size")
    if data.train_images is not None and spec.batch_size > data.train_images:
        raise SpecError(f"{spec.batch_size} is larger than the training set ({data.train_images} images)",
                        source=profile_source, key="data.batch_size")
    for i, setting in enumerate(sweep.settings):
        cfg = run_config(profile, setting, 0, sweep.name)

        def where(key: str, i: int = i, setting: Setting = setting) -> tuple[str, str]:
            if key.removeprefix("backbone.") in setting.backbone:
                return sweep.path or sweep.name, f"settings[{i}].{key}"
            return profile_source, key

        _check_setting(cfg, data, where)
        try:
            check_input_size(cfg)
        except SpecError as e:
            source, key = where(e.key or "data.input_size")
            raise SpecError(e.message, source=source, key=key) from None


def _check_setting(cfg: RunConfig, data: DataFacts, where: Callable[[str], tuple[str, str]]) -> None:
    if data.classes is not None and cfg.backbone.num_classes != data.classes:
        source, key = where("backbone.num_classes")
        raise SpecError(f"{cfg.data.dataset} has {data.classes} classes but backbone.num_classes is "
                        f"{cfg.backbone.num_classes}", source=source, key=key)
    if data.rgb and cfg.backbone.in_chans != 3:
        source, key = where("backbone.in_chans")
        raise SpecError(f"{cfg.data.dataset} images have 3 channels, got in_chans={cfg.backbone.in_chans}",
                        source=source, key=key)

