"""The method registry: method name -> config class.

Checkpoints, YAML configs and the command lines name methods by these strings.
"""

from __future__ import annotations

from typing import Any

from .config import AdapterConfig
from .errors import CheckpointError, ConfigError

METHODS: dict[str, type[AdapterConfig]] = {}


def register(name: str, *, mergeable: bool):
    """Class decorator: record a config class under ``name`` and state if it merges."""

    def wrap(cls: type[AdapterConfig]) -> type[AdapterConfig]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {METHODS[name]}")
        cls.method = name
        cls.mergeable = mergeable
        METHODS[name] = cls
        return cls

    return wrap


def config_from_dict(method: str, fields: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from its method name and ``to_dict()`` output."""
    if method not in METHODS:
        raise CheckpointError(
            f"unknown method {method!r}; this omnipeft knows {sorted(METHODS)}. "
            "The checkpoint may come from a newer omnipeft: upgrade, or pick a known method."
        )
    try:
        return METHODS[method](**fields)
    except TypeError as err:
        raise ConfigError(f"config fields do not fit method {method!r}: {err}") from None
