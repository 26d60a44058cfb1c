"""The GPU check (`make gpu-check`): what only a GPU can tell about the trainer, in under 10 minutes
on one GPU, as JSON plus a BENCHMARKS.md section.

    python benchmarks/gpu_check.py [--out benchmarks/gpu_check.json] [--budget 570] [--no-render]

Without a CUDA device it prints one line saying so and exits 0, writing nothing (CI runs it that way).
With one, it runs the steps of gpu_check_steps.py in order, each in a process of its own with its own
time limit (a crash, a CUDA error or a hang costs that step only), and rewrites --out after every step,
so a run cut short still leaves the figures so far. A step that fails records its error; one that does
not apply (the 2-GPU steps on one GPU) records why. Steps that no longer fit in --budget seconds are
recorded as not run. At the end the figures go into benchmarks/results.json under "gpu_check" and
BENCHMARKS.md is rendered again (render_benchmarks.py), unless --no-render.

The steps (gpu_check_steps.STEPS): the cifar profile on synthetic data with bf16 and channels_last,
eager and compiled (images/s, compile seconds, dynamo graphs, graph breaks, recompiles after the
warm-up); the optimizer step alone (ms and CUDA kernels per step: fused, foreach, per-tensor loop); SE's
training-step overhead; 3 trials packed on one GPU (each one's images/s); the ImageFolder pipeline
(PIL in workers vs nvJPEG); trainer vs bare loop; and on 2 GPUs or more: a GPU-0 leak check of a trial
pinned to cuda:1 (nvidia-smi), DDP vs 1 GPU, a DDP trial stopped and resumed on 1 GPU, DDP + compile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
DEFAULT_OUT = BENCH / "gpu_check.json"
BUDGET_S = 570  # the whole check, steps and start-up; one GPU finishes well inside it
STEPS_MODULE = "gpu_check_steps"  # tests substitute cheap CPU steps to exercise the driver
NO_GPU = "gpu-check: skipped: no CUDA device here (torch.cuda.is_available() is False); nothing measured"


def cuda_devices() -> int:
    """CUDA devices torch sees (counted without creating a context); 0 at once, without importing torch,
    where the kernel has no GPU device nodes (NVIDIA's or ROCm's) or CUDA_VISIBLE_DEVICES hides them."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not (
            any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def machine() -> str:
    sys.path.insert(0, str(BENCH))
    from machine import describe

    return describe()


def write_json(path: Path, data: dict) -> None:
    sys.path.insert(0, str(ROOT))
    from ablations.atomic import write_atomic

    write_atomic(path, json.dumps(data, indent=2) + "\n")


def run_step(name: str, gpus: int, limit_s: float, steps: str = STEPS_MODULE) -> dict:
    """One step in its own process group, killed after `limit_s`: its figures, or its error."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCH), os.environ.get("PYTHONPATH", "")])}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(BENCH / "gpu_check.py"), "--step", name, "--gpus", str(gpus),
                                 "--result", str(result), "--steps-module", steps], cwd=ROOT, env=env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = proc.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return {"status": "timeout", "error": f"killed after its {limit_s:.0f} s", "seconds": limit_s,
                    "log_tail": output[-2000:]}
        seconds = time.perf_counter() - t0
        if result.exists():
            return {**json.loads(result.read_text()), "seconds": seconds}
        return {"status": "error", "error": f"exited with status {proc.returncode}", "seconds": seconds,
                "log_tail": output[-2000:]}


def step_main(name: str, gpus: int, result: Path, steps: str = STEPS_MODULE) -> int:
    """Inside a step's process: run it, write {status, figures | error | reason}."""
    import importlib
    import traceback

    module = importlib.import_module(steps)
    try:
        out = {"status": "ok", "figures": module.STEPS[name][0](gpus)}
    except module.Skip as e:
        out = {"status": "skipped", "reason": str(e)}
    except BaseException as e:  # noqa: BLE001 -- recorded, and the next step still runs
        traceback.print_exc()
        out = {"status": "error", "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
    result.write_text(json.dumps(out))
    return 0


def check(out: Path, budget_s: float, gpus: int, steps: str = STEPS_MODULE) -> dict:
    """Run every step of the module `steps` (its STEPS: name -> (function, seconds)) within `budget_s`."""
    import importlib

    STEPS = importlib.import_module(steps).STEPS

    start = time.perf_counter()
    record = {"date": datetime.date.today().isoformat(), "machine": machine(), "gpus": gpus, "budget_s": budget_s,
              "command": "python benchmarks/gpu_check.py", "steps": {}}
    for name, (_, limit_s) in STEPS.items():
        left = budget_s - (time.perf_counter() - start)
        if left < min(limit_s, 20):
            record["steps"][name] = {"status": "not run", "reason": f"the {budget_s:.0f} s budget was spent"}
        else:
            print(f"gpu-check: {name} (up to {min(limit_s, left):.0f} s)", flush=True)
            record["steps"][name] = run_step(name, gpus, min(limit_s, left), steps)
            print(f"gpu-check: {name}: {record['steps'][name]['status']}", flush=True)
        record["total_s"] = time.perf_counter() - start
        write_json(out, record)
    return record


def render(record: dict) -> None:
    """Put the check into results.json and render BENCHMARKS.md again."""
    results_path = BENCH / "results.json"
    results = json.loads(results_path.read_text())
    results["gpu_check"] = record
    write_json(results_path, results)
    subprocess.run([sys.executable, str(BENCH / "render_benchmarks.py")], check=True, cwd=ROOT)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON record (rewritten after every step)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check")
    p.add_argument("--no-render", action="store_true", help="leave results.json and BENCHMARKS.md alone")
    p.add_argument("--step", help=argparse.SUPPRESS)  # inside a step's own process
    p.add_argument("--gpus", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--steps-module", default=STEPS_MODULE, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        return step_main(args.step, args.gpus, args.result, args.steps_module)
    gpus = cuda_devices()
    if gpus == 0:
        print(NO_GPU)
        return 0
    record = check(args.out, args.budget, gpus)
    if not args.no_render:
        render(record)
    failed = [n for n, s in record["steps"].items() if s["status"] in ("error", "timeout")]
    print(f"gpu-check: done in {record['total_s']:.0f} s; {len(failed)} step(s) failed{': ' if failed else ''}"
          f"{', '.join(failed)}; figures in {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# The BENCHMARKS.md section (render_benchmarks.py calls it)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def section(record: dict | None) -> list[str]:
    lines = ["", "## GPU check (`make gpu-check`)", ""]
    if not record:
        return lines + ["Not run yet: no GPU machine was available to the sessions that wrote this file. On one, "
                        "`make gpu-check` (`python benchmarks/gpu_check.py`, under 10 minutes on one GPU) measures "
                        "eager vs compiled training, the optimizer step, SE's step overhead, 3 packed trials, the "
                        "ImageFolder pipeline, trainer vs bare, and on 2 GPUs DDP, stop-and-resume and DDP + "
                        "compile, and writes its figures here."]
    lines += [f"`{record['command']}` on {record['date']}: {record['machine']}; {record['gpus']} GPU(s), "
              f"{record['total_s']:.0f} s of a {record['budget_s']:.0f} s budget. Raw figures: "
              "benchmarks/results.json, key `gpu_check`.", "", "| step | status | figures |", "|---|---|---|"]
    for name, step in record["steps"].items():
        if step["status"] == "ok":
            text = _fmt({k: v for k, v in step["figures"].items() if k not in ("nvidia_smi",)})
        else:
            text = step.get("reason") or step.get("error", "")
        lines.append(f"| {name} | {step['status']} | {text.replace('|', '/')} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
