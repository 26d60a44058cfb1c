"""Files the project ships beside its code: the sweep and profile YAMLs and the paper's numbers.

A wheel carries `sweeps/` as package data at `ablations/sweeps/` (pyproject's package-dir mapping);
a source checkout, installed editable or used through PYTHONPATH, keeps it at the repository's top,
where people edit it. Both are found through the `ablations` package, so neither depends on the
working directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout's top (site-packages in a wheel)


def package_dir() -> Path:
    return Path(str(resources.files("ablations")))


def sweeps_dir() -> Path:
    installed = package_dir() / "sweeps"
    return installed if installed.is_dir() else package_dir().parent / "sweeps"


def profiles_dir() -> Path:
    return sweeps_dir() / "profiles"


def published_csv() -> Path:
    return package_dir() / "senet_published.csv"
