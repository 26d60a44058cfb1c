"""BENCHMARKS.md from benchmarks/results.json (what `python benchmarks/bench.py` measured).

    python benchmarks/render_benchmarks.py

Only the measured part is written: the summary against each goal, and one section per measurement. The
notes below it (what limits each figure, the performance history) are written by hand and kept as they
are; this script never changes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gpu_check

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
OUT = ROOT / "BENCHMARKS.md"
BEGIN = ("<!-- The measured figures, written by `python benchmarks/render_benchmarks.py` from "
         "benchmarks/results.json: edit below the end marker. -->")
END = "<!-- End of the measured figures; everything below is written by hand. -->"

GOALS = {
    "cpu_inference": 1.02,  # SE-ResNet-50 / ResNet-50, paper 1.018
    "gpu_train_step": 1.05,  # paper 1.10
    "patched_vs_timm": 1.01,
    "trainer_vs_bare": 0.95,
    "time_to_table_s": 300,
    "scheduler_overhead": 0.02,
    "two_workers_speedup": 1.8,
}


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: "not measured"}[ok]


def render(r: dict) -> str:
    lines = ["# Benchmarks", "",
             f"Recorded by `make bench` (`python benchmarks/bench.py`, then `python benchmarks/render_benchmarks.py`) "
             f"on {r['date']}: {r['machine']}.",
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
        lines += folder_section(fp)
    lines += gpu_check.section(r.get("gpu_check"))
    return "\n".join(lines) + "\n"


def folder_section(fp: dict) -> list[str]:
    """The folder pipeline's section, from benchmarks/folder_pipeline.py's figures."""
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


def with_hand_written_part(measured: str, previous: str | None) -> str:
    """The new measured part followed by the hand-written part of the previous file (after END)."""
    kept = previous.split(END, 1)[1] if previous and END in previous else "\n\n## Notes\n\n(none yet)\n"
    return f"{BEGIN}\n\n{measured}\n{END}{kept}"


def main() -> None:
    figures = json.loads(RESULTS.read_text())
    previous = OUT.read_text() if OUT.exists() else None
    text = with_hand_written_part(render(figures), previous)
    tmp = OUT.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, OUT)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
