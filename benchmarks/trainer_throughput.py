"""Trainer throughput vs the bare model on the same batches.

    python benchmarks/trainer_throughput.py [--profile quick] [--reps 5] [--device cpu] [--md FILE]

For each repetition (one epoch each) it times, in rotating order so slow drift of a shared machine
hits all variants alike:
  trainer            ablations.train.train_epoch: the real loop (on-device augmentation and
                     normalisation, LR per step, forward, loss, backward, SGD step, NaN checks;
                     progress bar disabled)
  bare fwd+bwd       the same model: forward + cross-entropy + backward + zero_grad on that epoch's
                     batches, prepared (augmented, normalised) beforehand. The goal: trainer >= 95%
  bare fwd+bwd+step  the same plus the trainer's optimizer step
  stock loop         a second copy of the model, same initialisation, with a stock
                     torch.optim.SGD (per-tensor update): what a plain PyTorch loop does
and reports images/s and the trainer's share of each figure.

Images/s are given per wall-clock second and per CPU second of this process (`time.process_time`):
on a shared machine other processes steal wall time at random, CPU time they cannot steal, so the
CPU-time ratio is the steadier measure of the trainer's own overhead (with train.threads=1 the two
agree on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ablations.atomic import write_atomic  # noqa: E402
from ablations.data import load_data  # noqa: E402
from ablations.devices import resolve_device  # noqa: E402
from ablations.optim import make_optimizer  # noqa: E402
from ablations.patch import build_model  # noqa: E402
from ablations.schema import SESpec, Setting  # noqa: E402
from ablations.spec import load_profile, run_config
from ablations.train import autocast, torch_settings, train_epoch  # noqa: E402


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of fn()."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def bare(model, opt, batches, amp, dev, step: bool) -> None:
    """One pass over `batches`: forward, loss, backward (and the SGD step)."""
    for x, y in batches:
        with amp():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step:
            opt.step()
    _sync(dev)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--reps", type=int, default=10, help="timed epochs per variant")
    p.add_argument("--device", default=None)
    p.add_argument("--data-root", default=None)
    p.add_argument("--md", default=None, help="also write the report to this Markdown file")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args()

    cfg = run_config(load_profile(args.profile, args.set), Setting(label="SE r=16", se=SESpec()), seed=0)
    dev = resolve_device(args.device)
    spec = cfg.train
    mf = torch.channels_last if spec.channels_last else torch.contiguous_format
    with torch_settings(spec, dev):
        data = load_data(cfg, device=dev, root=args.data_root, memory_format=mf)
        torch.manual_seed(0)
        model = build_model(cfg.backbone, cfg.se).to(dev, memory_format=mf)
        opt = make_optimizer(model, spec)
        net = torch.compile(model) if spec.compile else model
        torch.manual_seed(0)
        stock = build_model(cfg.backbone, cfg.se).to(dev, memory_format=mf)
        stock_opt = torch.optim.SGD(stock.parameters(), lr=spec.lr * 0.1, momentum=spec.momentum,
                                    nesterov=spec.nesterov, weight_decay=spec.weight_decay)
        stock_net = torch.compile(stock) if spec.compile else stock
        amp = autocast(spec, dev)

        images = data.images_per_epoch
        threads = torch.get_num_threads()
        variants = ("trainer", "bare fwd+bwd", "bare fwd+bwd+step", "stock loop")
        wall: dict[str, list[float]] = {k: [] for k in variants}
        cpu: dict[str, list[float]] = {k: [] for k in variants}
        step = 0
        load_before = os.getloadavg()[0]
        for rep in range(args.reps + 1):  # repetition 0 warms up (allocator, oneDNN primitives, cudnn)
            batches = list(data.train_batches(rep, cfg.seed))  # the batches the trainer draws this epoch
            runs = {
                "trainer": lambda rep=rep, step=step: train_epoch(net, data, opt, cfg, rep, step, amp),
                "bare fwd+bwd": lambda batches=batches: bare(net, opt, batches, amp, dev, False),
                "bare fwd+bwd+step": lambda batches=batches: bare(net, opt, batches, amp, dev, True),
                "stock loop": lambda batches=batches: bare(stock_net, stock_opt, batches, amp, dev, True),
            }
            names = list(runs)
            names = names[rep % len(names):] + names[:rep % len(names)]
            for name in names:
                w, c = timed(runs[name])
                if rep > 0:
                    wall[name].append(images / w)
                    cpu[name].append(images / c)
            step += data.steps_per_epoch
        load_after = os.getloadavg()[0]

    def stat(d: dict[str, list[float]], f) -> dict[str, float]:
        return {k: f(v) for k, v in d.items()}

    stats = {"CPU best": stat(cpu, max), "CPU median": stat(cpu, statistics.median),
             "wall best": stat(wall, max), "wall median": stat(wall, statistics.median)}
    lines = [
        f"# Trainer throughput: profile `{cfg.profile}` on {dev}",
        "",
        f"`python benchmarks/trainer_throughput.py --profile {args.profile}"
        + "".join(f" --set {s}" for s in args.set) + f" --reps {args.reps}`",
        "",
        f"- model: {cfg.backbone.arch} layers {cfg.backbone.layers or 'default'} channels "
        f"{cfg.backbone.channels or 'default'}, SE r=16; input {cfg.data.input_size}, batch "
        f"{cfg.data.batch_size}, {data.steps_per_epoch} steps/epoch; dataset {cfg.data.dataset}",
        f"- torch {torch.__version__}, {threads} thread(s) (train.threads={spec.threads}), "
        f"channels_last={spec.channels_last}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; load average {load_before:.1f} before, {load_after:.1f} after",
        f"- {args.reps} timed epochs per variant (rotating order). Best = the fastest epoch (least "
        "disturbed by other processes), median = the typical one. Images/s; in brackets the trainer's "
        "share of the variant's figure.",
        "",
        "| variant | " + " | ".join(stats) + " |",
        "|---|" + "---:|" * len(stats),
    ]
    for name in variants:
        cells = [f"{st[name]:.0f} ({100 * st['trainer'] / st[name]:.1f}%)" for st in stats.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.md:
        write_atomic(args.md, report)
    if args.json:
        write_atomic(args.json, json.dumps({"device": str(dev), "reps": args.reps, "stats": stats}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
