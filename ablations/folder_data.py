"""ImageNet-style folders (`root/train/<class>/*`, `root/val/<class>/*`) through one DataLoader per trial.

- **Workers live as long as the trial.** One DataLoader serves training epochs, evaluations and the
  excitation probe; its workers persist between them (`persistent_workers`), and `close()` ends them
  when the trial ends. Before each pass over the loader, its batch sampler (`PassSampler`) is handed
  that pass's batches: (split, index, seed) keys, where the seed fixes the image's augmentation
  (folder_transforms.py). Order and augmentation are thus a function of (seed, epoch, rank) whatever
  the workers did before.
- **The folder is scanned once per process.** The (file, class) lists come from torchvision's
  `find_classes` / `make_dataset`, cached per split folder, so validation, resumed trials and the next
  trials of a long-lived worker reuse them. They are held as two numpy arrays rather than a list of
  1.28 M Python strings, which forked workers would copy page by page as they touch reference counts.
- **Decoding.** `decode: cpu`: workers decode with PIL and crop/resize there (uint8 batches out).
  `decode: gpu`: workers only read the files' bytes; the training process decodes each batch with
  `torchvision.io.decode_jpeg(..., device=cuda)` (nvJPEG) and crops/resizes it on the GPU. Files nvJPEG
  cannot read (PNGs, CMYK JPEGs) are decoded by the worker on the CPU with `decode_image`.
- **Shared memory.** Workers hand batches over through /dev/shm; a container's default 64 MB is too
  small for ImageNet batches. A /dev/shm smaller than the batches in flight is refused before any
  worker starts, and the errors torch raises when it fills up become one line saying what to do.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ablations import folder_transforms as ft
from ablations.batches import Batch, seed_for
from ablations.errors import SpecError
from ablations.schema import DataSpec

TRAIN, VAL = 0, 1
SPLITS = ("train", "val")
SHM = Path("/dev/shm")
PREFETCH = 2  # batches each worker prepares ahead (DataLoader's default prefetch_factor)
Key = tuple[int, int, int]  # (split, index in the split's file list, augmentation seed)
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


# --------------------------------------------------------------------------------------------------
# File lists


@dataclass(frozen=True)
class FileList:
    """One split's images: paths relative to `folder` (bytes) and class indices, in ImageFolder's order."""

    folder: Path
    classes: tuple[str, ...]
    paths: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def path(self, index: int) -> Path:
        return self.folder / os.fsdecode(self.paths[index])


def file_list(root: Path, split: str) -> FileList:
    """`root/<split>`'s images, scanned once per process while the folder's entries stay the same (a
    class folder added or removed changes its mtime; files added inside a class folder need a restart)."""
    folder = root / split
    if not folder.is_dir():
        raise SpecError(f"{root} has no {split}/ folder (ImageNet layout: train/<class>/*.JPEG, "
                        "val/<class>/*.JPEG)", key="data.root")
    return _scan(str(folder.resolve()), folder.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _scan(folder: str, _mtime_ns: int) -> FileList:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(folder)
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS)
    except OSError as e:  # FileNotFoundError: no class folders, or a class without images
        raise SpecError(f"malformed image folder {folder}: {e}", key="data.root") from None
    prefix = len(folder) + len(os.sep)  # make_dataset joins the folder, the class and the file name
    paths = np.array([os.fsencode(path[prefix:]) for path, _ in samples])
    targets = np.array([target for _, target in samples], dtype=np.int64)
    return FileList(Path(folder), tuple(classes), paths, targets)


# --------------------------------------------------------------------------------------------------
# What workers run


class FolderItems(Dataset):
    """Both splits' images, read by (split, index, seed) keys.

    `raw=False`: a decoded, transformed uint8 [3, S, S] image and its class. `raw=True`: the file's
    bytes (1-D uint8) for the training process to decode, or a decoded [3, H, W] image when nvJPEG
    could not read it; then its class, seed and path.
    """

    def __init__(self, lists: tuple[FileList, FileList], size: int, raw: bool):
        self.lists, self.size, self.raw = lists, size, raw

    def __len__(self) -> int:
        return sum(len(files) for files in self.lists)

    def __getitem__(self, key: Key):
        split, index, seed = key
        files = self.lists[split]
        path, target = files.path(index), int(files.targets[index])
        if self.raw:
            return read_payload(path), target, seed, str(path)
        from PIL import Image

        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return ft.transform_pil(rgb, seed if split == TRAIN else None, self.size), target


def read_payload(path: Path) -> torch.Tensor:
    """The file's bytes, or the decoded image when nvJPEG cannot decode it (PIL reads the header only)."""
    from PIL import Image

    raw = path.read_bytes()
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    with Image.open(io.BytesIO(raw)) as image:
        if ft.nvjpeg_can_decode(image):
            return data
    return ft.decode_cpu(data)


def collate_payloads(items: list) -> tuple[list[torch.Tensor], torch.Tensor, list[int], list[str]]:
    """`raw` items stay a list: the images differ in size until the training process crops them."""
    payloads, targets, seeds, names = zip(*items)
    return list(payloads), torch.tensor(targets, dtype=torch.long), list(seeds), list(names)


class PassSampler(Sampler):
    """The DataLoader's batch sampler: it yields the batches of the pass last planned.

    The loader asks for an iterator at the start of every pass, in the training process, so what a
    pass reads is decided here however long the workers have been running. (It may ask more than once
    per pass: a new multi-process iterator asks twice, hence a function that makes the batches.)
    """

    def __init__(self) -> None:
        self._make: Callable[[], Iterable[list[Key]]] = tuple

    def plan(self, make_batches: Callable[[], Iterable[list[Key]]]) -> None:
        self._make = make_batches

    def __iter__(self) -> Iterator[list[Key]]:
        return iter(self._make())


def batched(keys: Iterable[Key], n: int) -> Iterator[list[Key]]:
    it = iter(keys)
    while batch := list(islice(it, n)):
        yield batch


# --------------------------------------------------------------------------------------------------
# The data set of a trial


class FolderData:
    """Batches of normalised float images on `device`, same interface as `data.InMemoryData`.

    One pass at a time: starting a pass (`train_batches`, `val_batches`) abandons an unfinished one.
    `decode_on_device` decodes and transforms batches in this process on `device` (`decode: gpu`; on a
    CPU device only the tests use it). `persistent=False` builds a DataLoader per pass instead (the
    benchmark's "before"); the batches are the same.
    """

    def __init__(self, root: Path, spec: DataSpec, *, device: str | torch.device = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format, rank: int = 0,
                 world_size: int = 1, decode_on_device: bool = False, persistent: bool = True):
        self.device = torch.device(device)
        self.spec, self.memory_format = spec, memory_format
        self.rank, self.world_size = rank, world_size
        train, val = file_list(root, "train"), file_list(root, "val")
        if train.classes != val.classes:
            raise SpecError(f"{root}/train and {root}/val have different class folders", key="data.root")
        self.lists = (train, val)
        self.num_classes = len(train.classes)
        if spec.batch_size % world_size:
            raise SpecError(f"{spec.batch_size} is not divisible by {world_size} processes",
                            key="data.batch_size")
        self.local_batch = spec.batch_size // world_size
        self.eval_batch = max(1, spec.eval_batch_size // world_size)
        self.steps_per_epoch = len(train) // spec.batch_size
        if self.steps_per_epoch == 0:
            raise SpecError(f"{spec.batch_size} is larger than the training set ({len(train)} images)",
                            key="data.batch_size")
        self.images_per_epoch = self.steps_per_epoch * self.local_batch
        check_shm(spec.workers, max(self.local_batch, self.eval_batch) * 3 * spec.input_size ** 2)
        c = 3
        mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, c, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=self.device).view(1, c, 1, 1)
        self.scale, self.shift = 1.0 / std, -mean / std
        self.decode_on_device = decode_on_device
        self._items = FolderItems(self.lists, spec.input_size, raw=decode_on_device)
        self._plan = PassSampler()
        self._loader = self._make_loader(persistent) if persistent else None

    def _make_loader(self, persistent: bool) -> DataLoader:
        workers = self.spec.workers
        return DataLoader(
            self._items, batch_sampler=self._plan, num_workers=workers,
            collate_fn=collate_payloads if self.decode_on_device else default_collate,
            # Raw bytes are not worth pinning: decode_jpeg copies them into nvJPEG's own buffers.
            pin_memory=self.device.type == "cuda" and not self.decode_on_device,
            persistent_workers=persistent and workers > 0,
            # The loader draws its workers' base seed from this, not from the training process's
            # global generator (augmentation does not use the workers' RNG).
            generator=torch.Generator().manual_seed(0))

    def _pass(self, make_batches: Callable[[], Iterable[list[Key]]], train: bool) -> Iterator[Batch]:
        self._plan.plan(make_batches)
        loader = self._loader if self._loader is not None else self._make_loader(persistent=False)
        with shm_errors_explained(self.spec.workers):
            for batch in loader:
                yield self._to_device(batch, train)

    def _to_device(self, batch, train: bool) -> Batch:
        if self.decode_on_device:
            payloads, y, seeds, names = batch
            images = ft.decode_batch(payloads, self.device, names)
            x = ft.transform_batch(images, seeds if train else None, self.spec.input_size)
        else:
            x, y = batch
            x = x.to(self.device, non_blocking=True)
        x = x.float().mul_(self.scale).add_(self.shift)
        return x.contiguous(memory_format=self.memory_format), y.to(self.device, non_blocking=True)

    def train_batches(self, epoch: int, seed: int) -> Iterator[Batch]:
        """This rank's batches of epoch `epoch` (0-based); a function of (seed, epoch, rank) only."""
        order = torch.Generator().manual_seed(seed_for(seed, epoch))
        perm = torch.randperm(len(self.lists[TRAIN]), generator=order)
        perm = perm[: self.steps_per_epoch * self.spec.batch_size][self.rank::self.world_size]
        aug = torch.Generator().manual_seed(seed_for(seed, epoch, 1 + self.rank))
        seeds = torch.randint(0, 2 ** 62, (len(perm),), generator=aug)
        keys = [(TRAIN, i, s) for i, s in zip(perm.tolist(), seeds.tolist())]
        return self._pass(lambda: batched(keys, self.local_batch), train=True)

    def val_indices(self) -> torch.Tensor:
        return torch.arange(len(self.lists[VAL]))[self.rank::self.world_size]

    def val_batches(self, indices: torch.Tensor | None = None) -> Iterator[Batch]:
        idx = self.val_indices() if indices is None else torch.as_tensor(indices)
        keys = [(VAL, i, 0) for i in idx.tolist()]
        return self._pass(lambda: batched(keys, self.eval_batch), train=False)

    def val_labels(self) -> torch.Tensor:
        return torch.from_numpy(self.lists[VAL].targets.copy())

    def close(self) -> None:
        """End the workers now (a long-lived worker process runs many trials). torch has no public
        call for it: the iterator's `__del__` does the same, whenever the last reference goes."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader = None


# --------------------------------------------------------------------------------------------------
# /dev/shm

SHM_ADVICE = ("start the container with a larger /dev/shm (docker run --shm-size=16g, or a bigger "
              "tmpfs mount on /dev/shm) or lower data.workers")
# What torch says when /dev/shm fills: a worker's allocation fails (file_descriptor sharing creates
# /torch_* files there; older torch versions word it "unable to write to file"), or a worker dies of
# SIGBUS writing to a page /dev/shm could not back.
SHM_SIGNS = ("unable to allocate shared memory", "unable to write to file </torch_", "out of shared memory",
             "insufficient shared memory")


def check_shm(workers: int, batch_bytes: int, path: Path = SHM) -> None:
    """Refuse a /dev/shm too small for the batches the workers keep in flight (`PREFETCH` each):
    a lower bound, since other processes' batches share it."""
    if workers == 0:
        return
    try:
        st = os.statvfs(path)
    except OSError:  # no /dev/shm (not Linux): torch shares memory some other way
        return
    free, need = st.f_bavail * st.f_frsize, workers * PREFETCH * batch_bytes
    if free < need:
        raise SpecError(f"{path} has {free / 2**20:.0f} MB free, less than the {need / 2**20:.0f} MB that "
                        f"{workers} DataLoader workers' batches in flight take: {SHM_ADVICE}", key="data.workers")


@contextlib.contextmanager
def shm_errors_explained(workers: int):
    """torch's shared-memory failures (a traceback from inside a worker) as one line saying what to do."""
    try:
        yield
    except RuntimeError as e:
        if not any(sign in message for message in _chain(e) for sign in SHM_SIGNS):
            raise
        raise SpecError(f"DataLoader workers ran out of shared memory in {SHM} ({workers} workers): {SHM_ADVICE}",
                        key="data.workers") from None


def _chain(e: BaseException | None) -> Iterator[str]:
    """The messages of `e` and of what caused it: a worker killed by SIGBUS surfaces as "exited
    unexpectedly", raised from the "killed by signal: Bus error" that says why."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield str(e)
        e = e.__cause__ or e.__context__


# --------------------------------------------------------------------------------------------------
# Entry point


def open_folder(root: Path, spec: DataSpec, *, device: torch.device, memory_format: torch.memory_format,
                rank: int, world_size: int) -> FolderData:
    """The trial's folder data, after checking that `decode: gpu` can decode on `device` (a CUDA device:
    data.check_decode_device)."""
    on_device = spec.decode == "gpu"
    if on_device:
        why = ft.probe_decoder(device)
        if why is not None:
            raise SpecError(f"cannot decode JPEGs on {device}: {why} (use data.decode=cpu)", key="data.decode")
    return FolderData(root, spec, device=device, memory_format=memory_format, rank=rank, world_size=world_size,
                      decode_on_device=on_device)
