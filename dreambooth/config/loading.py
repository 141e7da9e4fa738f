"""Building a ``RunConfig`` from layers (model recipe < YAML file < flags): keys coerced to their field's type,
unknown keys answered with the nearest known one, each value's source kept (``validation`` checks the result);
and the README's config reference."""

from __future__ import annotations

import copy
import difflib
import math
import re
import typing
from pathlib import Path
from typing import Any, Literal

from dreambooth.config.schema import SECTIONS, ConfigError, FieldInfo, RunConfig, all_fields
from dreambooth.inputs import MAX_CONFIG_BYTES, MAX_TEXT_FIELD, InputError, load_yaml_file, shorten


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_LIST_ITEMS = 64
"""Entries a list setting accepts (each sample prompt renders a row of the grid)..."""
MAX_LIST_ITEMS_OF = {"extra_prior_prompts": 4096}
"""... except these, whose entries only name what some prior images show."""


def _coerce(info: FieldInfo, value: Any, source: str) -> Any:
    """Check/convert one value to its field's type; errors name the field and the source."""
    tp = info.type
    optional = typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)
    if optional:
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    where = f"'{info.name}' ({source})"
    shown = shorten(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "yes", "no", "1", "0"}:
            return value.lower() in {"true", "yes", "1"}
        raise ConfigError(f"{where} must be true or false, got {shown}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and len(value) > 20):
            raise ConfigError(f"{where} must be an integer, got {shown}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {shown}") from None
    if tp is float:
        if isinstance(value, bool) or (isinstance(value, str) and len(value) > 40):
            raise ConfigError(f"{where} must be a number, got {shown}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} must be a number, got {shown}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number, got {shown}")
        return number
    if tp is str or typing.get_origin(tp) is Literal:  # a Literal's choice is checked by ``validate``
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where} must be a string, got {shown}")
        return _checked_text(str(value), where)
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {shown}")
        limit = MAX_LIST_ITEMS_OF.get(info.name, MAX_LIST_ITEMS)
        if len(value) > limit:
            raise ConfigError(f"{where} has {len(value)} entries; at most {limit} are accepted")
        return [_checked_text(v, where) for v in value]
    raise TypeError(f"unsupported config type {tp} for {info.name}")  # a bug, not user input


def _checked_text(text: str, where: str) -> str:
    if len(text) > MAX_TEXT_FIELD:
        raise ConfigError(f"{where} is {len(text):,} characters long; at most {MAX_TEXT_FIELD} are accepted")
    bad = _CONTROL.search(text)
    if bad:
        raise ConfigError(f"{where} contains a control character ({bad.group()!r}) in {shorten(text)}; "
                          "remove line breaks, tabs and other control characters")
    return text


def _unknown_key(key: str, source: str) -> ConfigError:
    names = list(all_fields()) + list(SECTIONS)
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(names))}"
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def flatten(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Turn nested-or-flat YAML data into ``{field_name: value}``, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping of config keys, got {type(data).__name__}")
    flat: dict[str, Any] = {}
    fields = all_fields()
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"section '{key}' in {source} must be a mapping")
            for sub_key, sub_value in value.items():
                sub_key = str(sub_key).replace("-", "_")
                info = fields.get(sub_key)
                if info is None or info.section != key:
                    raise _unknown_key(f"{key}.{sub_key}" if info is None else sub_key, source)
                flat[sub_key] = sub_value
        elif key in fields:
            flat[key] = value
        else:
            raise _unknown_key(key, source)
    return flat


def build_config(*layers: tuple[dict[str, Any], str]) -> RunConfig:
    """Build a RunConfig from flat ``{field: value}`` layers, later layers winning.

    Each layer comes with a source name for error messages (a file path, "flags", ...).
    """
    cfg = RunConfig()
    for values, source in layers:
        _set_layer(cfg, values, source)
    return cfg


def with_layer(cfg: RunConfig, values: dict[str, Any], source: str) -> RunConfig:
    """A copy of ``cfg`` with one more flat layer over it (``cfg`` is not written)."""
    layered = copy.deepcopy(cfg)
    _set_layer(layered, values, source)
    return layered


def _set_layer(cfg: RunConfig, values: dict[str, Any], source: str) -> None:
    fields = all_fields()
    for name, value in values.items():
        info = fields.get(name)
        if info is None:
            raise _unknown_key(name, source)
        target = cfg if info.section is None else getattr(cfg, info.section)
        setattr(target, name, _coerce(info, value, source))
        cfg.sources[name] = source


CONFIG_YAML_NODES = 100_000
"""Largest config file in YAML nodes after alias expansion (a config has a few dozen keys)."""


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file (``--config``) into flat ``{field: value}``."""
    return flatten(load_yaml_document(path), path)


def load_yaml_document(path: str) -> Any:
    """A YAML config file as written (sections nested), checked for size; {} when empty."""
    try:
        data = load_yaml_file(path, "config file", MAX_CONFIG_BYTES, CONFIG_YAML_NODES) if Path(path).is_file() else None
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    if data is None and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    return data or {}


def reference_markdown() -> str:
    """The config reference table of the README, generated from the dataclasses' docstrings."""
    lines = ["| YAML key (section) | flag | default | meaning |", "|---|---|---|---|"]
    for info in all_fields().values():
        key = info.name if info.section is None else f"{info.section}.{info.name}"
        default = "; ".join(info.default) if isinstance(info.default, list) else info.default
        shown = f"`{default}`" if default not in ("", None) else "(empty)" if default == "" else "(none)"
        lines.append(f"| `{key}` | `{info.flag}` | {shown} | {info.doc.replace('|', '/')} |")
    return "\n".join(lines)
