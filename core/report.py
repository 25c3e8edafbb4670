"""Parameter accounting: trainable vs total, per adapter and per adapted module type."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .targeting import adapted_modules, find_targets


@dataclass
class ParamReport:
    """What ``core.param_report`` returns; ``str(report)`` is a table."""

    total: int
    trainable: int
    by_adapter: dict[str, dict[str, int | str]] = field(default_factory=dict)
    by_module_type: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {
            "total": self.total,
            "trainable": self.trainable,
            "trainable_percent": self.trainable_percent,
            "by_adapter": self.by_adapter,
            "by_module_type": self.by_module_type,
        }

    def table(self) -> str:
        lines = [f"{'adapter':<16}{'method':<12}{'modules':>8}{'params':>14}{'saved':>12}"]
        for name, row in self.by_adapter.items():
            lines.append(
                f"{name:<16}{row['method']:<12}{row['modules']:>8}{row['params']:>14,}"
                f"{row['saved_params']:>12,}"
            )
        lines.append("")
        lines.append(f"{'module type':<16}{'wrapped':>8}{'base params':>16}{'adapter params':>16}")
        for kind, row in self.by_module_type.items():
            lines.append(
                f"{kind:<16}{row['modules']:>8}{row['base_params']:>16,}{row['adapter_params']:>16,}"
            )
        lines.append("")
        lines.append(
            f"trainable {self.trainable:,} / total {self.total:,} ({self.trainable_percent:.4f}%)"
        )
        return "\n".join(lines)

    __str__ = table


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_report(model: nn.Module) -> ParamReport:
    """Count parameters (works on the meta device: shapes are enough)."""
    params = list(model.parameters())  # unique objects, so tied weights count once
    report = ParamReport(
        total=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
    )
    for _, wrapper in adapted_modules(model):
        kind = type(wrapper.base_layer).__name__
        row = report.by_module_type.setdefault(
            kind, {"modules": 0, "base_params": 0, "adapter_params": 0}
        )
        row["modules"] += 1
        row["base_params"] += _numel(wrapper.base_layer)
        for name, adapter in wrapper.adapters.items():
            count = _numel(adapter)
            row["adapter_params"] += count
            entry = report.by_adapter.setdefault(
                name,
                {"method": adapter.config.method, "modules": 0, "params": 0, "saved_params": 0},
            )
            entry["modules"] += 1
            entry["params"] += count
    for name, entry in report.by_adapter.items():
        cfg = next(w.adapters[name].config for _, w in adapted_modules(model) if name in w.adapters)
        if cfg.modules_to_save:
            entry["saved_params"] = sum(
                _numel(m) for _, m in find_targets(model, cfg.modules_to_save)
            )
    return report
