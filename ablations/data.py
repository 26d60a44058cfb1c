"""Data sets for one trial: digits, synthetic, CIFAR-10/100 and ImageNet-style folders.

Two shapes of data, one interface (`train_batches(epoch, seed)`, `val_batches(indices)`,
`val_labels()`, `steps_per_epoch`, `images_per_epoch`), both yielding normalised float batches on
the training device:

- `InMemoryData` (digits, synthetic, CIFAR): the whole set lives on the training device as uint8 and
  is augmented there, a batch at a time (zero-pad + random crop, horizontal flip), then normalised.
  A GPU never waits on CPU workers, and a CPU run pays no DataLoader overhead.
- `FolderData` (imagefolder, folder_data.py): DataLoader workers that live as long as the trial decode
  and augment (random-resized crop + flip for training, resize + centre crop for evaluation) and hand
  over uint8, or read JPEG bytes that the training device decodes (`data.decode: gpu`); normalisation
  happens on device.

Every epoch's randomness is seeded by (seed, epoch[, rank]) (batches.py). Data order depends on
(seed, epoch) only, so data-parallel ranks agree on it and take disjoint shards.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ablations.batches import Batch, TrialData, seed_for
from ablations.errors import SpecError
from ablations.schema import DataSpec, RunConfig
from ablations.stride import check_input_size

SPLIT_SEED = 0  # digits' train/val split: fixed, so every trial and seed sees the same validation set
SYNTHETIC_SEED = 1234  # synthetic images: fixed, the data set is part of the profile, not of the trial

# name -> (folder, train files, test files, label key, meta file, class-name key, classes)
CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "batches.meta", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names", 100),
}


# --------------------------------------------------------------------------------------------------
# In-memory data sets on the training device


def crop_flip(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop of the zero-padded batch (same size out) and optional horizontal flip.

    One gather for the whole batch instead of a Python loop over images: this runs every step.
    """
    n, _, h, w = x.shape
    dev = x.device
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=dev)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen, device=dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, :, None]  # [n, h, 1]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, :]  # [n, 1, w]
        idx = torch.arange(n, device=dev)[:, None, None]
        # Advanced indices around a slice put the indexed dims first: [n, h, w, C], i.e. the result
        # is already channels_last once permuted back.
        x = xp[idx, :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mirror = torch.rand(n, generator=gen, device=dev) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


class InMemoryData:
    """A labelled image set held on `device` as uint8 [N, C, H, W]; batches come out normalised."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                 val_y: torch.Tensor, num_classes: int, *, batch_size: int, eval_batch_size: int,
                 crop_padding: int = 0, hflip: bool = False, device: str | torch.device = "cpu",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 rank: int = 0, world_size: int = 1):
        if train_x.dtype != torch.uint8 or val_x.dtype != torch.uint8:
            raise TypeError("in-memory images must be uint8")
        self.device = torch.device(device)
        self.train_x, self.val_x = train_x.to(self.device), val_x.to(self.device)
        self.train_y = train_y.to(self.device, torch.long)
        self.val_y = val_y.to(self.device, torch.long)
        self.num_classes = num_classes
        self.crop_padding, self.hflip = crop_padding, hflip
        self.memory_format = memory_format
        self.rank, self.world_size = rank, world_size
        if batch_size % world_size:
            raise SpecError(f"{batch_size} is not divisible by {world_size} processes", key="data.batch_size")
        self.local_batch = batch_size // world_size
        self.eval_batch = max(1, eval_batch_size // world_size)
        self.steps_per_epoch = len(self.train_x) // batch_size
        if self.steps_per_epoch == 0:
            raise SpecError(f"{batch_size} is larger than the training set ({len(self.train_x)} images)",
                            key="data.batch_size")
        self.images_per_epoch = self.steps_per_epoch * self.local_batch  # per rank
        c = self.train_x.shape[1]
        if mean is None or std is None:  # the training set's own per-channel statistics
            flat = self.train_x.transpose(0, 1).reshape(c, -1).double()
            mean, std = flat.mean(1).tolist(), flat.std(1).clamp_min(1.0).tolist()
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, c, 1, 1)
        self.scale, self.shift = 1.0 / std_t, -mean_t / std_t

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().mul_(self.scale).add_(self.shift)
        return x.contiguous(memory_format=self.memory_format)

    def train_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        """This rank's batches of epoch `epoch` (0-based); a function of (seed, epoch, rank) only."""
        order = torch.Generator(device=self.device)
        order.manual_seed(seed_for(seed, epoch))
        aug = torch.Generator(device=self.device)
        aug.manual_seed(seed_for(seed, epoch, 1 + self.rank))
        perm = torch.randperm(len(self.train_x), generator=order, device=self.device)
        # Drop the tail that does not fill a global batch, then shard: rank r takes every
        # world_size-th image, so ranks see disjoint data of equal size.
        perm = perm[: self.steps_per_epoch * self.local_batch * self.world_size][self.rank::self.world_size]
        for i in range(self.steps_per_epoch):
            idx = perm[i * self.local_batch:(i + 1) * self.local_batch]
            x = crop_flip(self.train_x[idx], self.crop_padding, self.hflip, aug)
            yield self.normalise(x), self.train_y[idx]

    def val_indices(self) -> torch.Tensor:
        """This rank's share of the validation set (all of it on one process)."""
        return torch.arange(len(self.val_x))[self.rank::self.world_size]

    def val_batches(self, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        """Validation images in order (this rank's share, or exactly `indices`), unaugmented."""
        idx_all = (self.val_indices() if indices is None else torch.as_tensor(indices)).to(self.device)
        for i in range(0, len(idx_all), self.eval_batch):
            idx = idx_all[i:i + self.eval_batch]
            yield self.normalise(self.val_x[idx]), self.val_y[idx]

    def val_labels(self) -> torch.Tensor:
        return self.val_y.cpu()

    def close(self) -> None:
        """Nothing to release (FolderData ends its workers here)."""


def resize_uint8(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 [N, C, H, W] batch to size x size (bilinear; antialiased when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < max(x.shape[-2:])
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int = SPLIT_SEED
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices, each class split in the same proportion (sorted, reproducible)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (uint8 [1797, 8, 8] scaled to 0..255, int64 labels), read once per
    process: a worker's trials all use them."""
    data = _digits_csv()
    images = np.rint(data[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    images.flags.writeable = False  # shared by every trial of the process
    return images, data[:, -1].astype(np.int64)


def _digits_csv() -> np.ndarray:
    """The [1797, 65] table `sklearn.datasets.load_digits` reads (64 pixels, then the label), read the way
    it reads it, from the file scikit-learn ships, but without importing scikit-learn: that import takes
    1-2 s, in every worker process. Falls back to `load_digits` if the file is not where it was."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        d = load_digits()
        return np.concatenate([d.data, d.target[:, None]], axis=1)
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        return np.loadtxt(f, delimiter=",")


def load_digits_uint8(spec: DataSpec, in_chans: int) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 1,797 8x8 digits (values 0..16) as uint8 0..255, resized, split, replicated."""
    digits, target = _digits()
    images = torch.from_numpy(digits.copy())[:, None]
    images = resize_uint8(images, spec.input_size).expand(-1, in_chans, -1, -1).contiguous()
    labels = torch.from_numpy(target.copy())
    tr, va = stratified_split(target, spec.val_fraction)
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    return images[tr_t], labels[tr_t], images[va_t], labels[va_t]


def make_synthetic(spec: DataSpec, num_classes: int, in_chans: int) -> tuple[torch.Tensor, ...]:
    """Deterministic learnable images: one smooth random template per class plus per-image noise."""
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    s = spec.input_size
    coarse = max(2, s // 4)
    templates = F.interpolate(torch.rand(num_classes, in_chans, coarse, coarse, generator=g),
                              size=(s, s), mode="bilinear", align_corners=False)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, in_chans, s, s, generator=g)
        return (x * 255).round_().to(torch.uint8), y

    train_x, train_y = split(spec.synthetic_size)
    val_x, val_y = split(max(num_classes, spec.synthetic_size // 4))
    return train_x, train_y, val_x, val_y


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise SpecError(f"missing {path.name} in {path.parent} (torchvision's CIFAR python format)",
                        key="data.root")
    try:
        with path.open("rb") as f:
            raw = pickle.load(f, encoding="latin1")
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise SpecError(f"malformed CIFAR file {path}: {type(e).__name__}: {e}", key="data.root") from None
    if not isinstance(raw, dict):
        raise SpecError(f"malformed CIFAR file {path}: not a dict", key="data.root")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar_files(base: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for name in files:
        entry = _unpickle(base / name)
        try:
            x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(entry[label_key], dtype=np.int64)
        except (KeyError, ValueError) as e:
            raise SpecError(f"malformed CIFAR file {base / name}: {type(e).__name__}: {e}",
                            key="data.root") from None
        if len(x) != len(y):
            raise SpecError(f"malformed CIFAR file {base / name}: {len(x)} images but {len(y)} labels",
                            key="data.root")
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(name: str, root: Path, download: bool) -> tuple[tuple[torch.Tensor, ...], int]:
    """CIFAR-10/100 from torchvision's python-pickle files (read directly: torchvision's own class
    insists on the published checksums). Returns (train x, train y, val x, val y), class count."""
    folder, train_files, test_files, label_key, meta, names_key, classes = CIFAR[name]
    base = root / folder
    if download and not base.is_dir():
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)
        except Exception as e:  # no network, proxy, disk: one line either way
            raise SpecError(f"could not download {name} into {root}: {e}", key="data.download") from None
    if not base.is_dir():
        raise SpecError(f"{root} has no {folder}/ ({name} in torchvision's python format; "
                        "data.download=true fetches it where the network allows)", key="data.root")
    names = _unpickle(base / meta).get(names_key)
    if names is not None and len(names) != classes:
        raise SpecError(f"malformed {base / meta}: {len(names)} class names, expected {classes}",
                        key="data.root")
    tx, ty = _cifar_files(base, train_files, label_key)
    vx, vy = _cifar_files(base, test_files, label_key)
    for y, what in ((ty, "training"), (vy, "test")):
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise SpecError(f"malformed {name}: {what} labels outside 0..{classes - 1}", key="data.root")
    return (tx, ty, vx, vy), classes


# --------------------------------------------------------------------------------------------------
# Entry point


def _check_classes(dataset: str, found: int, cfg: RunConfig) -> None:
    if found != cfg.backbone.num_classes:
        raise SpecError(f"{dataset} has {found} classes but backbone.num_classes is "
                        f"{cfg.backbone.num_classes}", key="backbone.num_classes")


def _check_rgb(dataset: str, cfg: RunConfig) -> None:
    if cfg.backbone.in_chans != 3:
        raise SpecError(f"{dataset} images have 3 channels, got in_chans={cfg.backbone.in_chans}",
                        key="backbone.in_chans")


def check_decode_device(spec: DataSpec, device: str | torch.device) -> None:
    """`decode: gpu` needs a CUDA training device (every device of a DDP group such as `cuda:0,cuda:1`)."""
    if spec.dataset != "imagefolder" or spec.decode != "gpu":
        return
    if not all(torch.device(d.strip()).type == "cuda" for d in str(device).split(",") if d.strip()):
        raise SpecError(f"gpu decodes JPEGs with nvJPEG on the CUDA training device; this run trains on "
                        f"{device} (use data.decode=cpu)", key="data.decode")


def load_data(cfg: RunConfig, *, device: str | torch.device = "cpu", root: str | Path | None = None,
              memory_format: torch.memory_format = torch.contiguous_format,
              rank: int = 0, world_size: int = 1) -> TrialData:
    """The trial's data set on `device`. `root` (--data-root) overrides `data.root`."""
    spec = cfg.data
    check_input_size(cfg)
    root_str = root if root is not None else spec.root
    in_memory = dict(batch_size=spec.batch_size, eval_batch_size=spec.eval_batch_size, device=device,
                     crop_padding=spec.input_size // 8 if spec.crop_padding is None else spec.crop_padding,
                     hflip=spec.hflip, memory_format=memory_format, rank=rank, world_size=world_size)
    if spec.dataset == "digits":
        _check_classes("digits", 10, cfg)
        return InMemoryData(*load_digits_uint8(spec, cfg.backbone.in_chans), 10, **in_memory)
    if spec.dataset == "synthetic":
        n = cfg.backbone.num_classes
        return InMemoryData(*make_synthetic(spec, n, cfg.backbone.in_chans), n, **in_memory)
    if spec.dataset in CIFAR or spec.dataset == "imagefolder":
        if root_str is None:
            raise SpecError(f"{spec.dataset} needs a data root (--data-root or data.root)", key="data.root")
        path = Path(root_str).expanduser()
        if not path.is_dir():
            raise SpecError(f"no such directory: {path}", key="data.root")
        _check_rgb(spec.dataset, cfg)
        check_decode_device(spec, device)
        if spec.dataset == "imagefolder":
            from ablations.folder_data import open_folder

            data = open_folder(path, spec, device=torch.device(device), memory_format=memory_format, rank=rank,
                               world_size=world_size)
            _check_classes(f"{path} (imagefolder)", data.num_classes, cfg)
            return data
        (tx, ty, vx, vy), classes = load_cifar(spec.dataset, path, spec.download)
        _check_classes(spec.dataset, classes, cfg)
        # Resized once, on the training device (50k images: seconds on a CPU, nothing on a GPU).
        tx, vx = (resize_uint8(t.to(device), spec.input_size) for t in (tx, vx))
        return InMemoryData(tx, ty, vx, vy, classes, **in_memory)
    raise SpecError(f"unknown dataset {spec.dataset!r} (known: digits, synthetic, cifar10, cifar100, "
                    "imagefolder)", key="data.dataset")
