"""`pip install .` (not editable) into a fresh virtual environment, then `ablate` from another directory:
the sweeps, profiles, notebooks and the paper's numbers must travel in the wheel, not be found in the
checkout."""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def copy_checkout(dest: Path) -> Path:
    """The files a clean clone has (git's list when there is one), so no build output or results of
    this checkout leak into the wheel."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.decode().split("\0")):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", "results", ".git", "*.egg-info", "build", "__pycache__", ".pytest_cache"))
    return dest


def fresh_venv(path: Path) -> Path:
    """A new environment that sees this interpreter's packages (torch, timm, pip and setuptools are not
    downloaded again) through a .pth line, after its own site-packages: what it installs comes first.
    The .pth files of those directories (an editable install of this project) are not processed."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(path)],
                   check=True, timeout=300)
    python = path / "bin" / "python"
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(own, "_outer_packages.pth").write_text("\n".join(outer) + "\n")
    return python


@pytest.mark.slow
def test_non_editable_install_runs_ablate_complexity_from_another_directory(tmp_path):
    src = copy_checkout(tmp_path / "src")
    python = fresh_venv(tmp_path / "venv")
    build = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the Makefile exports the checkout
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", *build, str(src)], check=True,
                   env=env, cwd=tmp_path, timeout=600)
    shutil.rmtree(src)  # nothing may still point into the source tree

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import ablations, analysis.execute as e; "
                            "from ablations import bundled; print(ablations.__file__); "
                            "print(bundled.sweeps_dir()); print(len(e.notebooks()))"],
                           capture_output=True, text=True, env=env, cwd=elsewhere, timeout=300)
    assert where.returncode == 0, where.stderr
    module, sweeps, notebooks = where.stdout.split()
    venv = tmp_path / "venv"
    assert venv in Path(module).parents and venv in Path(sweeps).parents and int(notebooks) == 8

    ablate = venv / "bin" / "ablate"
    proc = subprocess.run([str(ablate), "complexity", "ratio", "--profile", "paper", "--format", "csv"], capture_output=True, text=True,
                          env=env, cwd=elsewhere, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["setting"]: r for r in csv.DictReader(io.StringIO(proc.stdout))}
    assert list(rows) == ["r=2", "r=4", "r=8", "r=16", "r=32", "original"]
    assert rows["r=16"]["paper_params_m"] == "28.1" and rows["original"]["params_m"] == "25.6"
    profiles = subprocess.run([str(ablate), "complexity", "stages", "--profile", "quick", "--format", "json"],
                              capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert profiles.returncode == 0 and '"setting": "SE_All"' in profiles.stdout, profiles.stderr[-3000:]
