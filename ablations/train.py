"""Train and evaluate one setting into its run directory (rundir.py); resumable, and bit-repeatable
on CPU.

Every file is written atomically, so a kill at any instant leaves the previous epoch's state intact,
and a rerun continues from it. Epoch data order and augmentation are functions of (seed, epoch)
(batches.py), the LR a function of the step counter and the stored validation losses (schedule.py),
and the model, optimizer and RNG states are restored exactly (checkpoints.py, rng.py): a resumed
deterministic CPU run ends with the same numbers as an uninterrupted one.

`train` runs in the process that calls it, on one device, or as one rank of a DDP trial that ddp.py
started (`distributed.Dist` says which). Several devices for one trial are the caller's choice:
`ddp.launch` runs this same function under torchrun.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ablations import checkpoints, compiled, optim, rundir, schedule
from ablations.atomic import write_text_atomic
from ablations.batches import TrialData
from ablations.complexity import complexity
from ablations.data import load_data
from ablations.devices import bind, release, resolve_device, trials_per_device
from ablations.distributed import Dist, check_compile_sync_bn
from ablations.errors import SpecError, TrialFailed
from ablations.optim import make_optimizer
from ablations.patch import build_model
from ablations.probe import probe_excitations, save_excitations
from ablations.rng import rng_state, seed_all, set_rng_state
from ablations.schema import RunConfig, TrainSpec
from ablations.spec import load_run_config
from ablations.terminal import real_terminal  # a log file gets the epoch lines, not bar frames

CHECKPOINT_FORMAT = 2  # 2: per-parameter SGD state (torch SGD); 1 held one flat buffer per group
NAN_CHECK_EVERY = 25  # steps between finiteness checks: each is a device sync on a GPU


# --------------------------------------------------------------------------------------------------
# The process around a trial


@contextlib.contextmanager
def torch_settings(spec: TrainSpec, device: torch.device, packed: int = 1) -> Iterator[None]:
    """Threads, determinism and kernel choices for this trial; the process's own are restored after
    (tests and in-process workers run several trials in one interpreter).

    cuDNN's autotuner (`cudnn.benchmark`) only on a device of its own (`packed` 1): timed while a
    packed neighbour runs, it picks algorithms for the contention of that moment, and its trial
    workspaces can run a neighbour out of memory."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        if spec.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to repeat
            torch.use_deterministic_algorithms(True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = not spec.deterministic and packed == 1
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def check_run_dir(cfg: RunConfig, out_dir: Path) -> None:
    """A run directory belongs to one config: refuse to mix two trials' states."""
    path = out_dir / rundir.CONFIG
    if not path.exists():
        return
    old = load_run_config(path)
    if old == cfg:
        return
    a, b = _flat(old.model_dump(mode="json")), _flat(cfg.model_dump(mode="json"))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:3])
    raise SpecError(f"holds a run with a different config ({shown}); use another --out or delete it",
                    source=str(path))


@functools.cache  # per process: a long-lived worker runs one code version
def versions() -> dict[str, str]:
    import timm

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}


# --------------------------------------------------------------------------------------------------
# Epochs


@torch.no_grad()
def evaluate(model: nn.Module, data: TrialData, amp: Callable[[], Any], dist: Dist, num_classes: int,
             pad_to: int | None = None) -> tuple[float, float, float]:
    """Validation loss (plain cross-entropy, no smoothing) and top-1 / top-5 error in %.

    `pad_to`: a compiled model's batch size; a shorter (last) batch is padded to it and the padding's
    outputs dropped (eval-mode BN treats images independently), so no second shape compiles."""
    model.eval()
    k = min(5, num_classes)
    sums = None
    for x, y in data.val_batches():
        if pad_to is not None and len(x) < pad_to:
            x = _padded(x, pad_to)
        with amp():
            logits = model(x)
        logits = logits[:len(y)].float()
        hits = logits.topk(k, dim=1).indices == y[:, None]
        batch = torch.stack([F.cross_entropy(logits, y, reduction="sum"), hits[:, 0].sum(),
                             hits.any(1).sum(), torch.tensor(len(y), device=y.device)]).double()
        sums = batch if sums is None else sums + batch
    loss, top1, top5, n = dist.sum(sums).tolist()
    return loss / n, 100.0 * (1 - top1 / n), 100.0 * (1 - top5 / n)


def _padded(x: torch.Tensor, n: int) -> torch.Tensor:
    """`x` followed by zero images up to `n`, in `x`'s memory format (a compiled graph guards on it)."""
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    out = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    out[:len(x)] = x
    out[len(x):] = 0
    return out


@torch.no_grad()
def precise_bn(model: nn.Module, data: TrialData, epoch: int, seed: int, batches: int, amp: Callable[[], Any]) -> None:
    """Recompute every BN layer's running statistics as a plain average over the first `batches`
    training batches of `epoch`, with the weights as they are now (pycls's precise BN).

    The running averages (momentum 0.1) trail weights that moved fast: a small model early in
    training then evaluates with statistics of a network it no longer is (validation loss 10^3-10^4
    after epoch 1 on the quick profile, while the training loss is ~2). Training is unchanged.
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batches <= 0 or not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    try:
        for _, (x, _y) in zip(range(batches), data.train_batches(epoch, seed)):
            with amp():
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=False, disable=not enabled or not real_terminal(),
                file=sys.stderr, dynamic_ncols=True)


def autocast(spec: TrainSpec, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The training step's autocast context: bf16 on CUDA when the profile asks for it, else none."""
    bf16 = device.type == "cuda" and spec.bf16
    return lambda: torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def train_epoch(net: nn.Module, data: TrialData, opt: torch.optim.Optimizer, cfg: RunConfig, epoch: int, step: int,
                amp: Callable[[], Any], bar: Any = None, dist: Dist | None = None, cuts: int = 0
                ) -> tuple[int, float, float, float]:
    """One pass over this rank's shard, updating `bar` (if any) per step; `cuts`: the plateau rule's
    LR cuts so far. Returns (next step, mean train loss over all ranks, last LR, loop seconds)."""
    dist = dist or Dist()
    spec = cfg.train
    net.train()
    loss_sum = None
    lr = None
    steps = 0
    t0 = time.perf_counter()
    for x, y in data.train_batches(epoch, cfg.seed):
        new_lr = schedule.lr_at(step, spec, data.steps_per_epoch, cuts)
        if new_lr != lr:
            lr = new_lr
            for g in opt.param_groups:
                g["lr"] = lr
        with amp():
            loss = F.cross_entropy(net(x), y, label_smoothing=spec.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # Accumulated on the device; read back only every NAN_CHECK_EVERY steps.
        loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        step += 1
        steps += 1
        if steps % NAN_CHECK_EVERY == 0:  # all-reduced: a rank that stopped alone would hang the others
            _check_finite(dist.sum(loss_sum.clone()), epoch, step, lr)
        if bar is not None:
            bar.update(1)
    loss_sum = dist.sum(loss_sum) / dist.world_size
    _check_finite(loss_sum, epoch, step, lr)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return step, loss_sum.item() / steps, lr, time.perf_counter() - t0


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, lr: float) -> None:
    if not torch.isfinite(loss_sum).item():
        raise TrialFailed(f"training loss is {loss_sum.item()} in epoch {epoch + 1} (by step {step}, "
                          f"lr {lr:.4g}): diverged; lower train.lr or lengthen train.warmup_epochs")


# --------------------------------------------------------------------------------------------------
# One trial


def train(cfg: RunConfig, out_dir: Path, *, device: str | None = None, data_root: str | None = None,
          progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> rundir.FinalRecord:
    """Train `cfg` into `out_dir` (resuming from its checkpoint), probe excitations, return the final
    record (also written as final.json; a run directory that has one is returned as it is).

    `on_epoch(row)` gets each epoch's metric row once its checkpoint is on disk (an exception it raises,
    e.g. a lost claim, leaves a resumable run). Raises SpecError on bad input, TrialFailed on divergence.
    """
    out_dir = Path(out_dir)
    dist = Dist.current()
    check_run_dir(cfg, out_dir)
    done = rundir.read_final(out_dir)
    if done is not None:
        return done
    dev = resolve_device(device)
    bind(dev)  # before the data (pin-memory thread) or the model touch CUDA
    if dist.is_main:
        for stale in rundir.temp_files(out_dir):  # writes a kill cut short
            stale.unlink(missing_ok=True)

    mf = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    packed = trials_per_device()
    with torch_settings(cfg.train, dev, packed):
        data = load_data(cfg, device=dev, root=data_root, memory_format=mf, rank=dist.rank,
                         world_size=dist.world_size)
        try:
            return _train(cfg, out_dir, dev, dist, data, mf, progress, on_epoch, packed)
        finally:
            data.close()  # a long-lived worker's next trial must not inherit this one's loader workers
            release(dev)


def _train(cfg: RunConfig, out_dir: Path, dev: torch.device, dist: Dist, data: TrialData,
           mf: torch.memory_format, progress: bool, on_epoch: Callable[[dict], None] | None, packed: int
           ) -> rundir.FinalRecord:
    spec = cfg.train
    rank_batch = data.images_per_epoch // data.steps_per_epoch
    eval_batch = max(1, cfg.data.eval_batch_size // dist.world_size)
    check_compile_sync_bn(spec, dist.world_size, rank_batch)
    sync_bn = dist.wants_sync_bn(spec, rank_batch)
    seed_all(cfg.seed)
    model = build_model(cfg.backbone, cfg.se)
    cx = complexity(model, cfg.data.input_size, cfg.backbone.in_chans)  # before any training step
    model = (dist.sync_batchnorm(model, dev) if sync_bn else model).to(dev, memory_format=mf)
    opt = make_optimizer(model, spec)
    net = eval_net = dist.wrap(model, dev)
    if dist.world_size > 1:  # DDP's forward may talk to the other ranks; validation shards can differ
        eval_net = model
    amp = autocast(spec, dev)
    compile_seconds = 0.0
    if spec.compile:
        net, eval_net = compiled.compile_nets(model, net, dist.world_size)
        compile_seconds = compiled.warm_up(
            model, net, eval_net, train_batch=rank_batch, eval_batch=eval_batch,
            image=(cfg.backbone.in_chans, cfg.data.input_size, cfg.data.input_size),
            device=dev, memory_format=mf, amp=amp)
    # Claimed only now that data and model are known to work: a run that failed on bad input leaves
    # no config behind to clash with the corrected rerun.
    if dist.is_main and not (out_dir / rundir.CONFIG).exists():
        write_text_atomic(out_dir / rundir.CONFIG, cfg.to_yaml())
    rows: list[dict[str, Any]] = []
    start, step, train_seconds = 0, 0, 0.0
    ckpt = checkpoints.load_latest(out_dir, CHECKPOINT_FORMAT, main=dist.is_main)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optim.load_state(opt, ckpt["optimizer"])
        start, step, train_seconds = ckpt["epoch"], ckpt["step"], ckpt["train_seconds"]
        compile_seconds += ckpt.get("compile_seconds", 0.0)
        rows = list(ckpt["metrics"])
        set_rng_state(ckpt["rng"])
        del ckpt
    saved_epoch, saved_at = start, time.monotonic()

    for epoch in range(start, spec.epochs):  # `epochs` is the cap; the plateau rule may end sooner
        plateau = schedule.plateau_state(spec, [r["val_loss"] for r in rows])
        if plateau.stop is not None:
            break
        t0 = time.perf_counter()
        with _progress(data.steps_per_epoch, f"epoch {epoch + 1}/{spec.epochs}", progress) as bar:
            step, train_loss, lr, loop_s = train_epoch(net, data, opt, cfg, epoch, step, amp, bar, dist,
                                                       cuts=len(plateau.cuts))
        precise_bn(model, data, epoch, cfg.seed, spec.precise_bn, amp)
        dist.broadcast_buffers(model)
        val_loss, top1, top5 = evaluate(eval_net, data, amp, dist, cfg.backbone.num_classes,
                                        pad_to=eval_batch if spec.compile else None)
        if not math.isfinite(val_loss):  # an error rate from overflowing logits is no result
            raise TrialFailed(f"validation loss is {val_loss} after epoch {epoch + 1} (training loss "
                              f"{train_loss:.4g}): eval-mode activations overflowed, diverged")
        epoch_s = time.perf_counter() - t0
        train_seconds += epoch_s
        row = rundir.metric_row(epoch=epoch + 1, lr=lr, train_loss=train_loss, val_loss=val_loss,
                                top1_err=top1, top5_err=top5, epoch_seconds=epoch_s,
                                images_per_s=data.images_per_epoch * dist.world_size / loop_s)
        rows.append(row)
        if checkpoints.due(spec, epoch + 1, saved_epoch, time.monotonic() - saved_at):
            if dist.is_main:
                checkpoints.save(out_dir, {  # keeps the previous one too: checkpoints.py
                    "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "step": step,
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                    "metrics": rows, "train_seconds": train_seconds, "compile_seconds": compile_seconds,
                })
            saved_epoch, saved_at = epoch + 1, time.monotonic()
        if dist.is_main:
            rundir.write_metrics(out_dir, rows)
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"epoch {epoch + 1}/{spec.epochs}  lr {lr:.3g}  train_loss {train_loss:.4f}  val_loss "
                       f"{val_loss:.4f}  top1_err {top1:.2f}%  top5_err {top5:.2f}%  {epoch_s:.1f}s  "
                       f"{row['images_per_s']:.0f} img/s", file=sys.stderr)
        if on_epoch is not None:
            on_epoch(dict(row))

    if not rows:  # cannot happen with epochs > 0; guards a hand-edited checkpoint
        raise SpecError("checkpoint holds no epochs; delete it to start over",
                        source=str(out_dir / rundir.CHECKPOINT))
    if dist.is_main:
        save_excitations(out_dir / rundir.EXCITATIONS,
                         probe_excitations(model, data, cfg.backbone.num_classes))
    last = rows[-1]
    steady = rows[1:] or rows  # the first epoch pays what warm-up is left (allocator, cudnn autotune)
    final = rundir.FinalRecord(
        top1_err=last["top1_err"], top5_err=last["top5_err"], val_loss=last["val_loss"],
        params_m=cx.params_m, gflops=cx.gflops, params=cx.params, macs=cx.macs,
        train_seconds=train_seconds,
        images_per_s=len(steady) / sum(1.0 / r["images_per_s"] for r in steady),
        epochs=len(rows), lr_cuts=tuple(schedule.lr_cuts(spec, [r["val_loss"] for r in rows])),
        device=str(dev) if dist.world_size == 1 else f"{dev.type} x{dist.world_size}",
        versions=versions(), git_commit=rundir.git_commit(),
        sweep=cfg.sweep, profile=cfg.profile, setting=cfg.setting, seed=cfg.seed,
        compile_seconds=compile_seconds, trials_per_device=packed,
    )
    if dist.is_main:
        rundir.write_final(out_dir, final)
    return final
