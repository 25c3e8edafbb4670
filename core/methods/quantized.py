"""Quantisation-aware low-rank training.

L4Q (Jeon et al., 2024, "L4Q: Parameter Efficient Quantization-Aware Fine-Tuning on Large
Language Models", eq. 4-6): the LoRA update is merged into the weight *before* a learned
step-size quantiser (LSQ, Esser et al., 2020), so training sees, and export yields, one
quantised weight and no separate adapter:

    W' = W0 + (alpha / r) B A
    q  = clamp(round((W' - beta) / s), 0, 2^bits - 1)      per group of ``group_size`` inputs
    W_hat = s q + beta,      y = x W_hat^T + bias

s (step) and beta (offset) are learned per output row and input group, started from the
group's min-max range of W0; round passes gradients straight through strictly inside the
range, 0 < (W' - beta) / s < 2^bits - 1 (LSQ's gradients for s and beta; an entry exactly at
a bound, e.g. each group's minimum at the start, takes the clamped branch). A custom
backward recomputes W_hat instead of keeping the (d_out x d_in) intermediates of autograd,
which is the paper's memory-optimised layer.

Not the identity at start: the model starts as the quantised W0 (B = 0), as in the paper.
``core.merge`` writes W_hat into the base weight (merging *is* quantising) and unmerge
restores W0; ``export_quantized`` gives the integer codes, steps and offsets, which
``dequantize`` turns back into exactly the weight the training forward used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..errors import MergeError
from ..kernels.dispatch import autocast_on
from ..layers import Adapter, is_fan_in_fan_out, weight_dtype
from ..registry import register
from ..targeting import adapted_modules

BITS = (2, 3, 4, 8)
STEP_FLOOR = 1e-8  # keeps a learned step from reaching zero (the quantiser divides by it)


@register("l4q", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class L4Q(AdapterConfig):
    """L4Q (Jeon et al., 2024).

    Args:
        bits: weight precision (2, 3, 4 as in the paper; 8 allowed).
        group_size: inputs sharing one step and offset (-1, or any size >= d_in: a whole
            row); must divide d_in otherwise.
        r, alpha, init: the LoRA branch (kaiming: A Kaiming-uniform, B zero; gaussian:
            A ~ N(0, 1/r)); defaults are LoRA's usual r = 8, alpha = 16. There is no LoRA
            dropout: the update is inside the quantised weight, with no input of its own.

    Per layer r (d_in + d_out) + 2 d_out d_in / group_size trainable parameters.
    """

    bits: int = 4
    group_size: int = 128
    r: int = 8
    alpha: float = 16.0
    init: str = "kaiming"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "bits", BITS)
        if self.group_size != -1:
            check_int(self, "group_size")
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_choice(self, "init", ("kaiming", "gaussian"))

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not (isinstance(module, nn.Linear) or is_fan_in_fan_out(module)):
            return "L4Q wraps nn.Linear or transformers Conv1D"
        in_f = _oriented(module).shape[1]
        if in_f % group_for(self.group_size, in_f):
            return (
                f"L4Q quantises groups of group_size={self.group_size} inputs, which does not "
                f"divide d_in={in_f}; pick a divisor or group_size=-1 (one group per row)"
            )
        return None

    def build(self, module: nn.Module, path: str) -> L4QAdapter:
        return L4QAdapter(module, self)


def group_for(group_size: int, in_features: int) -> int:
    """The group size used on a layer: a whole row for -1 or a size beyond the row."""
    return in_features if group_size == -1 else min(group_size, in_features)


def _oriented(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in)."""
    return base.weight.T if is_fan_in_fan_out(base) else base.weight


def dequantize_groups(
    q: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, *, inplace: bool = False
) -> torch.Tensor:
    """s q + beta per group, back to (out, in); the one formula training and export share
    (``inplace`` overwrites the codes ``q``: the training forward's own buffer)."""
    scaled = q.mul_(step[..., None]) if inplace else q * step[..., None]
    return scaled.add_(offset[..., None]).flatten(1)


# --- the training layer ------------------------------------------------------------------------
#
# On the CPU a pass over a (d_out x d_in) tensor costs about a millisecond at ViT-B's qkv, and
# comparisons that make boolean masks cost several (bool kernels are not vectorised), so the
# layer below spends as few passes as it can: the intermediates are built in place in one
# buffer, and the quantiser's range test is done by ``hardtanh_backward`` (one vectorised pass
# that keeps a gradient where 0 < v < qmax) instead of a boolean mask.


def scaled_weight(weight, a, b, step, offset, scale: float) -> torch.Tensor:
    """v = (W0 + scale B A - beta) / s per group, as (out, groups, group_size) float32: one
    new buffer (addmm), then in place."""
    merged = torch.addmm(weight.float(), b.float(), a.float(), alpha=scale)
    v = merged.view(step.shape[0], step.shape[1], -1)
    return v.sub_(offset[..., None]).div_(step[..., None])


def codes_of(v: torch.Tensor, qmax: int, *, inplace: bool = False) -> torch.Tensor:
    """q = clamp(round(v), 0, qmax), overwriting ``v`` when ``inplace``."""
    q = v.round_() if inplace else torch.round(v)
    return q.clamp_(0, qmax)


class _QuantizedLoRALinear(torch.autograd.Function):
    """x W_hat^T + bias with W_hat = Q(W0 + scale B A); saves only its inputs and recomputes
    W_hat in backward (no d_out x d_in tensor kept between the passes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, step, offset, scale: float, qmax: int):
        step32, offset32 = _L4QMath.quantiser(step, offset)
        v = scaled_weight(weight, a, b, step32, offset32, scale)
        w_hat = dequantize_groups(codes_of(v, qmax, inplace=True), step32, offset32, inplace=True)
        ctx.save_for_backward(x, weight, a, b, step, offset)
        ctx.scale, ctx.qmax = scale, qmax
        ctx.bias_dtype = None if bias is None else bias.dtype
        bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, w_hat.to(x.dtype), bias)  # the bias added in the GEMM

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, a, b, step, offset = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_b, need_step, need_offset = ctx.needs_input_grad[:7]
        step32, offset32 = _L4QMath.quantiser(step, offset)
        v = scaled_weight(weight, a, b, step32, offset32, ctx.scale)
        q = codes_of(v, ctx.qmax)
        grad_x = grad_bias = None
        if need_bias:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        if need_x:  # not wanted under the first adapted layer: skip W_hat and its GEMM
            w_hat = dequantize_groups(q, step32, offset32)
            grad_x = grad_out @ w_hat.to(grad_out.dtype)
            del w_hat
        if not (need_a or need_b or need_step or need_offset):
            return grad_x, None, grad_bias, None, None, None, None, None, None
        # dL/dW_hat = dy^T x: a full (out, in) GEMM that the masked quantiser gradient needs
        # (LoRA's factored dA, dB do not exist here: the range mask is elementwise).
        rows = grad_out.reshape(-1, grad_out.shape[-1]).t()
        grad_w_hat = (rows @ x.reshape(-1, x.shape[-1])).float().view(v.shape)
        # Straight through round, zero when clamped: dW_hat/dW' = 1 strictly inside the range
        # 0 < v < qmax (LSQ's range; at a bound the clamp branch applies, as clamp's gradient).
        grad_w = torch.ops.aten.hardtanh_backward(grad_w_hat, v, 0.0, float(ctx.qmax))
        grad_a = grad_b = grad_step = grad_offset = None
        if need_a:
            grad_a = (b.float().t() @ grad_w.flatten(1)).mul_(ctx.scale).to(a.dtype)
        if need_b:
            grad_b = (grad_w.flatten(1) @ a.float().t()).mul_(ctx.scale).to(b.dtype)
        # LSQ: d W_hat / d s = q - v inside the range, q (its bound) outside and at the bounds;
        # d / d beta = 1 there and 0 inside. Summed per group: sum g q - sum_inside g v and
        # sum g - sum_inside g (autograd of the equations sums the same two terms).
        if need_offset:
            grad_offset = (grad_w_hat.sum(-1) - grad_w.sum(-1)).to(offset.dtype)
        if need_step:
            inside_term = v.mul_(grad_w).sum(-1)
            grad_step = (q.mul_(grad_w_hat).sum(-1) - inside_term).to(step.dtype)
        grads = (grad_a, grad_b, grad_step, grad_offset)
        return grad_x, None, grad_bias, *grads, None, None


class _L4QMath:
    @staticmethod
    def quantiser(step, offset) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, beta) in float32, s floored away from zero."""
        return step.float().clamp_min(STEP_FLOOR), offset.float()

    @staticmethod
    def quantized(weight, a, b, step, offset, scale: float, qmax: int):
        """(W_hat, v, q) in float32 for W' = W0 + scale B A (v, q grouped)."""
        step, offset = _L4QMath.quantiser(step, offset)
        v = scaled_weight(weight, a, b, step, offset, scale)
        q = codes_of(v, qmax)
        return dequantize_groups(q, step, offset), v, q


class L4QAdapter(Adapter):
    """Computes the layer with the quantised merged weight W_hat (``replaces_base``)."""

    replaces_base = True

    def __init__(self, base: nn.Module, cfg: L4Q) -> None:
        super().__init__()
        weight = _oriented(base)
        out_f, in_f = weight.shape
        self.bits, self.qmax = cfg.bits, 2**cfg.bits - 1
        self.group_size = group_for(cfg.group_size, in_f)
        self.r, self.scale = cfg.r, cfg.alpha / cfg.r
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self.A = nn.Parameter(torch.empty(cfg.r, in_f, **opts))
        self.B = nn.Parameter(torch.zeros(out_f, cfg.r, **opts))
        groups = in_f // self.group_size
        self.step = nn.Parameter(torch.empty(out_f, groups, **opts))
        self.offset = nn.Parameter(torch.empty(out_f, groups, **opts))
        with torch.no_grad():
            if cfg.init == "gaussian":
                nn.init.normal_(self.A, std=1.0 / cfg.r)
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            self.reset_quantizer(weight)

    def reset_quantizer(self, weight: torch.Tensor) -> None:
        """Min-max start: beta = the group's minimum, s = its range / (2^bits - 1)."""
        grouped = weight.detach().to(self.step.dtype).unflatten(1, (self.step.shape[1], -1))
        low, high = grouped.amin(-1), grouped.amax(-1)
        self.offset.copy_(low)
        self.step.copy_(((high - low) / self.qmax).clamp_min(STEP_FLOOR))

    def quantized_weight(self, base: nn.Module) -> torch.Tensor:
        """W_hat (out, in) in float32, as the forward uses it."""
        weight = _oriented(base)
        return _L4QMath.quantized(
            weight, self.A, self.B, self.step, self.offset, self.scale, self.qmax
        )[0]

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        if args or kwargs:
            raise TypeError("L4Q wraps linear layers called with one input tensor.")
        weight = _oriented(base)
        params = (self.A, self.B, self.step, self.offset)
        if not autocast_on(x):
            return _QuantizedLoRALinear.apply(x, weight, base.bias, *params, self.scale, self.qmax)
        device = x.device.type
        # Autocast would cast only inside the forward (its GEMM), leaving the backward to mix
        # a low-precision dy with a float32 x; cast x as autocast casts a linear's input.
        if x.dtype == torch.float32:
            x = x.to(torch.get_autocast_dtype(device))
        with torch.autocast(device, enabled=False):
            return _QuantizedLoRALinear.apply(x, weight, base.bias, *params, self.scale, self.qmax)

    def merge(self, base: nn.Module) -> None:
        """Quantise: the base weight becomes W_hat (W0 kept aside to unmerge)."""
        self._original = base.weight.detach().clone()
        w_hat = self.quantized_weight(base)
        base.weight.data.copy_((w_hat.T if is_fan_in_fan_out(base) else w_hat).to(base.weight))

    def unmerge(self, base: nn.Module) -> None:
        base.weight.data.copy_(self._original)
        del self._original

    def export(self, base: nn.Module) -> QuantizedWeight:
        """The integer codes, steps and offsets of the forward's W_hat (same computation)."""
        with torch.no_grad():
            args = (_oriented(base), self.A, self.B, self.step, self.offset)
            q = _L4QMath.quantized(*args, self.scale, self.qmax)[2]
        return QuantizedWeight(
            codes=q.flatten(1).to(torch.uint8),
            step=self.step.detach().float().clamp_min(STEP_FLOOR),
            offset=self.offset.detach().float(),
            bits=self.bits,
            group_size=self.group_size,
        )


@dataclass
class QuantizedWeight:
    """One layer's integer weight: ``codes`` (out, in) in [0, 2^bits - 1] (uint8, one code
    per byte), ``step`` and ``offset`` (out, in / group_size) in float32."""

    codes: torch.Tensor
    step: torch.Tensor
    offset: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        q = self.codes.float().unflatten(1, (self.step.shape[1], -1))
        return dequantize_groups(q, self.step, self.offset)


def export_quantized(model: nn.Module, name: str = "default") -> dict[str, QuantizedWeight]:
    """Every L4Q layer of adapter ``name`` as integer codes + steps + offsets, by path."""
    found = {}
    for path, wrapper in adapted_modules(model):
        if name in wrapper.adapters and isinstance(wrapper.adapters[name], L4QAdapter):
            if name in wrapper.merged:
                raise MergeError(
                    f"adapter {name!r} is merged (the base already holds W_hat); export "
                    "reads W0 + B A, so call core.unmerge(model) first."
                )
            found[path] = wrapper.adapters[name].export(wrapper.base_layer)
    if not found:
        raise KeyError(f"the model has no L4Q adapter named {name!r}")
    return found


def quantized_state_dict(exported: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """A flat, safetensors-ready dict: ``<path>.qweight`` (uint8), ``.step``, ``.offset``."""
    flat: dict[str, torch.Tensor] = {}
    for path, weight in exported.items():
        flat[f"{path}.qweight"] = weight.codes.contiguous()
        flat[f"{path}.step"] = weight.step.contiguous()
        flat[f"{path}.offset"] = weight.offset.contiguous()
    return flat


__all__ = [
    "L4Q",
    "L4QAdapter",
    "QuantizedWeight",
    "dequantize_groups",
    "export_quantized",
    "quantized_state_dict",
]
