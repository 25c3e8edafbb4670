"""VTAB-1k evaluation: exact top-k accuracy over a list, the benchmark's group averages,
and the metrics file every run writes.

Accuracy is counted per sample index, so under DDP (where Lightning's distributed sampler
pads the evaluation list by repeating samples to split it evenly) every sample still
counts exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from core.checkpoint import atomic_write

from .data import GROUPS, VTAB_TASKS

METRICS_FILE = "metrics.json"


class ExactAccuracy(Metric):
    """Top-k accuracy over the distinct sample indices seen (duplicates counted once)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, top_k: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.top_k = top_k
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        k = min(self.top_k, logits.shape[-1])
        hits = (logits.topk(k, dim=-1).indices == labels[:, None]).any(dim=-1)
        self.index.append(index.detach().long())
        self.correct.append(hits.detach())

    def compute(self) -> torch.Tensor:
        index, correct = dim_zero_cat(self.index), dim_zero_cat(self.correct)
        if index.numel() == 0:
            return torch.tensor(float("nan"), device=self.device)
        unique, where = torch.unique(index, return_inverse=True)
        # A repeated sample was scored on another device with the same weights: same result.
        per_sample = torch.zeros(len(unique), device=index.device)
        per_sample.scatter_(0, where, correct.float())
        return per_sample.mean()

    def count(self) -> int:
        """How many distinct samples were scored (on this process, before syncing)."""
        return int(torch.unique(dim_zero_cat(self.index)).numel()) if self.index else 0


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


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, int | float) else None


class MetricsFile(lightning.Callback):
    """Writes ``<log_dir>/metrics.json`` (rank zero) after fit, validate and test: the task,
    the list file each stage read, the parameter counts, the accuracy after every
    validation epoch, and the final validation / test accuracy."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        acc = _scalar(trainer.callback_metrics.get("val_acc"))
        if acc is not None:
            self.history.append({"epoch": trainer.current_epoch, "val_acc": acc})

    def on_fit_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, stage="fit")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer, pl_module, stage="validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._write(trainer, pl_module, stage="test")

    def _write(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective: every rank asks
        if not trainer.is_global_zero:
            return
        path = Path(log_dir) / METRICS_FILE
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.update(run_description(trainer, pl_module))
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        if stage == "fit":
            record["val_acc_per_epoch"] = self.history
            record["epochs"] = trainer.current_epoch
            record["global_step"] = trainer.global_step
            exported = getattr(pl_module, "exported_adapter", None)
            record["exported"] = str(exported) if exported else None
        key = "test_acc" if stage == "test" else "val_acc"
        if metrics.get(key) is not None:
            record[key] = metrics[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record, indent=2, sort_keys=True).encode())


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


def read_metrics(folder: str | Path) -> dict[str, Any]:
    """Read a run's metrics file (``<folder>/metrics.json``)."""
    return json.loads((Path(folder) / METRICS_FILE).read_text())


__all__ = ["METRICS_FILE", "ExactAccuracy", "MetricsFile", "read_metrics", "vtab_summary"]
