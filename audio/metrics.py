"""Audio evaluation: exact accuracy (``core.domain.ExactAccuracy``, one count per clip), the
metrics file of every run, and the mean / std over ESC-50 folds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from core.domain import METRICS_FILE, ExactAccuracy, read_metrics
from core.domain import MetricsFile as _MetricsFile


def run_description(trainer, pl_module) -> dict[str, Any]:
    """What identifies an audio run: the data read, method and parameter counts."""
    out: dict[str, Any] = {}
    data = trainer.datamodule
    if data is not None and hasattr(data, "describe"):
        out.update(data.describe(), num_classes=data.num_classes)
    if hasattr(pl_module, "parameter_counts"):
        out["params"] = pl_module.parameter_counts()
        out["method"] = pl_module.method_label()
        out["pretrained"] = pl_module.hparams.get("pretrained")
    return out


class MetricsFile(_MetricsFile):
    """``<log_dir>/metrics.json`` after fit / validate / test, with the audio run's data."""

    def describe(self, trainer, pl_module) -> dict[str, Any]:
        return run_description(trainer, pl_module)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) over folds."""
    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


__all__ = ["METRICS_FILE", "ExactAccuracy", "MetricsFile", "mean_std", "read_metrics"]
