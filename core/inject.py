"""Putting adapters into a model, choosing which run, merging them, taking them out.

Every function here changes nothing when it raises: the plan is checked in full first.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn as nn

from .config import AdapterConfig
from .errors import ConfigError, MergeError, TargetError
from .layers import AdaptedModule, Adapter
from .targeting import adapted_modules, base_of, find_targets, split_parent, walk

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.fullmatch(name):
        raise ConfigError(
            f"adapter name {name!r} is not allowed: use letters, digits, '_' or '-' "
            "(no dots, not empty), e.g. name='style_a'."
        )
    if hasattr(nn.ModuleDict, name):  # adapters live in a ModuleDict keyed by name
        raise ConfigError(
            f"adapter name {name!r} is taken by a torch.nn.Module attribute; pick another, "
            f"e.g. name='{name}_adapter'."
        )


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters in ``model``, in the order they were injected."""
    names: dict[str, None] = {}
    for _, wrapper in adapted_modules(model):
        names.update(dict.fromkeys(wrapper.adapters.keys()))
    return list(names)


def adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    for _, wrapper in adapted_modules(model):
        if name in wrapper.adapters:
            return wrapper.adapters[name].config
    raise KeyError(f"no adapter named {name!r}; the model has {adapter_names(model)}")


def _unsupported(model: nn.Module, cfg: AdapterConfig, path: str, module: nn.Module):
    base = base_of(module)
    parent, attr = split_parent(model, path)
    if isinstance(parent, nn.MultiheadAttention):
        # MultiheadAttention reads out_proj.weight directly, bypassing the wrapper.
        return (
            "nn.MultiheadAttention uses its projection weights directly, so a wrapped "
            f"{attr!r} would never run; target another module"
        )
    if isinstance(base, AdaptedModule | Adapter):
        return "it is part of an adapter"
    return cfg.unsupported_reason(base)


def plan(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``cfg`` would adapt; raises before anything changes."""
    found = find_targets(model, cfg.targets, cfg.exclude)
    problems = [
        f"{path} ({type(base_of(m)).__name__}): {reason}"
        for path, m in found
        if (reason := _unsupported(model, cfg, path, m))
    ]
    if problems:
        raise TargetError(
            f"{type(cfg).__name__} cannot wrap {len(problems)} targeted module(s):\n  "
            + "\n  ".join(problems[:10])
            + "\nNarrow `targets` to supported layers, or add these to `exclude`."
        )
    return found


def _modules_to_save(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    if not cfg.modules_to_save:
        return []
    return find_targets(model, cfg.modules_to_save)


def attach(model: nn.Module, name: str, cfg: AdapterConfig, adapters: dict[str, Adapter]) -> None:
    """Put built adapters in place, wrapping base modules that are not wrapped yet."""
    for path, adapter in adapters.items():
        parent, attr = split_parent(model, path)
        module = getattr(parent, attr)
        if not isinstance(module, AdaptedModule):
            module = AdaptedModule(module)
            module.train(module.base_layer.training)
            setattr(parent, attr, module)
        adapter.train(module.base_layer.training)  # eval models keep adapter dropout off
        adapter.config = cfg
        adapter.path = path
        adapter.on_attach(module.base_layer)
        module.adapters[name] = adapter


def build(model: nn.Module, cfg: AdapterConfig) -> dict[str, Adapter]:
    """Plan and build the adapters of ``cfg`` without attaching them."""
    built: dict[str, Adapter] = {}
    for path, module in plan(model, cfg):
        built[path] = cfg.build(base_of(module), path)
    return built


def inject(model: nn.Module, cfg: AdapterConfig, name: str = "default") -> nn.Module:
    """Wrap the modules ``cfg.targets`` names with a new adapter called ``name``, in place.

    Afterwards only this adapter (and ``cfg.modules_to_save``) is trainable and only
    this adapter runs; ``set_active`` stacks several. Base weights are never copied, so
    a model on the ``meta`` device can be planned and counted.
    """
    if not isinstance(cfg, AdapterConfig):
        raise ConfigError(
            f"inject needs a method config such as core.LoRA(targets=[...]), got {type(cfg)}"
        )
    check_adapter_name(name)
    if name in adapter_names(model):
        raise ConfigError(
            f"the model already has an adapter named {name!r}; pick another name or call "
            "core.delete_adapter(model, name) first."
        )
    adapters = build(model, cfg)
    saved = _modules_to_save(model, cfg)
    attach(model, name, cfg, adapters)
    for param in model.parameters():
        param.requires_grad_(False)
    for adapter in adapters.values():
        adapter.set_trainable(True)
    for _, module in saved:
        module.requires_grad_(True)
    set_active(model, [name])
    return model


def _check_known(model: nn.Module, names: Iterable[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter name(s) {unknown}; the model has {known}")
    return names


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Choose which named adapters run, in this order (an empty list runs none)."""
    names = _check_known(model, names)
    wrappers = [w for _, w in adapted_modules(model)]
    if any(w.merged for w in wrappers):
        raise MergeError("adapters are merged into the weights; call core.unmerge(model) first.")
    for wrapper in wrappers:
        wrapper.active = [n for n in names if n in wrapper.adapters]


def active_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, wrapper in adapted_modules(model):
        names.update(dict.fromkeys(wrapper.active))
    return list(names)


def merge(model: nn.Module, names: str | Iterable[str] | None = None) -> nn.Module:
    """Fold the named (default: active) adapters into the base weights, exactly."""
    names = active_adapters(model) if names is None else _check_known(model, names)
    for name in names:
        cfg = adapter_config(model, name)
        if not cfg.mergeable:
            raise MergeError(
                f"adapter {name!r} is {cfg.method}, which acts on activations and cannot be "
                "merged into weights; keep it unmerged (it still runs) or remove it."
            )
    with torch.no_grad():
        for _, wrapper in adapted_modules(model):
            for name in names:
                if name in wrapper.adapters and name not in wrapper.merged:
                    wrapper.adapters[name].merge(wrapper.base_layer)
                    wrapper.merged.append(name)
                    if name not in wrapper.active:
                        wrapper.active.append(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Take every merged adapter back out of the base weights (last merged first)."""
    with torch.no_grad():
        for _, wrapper in adapted_modules(model):
            while wrapper.merged:
                wrapper.adapters[wrapper.merged.pop()].unmerge(wrapper.base_layer)
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; modules left without adapters get their base back."""
    _check_known(model, [name])
    for path, wrapper in list(adapted_modules(model)):
        if name not in wrapper.adapters:
            continue
        if name in wrapper.merged:
            raise MergeError(f"adapter {name!r} is merged; call core.unmerge(model) first.")
        wrapper.adapters[name].on_detach(wrapper.base_layer)
        del wrapper.adapters[name]
        wrapper.active = [n for n in wrapper.active if n != name]
        if not wrapper.adapters:
            parent, attr = split_parent(model, path)
            setattr(parent, attr, wrapper.base_layer)


def unload(model: nn.Module, merge_adapters: bool = False) -> nn.Module:
    """Return the plain model, wrappers removed; with ``merge_adapters`` the active ones stay
    folded into the weights, otherwise the base weights are restored."""
    if merge_adapters:
        merge(model)
    else:
        unmerge(model)
    for path, wrapper in list(adapted_modules(model)):
        for name, adapter in wrapper.adapters.items():
            if name not in wrapper.merged:
                adapter.on_detach(wrapper.base_layer)
        parent, attr = split_parent(model, path)
        setattr(parent, attr, wrapper.base_layer)
    return model


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the regularisers active adapters expose (None when there are none)."""
    total = None
    for _, wrapper in adapted_modules(model):
        for adapter in wrapper.running():
            term = adapter.aux_loss()
            if term is not None:
                total = term if total is None else total + term
    return total


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


__all__ = [
    "active_adapters",
    "adapter_config",
    "adapter_names",
    "aux_loss",
    "delete_adapter",
    "inject",
    "merge",
    "set_active",
    "trainable_parameters",
    "unload",
    "unmerge",
    "walk",
]
