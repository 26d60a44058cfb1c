"""The steps of `benchmarks/gpu_check.py`, one function each. Each runs in a process of its own (a CUDA
error or a hang in one cannot spoil the next), returns a dict of figures, or raises Skip with the reason.
`gpus` is the number of CUDA devices the driver saw.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYNTHETIC = 10240  # cifar-shaped synthetic training images: 40 steps of the profile's batch of 256


class Skip(Exception):
    """The step does not apply on this machine (the reason is recorded)."""


def cifar(*overrides: str, se: bool = True, label: str = "SE r=16"):
    """The cifar profile on synthetic data (bf16, channels_last as the profile has them)."""
    from ablations.schema import SESpec, Setting
    from ablations.spec import load_profile, run_config

    profile = load_profile("cifar", ["data.dataset=synthetic", f"data.synthetic_size={SYNTHETIC}", *overrides])
    return run_config(profile, Setting(label=label, se=SESpec() if se else None), seed=0)


def _device(index: int = 0):
    import torch

    from ablations.devices import bind

    dev = torch.device(f"cuda:{index}")
    bind(dev)
    return dev


def _script_json(script: str, *args: str) -> dict:
    """Run another benchmark script with `--json` and return what it wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------
# Single GPU


def environment(gpus: int) -> dict:
    import platform

    import torch

    smi = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=20)
    shm = os.statvfs("/dev/shm") if os.path.exists("/dev/shm") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)], "nvidia_smi": smi.stdout.strip(),
            "cpu_cores": os.cpu_count(), "dev_shm_gib": None if shm is None else shm.f_blocks * shm.f_frsize / 2**30}


def train_loop(gpus: int, compile: bool) -> dict:
    """The trainer's epoch loop on the cifar profile, eager or compiled: compile seconds, images/s of a
    timed epoch after a warm one, dynamo's graphs and graph breaks, and recompiles after the warm-up."""
    import torch

    from ablations import compiled
    from ablations.data import load_data
    from ablations.distributed import Dist
    from ablations.optim import make_optimizer
    from ablations.patch import build_model
    from ablations.train import autocast, evaluate, torch_settings, train_epoch

    cfg = cifar(f"train.compile={str(compile).lower()}")
    dev, mf = _device(), torch.channels_last
    with torch_settings(cfg.train, dev):
        data = load_data(cfg, device=dev, memory_format=mf)
        model = build_model(cfg.backbone, cfg.se).to(dev, memory_format=mf)
        opt = make_optimizer(model, cfg.train)
        amp = autocast(cfg.train, dev)
        net = eval_net = model
        before = compiled.dynamo_counts()
        compile_s = 0.0
        rank_batch = data.images_per_epoch // data.steps_per_epoch
        if compile:
            net, eval_net = compiled.compile_nets(model, model, 1)
            compile_s = compiled.warm_up(model, net, eval_net, train_batch=rank_batch,
                                         eval_batch=cfg.data.eval_batch_size, image=(3, 32, 32), device=dev,
                                         memory_format=mf, amp=amp)
        warm = compiled.dynamo_counts()
        step = train_epoch(net, data, opt, cfg, 0, 0, amp)[0]  # allocator, cuDNN autotuning
        epochs = []
        for epoch in (1, 2):
            step, _, _, seconds = train_epoch(net, data, opt, cfg, epoch, step, amp)
            epochs.append(seconds)
        evaluate(eval_net, data, amp, Dist(), cfg.backbone.num_classes,
                 pad_to=cfg.data.eval_batch_size if compile else None)
        after = compiled.dynamo_counts()
    return {"mode": "compile" if compile else "eager", "compile_s": compile_s,
            "img_s": data.images_per_epoch / statistics.median(epochs), "epoch_s": epochs,
            "graphs": after["graphs"] - before["graphs"], "graph_breaks": after["graph_breaks"] - before["graph_breaks"],
            "recompiles_after_warm_up": after["graphs"] - warm["graphs"]}


def se_overhead(gpus: int, steps: int = 30, rounds: int = 3) -> dict:
    """ms per training step (forward, backward, SGD), SE vs the plain ResNet-50, eager, interleaved."""
    import torch
    import torch.nn.functional as F

    from ablations.optim import make_optimizer
    from ablations.patch import build_model
    from ablations.train import autocast

    dev, mf = _device(), torch.channels_last
    models = {}
    for name, se in (("plain", False), ("SE", True)):
        cfg = cifar(se=se)
        model = build_model(cfg.backbone, cfg.se).to(dev, memory_format=mf)
        models[name] = (model, make_optimizer(model, cfg.train))
    amp = autocast(cfg.train, dev)
    x = torch.randn(256, 3, 32, 32, device=dev).contiguous(memory_format=mf)
    y = torch.randint(0, 10, (256,), device=dev)
    torch.backends.cudnn.benchmark = True
    ms: dict[str, list[float]] = {k: [] for k in models}
    for r in range(rounds + 1):
        for name, (model, opt) in models.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                with amp():
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            end.record()
            torch.cuda.synchronize(dev)
            if r:  # round 0 warms up
                ms[name].append(start.elapsed_time(end) / steps)
    plain, se = (statistics.median(ms[k]) for k in ("plain", "SE"))
    return {"plain_ms": plain, "se_ms": se, "ratio": se / plain, "batch": 256, "steps": steps, "rounds": rounds}


def optimizer_step(gpus: int, steps: int = 50) -> dict:
    """The SGD step alone on the cifar SE-ResNet-50's gradients: ms and CUDA kernels per step, for the
    trainer's fused SGD, foreach, and the per-tensor loop."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ablations.optim import param_groups
    from ablations.patch import build_model

    dev = _device()
    cfg = cifar()
    model = build_model(cfg.backbone, cfg.se).to(dev, memory_format=torch.channels_last)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    spec = cfg.train
    out = {"tensors": sum(1 for _ in model.parameters())}
    for name, kw in (("fused", {"fused": True}), ("foreach", {"foreach": True}), ("for-loop", {"foreach": False})):
        opt = torch.optim.SGD(param_groups(model, spec), lr=spec.lr, momentum=spec.momentum,
                              nesterov=spec.nesterov, **kw)
        for _ in range(5):
            opt.step()
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            opt.step()
        end.record()
        torch.cuda.synchronize(dev)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize(dev)
        kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        out[name] = {"ms": start.elapsed_time(end) / steps, "kernels": kernels / 3}
    return out


def trainer_vs_bare(gpus: int) -> dict:
    return _script_json("trainer_throughput.py", "--profile", "cifar", "--set", "data.dataset=synthetic",
                        "--set", f"data.synthetic_size={SYNTHETIC}", "--device", "cuda:0", "--reps", "3")


def packing(gpus: int) -> dict:
    """3 cifar trials packed on cuda:0 vs 1 alone: each one's images/s and the sum."""
    return _script_json("packing.py", "--profile", "cifar", "--set", "data.dataset=synthetic", "--set",
                        f"data.synthetic_size={SYNTHETIC}", "--device", "cuda:0", "--trials", "1,3", "--epochs", "2")


def folder_pipeline(gpus: int, images: int = 2000) -> dict:
    """The ImageFolder pipeline feeding cuda:0 (224 px, batch 128): images/s of one training pass, JPEGs
    decoded by PIL in the DataLoader workers vs by nvJPEG on the GPU."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from folder_pipeline import write_folder

    from ablations.data import load_data

    dev = _device()
    workers = max(1, min(8, (os.cpu_count() or 2) - 1))
    out: dict = {"images": images, "workers": workers}
    with tempfile.TemporaryDirectory(prefix="gpu-check-folder-") as tmp:
        t0 = time.perf_counter()
        write_folder(Path(tmp), images)
        out["write_s"] = time.perf_counter() - t0
        for decode in ("cpu", "gpu"):
            cfg = cifar("data.dataset=imagefolder", "data.input_size=224", "data.batch_size=128",
                        "data.eval_batch_size=128", f"data.workers={workers}", f"data.decode={decode}")
            data = load_data(cfg, device=dev, root=tmp, memory_format=torch.channels_last)
            try:
                for epoch in range(2):  # the first pays the workers' start
                    t0, n = time.perf_counter(), 0
                    for x, _ in data.train_batches(epoch, 0):
                        n += len(x)
                    torch.cuda.synchronize(dev)
                    seconds = time.perf_counter() - t0
            finally:
                data.close()
            out[decode] = {"img_s": n / seconds, "seconds": seconds}
    return out


# ---------------------------------------------------------------------------------------------------
# Two GPUs or more


def _need_two(gpus: int) -> None:
    if gpus < 2:
        raise Skip(f"needs 2 GPUs; this machine has {gpus}")


def gpu0_leak(gpus: int) -> dict:
    """A trial pinned to cuda:1 reading an image folder (DataLoader pin-memory thread): nvidia-smi must
    list its process on GPU 1 only."""
    _need_two(gpus)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from folder_pipeline import write_folder

    uuids = dict(line.split(", ") for line in subprocess.run(
        ["nvidia-smi", "--query-gpu=uuid,index", "--format=csv,noheader"], capture_output=True, text=True,
        check=True).stdout.strip().splitlines())
    with tempfile.TemporaryDirectory(prefix="gpu-check-leak-") as tmp:
        write_folder(Path(tmp) / "data", 256)
        code = ("import sys; from ablations.train import train; from gpu_check_steps import cifar; "
                "cfg = cifar('data.dataset=imagefolder', 'data.input_size=64', 'data.batch_size=64', "
                "'data.workers=2', 'train.epochs=2'); "
                f"train(cfg, {str(Path(tmp) / 'run')!r}, device='cuda:1', data_root={str(Path(tmp) / 'data')!r}, "
                "progress=False)")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
        seen: set[int] = set()
        polls = 0
        while proc.poll() is None:
            listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout
            polls += 1
            for line in listing.strip().splitlines():
                pid, uuid = (x.strip() for x in line.split(","))
                if pid == str(proc.pid):
                    seen.add(int(uuids[uuid]))
            time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(f"the pinned trial exited with status {proc.returncode}")
    if not seen:
        return {"ok": None, "polls": polls, "note": "nvidia-smi never listed the trial's process (a PID namespace "
                "hides it): not checked"}
    return {"ok": seen == {1}, "gpus_used": sorted(seen), "polls": polls}


def _run(tmp: str, name: str, device: str, *overrides: str, on_epoch=None):
    from ablations import ddp
    from ablations.train import train

    cfg = cifar("train.epochs=2", *overrides)
    fn = ddp.launch if "," in device else train
    return fn(cfg, Path(tmp) / name, device=device, progress=False, on_epoch=on_epoch)


def ddp_vs_one(gpus: int) -> dict:
    """The cifar trial (2 epochs, synthetic) on cuda:0 alone and on cuda:0,cuda:1: images/s."""
    _need_two(gpus)
    with tempfile.TemporaryDirectory() as tmp:
        one = _run(tmp, "one", "cuda:0")
        two = _run(tmp, "two", "cuda:0,cuda:1")
    return {"one_img_s": one.images_per_s, "two_img_s": two.images_per_s, "speedup": two.images_per_s / one.images_per_s,
            "top1_one": one.top1_err, "top1_two": two.top1_err}


def ddp_stop_resume(gpus: int, epochs: int = 4) -> dict:
    """Stopped once rank 0 reports its first epoch on 2 GPUs (the ranks may be an epoch further by then),
    resumed on 1: the trial ends with all its epochs, the later ones trained on one GPU."""
    _need_two(gpus)

    def stop(row: dict) -> None:
        raise KeyboardInterrupt

    with tempfile.TemporaryDirectory() as tmp:
        try:
            _run(tmp, "run", "cuda:0,cuda:1", f"train.epochs={epochs}", on_epoch=stop)
        except KeyboardInterrupt:
            pass
        resumed: list[int] = []
        final = _run(tmp, "run", "cuda:0", f"train.epochs={epochs}",
                     on_epoch=lambda row: resumed.append(int(row["epoch"])))
    ok = final.epochs == epochs and bool(resumed) and resumed[0] >= 2 and resumed[-1] == epochs
    return {"ok": ok, "epochs_after_resume": resumed, "device": final.device}


def ddp_compile(gpus: int) -> dict:
    """DDP + torch.compile (no SyncBN) on 2 GPUs, 2 epochs."""
    _need_two(gpus)
    with tempfile.TemporaryDirectory() as tmp:
        final = _run(tmp, "run", "cuda:0,cuda:1", "train.compile=true", "train.sync_bn=false")
    return {"compile_s": final.compile_seconds, "img_s": final.images_per_s, "epochs": final.epochs}


STEPS = {  # name: (function, seconds it may take); in the order they run, most telling first
    "environment": (environment, 30),
    "train_eager": (lambda gpus: train_loop(gpus, False), 60),
    "train_compiled": (lambda gpus: train_loop(gpus, True), 150),
    "optimizer_step": (optimizer_step, 45),
    "se_overhead": (se_overhead, 45),
    "packing": (packing, 90),
    "folder_pipeline": (folder_pipeline, 90),
    "trainer_vs_bare": (trainer_vs_bare, 60),
    "gpu0_leak": (gpu0_leak, 60),
    "ddp_vs_one": (ddp_vs_one, 90),
    "ddp_stop_resume": (ddp_stop_resume, 90),
    "ddp_compile": (ddp_compile, 180),
}
