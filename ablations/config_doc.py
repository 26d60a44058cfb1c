"""A profile as YAML, each key followed by its description as a comment: what `ablate config` prints.

The descriptions are the schema's own (`Field(description=...)` in schema.py), the one place a key is
documented; the values are the effective ones, `--set` overrides applied. The output is a valid profile
file: `yaml.safe_load` reads it back to the same values.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from pydantic import BaseModel

from ablations.schema import Profile

INDENT = "  "
NOT_KEYS = {"path"}  # fields that say where a spec came from, not what it is


def _scalar(value: Any) -> str:
    """`value` as YAML on one line (a flow sequence for lists)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf, allow_unicode=True)
    return text.removesuffix("\n").removesuffix("\n...")


def _lines(model: BaseModel, depth: int) -> list[str]:
    out = []
    values = model.model_dump(mode="json")
    for name, field in type(model).model_fields.items():
        if name in NOT_KEYS:
            continue
        comment = f"  # {field.description}" if field.description else ""
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.append(f"{INDENT * depth}{name}:{comment}")
            out += _lines(value, depth + 1)
        else:
            out.append(f"{INDENT * depth}{name}: {_scalar(values[name])}{comment}")
    return out


def profile_yaml(profile: Profile, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The profile's effective keys as commented YAML."""
    where = profile.path or profile.name
    head = [f"# Profile {profile.name}, as a sweep trains it: {where}"
            + (f" with --set {' '.join(overrides)}" if overrides else "") + "."]
    return "\n".join([*head, *_lines(profile, 0)]) + "\n"
