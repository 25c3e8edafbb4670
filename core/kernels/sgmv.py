"""Many LoRA adapters in one batch: each segment of rows gathers its own A and B.

This is the SGMV idea of Punica (Chen et al., 2023, "Punica: Multi-Tenant LoRA Serving")
and S-LoRA (Sheng et al., 2023): the base GEMM runs once over the whole batch, then

    y[rows of segment s] += scale_a * (x[rows] A_a^T) B_a^T,      a = adapters[s]

with the adapters' factors stacked, A (L, R, K) and B (L, N, R) (ranks below R padded with
zeros, which changes nothing). ``starts`` (S + 1 row offsets) and ``adapters`` (S adapter
indices) describe the segments; rows in no segment keep the base output.

``sgmv_lora_triton`` runs two segment-gathered GEMM kernels (shrink to (M, R), expand into
y) under an autograd Function whose backward reuses them with the factors transposed.
``sgmv_lora_torch`` is the twin, differentiable by autograd and fast on CPU: when every
segment has the same length (a (batch, tokens, features) input, one segment per sample) it
is two batched GEMMs over the gathered factors, whatever the number of adapters; otherwise
it gathers each adapter's rows once (``index_select``), applies the two small GEMMs and adds
them back (``index_add_``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .dispatch import use_triton


def uniform_length(starts: Sequence[int], rows: int) -> int | None:
    """The common segment length when the segments tile all rows in equal, ordered pieces."""
    if len(starts) < 2 or starts[0] != 0 or starts[-1] != rows:
        return None
    length = starts[1] - starts[0]
    ok = length > 0 and all(b - a == length for a, b in zip(starts[:-1], starts[1:]))
    return length if ok else None


def sgmv_lora_torch(
    x: torch.Tensor,
    y: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    scales: torch.Tensor,
    starts: Sequence[int],
    adapters: Sequence[int],
) -> torch.Tensor:
    """Add each segment's LoRA update into ``y`` (M, N) in place and return it; see above."""
    if not adapters:
        return y
    rows, k = x.shape
    length = uniform_length(starts, rows)
    index = torch.as_tensor(list(adapters), device=x.device)
    if length is not None:
        segments = len(adapters)
        a = a_stack.index_select(0, index)  # (S, R, K)
        b = b_stack.index_select(0, index) * scales.index_select(0, index)[:, None, None]
        xa = torch.bmm(x.view(segments, length, k), a.transpose(1, 2))
        y.view(segments, length, -1).baddbmm_(xa, b.transpose(1, 2))
        return y
    for adapter, rows_of in _rows_per_adapter(starts, adapters, x.device).items():
        xa = torch.mm(x.index_select(0, rows_of), a_stack[adapter].t())
        update = torch.mm(xa, b_stack[adapter].t())
        y.index_add_(0, rows_of, update, alpha=float(scales[adapter]))
    return y


def _rows_per_adapter(
    starts: Sequence[int], adapters: Sequence[int], device: torch.device
) -> dict[int, torch.Tensor]:
    pieces: dict[int, list[range]] = {}
    for s, adapter in enumerate(adapters):
        pieces.setdefault(int(adapter), []).append(range(starts[s], starts[s + 1]))
    return {
        a: torch.tensor([i for r in ranges for i in r], device=device, dtype=torch.long)
        for a, ranges in pieces.items()
    }


def sgmv_lora_triton(x, y, a_stack, b_stack, scales, starts, adapters):  # twin's signature
    if not adapters:
        return y
    return SegmentedLoRAFunction.apply(x, y, a_stack, b_stack, scales, starts, adapters)


def sgmv_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    scales: torch.Tensor,
    starts: Sequence[int],
    adapters: Sequence[int],
) -> torch.Tensor:
    """Dispatch: the kernels for CUDA tensors (with Triton), else the twin."""
    kernel = use_triton(x, y, a_stack, b_stack)
    run = sgmv_lora_triton if kernel else sgmv_lora_torch
    return run(x, y, a_stack, b_stack, scales, list(starts), list(adapters))


class SegmentedLoRAFunction(torch.autograd.Function):
    """Kernel forward (y updated in place) and a backward through the same kernels."""

    @staticmethod
    def forward(ctx, x, y, a_stack, b_stack, scales, starts, adapters):
        from .triton_sgmv import segment_matmul

        meta = segment_meta(starts, adapters, x.device)
        ones = torch.ones_like(scales)
        xa = segment_matmul(x, a_stack, ones, meta, out=None)  # (M, R)
        segment_matmul(xa, b_stack, scales, meta, out=y)
        ctx.mark_dirty(y)
        ctx.meta, ctx.starts, ctx.adapters = meta, starts, adapters
        ctx.scale_list = scales.tolist()  # host copies: no device sync per segment later
        ctx.save_for_backward(x, xa, a_stack, b_stack, scales)
        return y

    @staticmethod
    def backward(ctx, dy):
        from .triton_sgmv import segment_matmul

        x, xa, a_stack, b_stack, scales = ctx.saved_tensors
        dy = dy.contiguous()
        ones = torch.ones_like(scales)
        g = segment_matmul(dy, b_stack.transpose(1, 2), ones, ctx.meta, out=None)  # dy B
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.zeros_like(x)
            segment_matmul(g, a_stack.transpose(1, 2), scales, ctx.meta, out=dx)
        da = torch.zeros_like(a_stack) if ctx.needs_input_grad[2] else None
        db = torch.zeros_like(b_stack) if ctx.needs_input_grad[3] else None
        for s, adapter in enumerate(ctx.adapters):  # reductions over each segment's rows
            lo, hi = ctx.starts[s], ctx.starts[s + 1]
            if da is not None:
                da[adapter].addmm_(g[lo:hi].t(), x[lo:hi], alpha=ctx.scale_list[adapter])
            if db is not None:
                db[adapter].addmm_(dy[lo:hi].t(), xa[lo:hi], alpha=ctx.scale_list[adapter])
        return dx, dy, da, db, None, None, None


def segment_meta(starts: Sequence[int], adapters: Sequence[int], device: torch.device):
    """Device tensors for the kernels plus the longest segment (sizes the launch grid)."""
    longest = max(b - a for a, b in zip(starts[:-1], starts[1:]))
    return (
        torch.tensor(list(starts), device=device, dtype=torch.int32),
        torch.tensor(list(adapters), device=device, dtype=torch.int32),
        longest,
    )
