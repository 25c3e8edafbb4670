"""The base of every method config: a frozen, validated dataclass that names its targets.

A config constructs from ``targets`` alone (every other field carries the paper's
default), checks its fields in ``__post_init__`` and says whether the method can be
merged into the base weights. ``core.registry.register`` ties a config class to the
adapter module it builds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.nn as nn

from .errors import ConfigError


def check_int(cfg: object, name: str, *, minimum: int = 1) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must be an int, got {type(value).__name__} {value!r}; "
            f"pass a whole number such as {name}={max(minimum, 8)}."
        )
    if value < minimum:
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must be >= {minimum}, got {value}; "
            f"choose a value of at least {minimum}."
        )


def check_float(
    cfg: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Check a real-valued field; ints are accepted and stored as floats."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must be a number, got {type(value).__name__} {value!r}."
        )
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be finite, got {value}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'(' if low_open else '['}{lo}, {hi}{')' if high_open else ']'}"
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must lie in {interval}, got {value}; pick a value inside."
        )
    object.__setattr__(cfg, name, value)


def check_choice(cfg: object, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must be one of {', '.join(map(repr, choices))}, "
            f"got {value!r}."
        )


def _check_name_list(cfg: object, name: str, *, allow_none: bool) -> None:
    value = getattr(cfg, name)
    if value is None and allow_none:
        return
    if isinstance(value, str):
        if not value:
            raise ConfigError(
                f"{type(cfg).__name__}.{name} is an empty string; give module names such as "
                "['q_proj', 'v_proj'] or a regular expression."
            )
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(
                f"{type(cfg).__name__}.{name} is a string, so it is read as a regular expression "
                f"matched against full module names, but {value!r} does not compile: {err}."
            ) from None
        return
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) and v for v in value):
        object.__setattr__(cfg, name, tuple(value))
        return
    raise ConfigError(
        f"{type(cfg).__name__}.{name} must be a non-empty list of module names (e.g. "
        f"['q_proj', 'v_proj']) or one regular expression string, got {value!r}."
    )


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields every method shares.

    Args:
        targets: module names to adapt. A list matches a module whose full name equals an
            entry or ends with ``"." + entry`` (HF PEFT's ``target_modules`` convention); a
            string is a regular expression that must match the full module name.
        exclude: modules to leave alone even if ``targets`` matches them (same syntax).
        modules_to_save: modules trained in full beside the adapter and saved with it,
            e.g. a new classification ``head``.
    """

    targets: tuple[str, ...] | str
    exclude: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] | None = None

    # Set by ``core.registry.register``.
    method: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_name_list(self, "targets", allow_none=False)
        _check_name_list(self, "exclude", allow_none=True)
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                object.__setattr__(self, "modules_to_save", (self.modules_to_save,))
            _check_name_list(self, "modules_to_save", allow_none=False)
            if isinstance(self.modules_to_save, str):  # a bare regex is not allowed here
                raise ConfigError("modules_to_save must be a list of module names.")

    def build(self, module: nn.Module, path: str) -> nn.Module:
        """Return a new adapter for ``module`` (found at ``path``); overridden per method."""
        raise NotImplementedError

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this method cannot wrap ``module``, or None when it can."""
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out
