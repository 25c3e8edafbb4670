"""Putting omnipeft's adapter weights into HF PEFT, and checking both compute the same.

``to_peft`` writes the adapter with ``core.interop.save_peft`` and loads the folder with
``PeftModel.from_pretrained``, so PEFT builds its own config class (``LoraConfig``,
``BOFTConfig``, ``LoraConfig(use_dora=True)``, ...) from the same fields and holds the same
weights. ``check_parity`` then runs both on the task's batch and raises ``ParityError``
when outputs, losses or input gradients differ: timing two models that compute different
functions would compare different work.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from core.interop import save_peft

from .models import Task

OUTPUT_TOL = 2e-4  # max abs output difference, relative to the outputs' largest magnitude
MIN_EFFECT = 20 * OUTPUT_TOL  # the adapter must move the outputs well past that tolerance
GRAD_TOL = 2e-3  # max relative difference of the input gradients


class ParityError(AssertionError):
    """omnipeft and PEFT disagree, so their timings would compare different work."""


def to_peft(
    ours: nn.Module, base: nn.Module, names: Sequence[str] = ("default",), trainable: bool = True
) -> nn.Module:
    """A ``PeftModel`` over ``base`` holding omnipeft adapters ``names`` of ``ours``."""
    from peft import PeftModel

    first, *rest = names
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. BOFT's "CUDA extension not found" on CPU
        folder = Path(tmp)
        save_peft(ours, folder / first, name=first)
        model = PeftModel.from_pretrained(
            base, folder / first, adapter_name=first, is_trainable=trainable
        )
        for name in rest:
            save_peft(ours, folder / name, name=name)
            model.load_adapter(folder / name, adapter_name=name, is_trainable=trainable)
    return model


def peft_config_class(model: nn.Module) -> str:
    """The PEFT config class a ``PeftModel`` built, as ``peft.<Class>`` (+ DoRA flag)."""
    config = model.peft_config[model.active_adapter]
    name = f"peft.{type(config).__name__}"
    return name + "(use_dora=True)" if getattr(config, "use_dora", False) else name


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_parity(
    label: str,
    task: Task,
    ours: nn.Module,
    theirs: nn.Module,
    loss_ours: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    loss_theirs: Callable[[nn.Module, torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """Same outputs (eval), same loss and same gradient w.r.t. the input images (train);
    every trainable tensor of both gets a gradient. The losses take (model, images)."""
    for model in (task.base, ours, theirs):
        model.eval()
    with torch.no_grad():
        y_base, y_ours, y_theirs = (task.outputs(m) for m in (task.base, ours, theirs))
    scale = max(1.0, y_theirs.abs().max().item())
    out_diff = (y_ours - y_theirs).abs().max().item()
    effect = (y_ours - y_base).abs().max().item()
    if not out_diff <= OUTPUT_TOL * scale:
        raise ParityError(f"{label}: outputs differ by {out_diff:.3g} (scale {scale:.3g})")
    if effect < MIN_EFFECT * scale:
        raise ParityError(f"{label}: the adapter barely changes the output ({effect:.3g})")

    losses, grads = [], []
    for model, loss_fn in ((ours, loss_ours), (theirs, loss_theirs)):
        model.train()
        model.zero_grad(set_to_none=True)
        images = task.inputs.clone().requires_grad_(True)
        loss = loss_fn(model, images)
        loss.backward()
        losses.append(loss.item())
        grads.append(images.grad)
        starved = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if starved:
            raise ParityError(f"{label}: trainable tensors without a gradient: {starved[:3]}")
        model.zero_grad(set_to_none=True)
    loss_diff = abs(losses[0] - losses[1])
    grad_diff = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
    if not loss_diff <= OUTPUT_TOL * max(1.0, abs(losses[1])):
        raise ParityError(f"{label}: training losses differ: {losses[0]:.6g} vs {losses[1]:.6g}")
    if not grad_diff <= GRAD_TOL:
        raise ParityError(f"{label}: input gradients differ by {grad_diff:.3g} (relative)")
    return {
        "output_max_abs_diff": out_diff,
        "adapter_effect": effect,
        "loss_abs_diff": loss_diff,
        "input_grad_rel_diff": grad_diff,
    }
