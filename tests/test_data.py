"""Data sets: digits split and scaling, synthetic determinism, on-device augmentation, CIFAR and
ImageFolder read from tiny files in their real formats, the folder pipeline (persistent workers, the
file-list cache, decoding on the device, /dev/shm), and the one-line errors for bad data input."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT

from ablations.batches import seed_for
from ablations.data import InMemoryData, crop_flip, load_data, stratified_split
from ablations.errors import SpecError
from ablations.folder_data import FolderData
from ablations.schema import BackboneSpec, DataSpec, RunConfig, SESpec, TrainSpec
from ablations.stride import input_stride

TINY = BackboneSpec(arch="resnet50", layers=(1, 1, 1, 1), channels=(16, 16, 16, 16), small_stem=True,
                    num_classes=10)


def cfg_for(backbone: BackboneSpec = TINY, **data) -> RunConfig:
    return RunConfig(sweep="", profile="test", setting="SE", seed=0, se=SESpec(), backbone=backbone,
                     data=DataSpec(**data), train=TrainSpec())


# --------------------------------------------------------------------------------------------------
# digits and synthetic


def test_digits_split_is_stratified_fixed_and_scaled():
    cfg = cfg_for(TINY.model_copy(update={"in_chans": 3}), dataset="digits", input_size=16,
                  val_fraction=0.2, batch_size=64)
    a, b = load_data(cfg), load_data(cfg)
    assert a.train_x.dtype == torch.uint8 and a.train_x.shape[1:] == (3, 16, 16)
    assert len(a.train_x) + len(a.val_x) == 1797
    assert abs(len(a.val_x) - 0.2 * 1797) <= 10  # rounding per class
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y)  # the split is fixed
    # Stratified: each class's share of the validation set is its share of the whole set.
    whole = torch.bincount(torch.cat([a.train_y, a.val_y]), minlength=10).double()
    val = torch.bincount(a.val_y, minlength=10).double()
    assert torch.allclose(val / whole, torch.full((10,), 0.2, dtype=torch.float64), atol=0.02)
    assert int(a.train_x.max()) == 255  # 16 -> 255, not left at 0..16
    assert torch.equal(a.train_x[:, 0], a.train_x[:, 2])  # the one channel, replicated


def test_stratified_split_disjoint_and_complete():
    labels = np.repeat(np.arange(3), [10, 20, 5])
    tr, va = stratified_split(labels, 0.2)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(35))
    assert np.bincount(labels[va]).tolist() == [2, 4, 1]


def test_synthetic_is_deterministic_and_sized():
    cfg = cfg_for(dataset="synthetic", input_size=16, synthetic_size=64, batch_size=16)
    a, b = load_data(cfg), load_data(cfg)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert len(a.train_x) == 64 and len(a.val_x) == 16
    assert set(a.train_y.tolist()) == set(range(10))


# --------------------------------------------------------------------------------------------------
# On-device batches


def _tiny_set(n: int = 40, **kw) -> InMemoryData:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 4
    return InMemoryData(x, y, x[:8], y[:8], 4, batch_size=8, eval_batch_size=5, **kw)


def test_epoch_order_depends_only_on_seed_and_epoch():
    d = _tiny_set(crop_padding=1, hflip=True)
    first = [x for x, _ in d.train_batches(epoch=3, seed=7)]
    again = [x for x, _ in _tiny_set(crop_padding=1, hflip=True).train_batches(epoch=3, seed=7)]
    other = [x for x, _ in d.train_batches(epoch=4, seed=7)]
    assert len(first) == 5 and all(torch.equal(p, q) for p, q in zip(first, again))
    assert not all(torch.equal(p, q) for p, q in zip(first, other))
    assert seed_for(1, 2) != seed_for(2, 1)


def test_ranks_take_disjoint_equal_shards():
    shards = []
    for rank in range(2):
        d = _tiny_set(rank=rank, world_size=2)
        ys = torch.cat([y for _, y in d.train_batches(epoch=0, seed=1)])
        xs = torch.cat([x for x, _ in d.train_batches(epoch=0, seed=1)])
        assert len(ys) == d.images_per_epoch == 20
        shards.append({tuple(v.flatten().tolist()) for v in xs})
    assert not shards[0] & shards[1]
    whole = _tiny_set()
    everything = {tuple(v.flatten().tolist()) for v in whole.normalise(whole.train_x)}
    assert shards[0] | shards[1] == everything


def test_batches_are_normalised_floats():
    d = _tiny_set()
    x, y = next(d.train_batches(epoch=0, seed=0))
    assert x.dtype == torch.float32 and x.shape == (8, 1, 6, 6) and y.dtype == torch.long
    full = d.normalise(d.train_x)
    assert abs(full.mean().item()) < 1e-3 and abs(full.std().item() - 1) < 1e-2


def test_crop_flip_identity_and_valid_crops():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    assert torch.equal(crop_flip(x, 0, False, g), x)
    out = crop_flip(x, 1, False, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):  # every output image is one of the 9 crops of its own padded image
        crops = [padded[i, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], c) for c in crops)
    flipped = [crop_flip(x, 0, True, g) for _ in range(20)]
    for f in flipped:
        for i in range(2):
            assert torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1))
    assert any(torch.equal(f[0], x[0].flip(-1)) for f in flipped)
    assert any(torch.equal(f[0], x[0]) for f in flipped)


def test_val_batches_cover_validation_in_order():
    d = _tiny_set()
    ys = torch.cat([y for _, y in d.val_batches()])
    assert torch.equal(ys, d.val_y)
    picked = torch.cat([y for _, y in d.val_batches(torch.tensor([3, 1]))])
    assert picked.tolist() == [d.val_y[3].item(), d.val_y[1].item()]


# --------------------------------------------------------------------------------------------------
# CIFAR in torchvision's python-pickle format


def write_cifar10(root: Path, per_batch: int = 4, test: int = 6, key_type=str) -> dict[str, np.ndarray]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    k = key_type if key_type is str else (lambda s: s.encode())
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        with (base / name).open("wb") as f:
            pickle.dump({k("batch_label"): name, k("data"): data, k("labels"): labels,
                         k("filenames"): [f"{name}_{i}.png" for i in range(n)]}, f)
        written[name] = data
        written[name + "_labels"] = np.array(labels)
    with (base / "batches.meta").open("wb") as f:
        pickle.dump({k("label_names"): [f"c{i}" for i in range(10)], k("num_cases_per_batch"): per_batch,
                     k("num_vis"): 3072}, f)
    return written


@pytest.mark.parametrize("key_type", [str, bytes])
def test_cifar10_reads_torchvision_files(tmp_path, key_type):
    written = write_cifar10(tmp_path, key_type=key_type)
    cfg = cfg_for(dataset="cifar10", input_size=32, batch_size=4)
    d = load_data(cfg, root=str(tmp_path))
    assert d.train_x.shape == (20, 3, 32, 32) and d.val_x.shape == (6, 3, 32, 32)
    # Row-major 3072 = 3 planes of 32x32, the layout torchvision reshapes to (3, 32, 32).
    assert np.array_equal(d.train_x[:4].numpy().reshape(4, 3072), written["data_batch_1"])
    assert np.array_equal(d.val_y.numpy(), written["test_batch_labels"])
    assert np.array_equal(d.train_y[4:8].numpy(), written["data_batch_2_labels"])


def test_cifar10_resized_to_input_size(tmp_path):
    write_cifar10(tmp_path)
    d = load_data(cfg_for(dataset="cifar10", input_size=16, batch_size=4), root=str(tmp_path))
    assert d.train_x.shape[-2:] == (16, 16) and d.train_x.dtype == torch.uint8


def test_cifar100_format(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 8), ("test", 4)):
        with (base / name).open("wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(range(n)), "coarse_labels": [0] * n}, f)
    with (base / "meta").open("wb") as f:
        pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)],
                     "coarse_label_names": [f"c{i}" for i in range(20)]}, f)
    backbone = TINY.model_copy(update={"num_classes": 100})
    d = load_data(cfg_for(backbone, dataset="cifar100", input_size=32, batch_size=4), root=str(tmp_path))
    assert d.num_classes == 100 and d.train_y.tolist() == list(range(8))


def test_cifar_errors_name_the_key(tmp_path):
    cfg = cfg_for(dataset="cifar10", input_size=32, batch_size=4)
    with pytest.raises(SpecError, match="data.root: .*needs a data root"):
        load_data(cfg)
    with pytest.raises(SpecError, match="data.root: no such directory"):
        load_data(cfg, root=str(tmp_path / "nope"))
    with pytest.raises(SpecError, match="data.root: .*has no cifar-10-batches-py"):
        load_data(cfg, root=str(tmp_path))
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(SpecError, match="data.root: malformed CIFAR file .*data_batch_3"):
        load_data(cfg, root=str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(SpecError, match="data.root: missing data_batch_3"):
        load_data(cfg, root=str(tmp_path))


def test_cifar_class_count_must_match(tmp_path):
    write_cifar10(tmp_path)
    cfg = cfg_for(TINY.model_copy(update={"num_classes": 100}), dataset="cifar10", input_size=32,
                  batch_size=4)
    with pytest.raises(SpecError, match="backbone.num_classes: cifar10 has 10 classes"):
        load_data(cfg, root=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# ImageNet-style folders


def write_image_folder(root: Path, classes=("ant", "bee", "cat"), per_class=(4, 2), size=20) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{c}_{i}.png")


def test_image_folder_batches(tmp_path):
    write_image_folder(tmp_path)
    backbone = TINY.model_copy(update={"num_classes": 3})
    cfg = cfg_for(backbone, dataset="imagefolder", input_size=16, batch_size=4, eval_batch_size=4,
                  workers=0)
    d = load_data(cfg, root=str(tmp_path), memory_format=torch.channels_last)
    assert isinstance(d, FolderData) and d.num_classes == 3 and d.steps_per_epoch == 3
    batches = list(d.train_batches(epoch=0, seed=0))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.is_contiguous(memory_format=torch.channels_last)
    # Same (seed, epoch) -> same crops, including what the workers drew.
    again = list(d.train_batches(epoch=0, seed=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    val = list(d.val_batches())
    assert sum(len(v[1]) for v in val) == 6 and d.val_labels().tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.cat([v[1] for v in val]).tolist() == [0, 0, 1, 1, 2, 2]


def test_image_folder_with_workers(tmp_path):
    write_image_folder(tmp_path, per_class=(2, 1))
    backbone = TINY.model_copy(update={"num_classes": 3})
    cfg = cfg_for(backbone, dataset="imagefolder", input_size=16, batch_size=2, workers=2)
    d = load_data(cfg, root=str(tmp_path))
    try:
        ys = torch.cat([y for _, y in d.train_batches(epoch=1, seed=3)])
    finally:
        d.close()  # its workers live as long as the data set: left to the collector, they stall the next test
    assert sorted(ys.tolist()) == [0, 0, 1, 1, 2, 2]


def test_image_folder_errors(tmp_path):
    backbone = TINY.model_copy(update={"num_classes": 3})
    cfg = cfg_for(backbone, dataset="imagefolder", input_size=16, batch_size=2, workers=0)
    (tmp_path / "train").mkdir()
    with pytest.raises(SpecError, match="data.root: malformed image folder"):
        load_data(cfg, root=str(tmp_path))  # train/ without class folders
    write_image_folder(tmp_path / "ok")
    (tmp_path / "novalid").mkdir()
    (tmp_path / "novalid" / "train").symlink_to(tmp_path / "ok" / "train")
    with pytest.raises(SpecError, match="data.root: .*has no val/"):
        load_data(cfg, root=str(tmp_path / "novalid"))
    wrong = cfg_for(TINY.model_copy(update={"num_classes": 5}), dataset="imagefolder", input_size=16,
                    batch_size=2, workers=0)
    with pytest.raises(SpecError, match="backbone.num_classes: .* has 3 classes"):
        load_data(wrong, root=str(tmp_path / "ok"))


# --------------------------------------------------------------------------------------------------
def test_a_trial_cannot_change_the_next_ones_digits():
    """The digits are read once per process (a worker's trials share them): what one trial's data do
    to their tensors must not reach the next trial's."""
    cfg = cfg_for(dataset="digits", input_size=8, batch_size=64)
    first = load_data(cfg)
    pristine = first.train_x.clone()
    first.train_x.zero_()
    first.train_y.fill_(3)
    second = load_data(cfg)
    assert torch.equal(second.train_x, pristine)
    assert len(torch.unique(second.train_y)) == 10


@pytest.mark.slow
def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    """`_digits` reads the file scikit-learn ships (its import costs every worker 1-2 s); what it reads
    must be exactly `load_digits()`, and the fallback through scikit-learn must give the same."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from ablations import data

    code = ("import sys; from ablations.data import _digits; images, labels = _digits(); "
            "print(images.shape, labels.shape, 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1797,", "8,", "8)", "(1797,)", "False"]
    d = load_digits()
    expected = np.concatenate([d.data, d.target[:, None]], axis=1)
    assert np.array_equal(data._digits_csv(), expected)
    images, labels = data._digits()
    assert np.array_equal(images, np.rint(d.images * (255.0 / 16.0)).astype(np.uint8))
    assert np.array_equal(labels, d.target) and labels.dtype == np.int64
    import importlib.util  # scikit-learn's file not found: read through load_digits() instead

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert np.array_equal(data._digits_csv(), expected)


@pytest.mark.parametrize("small_stem", [True, False])
def test_the_backbones_stride_is_every_settings_and_measured_once(small_stem):
    """input_stride takes the backbone alone; every SE position and stage set downsamples exactly as it
    does, so its stride is the stride of each setting's model."""
    from ablations.patch import build_model
    from ablations.stride import _input_stride

    backbone = TINY.model_copy(update={"small_stem": small_stem})
    _input_stride.cache_clear()
    stride = input_stride(backbone)
    assert stride == (8 if small_stem else 32)  # stages 3..5 halve the map; the ImageNet stem 4 more
    side = 3 * stride  # a map of 3x3 at the last stage: a wrong stride would show in the shape
    for se in (SESpec(), *(SESpec(position=p) for p in ("pre", "post", "identity", "3x3")),
               SESpec(squeeze="none", stages=(2, 5)), None):
        with torch.device("meta"):
            out = build_model(backbone, se).forward_features(torch.empty(1, 3, side, side))
        assert out.shape[-2:] == (side // stride, side // stride), se
    assert input_stride(backbone) == stride and _input_stride.cache_info().misses == 1


# Other bad input


def test_input_too_small_for_backbone():
    with pytest.raises(SpecError, match="data.input_size: 4 is too small .*total stride 8"):
        load_data(cfg_for(dataset="digits", input_size=4))
    imagenet_stem = TINY.model_copy(update={"small_stem": False})
    with pytest.raises(SpecError, match="total stride 32"):
        load_data(cfg_for(imagenet_stem, dataset="digits", input_size=16))
    assert load_data(cfg_for(dataset="digits", input_size=8, batch_size=64)).train_x.shape[-1] == 8


def test_unknown_dataset_and_oversized_batch():
    bad = cfg_for(dataset="digits").model_copy(
        update={"data": DataSpec.model_construct(**{**DataSpec().model_dump(), "dataset": "mnist"})})
    with pytest.raises(SpecError, match="data.dataset: unknown dataset 'mnist'"):
        load_data(bad)
    with pytest.raises(SpecError, match="data.batch_size: 5000 is larger than the training set"):
        load_data(cfg_for(dataset="digits", input_size=8, batch_size=5000))


# --------------------------------------------------------------------------------------------------
# The folder pipeline: persistent workers, the file-list cache, decoding on the training device, /dev/shm


def write_jpeg_folder(root: Path, classes=("ant", "bee", "cat"), per_class=(6, 3), extra: bool = False) -> None:
    """JPEGs of varied sizes with some structure (a gradient per class plus noise), as a camera's would
    be. `extra` adds what nvJPEG cannot read, as ImageNet has: a PNG, a CMYK JPEG, and a grayscale JPEG."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in zip(("train", "val"), per_class):
        for k, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = 30 + 3 * i, 40 - 2 * i
                ramp = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.5 + 0.2 * k, 0.3])
                pixels = (ramp + rng.normal(0, 25, (h, w, 3))).clip(0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if extra and i == 0 and c == "ant":
                    image.save(d / f"{c}_{i}.png")
                elif extra and i == 0:
                    image.convert("CMYK" if c == "bee" else "L").save(d / f"{c}_{i}.jpg")
                else:
                    image.save(d / f"{c}_{i}.jpg", quality=90)


def folder_spec(**kw) -> DataSpec:
    return DataSpec(**{"dataset": "imagefolder", "input_size": 16, "batch_size": 4, "eval_batch_size": 4,
                       "workers": 2, **kw})


def batches_of(it) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in it]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))


def test_persistent_workers_give_the_per_pass_loaders_batches(tmp_path):
    """Workers kept across epochs and evaluations give exactly the batches of a loader built for each
    pass (the former behaviour) and of no workers at all; epochs differ; an abandoned pass (precise BN
    reads a few batches only) does not leak into the next."""
    write_jpeg_folder(tmp_path)
    kept = FolderData(tmp_path, folder_spec())
    rebuilt = FolderData(tmp_path, folder_spec(), persistent=False)
    inline = FolderData(tmp_path, folder_spec(workers=0))
    try:
        for d in (kept, rebuilt, inline):
            assert d.steps_per_epoch == 4
        runs = []
        for d in (kept, rebuilt, inline):
            seen = []
            for epoch in range(2):
                seen.append(batches_of(d.train_batches(epoch, seed=5)))
                next(iter(d.train_batches(epoch, seed=5)))  # abandoned after one batch
                seen.append(batches_of(d.val_batches()))
            runs.append(seen)
        assert all(same(a, b) for a, b in zip(runs[0], runs[1]))
        assert all(same(a, b) for a, b in zip(runs[0], runs[2]))
        epoch0, val0, epoch1, val1 = runs[0]
        assert len(epoch0) == 4 and epoch0[0][0].shape == (4, 3, 16, 16)
        assert not same(epoch0, epoch1)  # another order and other crops
        assert same(val0, val1)  # evaluation is deterministic
        counts = torch.bincount(torch.cat([y for _, y in epoch0]), minlength=3)
        assert counts.sum() == 16 and (counts <= 6).all()  # 16 of the 18 images: a partial batch is dropped
        other_seed = batches_of(kept.train_batches(0, seed=6))
        assert not same(epoch0, other_seed)
    finally:
        for d in (kept, rebuilt, inline):
            d.close()


def test_a_fresh_folder_data_resumes_at_epoch_k(tmp_path):
    """A trial resumed at epoch 2 (a new process: a fresh FolderData) reads epoch 2's batches exactly."""
    write_jpeg_folder(tmp_path)
    first = FolderData(tmp_path, folder_spec())
    try:
        for epoch in range(2):
            batches_of(first.train_batches(epoch, seed=1))
            batches_of(first.val_batches())
        third = batches_of(first.train_batches(2, seed=1))
    finally:
        first.close()
    fresh = FolderData(tmp_path, folder_spec(workers=1))
    try:
        assert same(batches_of(fresh.train_batches(2, seed=1)), third)
    finally:
        fresh.close()


def test_ranks_take_disjoint_shards_of_the_folder(tmp_path):
    write_jpeg_folder(tmp_path)
    labels = []
    for rank in range(2):
        d = FolderData(tmp_path, folder_spec(workers=0), rank=rank, world_size=2)
        assert d.images_per_epoch == 8
        order = torch.randperm(18, generator=torch.Generator().manual_seed(seed_for(4, 0)))[:16]
        expected = torch.from_numpy(d.lists[0].targets)[order[rank::2]]
        labels.append(torch.cat([y for _, y in d.train_batches(0, seed=4)]))
        assert torch.equal(labels[-1], expected)


def test_the_folder_is_scanned_once_per_process(tmp_path, monkeypatch):
    """Every directory is listed once: not again for validation, for the next trial, or a resumed one."""
    import os

    from ablations import folder_data

    write_jpeg_folder(tmp_path / "a")
    listed: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path="."):
        listed.append(os.path.realpath(os.fspath(path)))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    root = tmp_path / "a"
    dirs = {os.path.realpath(root / s / c) for s in ("train", "val") for c in ("ant", "bee", "cat")}
    dirs |= {os.path.realpath(root / s) for s in ("train", "val")}
    for trial in range(2):
        d = FolderData(root, folder_spec(workers=0))
        batches_of(d.train_batches(trial, seed=0))
        batches_of(d.val_batches())
        assert sorted(listed) == sorted(dirs), trial  # each split and class folder exactly once
    # A class folder added: the split's listing changes, and that split is scanned again.
    (root / "val" / "dog").mkdir()
    with pytest.raises(SpecError, match="data.root: malformed image folder .*val"):
        FolderData(root, folder_spec(workers=0))
    assert listed.count(os.path.realpath(root / "val")) == 2
    assert listed.count(os.path.realpath(root / "train")) == 1
    assert folder_data._scan.cache_info().currsize >= 2


def test_close_ends_the_workers(tmp_path):
    """A long-lived worker process runs many trials: each trial's loader workers end with the trial."""
    import multiprocessing

    write_jpeg_folder(tmp_path)
    before = set(multiprocessing.active_children())
    d = FolderData(tmp_path, folder_spec(workers=2))
    batches_of(d.train_batches(0, seed=0))
    batches_of(d.val_batches())
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2  # the same two served training and evaluation
    d.close()
    assert not any(p.is_alive() for p in workers)
    d.close()  # twice is harmless


def test_a_trial_on_a_folder_leaves_no_workers_behind(tmp_path):
    import multiprocessing

    from ablations.train import train

    write_jpeg_folder(tmp_path / "data")
    cfg = cfg_for(TINY.model_copy(update={"num_classes": 3}), **{**folder_spec().model_dump(), "workers": 1})
    cfg = cfg.model_copy(update={"train": TrainSpec(epochs=2, threads=1, precise_bn=1)})
    before = set(multiprocessing.active_children())
    final = train(cfg, tmp_path / "run", device="cpu", data_root=str(tmp_path / "data"), progress=False)
    assert final.epochs == 2 and 0 <= final.top1_err <= 100
    assert not [p for p in multiprocessing.active_children() if p not in before]


def test_gpu_decode_refused_without_cuda(tmp_path, capsys):
    """`data.decode: gpu` on a CPU device: one line naming data.decode, before anything is created."""
    from ablations.cli import main

    write_jpeg_folder(tmp_path / "data")
    cfg = cfg_for(TINY.model_copy(update={"num_classes": 3}), **folder_spec(decode="gpu").model_dump())
    with pytest.raises(SpecError, match=r"^data.decode: gpu decodes JPEGs with nvJPEG .* trains on cpu "):
        load_data(cfg, root=str(tmp_path / "data"))
    sets = ["--set", "data.dataset=imagefolder", "--set", "data.decode=gpu", "--set", "backbone.num_classes=3",
            "--set", "backbone.in_chans=3", "--data-root", str(tmp_path / "data")]
    assert main(["train", "--out", str(tmp_path / "run"), "--device", "cpu", *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data.decode: ") and "use data.decode=cpu" in err
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert main(["run", "ratio", "--profile", "quick", "--results-dir", str(tmp_path / "results"),
                 "--devices", "cpu", *sets]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: data.decode: ")
    assert not (tmp_path / "results" / "optuna.db").exists()
    # cpu decoding, or gpu decoding where it does not apply (in-memory sets), is accepted
    load_data(cfg.model_copy(update={"data": folder_spec(decode="cpu")}), root=str(tmp_path / "data")).close()
    load_data(cfg_for(dataset="digits", input_size=8, batch_size=64, decode="gpu"))


def test_decoding_on_the_device_matches_the_pil_path(tmp_path):
    """The `decode: gpu` code path run with the CPU as the decode device: JPEG bytes from the workers,
    decoded as one batch and cropped here. Same shapes and dtypes as the PIL path; evaluation (no
    randomness) within a grey level of it; training the same crops and flips, so close as well. PNG,
    CMYK and grayscale files go through the workers' CPU decoding."""
    write_jpeg_folder(tmp_path, extra=True)
    pil = FolderData(tmp_path, folder_spec(workers=1))
    batched = FolderData(tmp_path, folder_spec(workers=1), decode_on_device=True)
    level = 1 / (0.224 * 255)  # one grey level in normalised units, at the smallest std
    try:
        for a, b in ((batches_of(pil.val_batches()), batches_of(batched.val_batches())),
                     (batches_of(pil.train_batches(3, seed=2)), batches_of(batched.train_batches(3, seed=2)))):
            assert len(a) == len(b) > 0
            for (xa, ya), (xb, yb) in zip(a, b):
                assert xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
                assert torch.equal(ya, yb)
                diff = (xa - xb).abs()
                assert diff.max() <= 1.01 * level and diff.mean() <= 0.3 * level, (diff.max(), diff.mean())
    finally:
        pil.close()
        batched.close()


def test_decode_batch_falls_back_and_names_what_it_cannot_read(tmp_path):
    import io

    from PIL import Image

    from ablations import folder_transforms as ft

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(buf, "JPEG")
    good = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    broken = good[:40].clone()  # a truncated JPEG fails the whole batched call
    png = ft.decode_cpu(good)  # what a worker sends for a file nvJPEG cannot read: decoded already
    images = ft.decode_batch([good, png], torch.device("cpu"), ["a.jpg", "b.png"])
    assert [tuple(i.shape) for i in images] == [(3, 12, 10), (3, 12, 10)] and torch.equal(images[0], images[1])
    with pytest.raises(RuntimeError, match="^cannot decode broken.jpg: "):
        ft.decode_batch([good, broken], torch.device("cpu"), ["good.jpg", "broken.jpg"])
    assert ft.probe_decoder(torch.device("cpu")) is None


@pytest.mark.slow
def test_crop_params_are_torchvisions_drawn_from_the_seed_alone():
    """The box and flip depend on (seed, size) only and leave torch's generator alone; over many seeds
    the boxes are distributed as torchvision's RandomResizedCrop draws them; an image too elongated for
    any draw gets torchvision's centre-crop fallback."""
    import statistics

    from torchvision import transforms as T

    from ablations import folder_transforms as ft

    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    boxes = [ft.crop_params(s, 300, 400) for s in range(2000)]
    assert torch.equal(torch.rand(3), expected_next)  # the training process's stream is untouched
    assert boxes[:50] == [ft.crop_params(s, 300, 400) for s in range(50)]
    assert len(set(boxes)) > 1900 and 0.45 < statistics.mean(b[4] for b in boxes) < 0.55
    for top, left, h, w, _ in boxes:
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.08 * 0.97 <= h * w / (300 * 400) <= 1 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
    theirs = []
    for s in range(2000):
        torch.manual_seed(s)
        theirs.append(T.RandomResizedCrop.get_params(torch.empty(1, 300, 400), [0.08, 1.0], [3 / 4, 4 / 3]))
    for stat in (lambda b: b[2] * b[3] / 120000, lambda b: b[3] / b[2], lambda b: b[0] + b[2] / 2):
        ours, tv = statistics.mean(map(stat, boxes)), statistics.mean(map(stat, theirs))
        assert abs(ours - tv) < 0.03 * abs(tv), (ours, tv)
    assert ft.crop_params(1, 10, 1000)[:4] == (0, 493, 10, 13)  # centre, at the widest allowed ratio


# /dev/shm


def test_small_dev_shm_refused_before_workers_start(tmp_path, monkeypatch):
    import os
    from types import SimpleNamespace

    from ablations import folder_data

    write_jpeg_folder(tmp_path)
    real = os.statvfs
    monkeypatch.setattr(folder_data.os, "statvfs", lambda p: SimpleNamespace(f_bavail=64, f_frsize=2**20)
                        if str(p) == "/dev/shm" else real(p))  # docker's default: 64 MB
    spec = folder_spec(input_size=224, batch_size=16, eval_batch_size=8, workers=2)
    with pytest.raises(SpecError, match=r"^data.workers: /dev/shm has 64 MB free, less than the 74 MB that 16 "
                                        r"DataLoader workers' batches in flight take: .*--shm-size"):
        FolderData(tmp_path, spec.model_copy(update={"workers": 16}))  # 16 x 2 batches of 16 x 3 x 224 x 224
    FolderData(tmp_path, spec).close()  # 2 workers: 9 MB fits


SHM_FULL = {  # torch's words when /dev/shm is full, this version's (seen on a 8 MB /dev/shm) and older ones'
    "allocate": "unable to allocate shared memory(shm) for file </torch_18567_2422046001_0>: No space left on "
                "device (28)",
    "write": "unable to write to file </torch_123_456_7>: No space left on device (28)",
}


@pytest.mark.parametrize("failure", ["allocate", "write", "bus_error"])
def test_shared_memory_failures_become_one_line(tmp_path, monkeypatch, failure):
    """What torch raises when /dev/shm fills up mid-epoch, raised by a worker: an allocation that fails
    (re-raised by the loader inside its "Caught RuntimeError in DataLoader worker" traceback), or a
    worker killed by SIGBUS (torch's own handler and message)."""
    import os
    import signal

    from ablations.folder_data import FolderItems

    def exhausted(self, key):
        if failure == "bus_error":
            os.kill(os.getpid(), signal.SIGBUS)
        raise RuntimeError(SHM_FULL[failure])

    write_jpeg_folder(tmp_path)
    monkeypatch.setattr(FolderItems, "__getitem__", exhausted)
    d = FolderData(tmp_path, folder_spec(workers=1))
    try:
        with pytest.raises(SpecError) as e:
            batches_of(d.train_batches(0, seed=0))
    finally:
        d.close()
    assert str(e.value).startswith("data.workers: DataLoader workers ran out of shared memory in /dev/shm")
    assert "--shm-size" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_real_small_dev_shm(tmp_path):
    """On a real 1 MB /dev/shm (a private mount namespace; needs root): refused before the workers start,
    and, with that check skipped, torch's own failure mid-epoch comes out as the one line."""
    import subprocess
    import sys

    if subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespace here (unshare needs root)")
    write_jpeg_folder(tmp_path / "data")
    code = tmp_path / "load.py"
    code.write_text(
        "import sys\nfrom pathlib import Path\nfrom ablations import folder_data\n"
        "from ablations.errors import SpecError\nfrom ablations.schema import DataSpec\n"
        "if sys.argv[1] == 'skip-check':\n    folder_data.check_shm = lambda *a: None\n"
        "spec = DataSpec(dataset='imagefolder', input_size=224, batch_size=8, eval_batch_size=8, workers=2)\n"
        "try:\n    d = folder_data.FolderData(Path(sys.argv[2]), spec)\n"
        "    [len(x) for x, _ in d.train_batches(0, 0)]\nexcept SpecError as e:\n    print(e)\n")
    outs = []
    for mode in ("check", "skip-check"):
        shell = (f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} {code} {mode} "
                 f"{tmp_path / 'data'}")
        proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", shell], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        outs.append(proc.stdout.strip())
    assert outs[0].startswith("data.workers: /dev/shm has 1 MB free, less than the 5 MB that 2 DataLoader")
    assert outs[1].startswith("data.workers: DataLoader workers ran out of shared memory in /dev/shm")
