"""`make bench`: SE's own cost and the runner's overheads, measured side by side in one run.

Writes BENCHMARKS.md and benchmarks/results.json. Timings are medians over interleaved rounds (each
round times every variant once, so drift in machine load hits all of them alike); ratios are of
medians. Sections that need a GPU say so when none is present instead of estimating.

    python benchmarks/bench.py [--only cpu_inference,scheduler] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
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

from ablations.patch import build_model  # noqa: E402
from ablations.spec import BackboneSpec, SESpec, load_profile  # noqa: E402

GOALS = {
    "cpu_inference": 1.02,  # SE-ResNet-50 / ResNet-50, paper 1.018
    "gpu_train_step": 1.05,  # paper 1.10
    "patched_vs_timm": 1.01,
    "trainer_vs_bare": 0.95,
    "time_to_table_s": 300,
    "scheduler_overhead": 0.02,
    "two_workers_speedup": 1.8,
}

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


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[ok]


def render(r: dict) -> str:
    lines = ["# Benchmarks", "",
             f"Recorded by `make bench` (`python benchmarks/bench.py`) on {r['date']}: {r['machine']}.",
             "Medians over interleaved rounds; ratios are of medians. Raw figures: `benchmarks/results.json`.",
             "", "## Summary", "", "| figure | measured | goal | |", "|---|---|---|---|"]
    no_gpu = "no GPU machine was available to the session that recorded this file"

    def row(name, value, goal, ok, cmd):
        lines.append(f"| {name} | {value} | {goal} | {verdict(ok)} — `{cmd}` |")

    inf = r.get("cpu_inference")
    if inf:
        row("CPU inference SE-ResNet-50 / ResNet-50 (batch 1, 224)",
            f"{inf['se_ratio']:.3f} (median of {inf['processes']} processes: "
            f"{', '.join(f'{x:.3f}' for x in inf['se_ratio_per_process'])})", f"≤ {GOALS['cpu_inference']}",
            inf["se_ratio"] <= GOALS["cpu_inference"], "python benchmarks/bench.py --only cpu_inference")
        row("patched standard SE / timm seresnet50 (CPU inference)",
            f"{inf['patched_vs_timm']:.3f} (per process: "
            f"{', '.join(f'{x:.3f}' for x in inf['patched_vs_timm_per_process'])})",
            f"≤ {GOALS['patched_vs_timm']}", inf["patched_vs_timm"] <= GOALS["patched_vs_timm"],
            "python benchmarks/bench.py --only cpu_inference")
    gpu = r.get("gpu_train_step", {})
    if gpu.get("measured"):
        for mode in ("eager", "compile"):
            se = [x for x in gpu["rows"] if x["model"] == "SE (standard)" and x["mode"] == mode][0]["ratio"]
            row(f"GPU training step SE / plain (256, bf16, channels_last, {mode})", f"{se:.3f}",
                f"≤ {GOALS['gpu_train_step']}", se <= GOALS["gpu_train_step"], "python benchmarks/bench.py --only gpu")
    else:
        row("GPU training step SE / plain (256, bf16, channels_last)", "—", f"≤ {GOALS['gpu_train_step']}",
            None, no_gpu)
    tvb = r.get("trainer_vs_bare")
    if tvb:
        row("trainer / bare forward+backward images/s (quick, CPU)", f"{tvb['ratio']:.3f}",
            f"≥ {GOALS['trainer_vs_bare']}", tvb["ratio"] >= GOALS["trainer_vs_bare"],
            "python benchmarks/trainer_throughput.py")
    gtvb = r.get("gpu_trainer_vs_bare", {})
    if gtvb.get("measured"):
        row("trainer / bare images/s (cifar profile, GPU)", f"{gtvb['ratio']:.3f}", f"≥ {GOALS['trainer_vs_bare']}",
            gtvb["ratio"] >= GOALS["trainer_vs_bare"], "python benchmarks/bench.py --only gpu_trainer")
    else:
        row("trainer / bare images/s (cifar profile, GPU)", "—", f"≥ {GOALS['trainer_vs_bare']}", None, no_gpu)
    pack = r.get("gpu_packing", {})
    if pack.get("measured"):
        row("2 cifar trials packed on one GPU / 1 alone (aggregate images/s)", f"{pack['gain']:.2f}×",
            "> 1× (then pack)", pack["gain"] > 1, "python benchmarks/bench.py --only gpu_packing")
    else:
        row("2 cifar trials packed on one GPU / 1 alone (aggregate images/s)", "—", "> 1× (then pack)", None,
            no_gpu)
    ttt = r.get("time_to_table")
    if ttt:
        row(f"time-to-table, quick Table 10 (18 trials, {ttt['workers']} workers)", f"{ttt['wall_s']:.0f} s",
            f"≤ {GOALS['time_to_table_s']} s", ttt["wall_s"] <= GOALS["time_to_table_s"],
            f"make ablation-ratio WORKERS={ttt['workers']} RESULTS=$(mktemp -d)")
    row("time-to-table, cifar Table 10 (GPU)", "—", "", None,
        f"{no_gpu}; on one: ablate run ratio --profile cifar --data-root <CIFAR-10 dir>")
    sch = r.get("scheduler")
    if sch:
        row(f"scheduler overhead per trial ({sch['trial_s']:.0f} s sleeping trials, 1 worker)",
            f"{sch['overhead_per_trial_s'] * 1e3:.0f} ms = {sch['overhead_fraction']:.1%}",
            f"≤ {GOALS['scheduler_overhead']:.0%}", sch["overhead_fraction"] <= GOALS["scheduler_overhead"],
            "python benchmarks/bench.py --only scheduler")
        row("2 workers vs 1, end to end (12 sleeping trials: nothing shared, as on 2 devices)",
            f"{sch['speedup_2_workers']:.2f}× ({sch['speedup_2_workers_trial_phase']:.2f}× from first claim "
            "to last result)", f"≥ {GOALS['two_workers_speedup']}×",
            sch["speedup_2_workers"] >= GOALS["two_workers_speedup"], "python benchmarks/bench.py --only scheduler")
        row("2 workers vs 1, end to end (12 real 2-epoch trials, 2 shared CPU cores)",
            f"{sch['speedup_2_workers_real']:.2f}×", f"≥ {GOALS['two_workers_speedup']}×",
            sch["speedup_2_workers_real"] >= GOALS["two_workers_speedup"],
            "python benchmarks/bench.py --only scheduler")

    if inf:
        lines += ["", f"## SE overhead, CPU inference (batch 1, 224×224, {inf['threads']} threads, ResNet-50 "
                  "with stride in 1×1)", "",
                  f"{inf['processes']} fresh processes, one after another; in each, {inf['rounds']} rounds in which "
                  f"every model runs one untimed call, then {inf['block']} timed ones. Quoted: medians over the "
                  "processes. The second ResNet-50 is identical to the first: its ratio is the noise floor within "
                  "a process (per process: "
                  f"{', '.join(f'{x:.3f}' for x in inf['noise_ratio_per_process'])}).", "",
                  "| model | ms | ratio |", "|---|---|---|"]
        lines += [f"| {x['model']} | {x['ms']:.1f} | {x['ratio']:.3f} |" for x in inf["rows"]]
        lines += ["", f"timm `seresnet50` {inf['timm_seresnet50_ms']:.1f} ms vs patched standard SE (bias, "
                  f"timm layout) {inf['patched_ms']:.1f} ms: ratio {inf['patched_vs_timm']:.3f}."]
        ops = inf.get("ops")
        if ops:
            lines += ["", "Where the time goes (torch.profiler, self CPU ms per forward, by op; ops whose time "
                      f"differs by > 0.05 ms, and the convolutions). Totals: ResNet-50 {ops['plain_total_ms']:.1f} ms, "
                      f"SE {ops['se_total_ms']:.1f} ms.", "", "| op | ResNet-50 ms | SE ms |", "|---|---|---|"]
            lines += [f"| `{x['op']}` | {x['plain_ms']:.2f} | {x['se_ms']:.2f} |" for x in ops["rows"]]
    qt = r.get("quick_train_step")
    if qt:
        layout = ", channels_last" if qt.get("channels_last") else ""
        lines += ["", f"## SE overhead, quick-profile training step (batch {qt['batch']}, {qt['input_size']}×"
                  f"{qt['input_size']}, {qt['threads']} thread{layout})", "", "| model | ms/step | ratio |",
                  "|---|---|---|"]
        lines += [f"| {x['model']} | {x['ms']:.1f} | {x['ratio']:.3f} |" for x in qt["rows"]]
    if gpu.get("measured"):
        lines += ["", f"## GPU training step ({gpu['device']})", "", "| mode | model | ms | img/s | ratio |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['mode']} | {x['model']} | {x['ms']:.1f} | {x['img_s']:.0f} | {x['ratio']:.3f} |"
                  for x in gpu["rows"]]
    else:
        lines += ["", "## GPU", "", f"Not measured: {no_gpu}. No GPU figure here is estimated. On a GPU "
                  "machine `make bench` measures the training step (batch 256, bf16, channels_last, eager and "
                  "`torch.compile`), the cifar profile's trainer vs bare model, and two cifar trials packed on one GPU "
                  "vs one alone, by itself."]
    if tvb:
        lines += ["", "## Trainer vs bare model (quick profile, CPU)", "",
                  f"trainer {tvb['trainer_img_s']:.0f} img/s, bare forward+backward {tvb['bare_img_s']:.0f} "
                  f"img/s: {tvb['ratio']:.3f} (vs forward+backward+SGD step: {tvb['ratio_vs_step']:.3f}; CPU-time medians, "
                  "details in benchmarks/trainer_throughput.md)."]
    if gtvb.get("measured"):
        lines += ["", "## Trainer vs bare model (cifar profile, GPU)", "",
                  f"trainer {gtvb['trainer_img_s']:.0f} img/s, bare forward+backward {gtvb['bare_img_s']:.0f} img/s: "
                  f"{gtvb['ratio']:.3f} (wall-time medians)."]
    if pack.get("measured"):
        lines += ["", "## Packing trials on one GPU (cifar profile)", "", "| trials at once | images/s | wall s |",
                  "|---|---|---|"]
        lines += [f"| {x['trials']} | {x['img_s']:.0f} | {x['wall_s']:.1f} |" for x in pack["rows"]]
    if sch:
        lines += ["", "## Scheduler", "",
                  f"Sleeping trials (`benchmarks/sleep_sweep.py`: the real `ablate run` code path, a trainer that "
                  f"sleeps {sch['trial_s']:.0f} s per trial): every other second is the scheduler's.", "",
                  "| workers | wall s | start-up s | per trial: inside ms | between ms | shut-down s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {w} | {x['wall_s']:.1f} | {x['startup_s']:.1f} | {x['inside_trial_s'] * 1e3:.0f} | "
                  f"{x['between_trials_s'] * 1e3:.0f} | {x['shutdown_s']:.1f} |" for w, x in sch["sleep"].items()]
        lines += ["", "Real 2-epoch quick-profile trials (`ablate run ratio --profile quick --seeds 2 --set "
                  "train.epochs=2`); outside epochs = a trial's span beyond its training epochs (data, model "
                  "build, complexity count, probe, checkpoints, storage), median:", "",
                  "| workers | wall s | Σ train s | outside epochs per trial s |", "|---|---|---|---|"]
        lines += [f"| {w} | {x['wall_s']:.1f} | {x['sum_train_s']:.1f} | {x['outside_epochs_per_trial_s']:.2f} |"
                  for w, x in sch["real"].items()]
        lines += ["", f"With two workers on the two cores the same epochs took {sch['contention_real']:.2f}× "
                  "the training time they took with one (Σ train s)."]
    if ttt:
        lines += ["", f"Time-to-table ran {ttt['sum_train_s']:.0f} s of training in {ttt['wall_s']:.0f} s wall with "
                  f"{ttt['workers']} workers ({ttt['sum_train_s'] / ttt['wall_s']:.2f}× parallel)."]
    fp = r.get("folder_pipeline")
    if fp:
        from folder_pipeline import render as folder_section

        lines += folder_section(fp)
    lines += ["", "## Notes", "", notes(r)]
    return "\n".join(lines) + "\n"


def notes(r: dict) -> str:
    """What limits each figure, with the recorded numbers it quotes."""
    out = [NOTE_FAST_PATHS]
    inf = r.get("cpu_inference")
    if inf:
        plain = {x["model"]: x["ms"] for x in inf["rows"]}["ResNet-50"]
        verdict_ = "met" if inf["se_ratio"] <= GOALS["cpu_inference"] else "not met"
        out.append(NOTE_CPU_INFERENCE.format(verdict=verdict_, added=(inf["se_ratio"] - 1) * plain, plain=plain,
                                             share=inf["se_ratio"] - 1, paper_speed=PAPER_CPU_MS / plain))
    sch = r.get("scheduler")
    if sch:
        one, two = sch["sleep"].values()  # 1 and 2 workers (JSON keeps the order, not the int keys)
        out.append(NOTE_SCHEDULER.format(
            overhead_ms=sch["overhead_per_trial_s"] * 1e3, fraction=sch["overhead_fraction"],
            verdict="met" if sch["overhead_fraction"] <= GOALS["scheduler_overhead"] else "not met"))
        out.append(NOTE_TWO_WORKERS.format(
            verdict="met" if sch["speedup_2_workers"] >= GOALS["two_workers_speedup"] else "not met",
            speedup=sch["speedup_2_workers"], phase=sch["speedup_2_workers_trial_phase"],
            startup_1=one["startup_s"], startup_2=two["startup_s"], real=sch["speedup_2_workers_real"],
            contention=sch["contention_real"]))
    if not r.get("gpu_train_step", {}).get("measured"):
        out.append(NOTE_NO_GPU)
    return "\n".join(out)


NOTE_FAST_PATHS = """\
- **Fast paths** (`ablations/se.py`, `ablations/patch.py`), each tested against a reference for
  outputs and every gradient (`tests/test_se_patch.py`):
  - the SE FCs run as `F.linear` on the pooled vector (about half the time of a 1×1 conv per FC on
    CPU);
  - the squeeze pools over one flattened axis (up to 1.5× faster than over (H, W) on 56×56 maps), as
    a sum divided on the pooled vector: its backward passes an expanded view of the gradient on,
    where `mean`'s writes a full-size map and then adds it (the quick profile's SE training step in
    channels_last, timed interleaved once before and after the change: 89 → 84 ms;
    `test_avg_squeeze_is_global_average_pooling_with_the_same_gradients`);
  - standard SE fuses the scaling with the residual addition (`addcmul`, the SENet authors' "Axpy";
    in place at inference), against timm's own block forward
    (`test_fused_standard_se_matches_reference`, train and inference)."""

PAPER_CPU_MS = 164  # the paper's ResNet-50 CPU inference time (SE-ResNet-50: 167 ms)

NOTE_CPU_INFERENCE = """\
- **CPU inference ratio: {verdict}.** SE adds {added:.1f} ms per image here ({share:.1%} of this machine's
  {plain:.0f} ms ResNet-50 forward). In the paper it added 3 ms (SE-ResNet-50 167 ms vs ResNet-50
  164 ms); the ratio was 1.018 there because that ResNet-50 took {paper_speed:.1f}× as long as this
  machine's. The op profile above splits SE's work (net of the residual addition that the fused
  scale+add replaces):
  - the two FC matrix–vector products (`aten::mm`), ~0.9 ms: 10 MB of FC weights read from memory
    for every image, because the 100 MB of conv weights evict them from cache. Timed alone with cold
    caches (a one-off measurement, not part of `make bench`) they stream at 10–12 GB/s, near what a
    plain `sum` over the same 10 MB reads here (14 GB/s on one thread, 17 GB/s on two);
  - the squeeze (a `sum` over 5.5 M activations and its small ops), ~0.9 ms;
  - the gate, ~0.1 ms, then Python and op dispatch.

  The FC weights and the squeeze are bound by memory traffic, not arithmetic, so a different kernel
  would not bring SE under 2% of a {plain:.0f} ms forward. Timed ratios on this shared 2-core VM move by a
  few percent from one process to the next (in our runs a process's ResNet-50 ran at either ~68 or
  ~80 ms): see the per-process figures in the summary and the identical second ResNet-50. The
  figure is therefore a median over fresh processes."""

NOTE_SCHEDULER = """\
- **Scheduler overhead: {verdict}** ({overhead_ms:.0f} ms per 4 s sleeping trial, {fraction:.1%}; 95 ms
  before the filtered reads below).
  - **What cost most:** reading trials through `study.get_trials`. Optuna's cache behind it reloads
    every unfinished trial on every call, whatever states are asked for. That is every queued point:
    5 ms a call at 18 points, 50 ms at 300, and each claim made about six such calls.
  - **The fix:** workers read RUNNING, WAITING and FAIL trials with a database-filtered query
    (`studies.trials_in`, tested against `study.get_trials`) and look each study's id up once.
    `setting` and `seed` are not stored as user attributes, since they are the trial's params.
  - **What remains:** about 18 attribute writes at ~1.2 ms each (Optuna has no batched write) and
    about 10 reads per trial.
  - **Trainer's own overhead:** its per-trial work outside epochs (data, model build, complexity
    count, probe, checkpoints) is the "outside epochs" column."""

NOTE_TWO_WORKERS = """\
- **Two workers: {verdict} end to end ({speedup:.2f}×; {phase:.2f}× from the first claim to the last
  result).** What is paid once, whatever the worker count, keeps the end-to-end figure below 2×:
  - **Start-up before the first claim** ({startup_1:.1f} s with one worker, {startup_2:.1f} s with two):
    the interpreter, importing torch and timm to validate the sweep (timm imports torchvision, which
    imports `torch._dynamo`: ~1.5 s of the ~3.8 s, by `python -X importtime -c "import timm"`), and
    creating the storage. Workers are forked from a fork server that imports torch, timm, the
    trainer and Optuna's storage stack while `ablate run` validates, and they open the storage
    without re-creating or re-checking its tables (nor waiting for the lock that guards that).
    Workers read the digits from the file scikit-learn ships without importing it.
  - **Exit:** `ablate` ends with `os._exit` once the atexit hooks have run and the output is flushed
    (`cli.exit_fast`). The interpreter's own teardown with torch and timm loaded took ~1.1 s of the
    user's wall time. Every storage's connections are closed at exit by a finalizer, which folds
    SQLite's write-ahead log into optuna.db; `tests/test_scheduler.py` checks that the .db file alone
    holds every write and that no log is left beside it.
  - **Real 2-epoch trials on the two shared cores** gain {real:.2f}×; their epochs took {contention:.2f}×
    the training time they took with one worker (the two share memory bandwidth and caches)."""

NOTE_NO_GPU = """\
- **GPU figures** (training step at batch 256 bf16/channels_last eager and compiled, cifar trainer
  throughput, two cifar trials packed on one GPU) are measured by the same script when CUDA is
  present; the cifar time-to-table needs CIFAR-10 on disk and a GPU. No GPU machine was lent to the
  session that recorded this file, so none is given or estimated."""


SECTIONS = ("cpu_inference", "quick_train_step", "gpu", "trainer_vs_bare", "gpu_trainer", "gpu_packing",
            "time_to_table", "scheduler", "folder_pipeline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--rounds", type=int, default=15, help="timing rounds per variant")
    ap.add_argument("--reps", type=int, default=10, help="timed epochs per variant, trainer vs bare")
    ap.add_argument("--workers", type=int, default=2, help="workers for time-to-table")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    only = set(args.only.split(",")) - {""}  # --only "" re-renders the recorded figures
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
    for path, text in ((results_path, json.dumps(r, indent=2)), (Path(args.out), render(r))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(Path(args.out).read_text())
    shutil.rmtree(ROOT / "benchmarks" / "__pycache__", ignore_errors=True)


if __name__ == "__main__":
    main()
