"""Strict YAML for sweep and profile files and `--set` values.

Plain `yaml.safe_load` quietly keeps the last of two equal keys and reads YAML 1.1 scalars by their
looks (`label: 010` is 8, `label: off` is False). Here a repeated key is an error, a `label` is the
text as written whatever it looks like, and anchors/aliases are refused (a few nested aliases expand
to billions of values once validated). Every failure is a one-line SpecError naming file and line.
`bool_for_number` lets the specs refuse the other YAML 1.1 surprise, `true` where a number is meant.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, ScalarNode

from ablations.errors import SpecError

STR_TAG = "tag:yaml.org,2002:str"
VERBATIM_KEYS = ("label",)  # keys whose plain scalar values are strings as written


class StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "anchors and aliases are not supported",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            if key in seen:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen[key] = key_node
            if key in VERBATIM_KEYS and isinstance(value_node, ScalarNode) and value_node.style is None:
                value_node.tag = STR_TAG
        return super().construct_mapping(node, deep=deep)


def _located(e: yaml.YAMLError) -> tuple[str, str | None]:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}" if mark is not None else None
    problem = getattr(e, "problem", None) or "malformed YAML"
    return problem, where


def parse(text: str, source: str | None = None) -> Any:
    """YAML text -> Python values, strictly; errors name `source` and the line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 -- StrictLoader is a SafeLoader
    except yaml.YAMLError as e:
        problem, where = _located(e)
        raise SpecError(f"malformed YAML: {problem}", source=source, key=where) from None
    except RecursionError:
        raise SpecError("malformed YAML: nested too deeply", source=source) from None
    except Exception as e:  # noqa: BLE001 -- PyYAML's constructors on odd explicit tags (`!!int `, `!!bool x`)
        raise SpecError(f"malformed YAML: unreadable value ({type(e).__name__}: {e})", source=source) from None


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping."""
    source = str(path)
    try:
        if not path.is_file():
            raise SpecError("no such file", source=source)
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror or e}", source=source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file "
                        "as UTF-8", source=source) from None
    data = parse(text, source)
    if not isinstance(data, dict):
        raise SpecError("must be a YAML mapping at the top level", source=source)
    return data


# ---------------------------------------------------------------------------------------------------
# YAML booleans where numbers are meant


def _flat(tp: Any) -> list[Any]:
    """The members of a union annotation (itself otherwise)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(tp) for m in _flat(a)]
    return [tp]


def _admits_bool(tp: Any) -> bool:
    """Whether a field annotated `tp` means to take true/false (bool, Any, a Literal of booleans)."""
    for t in _flat(tp):
        if t is bool or t is Any:
            return True
        if typing.get_origin(t) is Literal and any(isinstance(a, bool) for a in typing.get_args(t)):
            return True
    return False


def bool_for_number(tp: Any, value: Any) -> bool:
    """A YAML true/false where a number (or a list of numbers) is meant: pydantic would read it as 1/0."""
    if isinstance(value, bool):
        return not _admits_bool(tp)
    if isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value):
        elements = [e for t in _flat(tp) if typing.get_origin(t) in (tuple, list)
                    for e in typing.get_args(t) if e is not Ellipsis]
        return bool(elements) and not any(_admits_bool(e) for e in elements)
    return False
