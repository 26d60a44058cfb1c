"""Files -> validated specs: sweeps and profiles by name or path, `--set` overrides, one trial's
resolved RunConfig, and config.yaml read back. Any invalid input raises a one-line `SpecError` naming
the file and the key (the schema itself is schema.py).

Data flows one way: `sweeps/<axis>.yaml` + `sweeps/profiles/<profile>.yaml` -> `Sweep` and `Profile`
-> `RunConfig` per (setting, seed).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ablations import bundled, yamlio
from ablations.errors import SpecError
from ablations.schema import (
    SE_ONLY,
    BackboneSpec,
    DataSpec,
    Profile,
    RunConfig,
    Setting,
    Sweep,
    TrainSpec,
    se_only_message,
)

SWEEPS_DIR = bundled.sweeps_dir()
PROFILES_DIR = bundled.profiles_dir()


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("literal", "function-after", "function-before", "tuple", "list"):
            continue  # pydantic's internal validator names, not user keys
        elif str(part).startswith(("literal[", "function-")):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def from_validation_error(err: ValidationError, source: str, prefix: str = "") -> SpecError:
    """The first pydantic error as a one-line SpecError naming file and key."""
    first = err.errors()[0]
    key = _format_loc(tuple(first["loc"]))
    key = ".".join(p for p in (prefix, key) if p)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] != "missing" and not isinstance(first["input"], dict):
        got = repr(first["input"])
        if f"got {got}" not in msg:  # validators of ours quote the value themselves
            msg = f"{msg} (got {got if len(got) <= 120 else got[:117] + '...'})"
    return SpecError(msg, source=source, key=key or None)


def _read_yaml(path: Path) -> dict[str, Any]:
    return yamlio.read_mapping(path)


def _resolve(name_or_path: str | Path, directory: Path, kind: str) -> Path:
    p = Path(name_or_path)
    candidate = directory / f"{name_or_path}.yaml"
    try:
        if p.suffix in (".yaml", ".yml") or p.exists():
            return p
        if candidate.is_file():
            return candidate
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte
        raise SpecError(f"unusable {kind} name or path: {getattr(e, 'strerror', None) or e}",
                        source=str(name_or_path)[:200]) from None
    known = sorted(x.stem for x in directory.glob("*.yaml"))
    raise SpecError(f"unknown {kind} (known: {', '.join(known)})", source=str(name_or_path))


def _setting_from_yaml(raw: Any) -> dict[str, Any]:
    """`{label, se: false}` or `{label, <attention and SE keys...>, backbone: {...}, published: {...}}`
    -> Setting fields."""
    if not isinstance(raw, dict):
        raise SpecError("each setting must be a mapping with a label")
    raw = dict(raw)
    if "label" not in raw:
        raise SpecError("missing", key="label")
    out: dict[str, Any] = {"label": raw.pop("label")}
    if not isinstance(out["label"], str):  # a flow list or mapping; scalars are kept as written
        raise SpecError(f"must be text (got {type(out['label']).__name__}); quote it", key="label")
    for key in ("backbone", "published"):
        if key in raw:
            out[key] = raw.pop(key)
    enabled = raw.pop("se", True)
    if enabled is False:
        if raw:
            raise SpecError("SE keys given but `se: false`", key=str(sorted(raw, key=str)[0]))
        out["se"] = None
    elif enabled is True:
        attention = raw.get("attention", "se")
        given = [k for k in SE_ONLY if k in raw]
        if attention != "se" and isinstance(attention, str) and given:  # even at SE's default value
            raise SpecError(se_only_message(attention), key=given[0])
        out["se"] = raw
    else:
        raise SpecError(f"must be true or false (got {enabled!r})", key="se")
    return out


def load_sweep(name_or_path: str | Path) -> Sweep:
    """A sweep by name (`ratio`) or path (`sweeps/ratio.yaml`), validated."""
    path = _resolve(name_or_path, SWEEPS_DIR, "sweep")
    data = _read_yaml(path)
    source = str(path)
    settings = data.get("settings")
    if not isinstance(settings, list) or not settings:
        raise SpecError("needs a non-empty list of settings", source=source, key="settings")
    rows = []
    for i, raw in enumerate(settings):
        try:
            rows.append(_setting_from_yaml(raw))
        except SpecError as e:
            raise e.within(source, f"settings[{i}]") from None
    fields = {**data, "settings": rows, "path": source}
    fields.setdefault("name", path.stem)
    try:
        sweep = Sweep.model_validate(fields)
    except ValidationError as e:
        err = from_validation_error(e, source)
        # SE keys sit flat in a setting's YAML (`{label, reduction}`): report them where the user wrote them
        key = re.sub(r"^(settings\[\d+\])\.se(?=\.|$)", r"\1", err.key or "") or None
        raise SpecError(err.message, source=source, key=key) from None
    for i, s in enumerate(sweep.settings):  # backbone overrides are checked against the schema now
        try:
            BackboneSpec.model_validate(s.backbone)
        except ValidationError as e:
            raise from_validation_error(e, source, f"settings[{i}].backbone") from None
    return sweep


def parse_override(item: str) -> tuple[str, Any]:
    """`data.batch_size=64` -> ("data.batch_size", 64) with YAML typing of the value."""
    if "=" not in item:
        raise SpecError("expected key=value", source="--set", key=item)
    key, value = item.split("=", 1)
    try:
        return key.strip(), yamlio.parse(value)
    except SpecError:
        raise SpecError(f"malformed value {value!r}", source="--set", key=key.strip()) from None


def _apply_overrides(data: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sections = {"backbone": BackboneSpec, "data": DataSpec, "train": TrainSpec}
    for item in overrides:
        key, value = parse_override(item)
        section, _, field = key.partition(".")
        if section not in sections or field not in sections[section].model_fields:
            raise SpecError("unknown key", source="--set", key=key)
        if not isinstance(data.setdefault(section, {}), dict):
            raise SpecError("must be a mapping to take --set keys", source=source, key=section)
        data[section][field] = value
    return data


def load_profile(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    """A profile by name (`quick`) or path, with `section.key=value` overrides applied and validated."""
    path = _resolve(name_or_path, PROFILES_DIR, "profile")
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    data = _apply_overrides(data, list(overrides), str(path))
    source = str(path) if not overrides else f"{path} (with --set)"
    try:
        return Profile.model_validate({**data, "path": str(path)})
    except ValidationError as e:
        raise from_validation_error(e, source) from None


def setting_backbone(profile: Profile, setting: Setting) -> dict[str, Any]:
    """The profile's backbone keys with the setting's overrides (a row of another timm family: see
    `families.family_backbone`), as a dict to validate."""
    keys = {**profile.backbone.model_dump(), **setting.backbone}
    if keys["arch"] == profile.backbone.arch and not profile.families:
        return keys
    from ablations.families import family_backbone  # imports timm: only where a family can differ

    return family_backbone(profile, setting, keys)


def run_config(profile: Profile, setting: Setting, seed: int, sweep: str = "") -> RunConfig:
    """Resolve one trial: the profile's backbone with the setting's overrides, the setting's SE."""
    try:
        backbone = BackboneSpec.model_validate(setting_backbone(profile, setting))
    except ValidationError as e:
        raise from_validation_error(e, profile.path or profile.name, "backbone") from None
    return RunConfig(
        sweep=sweep,
        profile=profile.name,
        setting=setting.label,
        seed=seed,
        se=setting.se,
        backbone=backbone,
        data=profile.data,
        train=profile.train,
    )


def load_run_config(path: str | Path) -> RunConfig:
    """Read back a config.yaml written by `RunConfig.to_yaml`."""
    try:
        return RunConfig.model_validate(_read_yaml(Path(path)))
    except ValidationError as e:
        raise from_validation_error(e, str(path)) from None
