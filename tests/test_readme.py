"""The README's "What is where" names every module of the packages, and only modules that exist."""

from __future__ import annotations

import re

from helpers import ROOT

PACKAGES = ("ablations", "analysis", "benchmarks")


def named_modules() -> set[str]:
    """`package/module.py` for every module the "What is where" block names, under the package whose
    line (`ablations/`, ...) comes last above it."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## What is where", 1)[1].split("```", 2)[1]
    named, package = set(), None
    for line in block.splitlines():
        if line and not line.startswith(" "):
            top = line.split()[0].rstrip("/")
            package = top if top in PACKAGES else None
        if package is not None:
            named |= {f"{package}/{m}" for m in re.findall(r"\b[\w]+\.py\b", line)}
    return named


def test_what_is_where_names_every_module_and_no_other():
    named = named_modules()
    assert {"ablations/rundir.py", "analysis/load.py", "benchmarks/bench.py"} <= named  # the parse works
    missing = sorted(m for m in named if not (ROOT / m).is_file())
    assert missing == [], f"named in the README but not in the tree: {missing}"
    modules = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
               if p.name != "__init__.py"}
    unnamed = sorted(modules - named)
    assert unnamed == [], f"in the tree but not in the README's What is where: {unnamed}"
