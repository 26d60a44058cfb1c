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
    from ablations.spec import DataSpec

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


def machine() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}); torch {torch.__version__}, Python {platform.python_version()}"


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
    return {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "load_at_start": load,
            "train_images": images, "val_images": images // 4, "classes": CLASSES, "epochs": EPOCHS,
            "workers": workers, "batch": 64, "input_size": 224, "rounds": rounds, "runs": runs, "img_s": img_s,
            "gain": after / before,
            "command": f"python benchmarks/folder_pipeline.py --images {images} --workers {workers} --rounds {rounds}"}


def render(fp: dict) -> list[str]:
    """The BENCHMARKS.md section (benchmarks/bench.py renders it from the recorded figures)."""
    before, after = fp["img_s"].values()
    lines = ["", "## Folder input pipeline (CPU)", "",
             f"`{fp['command']}` on {fp['date']}: {fp['machine']}; load average {fp['load_at_start']:.1f} at the "
             "start (the cores are shared).", "",
             f"{fp['train_images']} training JPEGs of ~400×350 in {fp['classes']} classes and {fp['val_images']} "
             f"validation ones; {fp['epochs']} epochs of `train_batches` and one `val_batches` pass, batch "
             f"{fp['batch']} at {fp['input_size']}, PIL decoding in {fp['workers']} DataLoader workers, timed from "
             "building the data set to its last batch. Variants interleaved; medians of "
             f"{fp['rounds']} runs each.", "",
             "| DataLoader workers | images/s | runs (images/s) |", "|---|---|---|"]
    for name, value in fp["img_s"].items():
        each = ", ".join(f"{x['img_s']:.0f}" for x in fp["runs"] if x["variant"] == name)
        lines.append(f"| {name} | {value:.0f} | {each} |")
    images = fp["runs"][0]["images"]
    saved = images / before - images / after
    lines += ["", f"Persistent / rebuilt: {after / before:.2f}×, {saved:.1f} s less per run of "
              f"{images / after:.0f} s: the start-up, first batches and shut-down of the {fp['epochs']} worker "
              f"sets that rebuilding starts beyond the first ({saved / fp['epochs']:.1f} s each; workers are "
              "forked, so they import nothing). The rest is decoding and resizing in the workers, which "
              "`data.decode: gpu` moves to the GPU (not measurable on this machine)."]
    return lines


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
