"""Fused per-feature scale and shift: y = scale * x + shift along one feature axis.

(IA)^3 scales (shift None), SSF scales and shifts, DiffFit's gamma scales a shifted output
(shift = gamma * delta_b), BitFit shifts (scale None). ``scale`` and ``shift`` have one entry
per feature; ``axis`` is the feature axis of x, or None when the features are x's trailing
dimensions (``scale.numel()`` of them).

The Triton kernels view x as (outer, features, inner), so one pair serves (..., features)
activations and channel-first feature maps alike: the forward is one pass, and the
backward one pass over (dy, x) that writes dx and per-program partial sums of dy * x and
dy, summed on the host into d(scale) and d(shift). The twin is ``addcmul`` (one pass; its
autograd is already the minimal backward on CPU). Results keep x's dtype; the arithmetic
runs in the promoted dtype (float32 parameters on a half-precision x compute in float32).
"""

from __future__ import annotations

import math

import torch

from .dispatch import use_triton


def _layout(x: torch.Tensor, features: int, axis: int | None) -> tuple[int, int, int]:
    """(outer, features, inner) for x; trailing features when axis is None."""
    if axis is None:
        return x.numel() // max(features, 1), features, 1
    axis = axis % x.dim()
    return math.prod(x.shape[:axis]), x.shape[axis], math.prod(x.shape[axis + 1 :])


def _along(v: torch.Tensor | None, x: torch.Tensor, axis: int | None) -> torch.Tensor | None:
    if v is None or axis is None:
        return v
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return v.reshape(shape)


def scale_shift_torch(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    axis: int | None = None,
) -> torch.Tensor:
    """scale * x + shift along ``axis`` (see the module docstring); autograd for grads."""
    s, b = _along(scale, x, axis), _along(shift, x, axis)
    if s is None:
        out = x + b
    elif b is None:
        out = x * s
    else:
        out = torch.addcmul(b, x, s)
    return out.to(x.dtype)


def scale_shift_triton(x, scale, shift, axis=None):  # the twin's signature
    return ScaleShiftFunction.apply(x, scale, shift, axis)


def scale_shift(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    axis: int | None = None,
) -> torch.Tensor:
    """Dispatch to the kernel (CUDA + Triton) or the twin."""
    if scale is None and shift is None:
        return x
    run = scale_shift_triton if use_triton(x, scale, shift) else scale_shift_torch
    return run(x, scale, shift, axis)


class ScaleShiftFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift, axis):
        from .triton_scaling import scale_shift_forward

        features = (scale if scale is not None else shift).numel()
        layout = _layout(x, features, axis)
        x = x.contiguous()
        ctx.layout, ctx.has_scale, ctx.has_shift = layout, scale is not None, shift is not None
        ctx.shapes = (
            None if scale is None else scale.shape,
            None if shift is None else shift.shape,
        )
        ctx.save_for_backward(x, scale)
        return scale_shift_forward(x, scale, shift, layout)

    @staticmethod
    def backward(ctx, dy):
        from .triton_scaling import scale_shift_backward

        x, scale = ctx.saved_tensors
        need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
        dx, dscale, dshift = scale_shift_backward(
            dy.contiguous(), x, scale, ctx.layout, need_x, need_scale, need_shift
        )
        scale_shape, shift_shape = ctx.shapes
        if dscale is not None:
            dscale = dscale.reshape(scale_shape).to(scale.dtype)
        if dshift is not None:
            dshift = dshift.reshape(shift_shape)
        return dx, dscale, dshift, None
