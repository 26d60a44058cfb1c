"""Image transforms of the folder pipeline, for PIL images in DataLoader workers (`data.decode: cpu`)
and for batches of JPEG bytes decoded on the training device (`data.decode: gpu`).

Training: torchvision's RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3) to `size` x `size`, then a
horizontal flip with probability 1/2. Evaluation: the shorter side resized to size*256/224, then a
centre crop of `size` x `size`.

An image's crop box and flip come from its own seed, which the loader's plan draws per (seed, epoch,
rank) and position in the epoch, never from a worker's RNG: batches are the same whatever the number of
workers, whichever worker an image lands on, with workers kept across epochs or not, and on either
decode path (the box depends on the seed and the image's size only).
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, as the paper's Sec. 5.1 augmentation
RATIO = (3 / 4, 4 / 3)


def eval_side(size: int) -> int:
    """Shorter side before the evaluation centre crop (256 for 224)."""
    return round(size * 256 / 224)


def crop_params(seed: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) of an image's random-resized crop, from its seed and size alone.

    torchvision's `RandomResizedCrop.get_params` algorithm (up to 10 draws of an area fraction and a
    log-uniform aspect ratio, then a centre crop at the nearest allowed ratio), drawn from Python's
    `random.Random(seed)`: torchvision's own draws from the global torch generator with a dozen tiny
    tensor ops, ~0.4 ms an image (with seeding it and restoring it), which `decode: gpu` would pay in
    the training process for every image.
    """
    rng = random.Random(seed)
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return top, left, h, w, rng.random() < 0.5
    if width / height < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5


def transform_pil(image, seed: int | None, size: int) -> torch.Tensor:
    """One PIL image to uint8 [3, size, size]: training crop + flip when `seed` is given, else the eval
    resize + centre crop (PIL's resampling, as torchvision's transforms on PIL images)."""
    if seed is None:
        image = F.center_crop(F.resize(image, [eval_side(size)], antialias=True), [size, size])
    else:
        top, left, h, w, flip = crop_params(seed, image.height, image.width)
        image = F.resized_crop(image, top, left, h, w, [size, size], antialias=True)
        if flip:
            image = F.horizontal_flip(image)
    return F.pil_to_tensor(image)


def transform_batch(images: Sequence[torch.Tensor], seeds: Sequence[int] | None, size: int) -> torch.Tensor:
    """Decoded uint8 [3, H, W] images (any sizes, one device) to one uint8 [N, 3, size, size] batch there:
    training crops + flips when `seeds` are given, else the eval resize + centre crop.

    Resampling runs in float32 on every device (torchvision's uint8 fast path exists on CPU only, and a
    CUDA uint8 image is converted to float32 anyway), so a CPU run checks the GPU's arithmetic.
    """
    out, flips = [], []
    for i, image in enumerate(images):
        if seeds is None:
            image = F.resize(image.float(), [eval_side(size)], antialias=True)
            image = F.center_crop(image, [size, size])
        else:
            top, left, h, w, flip = crop_params(seeds[i], image.shape[-2], image.shape[-1])
            image = F.resize(F.crop(image, top, left, h, w).float(), [size, size], antialias=True)
            flips.append(flip)
        out.append(image)
    batch = torch.stack(out).round_().clamp_(0, 255).to(torch.uint8)
    if flips:
        mirror = torch.tensor(flips, device=batch.device)[:, None, None, None]
        batch = torch.where(mirror, batch.flip(-1), batch)
    return batch


# --------------------------------------------------------------------------------------------------
# Decoding


@contextlib.contextmanager
def _torchvision_io():
    """torchvision 0.29 deprecates its image decoders in favour of TorchCodec, with a warning on every
    call; they are still the ones that decode a batch of JPEGs with nvJPEG."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def nvjpeg_can_decode(image) -> bool:
    """Whether a PIL-opened file (its header only) is a JPEG that nvJPEG decodes to RGB: 3-channel or
    grayscale. CMYK JPEGs, PNGs (some ImageNet ".JPEG" files are PNGs) and the rest are decoded on the CPU."""
    return image.format == "JPEG" and image.mode in ("RGB", "L")


def decode_cpu(data: torch.Tensor) -> torch.Tensor:
    """Any format torchvision reads (PNG, CMYK JPEG, ...) to uint8 RGB [3, H, W], on the CPU."""
    with _torchvision_io():
        image = decode_image(data, mode=ImageReadMode.RGB)
    return F.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode to uint16


def decode_batch(payloads: Sequence[torch.Tensor], device: torch.device, names: Sequence[str]) -> list[torch.Tensor]:
    """Each payload as a uint8 RGB [3, H, W] image on `device`: JPEG bytes (1-D CPU tensors) decoded in
    one `decode_jpeg` call there (nvJPEG on a GPU), images a worker decoded already (3-D) moved there.

    nvJPEG fails a whole batch for one file it cannot read: the batch is then decoded image by image,
    and what the device cannot decode is decoded on the CPU; a file nobody can decode raises, named.
    """
    jpegs = [i for i, p in enumerate(payloads) if p.dim() == 1]
    images = list(payloads)
    if jpegs:
        with _torchvision_io():
            try:
                decoded = decode_jpeg([payloads[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                decoded = [_decode_alone(payloads[i], device, names[i]) for i in jpegs]
        for i, image in zip(jpegs, decoded):
            images[i] = image
    return [image.to(device, non_blocking=True) for image in images]


def _decode_alone(data: torch.Tensor, device: torch.device, name: str) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        return decode_cpu(data).to(device)
    except RuntimeError as e:
        raise RuntimeError(f"cannot decode {name}: {e}".splitlines()[0]) from None


def probe_decoder(device: torch.device) -> str | None:
    """Why `decode_jpeg` cannot decode on `device` (a torchvision built without nvJPEG, a driver too
    old), or None when one small JPEG decodes there. Without this check every batch would fall back to
    decoding image by image on the CPU, in the training process."""
    from torchvision.io import encode_jpeg

    with _torchvision_io():
        jpeg = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
        try:
            decode_jpeg([jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            return str(e).splitlines()[0]
    return None
