"""Block-diagonal / butterfly orthogonal transforms and a batched Cayley transform.

``block_apply(x, blocks, gather)`` maps each row v of x (M, d) to diag(D_1, ..., D_n) v[gather]
(blocks (n, b, b), n b = d; gather None = identity). OFT is one such step (T = R); a BOFT
butterfly factor B = P D P^T is one step with a gather on each side, and the gathers
between consecutive factors fuse into one (``butterfly_apply``). No dense d x d matrix is
formed: the kernel reads each row's gathered block columns straight from x, and for blocks
smaller than 16 one program packs several of them into one 16-wide block-diagonal tile.

``cayley(upper, b)`` turns strictly upper triangles (..., b(b-1)/2) into the orthogonal
blocks (I - S)(I + S)^{-1} of their skew-symmetric S. Writing M = I + S, the result is
R = 2 M^{-1} - I, so its gradient needs no second solve:

    dL/dS = -2 M^{-T} G M^{-T} = -1/2 (R + I)^T G (R + I)^T,     G = dL/dR,

and dL/dupper[i, j] = dL/dS[i, j] - dL/dS[j, i]. The kernel runs one block per program by
Gauss-Jordan elimination in registers; no pivoting is needed because I + S has the identity
as its symmetric part (positive definite), so every leading minor is non-zero. The twin uses
``torch.linalg.solve`` for the forward and the closed form above for the backward.
"""

from __future__ import annotations

import functools

import torch

from .dispatch import use_triton

# --- block apply ----------------------------------------------------------------------------

# Below this block size the twin packs blocks into dense block-diagonal tiles of about this
# width: one (M, 32) x (32, 32) batched GEMM beats eight (M, 4) x (4, 4) ones on CPU.
PACKED_WIDTH = 32


def pack_blocks(blocks: torch.Tensor, group: int) -> torch.Tensor:
    """(n, b, b) blocks -> (n / group, group b, group b) block-diagonal tiles."""
    n, b, _ = blocks.shape
    eye = torch.eye(group, dtype=blocks.dtype, device=blocks.device)
    tiles = torch.einsum("gicd,ij->gicjd", blocks.reshape(n // group, group, b, b), eye)
    return tiles.reshape(n // group, group * b, group * b)


def block_apply_torch(
    x: torch.Tensor, blocks: torch.Tensor, gather: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows v of x (M, d) -> diag(blocks) v[gather]; differentiable by autograd."""
    if gather is not None:
        x = x.index_select(1, gather)
    n, b, _ = blocks.shape
    group = max(1, PACKED_WIDTH // b)
    if b < PACKED_WIDTH and group > 1 and n % group == 0:
        blocks = pack_blocks(blocks, group)
        n, b = blocks.shape[0], blocks.shape[1]
    m, d = x.shape
    return torch.einsum("mnk,nck->mnc", x.reshape(m, n, b), blocks).reshape(m, d)


def block_apply_triton(x, blocks, gather=None):  # the twin's signature
    return BlockApplyFunction.apply(x, blocks, gather)


def block_apply(
    x: torch.Tensor, blocks: torch.Tensor, gather: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch ``block_apply`` to the kernel (CUDA + Triton) or the twin."""
    run = block_apply_triton if use_triton(x, blocks) else block_apply_torch
    return run(x, blocks, gather)


class BlockApplyFunction(torch.autograd.Function):
    """Kernel forward; backward = the kernel with D^T scattered back, plus a kernel for
    dD[i] = sum over rows of dout_i^T x_i."""

    @staticmethod
    def forward(ctx, x, blocks, gather):
        from .triton_orthogonal import block_apply_kernel_call

        ctx.save_for_backward(x, blocks, gather)
        return block_apply_kernel_call(x.contiguous(), blocks, gather, scatter=False)

    @staticmethod
    def backward(ctx, dout):
        from .triton_orthogonal import block_apply_kernel_call, block_grad_kernel_call

        x, blocks, gather = ctx.saved_tensors
        dout = dout.contiguous()
        dx = dblocks = None
        if ctx.needs_input_grad[0]:
            dx = block_apply_kernel_call(dout, blocks.transpose(1, 2), gather, scatter=True)
        if ctx.needs_input_grad[1]:
            dblocks = block_grad_kernel_call(dout, x.contiguous(), gather, blocks.shape[-1])
        return dx, dblocks, None


def butterfly_apply(
    x: torch.Tensor, factors: list[torch.Tensor], gathers: list[torch.Tensor | None]
) -> torch.Tensor:
    """Apply factors in order with ``gathers[i]`` before factor i and ``gathers[-1]`` after
    the last (as ``orthogonal.chain_gathers`` builds them; None = identity)."""
    for gather, blocks in zip(gathers, factors, strict=False):
        x = block_apply(x, blocks, gather)
    if gathers[-1] is not None:
        x = x.index_select(1, gathers[-1])
    return x


# --- Cayley ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _upper_indices(b: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(b, b, 1, device=device)
    return rows, cols


def skew_from_upper(upper: torch.Tensor, b: int) -> torch.Tensor:
    rows, cols = _upper_indices(b, upper.device)
    skew = upper.new_zeros(*upper.shape[:-1], b, b)
    skew[..., rows, cols] = upper
    return skew - skew.transpose(-1, -2)


def cayley_grad_from_blocks(blocks: torch.Tensor, grad: torch.Tensor, b: int) -> torch.Tensor:
    """dL/dupper from R = cayley(upper) and G = dL/dR (closed form in the module doc)."""
    eye = torch.eye(b, dtype=blocks.dtype, device=blocks.device)
    p = (blocks + eye).transpose(-1, -2)
    g_skew = -0.5 * (p @ grad @ p)
    rows, cols = _upper_indices(b, blocks.device)
    return g_skew[..., rows, cols] - g_skew[..., cols, rows]


class CayleyTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, upper, b):
        skew = skew_from_upper(upper, b)
        eye = torch.eye(b, dtype=upper.dtype, device=upper.device)
        blocks = torch.linalg.solve(eye + skew, eye - skew)
        ctx.b = b
        ctx.save_for_backward(blocks)
        return blocks

    @staticmethod
    def backward(ctx, grad):
        (blocks,) = ctx.saved_tensors
        return cayley_grad_from_blocks(blocks, grad, ctx.b), None


class CayleyTritonFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, upper, b):
        from .triton_orthogonal import cayley_kernel_call

        blocks = cayley_kernel_call(upper, b)
        ctx.b = b
        ctx.save_for_backward(blocks)
        return blocks

    @staticmethod
    def backward(ctx, grad):
        from .triton_orthogonal import cayley_grad_kernel_call

        (blocks,) = ctx.saved_tensors
        return cayley_grad_kernel_call(blocks, grad.contiguous(), ctx.b), None


def cayley_torch(upper: torch.Tensor, b: int) -> torch.Tensor:
    """(..., b(b-1)/2) upper triangles -> (..., b, b) blocks (I - S)(I + S)^{-1}."""
    return CayleyTorchFunction.apply(upper, b)


def cayley_triton(upper: torch.Tensor, b: int) -> torch.Tensor:  # the twin's signature
    return CayleyTritonFunction.apply(upper, b)


def cayley(upper: torch.Tensor, b: int) -> torch.Tensor:
    """Dispatch the batched Cayley transform to the kernel or the twin."""
    return (cayley_triton if use_triton(upper) else cayley_torch)(upper, b)
