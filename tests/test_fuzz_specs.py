"""Property: whatever a sweep file, a profile file or a `--set` option holds, loading it yields a valid
spec or one line of SpecError, never another exception (hypothesis)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ablations.errors import SpecError
from ablations.schema import Profile, Sweep
from ablations.spec import load_profile, load_sweep

pytestmark = pytest.mark.slow  # 150 examples each: tens of seconds

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORK = Path(tempfile.mkdtemp(prefix="ablate-fuzz-"))  # one directory for every example (no fixtures)

SE_KEYS = ("reduction", "squeeze", "gate", "position", "stages", "bias", "se", "backbone", "label", "attention",
           "attention_args", "published")
SWEEP_KEYS = ("name", "description", "table", "reference", "seeds", "settings")
PROFILE_KEYS = ("name", "description", "comparable_tables", "backbone", "families", "data", "train")
SECTION_KEYS = {
    "backbone": ("arch", "layers", "channels", "block", "num_classes", "in_chans", "small_stem", "width"),
    "data": ("dataset", "root", "input_size", "batch_size", "val_fraction", "crop_padding"),
    "train": ("epochs", "lr", "momentum", "schedule", "warmup_epochs", "threads"),
}

scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
           | st.text(max_size=30) | st.sampled_from(["all", "avg", "max", "none", "sigmoid", "relu", "3x3",
                                                    "digits", "cifar10", "../x", "/tmp/x", "r=16", "..", "eca", "timm",
                                                    "pkg.mod:Cls", "efficientnet", "source"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=4), max_leaves=12)


def mapping(keys) -> st.SearchStrategy[dict]:
    """Dicts mostly over the real keys (so validation gets deep), sometimes with stray ones."""
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), values, max_size=len(keys) + 1)


settings_rows = st.lists(mapping(SE_KEYS) | values, max_size=4)
sweep_docs = st.builds(lambda d, rows: {**d, "settings": rows} if rows is not None else d,
                       mapping(SWEEP_KEYS), st.none() | settings_rows)
profile_docs = st.builds(lambda d, sections: {**d, **sections}, mapping(PROFILE_KEYS),
                         st.fixed_dictionaries({}, optional={k: mapping(v) | values
                                                             for k, v in SECTION_KEYS.items()}))


def check(load, path: Path, kind: type) -> None:
    try:
        result = load(path)
    except SpecError as e:
        text = str(e)
        assert text and len(text.splitlines()) == 1, repr(text)
        return
    assert isinstance(result, kind)


def write(name: str, content: str | bytes) -> Path:
    path = WORK / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    return path


@FUZZ
@given(sweep_docs)
def test_sweep_documents(doc):
    check(load_sweep, write("fuzz_sweep.yaml", yaml.safe_dump(doc, allow_unicode=True)), Sweep)


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_sweep_files_of_any_text_or_bytes(content):
    check(load_sweep, write("fuzz_raw.yaml", content), Sweep)


@FUZZ
@given(st.lists(st.sampled_from(["settings:", "\n", "  - ", "{", "}", "[", "]", "label: ", "a", ",", ": ",
                                 "&x ", "*x", "<<: ", "!!int ", "!!bool ", "!!float ", "!!set ", "!!binary ",
                                 "!!timestamp ", "!!str ", "010", "off", "reduction: ", "- ", "'", "\"",
                                 "\t", "#", "---\n", "...", "? "]), max_size=40).map("".join))
def test_sweep_files_of_yaml_fragments(content):
    check(load_sweep, write("fuzz_fragments.yaml", content), Sweep)


@FUZZ
@given(profile_docs)
def test_profile_documents(doc):
    check(load_profile, write("fuzz_profile.yaml", yaml.safe_dump(doc, allow_unicode=True)), Profile)


@FUZZ
@given(st.lists(st.text(max_size=40)
                | st.builds(lambda section, key, value: f"{section}.{key}={value}",
                            st.sampled_from([*SECTION_KEYS, "x", ""]),
                            st.sampled_from([k for keys in SECTION_KEYS.values() for k in keys]) | st.text(max_size=5),
                            st.text(max_size=20) | values.map(lambda v: yaml.safe_dump(v).strip())),
                max_size=4))
def test_set_options(overrides):
    check(lambda path: load_profile("quick", overrides), WORK, Profile)
