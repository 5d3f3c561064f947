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


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
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
