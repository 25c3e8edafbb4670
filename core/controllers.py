"""Training-time controllers: the one mechanism by which methods act between steps.

Some methods change their structure while training: AdaLoRA prunes singular values to a
shrinking budget, IncreLoRA and TriAdaptLoRA add rank where it matters most, dynamic-rank
DoRA prunes rank-one components, DiffoRA picks the modules that keep an adapter. Each of
them exposes a ``Controller`` through its config (``cfg.controller(model, name,
total_steps)``); ``controllers_for(model)`` builds one per adapter name and returns a
``ControllerSet``, which a training loop calls at two points of every optimizer step:

* ``after_backward(model, step)``: the gradients of this step are in ``.grad``, the
  optimizer has not stepped yet;
* ``after_step(model, step)``: right after ``optimizer.step()``, gradients still in
  ``.grad`` (before ``zero_grad``). Structural changes (masks, new rank) happen here.

``step`` counts optimizer steps, this one included: 1, 2, ..., ``total_steps``. What a
controller decides lives in its adapters' persistent buffers (rank masks, active ranks,
selections), so ``core.save_adapter`` / ``core.load_adapter`` reproduce the trained
structure exactly; ``state_dict`` / ``load_state_dict`` carry only what is needed to
*resume* training (importance averages, counters).

``core.lightning.PeftModule`` makes these calls itself. A plain PyTorch loop::

    controllers = core.controllers.controllers_for(model, total_steps=num_steps)
    for step, batch in enumerate(loader, start=1):
        loss = task_loss(model, batch)
        extra = core.aux_loss(model)            # regularisers adapters expose
        (loss if extra is None else loss + extra).backward()
        controllers.after_backward(model, step)
        optimizer.step()
        controllers.after_step(model, step)
        optimizer.zero_grad()

Methods subclass ``Controller``; ``core.controllers`` never imports a method.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .errors import ConfigError
from .layers import Adapter
from .targeting import adapted_modules


class Controller:
    """Base class of a method's controller for one named adapter (hooks do nothing).

    Args:
        name: the adapter name this controller drives.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def adapters(self, model: nn.Module) -> dict[str, Adapter]:
        """This controller's adapters by module name, in model order."""
        return {
            p: w.adapters[self.name] for p, w in adapted_modules(model) if self.name in w.adapters
        }

    def after_backward(self, model: nn.Module, step: int) -> None:
        """Gradients of optimizer step ``step`` are present; the optimizer has not stepped."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """The optimizer has taken step ``step``; gradients are still present."""

    def metrics(self, model: nn.Module) -> dict[str, float]:
        """Numbers worth logging (e.g. the total rank and the budget)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs beyond the adapter's own tensors."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output."""


def needs_total_steps(method: str, total_steps: int | None, field: str) -> int:
    """``total_steps`` or a clear error naming the config field that would supply it."""
    if total_steps is None or total_steps < 1:
        raise ConfigError(
            f"{method}'s schedule needs the run's length: set the config field {field} or pass "
            "total_steps to core.controllers.controllers_for (PeftModule passes the trainer's "
            "estimated_stepping_batches; set Trainer(max_steps=...) or max_epochs)."
        )
    return int(total_steps)


class ControllerSet:
    """The controllers of every adapter in a model, called together.

    A ``ControllerSet()`` starts empty; ``attach`` builds the controllers for a model (state
    loaded earlier with ``load_state_dict`` is applied then, as when Lightning restores a
    checkpoint before the fit starts).
    """

    def __init__(self, controllers: dict[str, Controller] | None = None) -> None:
        self.controllers: dict[str, Controller] = dict(controllers or {})
        self._pending_state: dict[str, Any] = {}
        self._step: int | None = None

    def __len__(self) -> int:
        return len(self.controllers)

    def attach(self, model: nn.Module, total_steps: int | None = None) -> ControllerSet:
        """(Re)build the controllers for ``model``, keeping the state known so far."""
        state = {**self._pending_state, **self.state_dict()}
        self.controllers = _build(model, total_steps)
        self._pending_state = {}
        self.load_state_dict(state)
        return self

    def after_backward(self, model: nn.Module, step: int) -> None:
        self._step = step
        for controller in self.controllers.values():
            controller.after_backward(model, step)

    def after_step(self, model: nn.Module, step: int | None = None) -> None:
        """Call after ``optimizer.step()``; ``step`` defaults to the one ``after_backward``
        saw (without one since the last step, nothing happens)."""
        step = self._step if step is None else step
        if step is None:  # no backward since the last step (e.g. a skipped batch)
            return
        for controller in self.controllers.values():
            controller.after_step(model, step)
        self._step = None

    def metrics(self, model: nn.Module) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, controller in self.controllers.items():
            out.update({f"{name}/{k}": v for k, v in controller.metrics(model).items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {name: c.state_dict() for name, c in self.controllers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore each controller's state; states of controllers not built yet wait for
        ``attach``."""
        for name, sub in (state or {}).items():
            if name in self.controllers:
                self.controllers[name].load_state_dict(sub)
            else:
                self._pending_state[name] = sub


def _build(model: nn.Module, total_steps: int | None) -> dict[str, Controller]:
    built: dict[str, Controller] = {}
    seen: dict[str, Any] = {}
    for _, wrapper in adapted_modules(model):
        for name, adapter in wrapper.adapters.items():
            seen.setdefault(name, adapter.config)
    for name, cfg in seen.items():
        make = getattr(cfg, "controller", None)
        controller = make(model, name, total_steps) if callable(make) else None
        if controller is not None:
            built[name] = controller
    return built


def controllers_for(model: nn.Module, total_steps: int | None = None) -> ControllerSet:
    """One controller per adapter name whose method has one (others need none).

    ``total_steps`` is the run's number of optimizer steps; methods whose schedule is a
    fraction of the run read it unless their config fixes it.
    """
    return ControllerSet(_build(model, total_steps))


__all__ = ["Controller", "ControllerSet", "controllers_for", "needs_total_steps"]
