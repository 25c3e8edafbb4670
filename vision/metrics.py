"""VTAB-1k evaluation: exact top-k accuracy over a list, the benchmark's group averages,
and the metrics file every run writes.

``ExactAccuracy``, ``METRICS_FILE``, ``read_metrics`` and the ``MetricsFile`` machinery live
in ``core.domain`` (shared by every domain); this module adds the VTAB-1k group means and
the VTAB run description the vision metrics file records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from core.domain import METRICS_FILE, ExactAccuracy, read_metrics  # noqa: F401
from core.domain import MetricsFile as _MetricsFile

from .data import GROUPS, VTAB_TASKS

# --- the VTAB-1k table ------------------------------------------------------------------


def vtab_summary(accuracy: Mapping[str, float]) -> dict[str, float]:
    """Group means and overall means of per-task accuracies (as the VTAB-1k tables print).

    ``mean`` averages the tasks given; ``mean_of_groups`` averages the group means (the
    "Mean" column of VPT / NOAH-style tables when all 19 tasks are present). Tasks outside
    the 19 only count in ``mean``.
    """
    out: dict[str, float] = {}
    groups = {
        g: [v for t, v in accuracy.items() if t in VTAB_TASKS and VTAB_TASKS[t][0] == g]
        for g in GROUPS
    }
    for group, values in groups.items():
        if values:
            out[group] = sum(values) / len(values)
    if accuracy:
        out["mean"] = sum(accuracy.values()) / len(accuracy)
    group_means = [out[g] for g in GROUPS if g in out]
    if group_means:
        out["mean_of_groups"] = sum(group_means) / len(group_means)
    return out


# --- the metrics file -----------------------------------------------------------------------


class MetricsFile(_MetricsFile):
    """Writes ``<log_dir>/metrics.json`` (rank zero) after fit, validate and test: the task,
    the list file each stage read, the parameter counts, the accuracy after every
    validation epoch, and the final validation / test accuracy."""

    def describe(self, trainer, pl_module) -> Mapping[str, Any]:
        return run_description(trainer, pl_module)  # looked up at call time


def run_description(trainer, pl_module) -> dict[str, Any]:
    """What identifies a run: task, lists read, backbone, method and parameter counts."""
    out: dict[str, Any] = {}
    data = trainer.datamodule
    if data is not None and hasattr(data, "describe"):
        out.update(
            task=data.task,
            group=data.group,
            protocol=data.protocol,
            lists=data.describe(),
            num_classes=data.num_classes,
        )
    if hasattr(pl_module, "parameter_counts"):
        out["params"] = pl_module.parameter_counts()
        out["method"] = pl_module.method_label()
        out["backbone"] = pl_module.hparams.get("backbone")
    return out


__all__ = [
    "METRICS_FILE",
    "ExactAccuracy",
    "MetricsFile",
    "read_metrics",
    "run_description",
    "vtab_summary",
]
