"""`make bench`: SE's own cost and the runner's overheads, measured side by side in one run.

Writes benchmarks/results.json (render_benchmarks.py turns it into BENCHMARKS.md). Timings are medians
over interleaved rounds (each round times every variant once, so drift in machine load hits all of them
alike); ratios are of medians. Sections that need a GPU record that none was present instead of
estimating.

    python benchmarks/bench.py [--only cpu_inference,scheduler] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import describe as machine  # noqa: E402

from ablations.atomic import write_atomic  # noqa: E402
from ablations.patch import build_model  # noqa: E402
from ablations.schema import BackboneSpec, SESpec  # noqa: E402
from ablations.spec import load_profile  # noqa: E402

VARIANTS = {  # label -> SE spec (None: ResNet-50)
    "ResNet-50": None,
    "SE (standard)": SESpec(),
    "SE-PRE": SESpec(position="pre"),
    "SE-POST": SESpec(position="post"),
    "SE-Identity": SESpec(position="identity"),
    "SE_3x3": SESpec(position="3x3"),
    "NoSqueeze": SESpec(squeeze="none"),
}
NULL_CONTROL = "ResNet-50 (second copy)"


def interleaved_medians(fns: dict, rounds: int, warmup: int = 2, block: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn. Each round runs every fn in turn, `block` timed calls each;
    with block > 1 one untimed call first brings that fn's weights back into cache, as in a process
    that serves one model (the rounds still spread machine drift over every fn alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if block > 1:
                fn()
            for _ in range(block):
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


INFERENCE_PROCESSES = 3  # fresh processes: a process's own state moves these ratios by a few percent


def cpu_inference(rounds: int) -> dict:
    """Batch 1 at 224, eval, inference mode, all CPU threads: the paper's CPU figure.

    Measured in INFERENCE_PROCESSES fresh processes, one after another: within a process the timings
    are steady (instances of one model agree to 0.1%), but from one process to the next the same
    models' ratio moves by a few percent (memory placement, the other core's neighbours), so one
    process's ratio is one sample. Quoted: the median over processes of each process's medians.
    """
    ctx = mp.get_context("spawn")
    runs = []
    for _ in range(INFERENCE_PROCESSES):
        with ctx.Pool(1) as pool:
            runs.append(pool.apply(cpu_inference_in_process, (rounds,)))
    per_model = {row["model"]: [] for row in runs[0]["rows"]}
    for run in runs:
        for row in run["rows"]:
            per_model[row["model"]].append(row)
    rows = [{"model": k, "ms": statistics.median(x["ms"] for x in v), "ratio": statistics.median(x["ratio"] for x in v)}
            for k, v in per_model.items()]
    out = {k: statistics.median(run[k] for run in runs)
           for k in ("se_ratio", "noise_ratio", "timm_seresnet50_ms", "patched_ms", "patched_vs_timm")}
    return {**out, "threads": runs[0]["threads"], "rows": rows, "block": runs[0]["block"], "rounds": rounds,
            "processes": len(runs), "se_ratio_per_process": [run["se_ratio"] for run in runs],
            "noise_ratio_per_process": [run["noise_ratio"] for run in runs],
            "patched_vs_timm_per_process": [run["patched_vs_timm"] for run in runs], "ops": se_op_breakdown()}


def cpu_inference_in_process(rounds: int) -> dict:
    """One process's interleaved medians. A second, identical ResNet-50 is timed like every variant:
    its ratio to the first is the noise floor within the process."""
    import timm

    backbone = BackboneSpec(stride_in_1x1=True)
    x = torch.randn(1, 3, 224, 224)
    models = {label: build_model(backbone, se).eval() for label, se in VARIANTS.items()}
    models[NULL_CONTROL] = build_model(backbone, None).eval()
    # Patched standard SE vs timm's seresnet50: the same architecture (timm layout, FC bias).
    models["timm seresnet50"] = timm.create_model("seresnet50").eval()
    models["patched (= seresnet50)"] = build_model(BackboneSpec(), SESpec(bias=True)).eval()
    fns = {k: (lambda m=m: m(x)) for k, m in models.items()}
    with torch.inference_mode():
        med = interleaved_medians(fns, rounds, block=5)
    base = med["ResNet-50"]
    rows = [{"model": k, "ms": v * 1e3, "ratio": v / base} for k, v in med.items()
            if k not in ("timm seresnet50", "patched (= seresnet50)")]
    patched = med["patched (= seresnet50)"] / med["timm seresnet50"]
    return {"threads": torch.get_num_threads(), "rows": rows, "se_ratio": med["SE (standard)"] / base,
            "noise_ratio": med[NULL_CONTROL] / base, "block": 5, "rounds": rounds,
            "timm_seresnet50_ms": med["timm seresnet50"] * 1e3,
            "patched_ms": med["patched (= seresnet50)"] * 1e3, "patched_vs_timm": patched}


def se_op_breakdown(calls: int = 20) -> dict:
    """Where SE's CPU inference time goes: torch.profiler's self CPU ms per forward, by aten op, for
    ResNet-50 and standard SE; ops whose time differs by more than 0.05 ms, and the convolutions."""
    from torch.profiler import ProfilerActivity, profile

    backbone = BackboneSpec(stride_in_1x1=True)
    x = torch.randn(1, 3, 224, 224)
    per_op = {}
    for label in ("ResNet-50", "SE (standard)"):
        model = build_model(backbone, VARIANTS[label]).eval()
        with torch.inference_mode():
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(calls):
                    model(x)
        per_op[label] = {e.key: e.self_cpu_time_total / calls / 1e3 for e in prof.key_averages()}
    plain, se = per_op["ResNet-50"], per_op["SE (standard)"]
    rows = [{"op": k, "plain_ms": plain.get(k, 0.0), "se_ms": se.get(k, 0.0)} for k in set(plain) | set(se)
            if abs(plain.get(k, 0.0) - se.get(k, 0.0)) > 0.05 or k == "aten::mkldnn_convolution"]
    rows.sort(key=lambda r: -abs(r["se_ms"] - r["plain_ms"]))
    return {"rows": rows, "plain_total_ms": sum(plain.values()), "se_total_ms": sum(se.values())}


def quick_train_step(rounds: int) -> dict:
    """One SGD step (forward, backward, update) of the quick profile's model and batch, in the memory
    format the trainer uses for it."""
    profile = load_profile("quick")
    torch.set_num_threads(profile.train.threads or torch.get_num_threads())
    n, size = profile.data.batch_size, profile.data.input_size
    mf = torch.channels_last if profile.train.channels_last else torch.contiguous_format
    x = torch.randn(n, 3, size, size).to(memory_format=mf)
    y = torch.randint(0, profile.backbone.num_classes, (n,))
    fns = {}
    for label in ("ResNet-50", "SE (standard)", "NoSqueeze"):
        model = build_model(profile.backbone, VARIANTS[label]).train().to(memory_format=mf)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        fns[label] = step
    med = interleaved_medians(fns, rounds)
    torch.set_num_threads(os.cpu_count() or 1)
    base = med["ResNet-50"]
    return {"batch": n, "input_size": size, "threads": profile.train.threads, "channels_last": profile.train.channels_last,
            "rows": [{"model": k, "ms": v * 1e3, "ratio": v / base} for k, v in med.items()]}


def gpu_train_step(rounds: int) -> dict:
    """Batch 256 at 224, bf16 autocast, channels_last, eager and torch.compile (needs CUDA)."""
    if not torch.cuda.is_available():
        return {"measured": False, "why": "no GPU on this machine"}
    dev = torch.device("cuda")
    x = torch.randn(256, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (256,), device=dev)
    out = {"measured": True, "device": torch.cuda.get_device_name(), "rows": []}
    for mode in ("eager", "compile"):
        fns = {}
        for label in ("ResNet-50", "SE (standard)"):
            model = build_model(BackboneSpec(stride_in_1x1=True), VARIANTS[label]).to(dev)
            model = model.to(memory_format=torch.channels_last)
            fwd = torch.compile(model) if mode == "compile" else model
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

            def step(fwd=fwd, opt=opt):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(fwd(x), y)
                loss.backward()
                opt.step()
                torch.cuda.synchronize()

            fns[label] = step
        med = interleaved_medians(fns, rounds, warmup=5)
        base = med["ResNet-50"]
        out["rows"] += [{"mode": mode, "model": k, "ms": v * 1e3, "img_s": 256 / v, "ratio": v / base}
                        for k, v in med.items()]
    return out


def trainer_vs_bare(reps: int) -> dict:
    """Trainer images/s vs bare forward+backward on the same batches (benchmarks/trainer_throughput.py)."""
    out = ROOT / "benchmarks" / "trainer_throughput.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trainer_throughput.py"), "--reps", str(reps),
                    "--md", str(ROOT / "benchmarks" / "trainer_throughput.md"), "--json", str(out)],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    stats = json.loads(out.read_text())["stats"]["CPU median"]
    return {"trainer_img_s": stats["trainer"], "bare_img_s": stats["bare fwd+bwd"],
            "ratio": stats["trainer"] / stats["bare fwd+bwd"],
            "ratio_vs_step": stats["trainer"] / stats["bare fwd+bwd+step"]}


def _ablate(*args: str, cwd: Path) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ablations", *args], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t


def time_to_table(workers: int) -> dict:
    """Wall time of the quick profile's Table 10 (6 settings x 3 seeds), from nothing to the table."""
    with tempfile.TemporaryDirectory() as tmp:
        wall = _ablate("run", "ratio", "--profile", "quick", "--results-dir", tmp, "--workers", str(workers),
                       cwd=ROOT)
        train = _sum_train_seconds(Path(tmp))
    return {"workers": workers, "wall_s": wall, "trials": 18, "sum_train_s": train}


def _sum_train_seconds(results: Path) -> float:
    return sum(json.loads(p.read_text())["train_seconds"] for p in results.rglob("final.json"))


SLEEP_EPOCH_S = 2.0  # x 2 epochs: 4 s trials, as long as the quick profile's 2-epoch trials here


def _script_json(script: str, *args: str) -> dict:
    """Run benchmarks/<script> with `args` and return the JSON it writes (its --json option)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(out)], check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
        return json.loads(out.read_text())


def _sleep_sweep(workers: int) -> dict:
    """benchmarks/sleep_sweep.py: the scheduler with a trainer that only sleeps (12 trials)."""
    t = time.perf_counter()
    figures = _script_json("sleep_sweep.py", "--workers", str(workers), "--epoch-s", str(SLEEP_EPOCH_S))
    wall = time.perf_counter() - t
    # As the user waits for `ablate run`: interpreter start and exit included, the script's own reading
    # of the trials' timeline after the run not.
    return {**figures, "wall_s": wall - figures["own_analysis_s"]}


def scheduler_overhead() -> dict:
    """Scheduler overhead per trial and 1 vs 2 workers: sleeping trials (the scheduler alone; two
    workers that share nothing, like two devices) and real 2-epoch quick-profile trials (2 CPU cores
    shared by both workers)."""
    from sleep_sweep import trial_timeline

    sleep = {w: _sleep_sweep(w) for w in (1, 2)}
    real = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            wall = _ablate("run", "ratio", "--profile", "quick", "--seeds", "2", "--results-dir", tmp,
                           "--workers", str(workers), "--set", "train.epochs=2", cwd=ROOT)
            line = trial_timeline(f"sqlite:///{tmp}/optuna.db", lambda t: t.user_attrs["train_seconds"])
            real[workers] = {"wall_s": wall, "sum_train_s": _sum_train_seconds(Path(tmp)), "trials": 12,
                             "trial_phase_s": line["trial_phase_s"],
                             "outside_epochs_per_trial_s": line["inside_trial_s"] + line["between_trials_s"]}
    one = sleep[1]
    return {"sleep": sleep, "real": real, "trial_s": one["trial_s"],
            "overhead_per_trial_s": one["overhead_per_trial_s"],
            "overhead_fraction": one["overhead_per_trial_s"] / one["trial_s"],
            "speedup_2_workers": sleep[1]["wall_s"] / sleep[2]["wall_s"],
            "speedup_2_workers_trial_phase": sleep[1]["trial_phase_s"] / sleep[2]["trial_phase_s"],
            "speedup_2_workers_real": real[1]["wall_s"] / real[2]["wall_s"],
            "contention_real": real[2]["sum_train_s"] / real[1]["sum_train_s"]}


# Synthetic 32x32 images through the cifar profile: the same in-memory, on-device pipeline as CIFAR-10,
# which the GPU machine cannot download.
CIFAR_ON_GPU = ("--profile", "cifar", "--set", "data.dataset=synthetic", "--set", "data.synthetic_size=50000",
                "--device", "cuda")


def gpu_trainer_vs_bare(reps: int) -> dict:
    """The cifar profile's trainer vs bare forward+backward on a GPU."""
    if not torch.cuda.is_available():
        return {"measured": False, "why": "no GPU on this machine"}
    stats = _script_json("trainer_throughput.py", *CIFAR_ON_GPU, "--reps", str(reps))["stats"]
    wall = stats["wall median"]  # a GPU is not shared: wall time
    return {"measured": True, "trainer_img_s": wall["trainer"], "bare_img_s": wall["bare fwd+bwd"],
            "ratio": wall["trainer"] / wall["bare fwd+bwd"]}


def gpu_packing(epochs: int = 2) -> dict:
    """Two cifar-profile trials on one GPU at once vs one alone (benchmarks/packing.py): does
    `--workers 2` per GPU raise throughput?"""
    if not torch.cuda.is_available():
        return {"measured": False, "why": "no GPU on this machine"}
    return {"measured": True, **_script_json("packing.py", *CIFAR_ON_GPU, "--epochs", str(epochs))}


# --------------------------------------------------------------------------------------------------
# report


SECTIONS = ("cpu_inference", "quick_train_step", "gpu", "trainer_vs_bare", "gpu_trainer", "gpu_packing",
            "time_to_table", "scheduler", "folder_pipeline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds per variant")
    ap.add_argument("--reps", type=int, default=10, help="timed epochs per variant, trainer vs bare")
    ap.add_argument("--workers", type=int, default=2, help="workers for time-to-table")
    args = ap.parse_args()
    only = set(args.only.split(",")) - {""}
    results_path = ROOT / "benchmarks" / "results.json"
    r = json.loads(results_path.read_text()) if results_path.exists() else {}
    if only >= set(SECTIONS) or "date" not in r:  # the header dates a full run; --only keeps it
        r.update(date=time.strftime("%Y-%m-%d"), machine=machine())
    steps = {"cpu_inference": lambda: cpu_inference(args.rounds),
             "quick_train_step": lambda: quick_train_step(args.rounds),
             "gpu": lambda: gpu_train_step(args.rounds),
             "trainer_vs_bare": lambda: trainer_vs_bare(args.reps),
             "gpu_trainer": lambda: gpu_trainer_vs_bare(args.reps),
             "gpu_packing": gpu_packing,
             "time_to_table": lambda: time_to_table(args.workers),
             "scheduler": scheduler_overhead,
             "folder_pipeline": lambda: _script_json("folder_pipeline.py")}
    keys = {"gpu": "gpu_train_step", "gpu_trainer": "gpu_trainer_vs_bare"}
    for name in SECTIONS:
        if name in only:
            print(f"[bench] {name} ...", flush=True)
            r[keys.get(name, name)] = steps[name]()
    write_atomic(results_path, json.dumps(r, indent=2) + "\n")
    print(f"figures in {results_path.relative_to(ROOT)}; `python benchmarks/render_benchmarks.py` writes "
          "BENCHMARKS.md from them")
    shutil.rmtree(ROOT / "benchmarks" / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
