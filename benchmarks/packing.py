"""Several trials on one device: do k trainers at once train more images per second than one?

    python benchmarks/packing.py --profile cifar --set data.dataset=synthetic --device cuda [--trials 1,2]
        [--json FILE]

`ablate run --workers 2 --devices cuda:0` packs two trials onto one GPU (workers are pinned to the
devices round-robin). A model that leaves the GPU idle between kernel launches trains more images per
second in total that way; one that already fills it only shares it. For each k of --trials this starts k
processes that each build the profile's model (standard SE, r=16), its data and optimiser on the
device, train one untimed epoch, wait for the others, then time --epochs epochs of the trainer's own
epoch loop (`ablations.train.train_epoch`). Aggregate images/s = every process's images / the slowest
process's wall time; each process's own images/s are listed too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def trainer_process(args: argparse.Namespace, start: mp.synchronize.Barrier, out: mp.Queue) -> None:
    """One trial's epoch loop on the shared device: (images, wall seconds) of the timed epochs."""
    import torch

    from ablations.data import load_data
    from ablations.devices import bind, resolve_device
    from ablations.optim import make_optimizer
    from ablations.patch import build_model
    from ablations.schema import SESpec, Setting
    from ablations.spec import load_profile, run_config
    from ablations.train import autocast, torch_settings, train_epoch

    cfg = run_config(load_profile(args.profile, args.set), Setting(label="SE r=16", se=SESpec()), seed=0)
    dev = resolve_device(args.device)
    bind(dev)
    spec = cfg.train
    mf = torch.channels_last if spec.channels_last else torch.contiguous_format

    amp = autocast(spec, dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch_settings(spec, dev):
        data = load_data(cfg, device=dev, root=args.data_root, memory_format=mf)
        model = build_model(cfg.backbone, cfg.se).to(dev, memory_format=mf)
        opt = make_optimizer(model, spec)
        net = torch.compile(model) if spec.compile else model
        step = train_epoch(net, data, opt, cfg, 0, 0, amp)[0]  # warm-up: allocator, cudnn, compile
        sync()
        start.wait()
        t0 = time.perf_counter()
        for epoch in range(1, args.epochs + 1):
            step = train_epoch(net, data, opt, cfg, epoch, step, amp)[0]
        sync()
        out.put((args.epochs * data.images_per_epoch, time.perf_counter() - t0))


def packed(args: argparse.Namespace, k: int) -> dict:
    """k trainers started together on the device: aggregate images/s."""
    ctx = mp.get_context("spawn")  # a fresh CUDA context per process
    start, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=trainer_process, args=(args, start, out)) for _ in range(k)]
    for p in procs:
        p.start()
    results = [out.get(timeout=args.timeout) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a trainer process failed (exit {p.exitcode})")
    images = sum(n for n, _ in results)
    slowest = max(s for _, s in results)
    return {"trials": k, "images": images, "wall_s": slowest, "img_s": images / slowest,
            "img_s_each": [n / s for n, s in results]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="cifar")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per trainer")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for a trainer")
    p.add_argument("--trials", default="1,2", help="comma-separated numbers of trials at once (first: the reference)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()
    rows = [packed(args, int(k)) for k in args.trials.split(",")]
    gain = rows[-1]["img_s"] / rows[0]["img_s"]
    for r in rows:
        print(f"{r['trials']} trial(s) at once: {r['img_s']:.0f} images/s ({r['images']} images in {r['wall_s']:.1f} s; "
              f"each {', '.join(f'{x:.0f}' for x in r['img_s_each'])})")
    print(f"{rows[-1]['trials']} packed / {rows[0]['trials']}: {gain:.2f}x")
    if args.json:
        from ablations.atomic import write_atomic

        write_atomic(args.json, json.dumps({"device": args.device, "profile": args.profile, "set": args.set,
                                            "rows": rows, "gain": gain}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
