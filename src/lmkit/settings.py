"""Settings files: YAML read strictly, `key=value` overrides, and sections built into checked dataclasses.

Recipes and tokenizer specs share this layer; what their sections hold lives with the modules that use them.

- YAML: 1.2 scalars (only true/false are booleans, `1e-3` is a float) and a duplicate key in any mapping is an error
  (PyYAML silently keeps the last one, so a second `data:` would replace the first).
- Overrides: dotted keys whose values are typed by the same YAML rules (`training.learning_rate=3e-4`).
- Sections: a dataclass per section whose fields are declared with `setting(...)`. `check_fields` checks every field
  against its annotation (int, float, bool, str, a list of str, `| None`) and its declared range or choices, so one
  rule covers every key; a class adds only the checks that involve several fields. A bad value raises `SettingError`,
  which `build_section` reports against the file and the full key path.
"""

import dataclasses
import difflib
import enum
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmkit.errors import UserError


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 scalars, and no duplicate keys. PyYAML follows YAML 1.1, where `no`/`off` are booleans
    (`eval_strategy: no` would become False) and `3e-4` (no dot) is a string: two traps for recipes."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
                )
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str):
    """`yaml.safe_load` with YAML 1.2 booleans (only true/false) and floats (`1e-3` too), refusing duplicate keys."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """' (line L, column C): problem' for a YAML error."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    return f"{where}: {getattr(exc, 'problem', None) or str(exc).splitlines()[0]}"


def read_yaml_mapping(path: str | os.PathLike, what: str = "recipe") -> dict:
    """Read a YAML file that must hold a mapping; every failure is a one-line UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        loaded = parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML{_yaml_problem(exc)}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(loaded).__name__}")
    return loaded


def apply_overrides(tree: dict, overrides: list[str], source: str) -> dict:
    """Apply `a.b.c=value` overrides to a nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}': expected key.path=value, e.g. training.learning_rate=3e-4")
        try:
            value = parse_yaml(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            if raw.lstrip()[:1] in ("[", "{", "'", '"'):
                raise UserError(f"override '{item}': the value is not valid YAML{_yaml_problem(exc)}") from None
            value = raw  # a plain word YAML cannot read, such as fortune's separator `%`: meant as itself
        node = tree
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override '{item}': {'.'.join(parts[:depth + 1])} in {source} is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def plain(value):
    """An enum member's value, anything else as it is: TrainingArguments holds its choices as enums (IntervalStrategy,
    SchedulerType), a recipe as strings."""
    return value.value if isinstance(value, enum.Enum) else value


def closest(name: str, valid: list[str]) -> str:
    """' (did you mean X?)' for the closest valid name, or ''."""
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def as_mapping(values, section: str, source: str) -> dict:
    """A section's values as a dict; a scalar or list where a section belongs is a UserError."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"{source}: section '{section}' must be a mapping of keys, "
                        f"got {type(values).__name__} {values!r}")
    return dict(values)


def check_keys(values: dict, valid: list[str], section: str, source: str) -> None:
    """Raise a UserError naming the first key of `values` that is not in `valid`, with a suggestion."""
    for key in values:
        if key not in valid:
            raise UserError(f"{source}: unknown key '{key_path(section, key)}'{closest(str(key), valid)}")


# ---------------------------------------------------------------------------------------------------------------------
# Checked dataclass sections


class SettingError(UserError):
    """A bad value for one key of a section. `key` is relative to the section; `build_section` adds the rest."""

    def __init__(self, key: str, detail: str, section: str = ""):
        self.key, self.detail = key, detail
        super().__init__(f"{section}.{key} {detail}" if section else f"{key} {detail}")

    def located(self, section: str, source: str) -> UserError:
        return UserError(f"{source}: {key_path(section, self.key)} {self.detail}")


def key_path(section: str, key: str) -> str:
    """'section.key', or 'key' for the top level of a file (a tokenizer spec has no sections)."""
    return f"{section}.{key}" if section else key


def setting(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, minimum=None,
            maximum=None, above=None, below=None, choices=None):
    """A dataclass field with its help and the range (`minimum`/`maximum` inclusive, `above`/`below` exclusive) or
    `choices` that `check_fields` enforces on top of the annotated type."""
    metadata = {"help": help}
    for name, value in (("minimum", minimum), ("maximum", maximum), ("above", above), ("below", below),
                        ("choices", choices)):
        if value is not None:
            metadata[name] = value
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML `true` is a bool, and bool is an int


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _describe_type(annotation) -> str | None:
    """What a value of `annotation` must be, in words; None for annotations no value is checked against."""
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(str(member.value) for member in annotation)
    if annotation is dict or typing.get_origin(annotation) is dict:
        return "a mapping"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        described = [_describe_type(a) for a in args if a is not type(None)]
        if None in described or not described:
            return None
        return " or ".join(described) + (" or null" if type(None) in args else "")
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if annotation is str:
        return "a string"
    if typing.get_origin(annotation) is list or annotation is list:
        inner = _describe_type(args[0]) if args else None
        return "a list of strings" if args == (str,) else f"a list ({inner} each)" if inner else "a list"
    if isinstance(annotation, type) and annotation.__module__ not in ("builtins", "typing"):
        return f"a {annotation.__name__} (only settable from Python)"
    return None


def _matches(value, annotation) -> bool:
    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, annotation) or any(value == member.value for member in annotation)
    if annotation is dict or typing.get_origin(annotation) is dict:
        return isinstance(value, dict)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _is_int(value)
    if annotation is float:
        return _is_number(value) and not math.isinf(value)
    if annotation is str:
        return isinstance(value, str)
    if typing.get_origin(annotation) is list or annotation is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if isinstance(annotation, type) and annotation.__module__ not in ("builtins", "typing"):
        return isinstance(value, annotation)
    return True


def _bound_text(bound) -> str:
    """A range's bound as written: `:g` for a float (0.001), every digit of an int (`:g` would write 1.04858e+06)."""
    return f"{bound:g}" if isinstance(bound, float) else str(bound)


def _range_text(meta: dict) -> str:
    """'in (0, 1]' for a two-sided range, '>= 1' or '< 1' for a one-sided one."""
    low = ("[", meta["minimum"]) if "minimum" in meta else ("(", meta["above"]) if "above" in meta else None
    high = ("]", meta["maximum"]) if "maximum" in meta else (")", meta["below"]) if "below" in meta else None
    if low and high:
        return f"in {low[0]}{_bound_text(low[1])}, {_bound_text(high[1])}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    return f"{'<=' if high[0] == ']' else '<'} {high[1]}"


def check_value(key: str, value, annotation, meta: dict) -> None:
    """Check one value against its annotation and its `setting` constraints; raise SettingError(key, ...) if bad."""
    described = _describe_type(annotation)
    if described is not None and not _matches(value, annotation):
        raise SettingError(key, f"must be {described}, got {value!r}")
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise SettingError(key, f"must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if _is_number(value):
        too_low = ("minimum" in meta and value < meta["minimum"]) or ("above" in meta and value <= meta["above"])
        too_high = ("maximum" in meta and value > meta["maximum"]) or ("below" in meta and value >= meta["below"])
        if too_low or too_high:
            raise SettingError(key, f"must be {_range_text(meta)}, got {value!r}")


def annotation_of(cls, name: str):
    """The annotation of field `name`, evaluated where it was written (string annotations included); Any if unknown.

    Not `typing.get_type_hints(cls)`: it evaluates every annotation of every base class, and transformers' config
    base annotates with names (torch) that are not importable from its module's namespace.
    """
    for klass in cls.__mro__:
        annotation = vars(klass).get("__annotations__", {}).get(name)
        if annotation is None:
            continue
        if isinstance(annotation, str):
            try:
                return eval(annotation, vars(sys.modules[klass.__module__]))  # noqa: S307 - the class's own source
            except Exception:
                return Any
        return annotation
    return Any


def check_fields(obj, section: str = "", names: typing.Iterable[str] | None = None) -> None:
    """Check every (or each named) field of the dataclass `obj` against its annotation and `setting` constraints.

    `section` names the keys in the error when `obj` is built outside `build_section` (which names them itself).
    """
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for name in names if names is not None else [n for n, f in fields.items() if f.init]:
        try:
            check_value(name, getattr(obj, name), annotation_of(type(obj), name), dict(fields[name].metadata))
        except SettingError as exc:
            raise SettingError(exc.key, exc.detail, section) from None


def build_section(cls, values: dict | None, section: str, source: str):
    """`cls(**values)` for a settings dataclass, with unknown keys and bad values reported against the YAML path."""
    values = as_mapping(values, section, source)
    check_keys(values, [f.name for f in dataclasses.fields(cls) if f.init], section, source)
    try:
        return cls(**values)
    except SettingError as exc:
        raise exc.located(section, source) from None
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source}: section '{section}': {exc}") from None
