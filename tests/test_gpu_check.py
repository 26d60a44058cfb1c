"""`make gpu-check` (benchmarks/gpu_check.py) on a machine without a GPU: one line, exit 0, nothing
written; and its driver, run with stand-in steps, keeps going past a failed, hung or crashed step and
rewrites its JSON after each."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["make", "-s", "-o", ".stamp-system", "gpu-check", f"PYTHON={sys.executable}",
                          f"GPU_CHECK_OUT={tmp_path / 'check.json'}"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [gpu_check.NO_GPU]
    assert not (tmp_path / "check.json").exists()


def test_each_step_runs_alone_and_the_json_is_written_after_every_step(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "machine", lambda: "a test machine")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "check.json"
    record = gpu_check.check(out, budget_s=60, gpus=1, steps="gpu_check_fake_steps")
    steps = record["steps"]
    assert {k: v["status"] for k, v in steps.items()} == {
        "ok": "ok", "fails": "error", "skipped": "skipped", "hangs": "timeout", "crashes": "error", "after": "ok"}
    assert steps["fails"]["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert steps["skipped"]["reason"] == "needs 2 GPUs; this machine has 1"
    assert steps["hangs"]["seconds"] == 2 and "exited with status 9" in steps["crashes"]["error"]
    assert steps["ok"]["figures"]["pid"] != steps["after"]["figures"]["pid"] != os.getpid()  # own processes
    assert json.loads(out.read_text()) == record

    text = "\n".join(gpu_check.section(record))
    assert "| fails | error | RuntimeError: CUDA error" in text and "| skipped | skipped | needs 2 GPUs" in text
    assert "Not run yet" in "\n".join(gpu_check.section(None))


def test_a_spent_budget_records_the_remaining_steps_as_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "machine", lambda: "a test machine")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    record = gpu_check.check(tmp_path / "c.json", budget_s=1, gpus=1, steps="gpu_check_fake_steps")
    assert {s["status"] for s in record["steps"].values()} == {"not run"}


def test_the_real_steps_import_without_a_gpu_and_fit_the_budget_on_one_gpu():
    steps = importlib.import_module("gpu_check_steps").STEPS
    one_gpu = [name for name in steps if name not in ("gpu0_leak", "ddp_vs_one", "ddp_stop_resume", "ddp_compile")]
    assert sum(steps[n][1] for n in one_gpu) <= gpu_check.BUDGET_S <= 600 - 30  # start-up and render: 30 s
    for name in set(steps) - set(one_gpu):
        try:
            steps[name][0](1)
        except importlib.import_module("gpu_check_steps").Skip as e:
            assert "needs 2 GPUs" in str(e)
        else:
            raise AssertionError(f"{name} ran on one GPU")
