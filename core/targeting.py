"""Finding the modules a config names, HF PEFT's ``target_modules`` convention.

A list entry matches a module whose full name equals it or ends with ``"." + entry``; a
string is a regular expression that must match the whole name. Adapted modules count
under their original name; their base's children stay visible, adapter internals never
are targets.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

import torch.nn as nn

from .errors import TargetError
from .layers import AdaptedModule


def walk(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield (full name, module) for every module under its original name.

    An AdaptedModule stands at its base's name and its base's children follow under that
    name (a wrapped block still exposes its layers), but adapter internals are skipped.
    """
    for child_name, child in model._modules.items():
        if child is None:
            continue
        path = f"{prefix}.{child_name}" if prefix else child_name
        yield path, child
        yield from walk(child.base_layer if isinstance(child, AdaptedModule) else child, path)


def adapted_modules(model: nn.Module) -> Iterator[tuple[str, AdaptedModule]]:
    for path, module in walk(model):
        if isinstance(module, AdaptedModule):
            yield path, module


def name_matches(path: str, spec: tuple[str, ...] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == entry or path.endswith("." + entry) for entry in spec)


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdaptedModule) else module


def nearest_names(model: nn.Module, wanted: str, limit: int = 5) -> list[str]:
    """Real module names (full and last part) closest to ``wanted``, for error messages."""
    paths = [p for p, _ in walk(model)]
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    close = difflib.get_close_matches(wanted, leaves, n=limit, cutoff=0.4)
    close += difflib.get_close_matches(wanted, paths, n=limit, cutoff=0.5)
    if not close:
        close = leaves[:limit]
    return list(dict.fromkeys(close))[:limit]


def find_targets(
    model: nn.Module,
    targets: tuple[str, ...] | str,
    exclude: tuple[str, ...] | str | None = None,
) -> list[tuple[str, nn.Module]]:
    """Return (name, module) for each target, or raise naming the nearest real names.

    Each list entry must match at least one module, so a typo is never silently skipped.
    """
    found = [
        (path, module)
        for path, module in walk(model)
        if name_matches(path, targets) and not (exclude and name_matches(path, exclude))
    ]
    entries = [targets] if isinstance(targets, str) else list(targets)
    for entry in entries:
        spec = entry if isinstance(targets, str) else (entry,)
        if not any(name_matches(path, spec) for path, _ in found):
            kind = "regular expression" if isinstance(targets, str) else "target"
            raise TargetError(
                f"{kind} {entry!r} matches no module in {type(model).__name__}. "
                f"Nearest module names: {nearest_names(model, entry)}. "
                "List entries match a full name or its last dotted parts; "
                "a string is a regex over full names."
            )
    return found


def split_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding ``path`` as a child (inside a wrapper: the wrapper's base)."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return base_of(parent), attr
