"""Build the configuration once, at the entry point.

Order of precedence (later wins): the shipped ``default.yaml``, the user's
``--config FILE`` (may be partial), ``--set section.key=value`` overrides, then
command-line flags mapped onto keys by the CLI.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from config.schema import AppConfig


class ConfigError(ValueError):
    """A configuration problem, with the offending key named in the message."""


def default_config_text() -> str:
    """The shipped, commented ``default.yaml``."""
    return resources.files("config").joinpath("default.yaml").read_text(encoding="utf-8")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key written twice in one mapping (YAML would keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{origin}: not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    return data


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its dotted path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if len(path) < 2:
        raise ConfigError(f"--set {text!r}: the key must name a section and a key, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {dotted}: cannot parse value {raw!r}: {exc}") from exc
    return path, value


def set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[p0][p1]... = value``, creating sections as needed."""
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        given = err.get("input")
        detail = f" (got {given!r})" if err["type"] != "extra_forbidden" and not isinstance(given, dict) else ""
        lines.append(f"  {key}: {msg}{detail}")
    return f"invalid configuration ({origin}):\n" + "\n".join(lines)


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    values: Mapping[str, Any] | None = None,
) -> AppConfig:
    """Build and validate the configuration.

    Parameters
    ----------
    path
        Optional YAML file; it may hold only the keys it changes.
    overrides
        ``section.key=value`` strings (values parsed as YAML: ``5``, ``true``, ``[64, 64, 56]``).
    values
        Dotted keys to values already typed by the caller (command-line flags).

    Raises
    ------
    ConfigError
        Unreadable file, unknown key, wrong type or impossible value; the message names the key.
    """
    data = _read_yaml(default_config_text(), "default.yaml")
    origin = "defaults"
    if path is not None:
        file_path = Path(path)
        try:
            text = file_path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{file_path}: cannot read configuration: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{file_path}: not UTF-8 text (byte {exc.start}): not a YAML configuration") from exc
        data = _deep_merge(data, _read_yaml(text, str(file_path)))
        origin = str(file_path)
    for item in overrides:
        dotted, value = parse_override(item)
        set_dotted(data, dotted, value)
    for dotted_key, value in (values or {}).items():
        set_dotted(data, dotted_key.split("."), value)
    if overrides or values:
        origin += " with command-line settings"
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from None
