"""Configuration: the shipped defaults, the typed schema and the loader."""

from config.loader import ConfigError, default_config_text, load_config
from config.schema import AppConfig

__all__ = ["AppConfig", "ConfigError", "default_config_text", "load_config"]
