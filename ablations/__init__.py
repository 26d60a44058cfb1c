"""The SE ablation runner (`ablate`)."""

__version__ = "0.1.0"  # pyproject.toml reads it (the one place the version is written)
