"""The wrapper that holds named adapters around one frozen base module.

``AdaptedModule`` replaces a base module in its parent. It keeps the base module itself
(same parameter objects, dtype and device; nothing is copied) under ``base_layer`` and
its adapters, by name, under ``adapters``. Its forward is

    x' = pre_n(...pre_1(x))            adapters that act on the input (e.g. OFT rotations)
    y  = base_layer(x', ...)           or one adapter's run_base(x', base) (a changed weight)
    y  = post_n(x, ...post_1(x, y))    adapters that act on the output (e.g. LoRA: y + s B A x)

over the active, unmerged adapters in order. A merged adapter is already inside the base
weight and is skipped.

Fast path: when the base is a plain linear layer and every running adapter is a low-rank
update of it (``lowrank_factors``), the wrapper runs ``core.kernels.lora_linear`` instead,
which computes the base GEMM and the updates in one output write (several adapters as one
concatenated low-rank product). Inside ``core.batch_adapters`` a per-sample router (set
in ``routing``) takes the call instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import MergeError
from .kernels import lora_linear


class Adapter(nn.Module):
    """One named adapter on one base module. Methods subclass this.

    An adapter acts through ``pre`` (on the input), ``post`` (on the output) or, when it
    sets ``replaces_base``, through ``run_base``, which computes the base module's output
    itself (e.g. with a transformed weight) so the frozen forward is not run twice.
    """

    replaces_base: bool = False
    # Whether each sample's output depends on that sample alone, so ``core.batch_adapters``
    # may route samples of one batch through different adapters. None: decided by the
    # method (weight-space methods, ``config.mergeable``, are); subclasses may say True/False.
    batch_separable: bool | None = None

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float, nn.Module | None] | None:
        """(A, B, scale, dropout) when this adapter only adds ``scale * B A dropout(x)`` to a
        linear base's output, so the wrapper may fuse it with the base GEMM; else None."""
        return None

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        """The base module's output computed by this adapter (only if ``replaces_base``)."""
        raise NotImplementedError

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Transform the input before the base module (identity by default)."""
        return x

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Transform the base output ``y`` given the original input ``x`` (identity)."""
        return y

    def merge(self, base: nn.Module) -> None:
        raise MergeError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge(self, base: nn.Module) -> None:
        raise MergeError(f"{type(self).__name__} cannot be unmerged.")

    def on_attach(self, base: nn.Module) -> None:
        """Called once when attached (PiSSA-style inits change the base weight here)."""

    def on_detach(self, base: nn.Module) -> None:
        """Undo whatever ``on_attach`` did to the base."""

    def aux_loss(self) -> torch.Tensor | None:
        """A regulariser the training loop adds to the task loss, or None."""
        return None

    def set_trainable(self, on: bool) -> None:
        """Mark what trains; methods with fixed parts keep those as buffers or override."""
        self.requires_grad_(on)


class AdaptedModule(nn.Module):
    """A frozen base module plus its named adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.routing: Any = None  # a per-sample router while core.batch_adapters runs

    def __getattr__(self, name: str) -> Any:
        # Code that reads `module.weight`, `module.in_features`, ... keeps working.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "adapters"):
                raise
            return getattr(self._modules["base_layer"], name)

    def running(self) -> list[Adapter]:
        return [self.adapters[n] for n in self.active if n not in self.merged]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.routing is not None:
            return self.routing(self, args, kwargs)
        return self.run_adapters(self.running(), args, kwargs)

    def run_adapters(self, running: list[Adapter], args: tuple, kwargs: dict) -> Any:
        """The forward with the given adapters (unmerged, in order) on top of the base."""
        if not running:
            return self.base_layer(*args, **kwargs)
        fused = fused_lowrank_forward(self.base_layer, running, args, kwargs)
        if fused is not None:
            return fused
        call = PrimaryCall.split(args, kwargs)
        h = call.x
        for adapter in running:
            h = adapter.pre(h)
        replacing = [a for a in running if a.replaces_base]
        if len(replacing) > 1:
            raise RuntimeError(
                f"adapters {[type(a).__name__ for a in replacing]} each recompute this base "
                "layer and cannot run together on it; activate one of them."
            )
        if replacing:
            y = replacing[0].run_base(h, self.base_layer, *call.args, **call.kwargs)
        else:
            y = call.run(self.base_layer, h)
        for adapter in running:
            y = adapter.post(call.x, y, self.base_layer)
        return y

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


# Keyword names under which frameworks pass a block's main input (transformers attention
# and MLP blocks are called with ``hidden_states=...``; diffusers with ``sample=...``).
PRIMARY_INPUT_NAMES = ("hidden_states", "x", "input", "sample", "input_ids", "inputs_embeds")


@dataclass
class PrimaryCall:
    """One call of a wrapped module split into its main input and everything else."""

    x: Any
    args: tuple
    kwargs: dict
    key: str | None  # the keyword the main input came under, None if positional

    @classmethod
    def split(cls, args: tuple, kwargs: dict) -> PrimaryCall:
        if args:
            return cls(args[0], args[1:], kwargs, None)
        for key in PRIMARY_INPUT_NAMES:
            if key in kwargs:
                rest = {k: v for k, v in kwargs.items() if k != key}
                return cls(kwargs[key], (), rest, key)
        raise TypeError(
            "an adapted module was called without a positional input or one of the keywords "
            f"{PRIMARY_INPUT_NAMES}; adapt a module whose main input is one of these."
        )

    def run(self, module: nn.Module, h: Any) -> Any:
        """Call ``module`` as the original call was made, with ``h`` as the main input."""
        if self.key is None:
            return module(h, *self.args, **self.kwargs)
        return module(**{self.key: h}, **self.kwargs)


# --- the fused low-rank path -------------------------------------------------------------


def linear_view(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as (out, in), bias) of a plain nn.Linear or transformers Conv1D, else None.
    Subclasses are left out on purpose: their forward may do more than x W^T + b."""
    if type(base) is nn.Linear:
        return base.weight, base.bias
    conv1d = transformers_conv1d_type()
    if conv1d is not None and type(base) is conv1d:
        return base.weight.t(), base.bias
    return None


def only_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The main input when the call carries nothing else, else None."""
    if len(args) == 1 and not kwargs:
        x = args[0]
    elif not args and len(kwargs) == 1 and next(iter(kwargs)) in PRIMARY_INPUT_NAMES:
        x = next(iter(kwargs.values()))
    else:
        return None
    return x if isinstance(x, torch.Tensor) else None


def active_dropout(dropout: nn.Module | None) -> nn.Module | None:
    if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
        return dropout
    return None


def stacked_factors(running: list[Adapter]) -> tuple | None:
    """One (A, B, scale, dropout) for all running adapters, or None when they are not all
    low-rank updates. Several adapters become one low-rank product of the summed rank,
    [A_1; A_2] and [s_1 B_1, s_2 B_2] (only without active dropout: each would see its own
    dropped-out input)."""
    factors = [adapter.lowrank_factors() for adapter in running]
    if any(f is None for f in factors):
        return None
    if len(factors) == 1:
        a, b, scale, dropout = factors[0]
        return a, b, scale, active_dropout(dropout)
    if any(active_dropout(f[3]) is not None for f in factors):
        return None
    a = torch.cat([f[0] for f in factors])
    b = torch.cat([f[1] * f[2] for f in factors], dim=1)
    return a, b, 1.0, None


def fused_lowrank_forward(
    base: nn.Module, running: list[Adapter], args: tuple, kwargs: dict
) -> torch.Tensor | None:
    """The base output plus every running low-rank update through ``lora_linear``, or None
    when this call does not fit (another base or adapter, extra arguments, hooks, dtypes)."""
    if base._forward_hooks or base._forward_pre_hooks:
        return None
    x, view = only_input(args, kwargs), linear_view(base)
    if x is None or view is None or x.device.type == "meta":
        return None
    stacked = stacked_factors(running)
    if stacked is None:
        return None
    (weight, bias), (a, b, scale, dropout) = view, stacked
    device = x.device.type
    tensors = [t for t in (x, weight, bias, a, b) if t is not None]
    if torch.is_autocast_enabled(device):  # cast as autocast does for every linear
        dtype = torch.get_autocast_dtype(device)
        if {t.dtype for t in tensors} - {torch.float32, dtype}:  # e.g. float64: left alone
            return None
        x, weight, a, b = (t.to(dtype) for t in (x, weight, a, b))
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            return lora_linear(x, weight, bias, a, b, scale, dropout)
    if (
        len({t.dtype for t in tensors}) != 1
    ):  # e.g. float32 adapters on a bfloat16 base: the generic path
        return None
    return lora_linear(x, weight, bias, a, b, scale, dropout)


# --- views of common base layers as a 2-D weight ------------------------------------------


@functools.lru_cache(maxsize=1)  # asked on every fused-path call; the answer is fixed
def transformers_conv1d_type() -> type | None:
    """transformers' GPT-2 style ``Conv1D`` (a Linear with its weight stored (in, out))."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional for core
        return None
    return Conv1D


def is_fan_in_fan_out(module: nn.Module) -> bool:
    conv1d = transformers_conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def conv_forward(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, **overrides: Any):
    """Run ``conv``'s own geometry (stride, padding, ...) with another weight and no bias."""
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]
    opts = {
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "groups": conv.groups,
    }
    opts.update(overrides)
    return fn(x, weight, None, **opts)


def weight_dtype(base: nn.Module) -> torch.dtype:
    """The dtype adapters train in: float32 under a half-precision base, else the base's."""
    dtype = base.weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
