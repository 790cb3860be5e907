"""Typed job configs: nested frozen dataclasses, loaded from YAML plus dotted overrides.

    cfg = parse_job_args(DownloadConfig, "Download image-caption pairs", argv)

gives every job the same command line: `--config FILE.yaml`, `--set key.sub=value` (repeatable;
values parsed as YAML, so `--set filter.min_side=128` is an int), and `--print-config`. A str-typed
key given with --set keeps the text as typed when YAML would read it as something else (`--out on`,
`--set output_dir=2024-01-01`): YAML 1.1 turns on/off/yes/no/null, numbers and dates into other
types, and a path is just text. In a YAML file such a value is an error asking to quote it: the file
was parsed before its types were known, so the text as written is gone (`yes` and `on` both read
True) and a conversion back could name another path. Unknown keys and wrong types are errors that
name the dotted key. Configs travel to Ray workers
as plain dicts (`to_dict`) and are rebuilt with `from_dict` on the worker's first line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SetValue:
    """A --set value: the text as typed and what YAML parsed it to; the key's type picks one (_coerce)."""

    text: str
    parsed: Any


def _unwrap(value: Any, hint: Any) -> Any:
    """A SetValue -> its typed text for a str key when YAML read a scalar of another type, else the parsed value."""
    if not isinstance(value, SetValue):
        return value
    scalar = not isinstance(value.parsed, (str, list, dict))
    return value.text if hint is str and scalar else value.parsed


def _str_option_last(args: tuple) -> list:
    """A union's options with str last: `layer: str | int` given -2 is the int, `on` (not an int) the text."""
    return sorted((a for a in args if a is not type(None)), key=lambda a: a is str)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint (after YAML parsing), converting only losslessly."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        parsed = _unwrap(value, Any)
        if parsed is None and type(None) in args:
            return None
        for option in _str_option_last(args):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {parsed!r} is not a valid {hint}")
    value = _unwrap(value, hint)
    if hint is Any:
        return value
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_hint, value_hint = args or (Any, Any)
        return {_coerce(k, key_hint, f"{key} key"): _coerce(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    if hint is str and not isinstance(value, (list, dict)):
        raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__}): YAML reads "
                          f"on/off/yes/no/true/false/null, numbers and dates as other types; quote it ('...')")
    raise ConfigError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type[T], values: dict | None, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and bad types raise ConfigError."""
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                          f"valid keys here: {[prefix + k for k in fields]}")
    kwargs = {name: _coerce(v, hints[name], prefix + name) for name, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None
    except ValueError as err:  # a section's own check (__post_init__) refused a value
        message = str(err)
        where = prefix.rstrip(".")
        raise ConfigError(message if not where or message.startswith(where) else f"{where}: {message}") from None


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_differences(existing: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> list[str]:
    """Why an existing output (checkpoint, feature folder, ...) is not what this config would make: one
    'key: existing X, config gives Y' line per differing dotted key, nested sections compared key by key."""
    lines = []
    for key in sorted(set(existing) | set(wanted)):
        a, b = existing.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: existing {a!r}, config gives {b!r}")
    return lines


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: for MLflow params and reports."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def apply_override(values: dict, assignment: str) -> None:
    """Apply `a.b.c=value` to a nested dict in place; the value is parsed as YAML and kept with its text
    (SetValue: from_dict gives a str key the text)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    dotted, raw = assignment.split("=", 1)
    *parents, leaf = dotted.strip().split(".")
    node = values
    for part in parents:
        if isinstance(node.get(part), SetValue):  # `--set a={...}` then `--set a.b=...`: a section after all
            node[part] = node[part].parsed
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    text = raw.strip()
    node[leaf] = SetValue(text, yaml.safe_load(raw) if text else "")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        values = yaml.safe_load(p.read_text()) or {}
    for assignment in overrides:
        apply_override(values, assignment)
    return from_dict(cls, values)


def parse_job_args(cls: type[T], description: str, argv: list[str] | None = None,
                   extra: typing.Callable[[argparse.ArgumentParser], None] | None = None
                   ) -> tuple[T, argparse.Namespace]:
    """The common job command line. Exits with status 2 and a one-line message on a bad config."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (defaults apply to anything it leaves out)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, repeatable, e.g. --set output_dir=/data/raw")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except (ConfigError, yaml.YAMLError) as err:
        parser.exit(2, f"config error: {err}\n")
    if args.print_config:
        yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
        parser.exit(0)
    return cfg, args
