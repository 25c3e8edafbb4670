"""Plumbing every domain package shares: Lightning defaults, a resumable shuffle, exact
accuracy, the per-run metrics file and the tuning modes of a classifier.

Domain packages (vision, audio, medical, diffusion, nlp) import these from here and never
from each other (see the dependency rules in DESIGN.md). Like ``core.lightning`` this
module imports Lightning; ``core.methods`` never does.

* ``default_precision`` / ``default_loggers`` / ``LOG_NAME``: trainer defaults of the CLIs.
* ``EpochShuffle``: a shuffle that is a function of (seed, epoch), resumable, DDP-ready.
* ``ExactAccuracy``: top-k accuracy counting each sample index once (DDP padding safe).
* ``MetricsFile`` / ``METRICS_FILE`` / ``read_metrics``: ``<log_dir>/metrics.json``.
* ``TUNINGS`` / ``with_head`` / ``check_tuning``: "peft" / "full" / "linear" training.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import lightning
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from torch.utils.data import Dataset, DistributedSampler
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from .checkpoint import atomic_write
from .config import AdapterConfig
from .errors import ConfigError
from .report import param_report

# --- trainer defaults ----------------------------------------------------------------------

LOG_NAME = "lightning_logs"


def default_precision() -> str:
    """bf16 mixed precision on a GPU that supports it, fp16 mixed on older GPUs, else fp32."""
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def default_loggers(root: str) -> list[Logger]:
    """A CSV logger, plus TensorBoard in the same version folder when it is installed."""
    csv = CSVLogger(save_dir=root, name=LOG_NAME)
    loggers: list[Logger] = [csv]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=root, name=LOG_NAME, version=csv.version))
    except ModuleNotFoundError:  # tensorboard is optional
        pass
    return loggers


class PeftCLI(LightningCLI):
    """The LightningCLI every domain's ``python -m <domain>.train`` uses.

    Subclasses name ``model_class`` and ``datamodule_class`` (and may change
    ``max_epochs``, link arguments, or add callbacks in ``extra_callbacks``). Shared
    defaults: bf16/fp16 mixed precision on a GPU (``default_precision``), seed 0, the
    config saved beside the logs, and ``default_loggers`` at ``--trainer.default_root_dir``
    unless the command line gives loggers.
    """

    model_class: ClassVar[type[lightning.LightningModule]]
    datamodule_class: ClassVar[type[lightning.LightningDataModule]]
    max_epochs: ClassVar[int] = 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault(
            "trainer_defaults",
            {
                "precision": default_precision(),
                "max_epochs": self.max_epochs,
                "log_every_n_steps": 10,
            },
        )
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(self.model_class, self.datamodule_class, *args, **kwargs)

    def make_loggers(self, root: str) -> list[Logger]:
        return default_loggers(root)

    def extra_callbacks(self, logging: bool) -> list[lightning.Callback]:
        """Callbacks added after the command line's own (``logging``: a logger is set)."""
        return []

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        logger = kwargs.get("logger", config.get("logger"))
        if logger is None or logger is True:
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = logger = self.make_loggers(str(root))
        extra = self.extra_callbacks(bool(logger))
        if extra:
            kwargs["callbacks"] = [*(config.get("callbacks") or []), *extra]
        return super().instantiate_trainer(**kwargs)


# --- data ----------------------------------------------------------------------------------


class EpochShuffle(DistributedSampler):
    """A shuffle that is a function of (seed, epoch) alone, on one device or many.

    Lightning calls ``set_epoch`` each epoch, so a run resumed from a checkpoint sees the
    same order the uninterrupted run would have; being a ``DistributedSampler`` already,
    Lightning does not replace it under DDP.
    """

    def __init__(self, dataset: Dataset, *, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)


# --- accuracy ------------------------------------------------------------------------------


class ExactAccuracy(Metric):
    """Top-k accuracy over the distinct sample indices seen (duplicates counted once).

    Under DDP, Lightning's distributed sampler pads an evaluation list by repeating samples;
    counting per sample index makes every sample count exactly once all the same.
    """

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


class ExactAccuracySteps:
    """Validation and test steps of a classifier on ``(inputs, labels, index)`` batches:
    cross-entropy logged as ``{stage}_loss``, ``ExactAccuracy`` as ``{stage}_acc`` (computed
    and synced at epoch end). Mix in before ``PeftModule``; the module sets
    ``self.accuracy = nn.ModuleDict({"val": ExactAccuracy(), "test": ExactAccuracy()})``."""

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.evaluate_stage("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.evaluate_stage("test", batch)

    def evaluate_stage(self, stage: str, batch: Any) -> torch.Tensor:
        inputs, labels, index = batch
        logits = self(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        self.accuracy[stage].update(logits, labels, index)
        self.log(f"{stage}_loss", loss, sync_dist=True)
        self.log(f"{stage}_acc", self.accuracy[stage], prog_bar=True)
        return loss


# --- the metrics file ----------------------------------------------------------------------

METRICS_FILE = "metrics.json"

Describe = Callable[[Any, Any], Mapping[str, Any]]


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, int | float) else None


def describe_run(trainer, pl_module) -> dict[str, Any]:
    """A domain-neutral run description: the data module's ``describe()`` when it returns a
    mapping, its ``num_classes``, and the module's parameter counts and method label."""
    out: dict[str, Any] = {}
    data = trainer.datamodule
    if data is not None and hasattr(data, "describe"):
        described = data.describe()
        if isinstance(described, Mapping):
            out.update(described)
        if hasattr(data, "num_classes"):
            out["num_classes"] = data.num_classes
    if hasattr(pl_module, "parameter_counts"):
        out["params"] = pl_module.parameter_counts()
    if hasattr(pl_module, "method_label"):
        out["method"] = pl_module.method_label()
    return out


class MetricsFile(lightning.Callback):
    """Writes ``<log_dir>/metrics.json`` (rank zero) after fit, validate and test: what
    identifies the run (``describe``), the ``monitor`` value after every validation epoch,
    and the final validation / test values.

    Args:
        describe: ``(trainer, pl_module) -> mapping`` of what identifies the run (data read,
            method, parameter counts); ``describe_run`` by default. Subclasses may override
            the ``describe`` method instead.
        val_key, test_key: the logged metrics recorded as the final validation / test
            result ("val_acc" / "test_acc" by default); ``val_key`` is also recorded per
            epoch under ``"<val_key>_per_epoch"``.
    """

    def __init__(
        self, describe: Describe | None = None, val_key: str = "val_acc", test_key: str = "test_acc"
    ) -> None:
        self._describe = describe
        self.val_key, self.test_key = val_key, test_key
        self.history: list[dict[str, float]] = []

    def describe(self, trainer, pl_module) -> Mapping[str, Any]:
        """What identifies the run; the ``describe`` argument, else ``describe_run``."""
        return (self._describe or describe_run)(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = _scalar(trainer.callback_metrics.get(self.val_key))
        if value is not None:
            self.history.append({"epoch": trainer.current_epoch, self.val_key: value})

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
        record.update(self.describe(trainer, pl_module))
        metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        if stage == "fit":
            record[f"{self.val_key}_per_epoch"] = self.history
            record["epochs"] = trainer.current_epoch
            record["global_step"] = trainer.global_step
            exported = getattr(pl_module, "exported_adapter", None)
            record["exported"] = str(exported) if exported else None
        key = self.test_key if stage == "test" else self.val_key
        if metrics.get(key) is not None:
            record[key] = metrics[key]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(record, indent=2, sort_keys=True).encode())


def read_metrics(folder: str | Path) -> dict[str, Any]:
    """Read a run's metrics file (``<folder>/metrics.json``)."""
    return json.loads((Path(folder) / METRICS_FILE).read_text())


def finished_metrics(folder: Path) -> dict[str, Any] | None:
    """The newest metrics file under ``folder`` that has a test accuracy, if any: what a
    sweep reuses instead of training that run again."""
    files = sorted(folder.glob(f"**/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime)
    for path in reversed(files):
        record = read_metrics(path.parent)
        if record.get("test_acc") is not None:
            return record
    return None


def head_parameter_counts(model: torch.nn.Module, head: torch.nn.Module) -> dict[str, int]:
    """Trainable and total parameters of ``model``; ``trainable_without_head`` is what PEFT
    tables report (a new classifier ``head`` excluded)."""
    report = param_report(model)
    head_trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
    return {
        "trainable": report.trainable,
        "total": report.total,
        "head": head_trainable,
        "trainable_without_head": report.trainable - head_trainable,
    }


# --- sweep tables and plots ------------------------------------------------------------------


def write_sweep_csv(path: Path, header: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """A sweep's CSV: floats to 4 decimals, ``params_M`` to 6 (millions to one parameter)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(header), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _sweep_cell(k, v) for k, v in row.items()})


def _sweep_cell(column: str, value: Any) -> Any:
    if not isinstance(value, float):
        return value
    return f"{value:.6f}" if column == "params_M" else f"{value:.4f}"


def plot_accuracy_vs_params(
    path: Path,
    points: Sequence[tuple[str, float, float, float | None]],
    ylabel: str,
    title: str,
) -> None:
    """One point per method, ``(method, params_M, accuracy, std or None)``, on a log
    parameter axis that is linear near 0 (BitFit-sized methods stay visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, x, y, std in points:
        if std is None:
            ax.scatter([x], [y], s=40)
        else:
            ax.errorbar([x], [y], yerr=[std], fmt="o", capsize=3)
        ax.annotate(method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("trainable parameters without the head (M)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- tuning modes of a classifier ----------------------------------------------------------

TUNINGS = ("peft", "full", "linear")


def with_head(method: AdapterConfig, head: str) -> AdapterConfig:
    """``method`` with the classifier ``head`` among its ``modules_to_save``."""
    saved = tuple(method.modules_to_save or ())
    if head in saved:
        return method
    return dataclasses.replace(method, modules_to_save=(*saved, head))


def check_tuning(tuning: str, method: Any | None, train_head: bool) -> None:
    """A clear ``ConfigError`` unless ``tuning`` is one of ``TUNINGS`` and agrees with
    ``method`` (needed by "peft", refused otherwise) and ``train_head`` ("linear" trains the
    head only)."""
    if tuning not in TUNINGS:
        raise ConfigError(
            f"tuning must be one of {TUNINGS}, got {tuning!r}: 'peft' trains a method config, "
            "'full' fine-tunes every parameter, 'linear' trains the head only."
        )
    if tuning == "peft" and method is None:
        raise ConfigError(
            "tuning='peft' needs a method: pass --model.method (e.g. --config "
            "configs/vision/lora.yaml), or choose --model.tuning full / linear."
        )
    if tuning != "peft" and method is not None:
        raise ConfigError(
            f"tuning={tuning!r} trains without an adapter, but a method was given; drop "
            "--model.method or use tuning='peft'."
        )
    if tuning == "linear" and not train_head:
        raise ConfigError("tuning='linear' trains the head only, so train_head must be true.")


__all__ = [
    "LOG_NAME",
    "METRICS_FILE",
    "TUNINGS",
    "EpochShuffle",
    "ExactAccuracy",
    "MetricsFile",
    "check_tuning",
    "default_loggers",
    "default_precision",
    "describe_run",
    "read_metrics",
    "with_head",
]
