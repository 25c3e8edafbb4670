"""The Lightning base every domain module builds on: inject, optimise, checkpoint adapters.

A domain subclasses ``PeftModule`` and writes two methods, ``build_model`` (the frozen
backbone) and ``compute_loss`` (task loss + metrics for one batch). The base injects the
method config, adds the regularisers adapters expose to the loss, puts only trainable
parameters in AdamW, and makes every Lightning checkpoint adapter-only: a ``.ckpt`` holds
the adapter's tensors (and anything else trainable), never the frozen base weights, so
``build_model`` must rebuild the same base (pretrained weights, or a fixed seed).

``method=None`` runs the baselines every PEFT table compares against: no adapter is
injected and whatever ``build_model`` leaves trainable trains (everything: full
fine-tuning; only the new head: a linear probe). Checkpoints then hold the trained
tensors, and the export at fit end is ``trained.safetensors`` instead of an adapter folder.

Hyperparameters hold the method as a plain ``{"class_path", "init_args"}`` dict, the
form LightningCLI configs use, so checkpoints load with ``torch.load(weights_only=True)``
and ``hparams.yaml`` is readable YAML.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import lightning
import torch
import torch.nn as nn

from .checkpoint import atomic_write, read_checkpoint
from .config import AdapterConfig
from .controllers import ControllerSet
from .errors import CheckpointError, ConfigError
from .inject import adapter_config, aux_loss, inject
from .methods.mixtures import expert_loads
from .methods.sparse import DiffPruning, prune, select
from .registry import METHODS
from .report import param_report
from .targeting import adapted_modules, find_targets

SCHEDULES = ("cosine", "constant")
MethodArg = AdapterConfig | dict[str, Any]
"""How subclasses annotate ``method``: a config, or its ``{"class_path", "init_args"}`` dict."""
METHODS_PACKAGE = "core.methods."
MODEL_ATTR = "model"  # the backbone lives at ``self.model``: state keys start "model."
TRAINED_FILE = "trained.safetensors"  # the export of a run without an adapter (method=None)
TRAINED_FORMAT = "omnipeft.trained"

try:  # LightningCLI: let `method: {class_path: core.LoRA, init_args: ...}` pick any method.
    from jsonargparse import set_parsing_settings

    set_parsing_settings(subclasses_enabled=[AdapterConfig])
except (ImportError, TypeError):  # older jsonargparse: PeftModule still accepts the dict
    pass


# --- the method config as plain data --------------------------------------------------


def method_spec(cfg: AdapterConfig) -> dict[str, Any]:
    """``cfg`` as ``{"class_path", "init_args"}``: YAML/JSON-safe and loadable without pickle."""
    cls = type(cfg)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": cfg.to_dict()}


def _registered_class(class_path: str) -> type[AdapterConfig] | None:
    import core

    for name, cls in METHODS.items():
        aliases = {name, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"}
        if getattr(core, cls.__qualname__, None) is cls:
            aliases.add(f"core.{cls.__qualname__}")
        if class_path in aliases:
            return cls
    return None


def _method_class(class_path: str) -> type[AdapterConfig]:
    # Only registered methods resolve, so a checkpoint's hparams can never import arbitrary
    # code; the one import allowed is omnipeft's own method module a path names
    # ("core.methods.prompts.VPT" registers VPT by importing core.methods.prompts).
    cls = _registered_class(class_path)
    module, _, _ = class_path.rpartition(".")
    if cls is None and module.startswith(METHODS_PACKAGE) and module.count(".") == 2:
        with contextlib.suppress(ImportError):  # a misspelt module: the error below says so
            importlib.import_module(module)
        cls = _registered_class(class_path)
    if cls is not None:
        return cls
    known = sorted(f"{c.__module__}.{c.__qualname__}" for c in METHODS.values())
    raise ConfigError(
        f"method class_path {class_path!r} names no registered method; known: {known} "
        f"(or their registry names {sorted(METHODS)}). Import the module that defines a "
        "custom method before building the model."
    )


def method_from_spec(method: AdapterConfig | Mapping[str, Any]) -> AdapterConfig:
    """Accept a config, or the ``{"class_path", "init_args"}`` dict configs and hparams hold."""
    if isinstance(method, AdapterConfig):
        return method
    if isinstance(method, Mapping) and isinstance(method.get("class_path"), str):
        cls = _method_class(method["class_path"])
        init_args = dict(method.get("init_args") or {})
        try:
            return cls(**init_args)
        except TypeError as err:
            raise ConfigError(f"init_args do not fit {cls.__name__}: {err}") from None
    raise ConfigError(
        "method must be a method config such as core.LoRA(targets=['qkv']) or a dict "
        "{'class_path': 'core.LoRA', 'init_args': {'targets': ['qkv']}}, "
        f"got {type(method).__name__} {method!r}."
    )


# --- learning-rate schedule -------------------------------------------------------------


def lr_factor(step: int, *, warmup_steps: int, total_steps: int | None, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Linear warmup from 1/warmup_steps to 1 over ``warmup_steps`` steps, then constant or a
    half cosine that reaches 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# --- the module ------------------------------------------------------------------------


class PeftModule(lightning.LightningModule):
    """Base LightningModule for PEFT: a frozen backbone with one trainable adapter.

    Args:
        method: the method config (e.g. ``core.LoRA(targets=["qkv"])``) or its
            ``{"class_path", "init_args"}`` dict, as LightningCLI passes it; None injects no
            adapter and trains what ``build_model`` leaves trainable (full fine-tuning or a
            linear probe, see the module docstring).
        adapter_name: name of the adapter injected, trained, saved and exported.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay, applied to matrices only (not to biases, norm
            scales or other 1-D parameters, where decay only hurts).
        betas: AdamW betas.
        warmup_steps: optimizer steps of linear warmup (0 for none).
        scheduler: "cosine" (decay to 0 over the run, needs max_steps or max_epochs) or
            "constant" (after warmup). Both step once per optimizer step.
        init_adapter: an exported adapter folder (``core.save_adapter``; with method=None a
            ``trained.safetensors`` file or its folder) whose values replace the fresh
            adapter's after building: ``validate``/``test`` of a saved adapter, or a warm
            start. Its method config must equal ``method``.

    Subclasses implement ``build_model`` and ``compute_loss``. Their own ``__init__``
    arguments are collected into ``self.hparams`` before ``build_model`` runs, so read them
    there (``self.hparams.num_classes``); do not call ``save_hyperparameters`` again.
    Set ``build_in_configure_model = True`` to build in ``configure_model`` instead of
    ``__init__``: the backbone is then created under the trainer's device/precision/sharding
    context, which large models need.
    """

    build_in_configure_model: ClassVar[bool] = False
    # Training batches GPS / SPT score before training to choose their entries.
    selection_batches: ClassVar[int] = 8

    def __init__(
        self,
        method: MethodArg | None,
        adapter_name: str = "default",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        scheduler: str = "cosine",
        init_adapter: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.method = None if method is None else method_from_spec(method)
        self.adapter_name = adapter_name
        _check_optim(lr, weight_decay, betas, warmup_steps, scheduler)
        # Collects this and every subclass __init__'s arguments (or LightningCLI's config);
        # then the method is replaced by its plain-dict form so no dataclass gets pickled.
        self.save_hyperparameters()
        self.save_hyperparameters({"method": self.method_spec()})
        if init_adapter is not None:
            self.save_hyperparameters({"init_adapter": str(init_adapter)})
        self.strict_loading = False  # checkpoints hold the adapter only
        self.exported_adapter: Path | None = None
        self.controllers = ControllerSet()  # methods' training-time controllers, see on_fit_start
        self.model: nn.Module | None = None
        if not self.build_in_configure_model:
            self._build()

    # -- what subclasses write ------------------------------------------------------------

    def build_model(self) -> nn.Module:
        """Return the backbone (pretrained, not yet adapted). Runs once."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_model()")

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return (task loss, extra metrics to log) for one batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_loss(batch)")

    # -- building -------------------------------------------------------------------------

    def _build(self) -> None:
        model = self.build_model()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}.build_model() must return an nn.Module, "
                f"got {type(model).__name__}."
            )
        if self.method is not None:
            model = inject(model, self.method, name=self.adapter_name)
        self.model = model
        if self.hparams.get("init_adapter"):
            self.load_exported(self.hparams.init_adapter)

    def method_spec(self) -> dict[str, Any] | None:
        """The method as ``{"class_path", "init_args"}`` (None without an adapter)."""
        return None if self.method is None else method_spec(self.method)

    def configure_model(self) -> None:
        if self.model is None:
            self._build()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    # -- steps ----------------------------------------------------------------------------

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Task loss plus the regularisers active adapters expose (``core.aux_loss``)."""
        task, logs = self._loss_and_logs(batch)
        aux = aux_loss(self.model)
        loss = task if aux is None else task + aux
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_task_loss", task)
        if aux is not None:
            self.log("train_aux_loss", aux)
        self._log_extras("train", logs)
        self._log_expert_load()
        return loss

    def _log_expert_load(self) -> None:
        """Mixtures (``core.methods.mixtures``): mean routing weight per expert and module."""
        for key, load in expert_loads(self.model).items():
            for expert, share in enumerate(load.tolist()):
                self.log(f"expert_load/{key}/{expert}", share)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step("test", batch)

    def _loss_and_logs(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.compute_loss(batch)
        if isinstance(out, torch.Tensor):
            return out, {}
        loss, logs = out
        return loss, dict(logs or {})

    def _eval_step(self, stage: str, batch: Any) -> torch.Tensor:
        loss, logs = self._loss_and_logs(batch)
        self.log(f"{stage}_loss", loss, prog_bar=True, sync_dist=True)
        self._log_extras(stage, logs, sync_dist=True)
        return loss

    def _log_extras(self, stage: str, logs: dict[str, Any], sync_dist: bool = False) -> None:
        for key, value in logs.items():
            self.log(f"{stage}_{key}", value, sync_dist=sync_dist)

    # -- optimisation ---------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """AdamW over trainable parameters only; optional warmup + cosine, stepped per step."""
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                (decay if param.ndim >= 2 else no_decay).append(param)
        if not decay and not no_decay:
            raise ConfigError(
                "nothing is trainable: the method froze every parameter. Check `targets` "
                "and that build_model() does not freeze the adapter afterwards."
            )
        hp = self.hparams
        groups = [
            {"params": params, "weight_decay": wd}
            for params, wd in ((decay, hp.weight_decay), (no_decay, 0.0))
            if params
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        if hp.scheduler == "constant" and hp.warmup_steps == 0:
            return optimizer
        total = None
        if hp.scheduler == "cosine":
            total = self.trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ConfigError(
                    "scheduler='cosine' needs the run's length: set Trainer(max_steps=...) or "
                    "max_epochs, or use scheduler='constant'."
                )
            total = int(total)
        factor = partial(
            lr_factor, warmup_steps=hp.warmup_steps, total_steps=total, schedule=hp.scheduler
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    # -- reporting and export -------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Before the optimizer exists: let GPS / SPT choose their entries on task data."""
        if stage == "fit" and self.model is not None and self.method is not None:
            self._select_sparse_entries()

    def _select_sparse_entries(self) -> None:
        pending = [
            w.adapters[self.adapter_name]
            for _, w in adapted_modules(self.model)
            if self.adapter_name in w.adapters
            and callable(getattr(w.adapters[self.adapter_name], "is_selected", None))
            and not w.adapters[self.adapter_name].is_selected()
        ]
        if not pending:
            return
        loader = self._train_loader()
        batches = list(itertools.islice(iter(loader), self.selection_batches))
        was_training = self.model.training
        self.model.eval()  # dropout-free, reproducible gradient scores
        select(
            self.model,
            batches,
            loss_fn=lambda _m, b: self._loss_and_logs(b)[0],
            name=self.adapter_name,
        )
        self.model.train(was_training)

    def _train_loader(self) -> Any:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            return datamodule.train_dataloader()
        source = getattr(self.trainer.fit_loop, "_data_source", None)  # fit(train_dataloaders=)
        if source is not None and source.is_defined():
            return source.dataloader()
        raise ConfigError(
            "GPS/SPT choose their entries from training batches before the optimizer is "
            "built, but the trainer has no training data yet; pass a datamodule or "
            "train_dataloaders to Trainer.fit."
        )

    def on_fit_start(self) -> None:
        """Set train mode, print the parameter table once, send the counts to the loggers."""
        self.set_train_mode()
        report = param_report(self.model)
        self.print(str(report))
        for logger in self.loggers:  # self.log is not allowed in on_fit_start
            logger.log_metrics(
                {"params_trainable": report.trainable, "params_total": report.total}, step=0
            )
        steps = self.trainer.estimated_stepping_batches  # rank schedules need the run's length
        self.controllers.attach(self.model, int(steps) if math.isfinite(steps) else None)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradients are complete: controllers (``core.controllers``) read them here."""
        self.controllers.after_backward(self.model, self.trainer.global_step + 1)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the controllers' structural updates (e.g. rank masks)."""
        super().optimizer_step(*args, **kwargs)
        self.controllers.after_step(self.model)
        self._prune_when_due()

    def _prune_when_due(self) -> None:
        """Diff pruning: after ``prune_at`` of the run, magnitude-prune to the target density
        and go on training the kept entries with a new optimizer (their parameters are new;
        the schedule starts again for this phase)."""
        cfg = self.method
        if not isinstance(cfg, DiffPruning) or cfg.kept or cfg.prune_at is None:
            return
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or self.trainer.global_step < cfg.prune_at * total:
            return
        prune(self.model, self.adapter_name)
        self.method = adapter_config(self.model, self.adapter_name)  # now lists kept entries
        self.hparams["method"] = self.method_spec()  # so checkpoints rebuild phase 2
        self.trainer.strategy.setup_optimizers(self.trainer)

    def set_train_mode(self) -> None:
        """``train()``, except norm layers whose running statistics the checkpoint omits.

        Backbones often arrive in eval mode (``from_pretrained``) and Lightning keeps module
        modes as found, so training would silently run without dropout. But a frozen
        BatchNorm in train mode would update its running statistics: the base would drift
        and the adapter-only checkpoint would no longer reproduce the trained model.
        """
        self.train()
        saved = set(self.adapter_state_dict())
        for name, module in self.named_modules():
            stats = getattr(module, "running_mean", None)
            if isinstance(stats, torch.Tensor) and f"{name}.running_mean" not in saved:
                module.eval()

    def export_adapter(self, path: str | Path) -> Path:
        """Write the adapter as an omnipeft adapter folder (``core.save_adapter``); without
        an adapter (method=None), the trained tensors as ``<path>/trained.safetensors``."""
        from .checkpoint import save_adapter

        if self.method is None:
            return save_trained(self.model, self.adapter_state_dict(), path)
        return save_adapter(self.model, path, name=self.adapter_name)

    def load_exported(self, path: str | Path) -> None:
        """Load what ``export_adapter`` wrote into this module's model (see ``init_adapter``)."""
        from .checkpoint import load_adapter

        if self.method is None:
            load_trained(self.model, path)
            return
        meta, _ = read_checkpoint(path)
        saved = meta.get("config", {})
        ours = self.method.to_dict()
        differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if meta.get("method") != self.method.method or differ:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs {ours.get(k)!r}" for k in differ)
            raise CheckpointError(
                f"the adapter in {path} was trained as {meta.get('method')!r} with another "
                f"config than this module's {self.method.method!r} ({detail}). Build the module "
                "with the method config the adapter was trained with."
            )
        load_adapter(self.model, path, name=self.adapter_name, trainable=True)

    def on_train_end(self) -> None:
        """Export the adapter to ``<log_dir or default_root_dir>/adapter`` (rank zero);
        without an adapter, the trained tensors to ``.../trained/trained.safetensors``."""
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir  # every rank calls it
        if self.trainer.is_global_zero:
            folder = "adapter" if self.method is not None else "trained"
            self.exported_adapter = self.export_adapter(Path(log_dir) / folder)
            self.print(f"{folder} exported to {self.exported_adapter}")

    # -- adapter-only Lightning checkpoints -----------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The part of ``self.state_dict()`` a checkpoint keeps: the adapter's tensors,
        its ``modules_to_save`` and any other trainable parameter, under their real keys.
        Without an adapter: the trainable parameters and the buffers (e.g. BatchNorm
        statistics) of the modules that train in full."""
        if self.method is None:
            return self._trained_state_dict()
        prefix, name = f"{MODEL_ATTR}.", self.adapter_name
        keep: set[str] = set()
        for path, wrapper in adapted_modules(self.model):
            if name in wrapper.adapters:
                owned = wrapper.adapters[name].state_dict(prefix=f"{prefix}{path}.adapters.{name}.")
                keep.update(owned)
        saved = adapter_config(self.model, name).modules_to_save
        for path, module in find_targets(self.model, saved) if saved else []:
            keep.update(module.state_dict(prefix=f"{prefix}{path}."))
        keep.update(n for n, p in self.named_parameters() if p.requires_grad)
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def _trained_state_dict(self) -> dict[str, torch.Tensor]:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        for name, module in self.named_modules():
            params = list(module.parameters(recurse=False))
            if params and all(p.requires_grad for p in params):
                persistent = set(module._buffers) - module._non_persistent_buffers_set
                keep.update(f"{name}.{b}" for b in persistent if module._buffers[b] is not None)
        return {k: v for k, v in self.state_dict().items() if k in keep}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = self.adapter_state_dict()
        checkpoint["omnipeft"] = {"adapter_name": self.adapter_name, **(self.method_spec() or {})}
        checkpoint["omnipeft_controllers"] = self.controllers.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint fits before anything loads, then fill in the frozen base.

        Unknown keys, wrong shapes or missing adapter tensors raise ``CheckpointError``; the
        base's own tensors are added so that loading is complete (no missing-key warnings).
        """
        self.configure_model()
        state = checkpoint.get("state_dict") or {}
        own = self.state_dict()
        unknown = sorted(k for k in state if k not in own)
        if unknown:
            raise CheckpointError(
                f"the checkpoint has {len(unknown)} tensor(s) this {type(self).__name__} does not: "
                f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}. It was saved from another "
                f"model, method config or adapter name (this module has adapter "
                f"{self.adapter_name!r}, method "
                f"{self.method.method if self.method else None!r}); build the module with "
                "the same arguments it was trained with."
            )
        wrong = [
            f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
            for k in sorted(state)
            if isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
        ]
        missing = sorted(k for k in self.adapter_state_dict() if k not in state)
        if wrong or missing:
            raise CheckpointError(
                "the checkpoint does not fit this module's adapter:\n  "
                + "\n  ".join(wrong[:8] + [f"missing {k}" for k in missing[:8]])
                + "\nIt was saved with another method config (e.g. rank) or adapter name."
            )
        checkpoint["state_dict"] = {**own, **state}
        self.controllers.load_state_dict(checkpoint.get("omnipeft_controllers") or {})


# --- the export of a run without an adapter ----------------------------------------------


def save_trained(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``state`` (keys under ``model.``) to ``<path>/trained.safetensors``, keyed by the
    model's own state-dict names, atomically."""
    import safetensors.torch

    prefix = f"{MODEL_ATTR}."
    tensors = {k.removeprefix(prefix): v.detach().contiguous().cpu() for k, v in state.items()}
    if any(t.is_meta for t in tensors.values()):
        raise CheckpointError("the model lives on the meta device; there is nothing to save.")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    blob = safetensors.torch.save(tensors, metadata={"format": TRAINED_FORMAT})
    atomic_write(folder / TRAINED_FILE, blob)
    return folder


def load_trained(model: nn.Module, path: str | Path) -> None:
    """Load ``save_trained``'s file (or its folder) into ``model``; every tensor must exist
    in the model with the same shape, else nothing changes and ``CheckpointError`` says why."""
    import safetensors.torch

    file = Path(path)
    file = file / TRAINED_FILE if file.is_dir() else file
    if not file.is_file():
        raise CheckpointError(
            f"{file} does not exist; give the {TRAINED_FILE} (or its folder) that a run "
            "without an adapter exported at the end of fit."
        )
    tensors = safetensors.torch.load_file(str(file))
    own = model.state_dict()
    problems = [f"unexpected {k}" for k in sorted(tensors) if k not in own]
    problems += [
        f"{k}: file {list(v.shape)} vs model {list(own[k].shape)}"
        for k, v in sorted(tensors.items())
        if k in own and v.shape != own[k].shape
    ]
    if problems:
        raise CheckpointError(
            f"{file} does not fit this model:\n  "
            + "\n  ".join(problems[:8])
            + "\nLoad it into the backbone it was trained from."
        )
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value.to(own[key].dtype))


def _check_optim(
    lr: float, weight_decay: float, betas: tuple[float, float], warmup_steps: int, scheduler: str
) -> None:
    problems = []
    if not (isinstance(lr, int | float) and lr > 0):
        problems.append(f"lr must be > 0, got {lr!r}")
    if not (isinstance(weight_decay, int | float) and weight_decay >= 0):
        problems.append(f"weight_decay must be >= 0, got {weight_decay!r}")
    if len(tuple(betas)) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        problems.append(f"betas must be two numbers in [0, 1), got {betas!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        problems.append(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    if scheduler not in SCHEDULES:
        problems.append(f"scheduler must be one of {SCHEDULES}, got {scheduler!r}")
    if problems:
        raise ConfigError("PeftModule optimizer settings: " + "; ".join(problems) + ".")


__all__ = [
    "MethodArg",
    "PeftModule",
    "load_trained",
    "lr_factor",
    "method_from_spec",
    "method_spec",
    "save_trained",
]
