"""Fused LoRA on a linear layer: the base GEMM and the low-rank update in one output write.

    y = x W^T + bias + scale * (h A^T) B^T,      h = dropout(x) (h = x without dropout)

``lora_forward_*`` and ``lora_backward_*`` come in two implementations of one signature:
``*_triton`` (``triton_lora.py``: one kernel computes the base tile and the low-rank
update together, reading each activation tile once) and ``*_torch``, the twin, which is
also the CPU fast path. On CPU the skinny products (M, K) x (K, r) run far below GEMM speed
and every extra pass over an (M, N) tensor costs about as much, so the twin spends as few
of both as it can:

* Folding. With many rows (M (N + K) >= N K) and a float32/64 weight, the update goes into
  a temporary weight, W' = W + scale B A (N K (2r + 1) flops, independent of M, against
  2 r (N + K) flops per row for the factored form): y = x W'^T + bias, and in the backward
  dx = dy W'. Only h A^T (for dB) and dy B (for dA) remain as skinny products. The base
  weight is never written; W' lives for one call (recomputed in the backward, not saved).
  A half-precision weight is never folded: rounding W' would lose the small update.
* Otherwise: ``y = addmm(bias, x, W^T)`` then ``y.addmm_(h A^T, B^T, alpha=scale)`` in
  place, and ``dx = dy W`` then ``dx.addmm_(dy B, A)``: no (M, N) or (M, K) temporary.

Either way the backward makes no (M, N) temporary (autograd of the plain formula makes the
scaled upstream gradient and the update's own dx, then adds them), reuses dy B for dx and
dA, and keeps only x and h A^T from the forward.

``lora_linear`` is the entry point. Without grad it skips the Function: the folded GEMM
alone (no h A^T is needed), so unmerged inference costs what the plain base costs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .dispatch import use_triton

# --- the twin (and CPU fast path) -------------------------------------------------------


def folds(rows: int, weight: torch.Tensor) -> bool:
    """Whether the twin folds B A into a temporary weight (see the module docstring)."""
    if weight.dtype not in (torch.float32, torch.float64):
        return False
    n, k = weight.shape
    return rows * (n + k) >= n * k


def folded_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float):
    return torch.addmm(weight, b, a, alpha=scale)


def lora_forward_torch(
    x: torch.Tensor,
    h: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h A^T) for 2-D ``x`` (M, K), ``weight`` (N, K), ``a`` (r, K), ``b`` (N, r);
    ``h`` is the adapter's input (None: x itself)."""
    xa = torch.mm(x if h is None else h, a.t())
    if h is None and folds(x.shape[0], weight):
        folded = folded_weight(weight, a, b, scale)
        y = torch.mm(x, folded.t()) if bias is None else torch.addmm(bias, x, folded.t())
        return y, xa
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    y.addmm_(xa, b.t(), alpha=scale)
    return y, xa


def lora_backward_torch(
    dy: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor | None,
    xa: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    needs: tuple[bool, bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, dh, dweight, dbias, da, db) of ``lora_forward_torch``; ``needs`` says
    which are wanted. With ``h`` None the adapter's share of dx is added into dx."""
    need_x, need_h, need_a = needs[0], needs[1], needs[4]
    dx = None
    fold = h is None and folds(dy.shape[0], weight)
    g = torch.mm(dy, b) if (need_a or need_h or (need_x and not fold)) else None  # (M, r)
    if need_x and fold:
        dx = torch.mm(dy, folded_weight(weight, a, b, scale))
    elif need_x:
        dx = torch.mm(dy, weight)
        if h is None:
            dx.addmm_(g, a, alpha=scale)
    return (dx, *lora_backward_rest(dy, x, h, xa, a, g, scale, needs))


def lora_backward_rest(dy, x, h, xa, a, g, scale, needs):
    """(dh, dweight, dbias, da, db) of the LoRA backward, given ``g = dy B`` (None when
    neither dh nor da is wanted); dx is the caller's. Shared by the torch and Triton twins."""
    _, need_h, need_w, need_bias, need_a, need_b = needs
    dh = dweight = dbias = da = db = None
    if need_h and h is not None:
        dh = torch.mm(g, a).mul_(scale)
    if need_a:
        da = torch.mm(g.t(), x if h is None else h).mul_(scale)
    if need_b:
        db = torch.mm(dy.t(), xa).mul_(scale)
    if need_w:
        dweight = torch.mm(dy.t(), x)
    if need_bias:
        dbias = dy.sum(0)
    return dh, dweight, dbias, da, db


# --- Triton launchers (imported lazily: Triton loads only when a kernel runs) ------------


def lora_forward_triton(x, h, weight, bias, a, b, scale):  # same signature as the twin
    from .triton_lora import lora_forward_triton as run

    return run(x, h, weight, bias, a, b, scale)


def lora_backward_triton(dy, x, h, xa, weight, a, b, scale, needs):
    from .triton_lora import lora_backward_triton as run

    return run(dy, x, h, xa, weight, a, b, scale, needs)


# --- autograd -----------------------------------------------------------------------------


class LoRALinearFunction(torch.autograd.Function):
    """The fused forward and backward above, dispatched per call to the kernel or the twin."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, a, b, scale):
        kernel = use_triton(x, weight, a, b)
        forward = lora_forward_triton if kernel else lora_forward_torch
        y, xa = forward(x, h, weight, bias, a, b, scale)
        ctx.kernel, ctx.scale, ctx.has_h = kernel, scale, h is not None
        ctx.save_for_backward(x, h, xa, weight, a, b)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, xa, weight, a, b = ctx.saved_tensors
        backward = lora_backward_triton if ctx.kernel else lora_backward_torch
        needs = tuple(ctx.needs_input_grad[:6])
        dx, dh, dweight, dbias, da, db = backward(
            dy.contiguous(), x, h if ctx.has_h else None, xa, weight, a, b, ctx.scale, needs
        )
        return dx, dh, dweight, dbias, da, db, None


# --- the entry point ----------------------------------------------------------------------


def should_fold(rows: int, weight: torch.Tensor, grad: bool) -> bool:
    """Inference by the folded GEMM alone: no grad, not the kernel's device (its fused
    kernel makes the update almost free) and ``folds`` (a float32/64 weight, many rows)."""
    return not grad and not use_triton(weight) and folds(rows, weight)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x W^T + bias + scale * dropout(x) A^T B^T`` over the last dimension of ``x``.

    ``weight`` is (N, K) (a transposed view is fine); x, weight, a and b share one dtype.
    """
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    h2 = None if dropout is None else dropout(x2)
    # Grad mode alone decides (not which tensors require grad), so a call gives the same
    # bits whether or not its parameters happen to be trainable.
    if h2 is None and should_fold(x2.shape[0], weight, torch.is_grad_enabled()):
        return F.linear(x, folded_weight(weight, a, b, scale), bias)
    y = LoRALinearFunction.apply(x2, h2, weight, bias, a, b, scale)
    return y.view(*x.shape[:-1], n)
