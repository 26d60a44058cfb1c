"""Images/s of the ImageNet-folder input pipeline on CPU: DataLoader workers kept for the whole trial
vs a DataLoader (and its workers) built for every pass, as before.

    python benchmarks/folder_pipeline.py [--images 2000] [--workers 2] [--rounds 2] [--json FILE]

Writes an ImageNet-style folder into a temp dir (--images training JPEGs of about 400x350 in 10
classes, a quarter as many for validation), then times what a trial asks of it: `train_batches` for
epochs 0, 1, 2 and one `val_batches` pass (batch 64, input 224, PIL decoding in --workers workers), from
building the FolderData to the last batch on the device. Both variants read the same batches (the
tests check it); only worker start-up and shut-down differ. The variants run interleaved, --rounds
times each, so drift in the machine's load hits both alike; the figure is the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from machine import describe as machine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLASSES = 10
EPOCHS = 3
VARIANTS = {"rebuilt per pass (before)": False, "persistent (after)": True}


def write_folder(root: Path, images: int, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colour gradients plus noise, quality 90) of 360-440 x 320-380 pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", images // 4)):
        for i in range(n):
            c = i % CLASSES
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = rng.integers(320, 381), rng.integers(360, 441)
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1) * rng.uniform(80, 255, 3)
            pixels = (base + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{split}_{i}.JPEG", quality=90)


def time_trial(root: Path, workers: int, persistent: bool) -> tuple[int, float]:
    """(images, seconds) of 3 epochs and one evaluation, the data set built inside the timing."""
    from ablations.folder_data import FolderData
    from ablations.schema import DataSpec

    spec = DataSpec(dataset="imagefolder", input_size=224, batch_size=64, eval_batch_size=64, workers=workers)
    t0 = time.perf_counter()
    data = FolderData(root, spec, persistent=persistent)
    images = 0
    try:
        for epoch in range(EPOCHS):
            for x, _ in data.train_batches(epoch, seed=0):
                images += len(x)
        for x, _ in data.val_batches():
            images += len(x)
    finally:
        data.close()
    return images, time.perf_counter() - t0


def measure(images: int, workers: int, rounds: int) -> dict:
    from ablations.folder_data import file_list

    with tempfile.TemporaryDirectory(prefix="folder-bench-") as tmp:
        root = Path(tmp)
        write_folder(root, images)
        file_list(root, "train"), file_list(root, "val")  # the scan is cached per process: not timed
        runs = []
        load = os.getloadavg()[0]
        for r in range(rounds):
            for name, persistent in VARIANTS.items():
                n, seconds = time_trial(root, workers, persistent)
                runs.append({"variant": name, "round": r, "images": n, "seconds": seconds, "img_s": n / seconds})
    img_s = {name: statistics.median(x["img_s"] for x in runs if x["variant"] == name) for name in VARIANTS}
    before, after = img_s.values()
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(gpu=False), "load_at_start": load,
            "train_images": images, "val_images": images // 4, "classes": CLASSES, "epochs": EPOCHS,
            "workers": workers, "batch": 64, "input_size": 224, "rounds": rounds, "runs": runs, "img_s": img_s,
            "gain": after / before,
            "command": f"python benchmarks/folder_pipeline.py --images {images} --workers {workers} --rounds {rounds}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="training images (validation: a quarter)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each variant, interleaved")
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()
    figures = measure(args.images, args.workers, args.rounds)
    text = json.dumps(figures, indent=2)
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.json)
    print(text)


if __name__ == "__main__":
    main()
