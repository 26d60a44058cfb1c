"""`ablate config`: the effective profile as YAML, every key with its description from the schema."""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from ablations import cli
from ablations.schema import Profile
from ablations.spec import load_profile

OVERRIDES = ["train.epochs=3", "data.batch_size=32", "backbone.layers=[1,1,1,1]"]


def commented_keys(text: str) -> dict[str, str]:
    """{"section.key": comment} for every `key: value  # comment` line (sections by indentation)."""
    out, section = {}, None
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        head, sep, comment = line.partition("  # ")
        key = head.strip().split(":", 1)[0]
        if not line.startswith(" "):
            section = key if head.rstrip().endswith(":") else None
            out[key] = comment if sep else ""
        else:
            out[f"{section}.{key}"] = comment if sep else ""
    return out


def schema_descriptions(model: type[BaseModel], prefix: str = "") -> dict[str, str]:
    out = {}
    for name, field in model.model_fields.items():
        if name == "path":
            continue
        out[prefix + name] = field.description
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out.update(schema_descriptions(field.annotation, f"{name}."))
    return out


def test_config_prints_the_effective_profile_with_each_keys_description(capsys):
    sets = [x for s in OVERRIDES for x in ("--set", s)]
    assert cli.main(["config", "--profile", "quick", *sets]) == 0
    out = capsys.readouterr().out
    profile = load_profile("quick", OVERRIDES)
    assert yaml.safe_load(out) == profile.model_dump(mode="json", exclude={"path"})  # a valid profile file
    assert Profile.model_validate({**yaml.safe_load(out)}) == profile.model_copy(update={"path": None})
    comments = commented_keys(out)
    expected = schema_descriptions(Profile)
    assert comments == expected  # every key once, each with the schema's description
    assert all(expected.values()), [k for k, v in expected.items() if not v]  # and every key has one
    assert "  epochs: 3  # passes over the training set" in out.splitlines()
    assert out.splitlines()[0].endswith("quick.yaml with --set " + " ".join(OVERRIDES) + ".")


def test_config_of_a_bad_override_is_one_line(capsys):
    assert cli.main(["config", "--set", "train.epochz=3"]) == 2
    assert capsys.readouterr().err.strip() == "error: --set: train.epochz: unknown key"
