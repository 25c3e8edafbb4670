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

``grid_linear(x, W, bias, scale, ops)`` is the training path of the orthogonal methods on
linear layers: scale * (W (C_n ... C_1 x)) + bias, each C_i block-diagonal along the rows or
the columns of a 2-D grid of the coordinates (see the section below). It is torch's batched
GEMM on every device (no Triton kernel: the blocks are dense and cuBLAS/MKL already run
them at full speed), fused into one autograd function with the layer's own GEMM.
"""

from __future__ import annotations

import functools

import torch

from .dispatch import hand_written_step_fits, use_triton

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


# --- grid transforms: block-diagonal products along both axes of a 2-D coordinate grid ---------
#
# Coordinates i = h K + l of a width-(H K) vector form an H x K grid. A "low" op multiplies
# every row h of the grid by its own K x K block (blocks (H, K, K): a plain block-diagonal
# matrix); a "high" op multiplies every column l by its own H x H block (blocks (K, H, H)).
# Products of Givens stages pairing i with i XOR 2^s are low ops for s < log2 K and high
# ops otherwise, so any chain of such stages is a few of these (qGOFT); BOFT's m butterfly
# factors multiply out to one block-diagonal low op. The ops run on columns: xt is
# (width, M), one column per token, so each op is one batched GEMM whose operands BLAS reads
# in place (the token axis has stride 1 in every layout the chain produces), and the linear
# layer afterwards reads the (d, M) result as a transposed operand: no copy of the
# activations between the ops except one transpose in and, after a high op, one regroup.


def grid_low(t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """t (H, K, M) -> each row h: blocks[h] @ t[h]."""
    return torch.bmm(blocks, t)


def grid_high(t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """t (H, K, M) -> each column l: blocks[l] @ t[:, l] (a (K, H, M) buffer, viewed back)."""
    return torch.bmm(blocks, t.transpose(0, 1)).transpose(0, 1)


GRID_OPS = {"low": grid_low, "high": grid_high}


def grid_shape(ops: list[tuple[str, torch.Tensor]]) -> tuple[int, int]:
    """(H, K) of the grid the ops act on."""
    kind, blocks = ops[0]
    n, b = blocks.shape[0], blocks.shape[1]
    return (n, b) if kind == "low" else (b, n)


def grid_apply(xt: torch.Tensor, ops: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Columns of xt (H K, M) through the ops in order (autograd-differentiable)."""
    h, k = grid_shape(ops)
    t = xt.reshape(h, k, xt.shape[-1])
    for kind, blocks in ops:
        t = GRID_OPS[kind](t, blocks)
    return t.reshape(h * k, xt.shape[-1])


def transposed_ops(ops: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The ops of the transposed product (C_n ... C_1)^T = C_1^T ... C_n^T."""
    return [(kind, blocks.transpose(-1, -2)) for kind, blocks in reversed(ops)]


def to_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """(M, d) rows -> (width, M) columns, zero rows below d (width >= d)."""
    xt = x.t()
    if width == x.shape[1]:
        return xt.contiguous()
    return torch.nn.functional.pad(xt, (0, 0, 0, width - x.shape[1]))


def grid_rows(rows: torch.Tensor, ops: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Each row v of rows (M, d) -> C_n ... C_1 v, as rows (a transposed view)."""
    h, k = grid_shape(ops)
    return grid_apply(to_columns(rows, h * k), ops)[: rows.shape[1]].t()


class _Columns:
    """The chain on token columns: state (H, K, M) views, token axis of stride 1. Any mix
    of low and high ops; one transpose of x in and of d(x) out."""

    @staticmethod
    def enter(x: torch.Tensor, width: int) -> torch.Tensor:
        return to_columns(x, width)

    @staticmethod
    def first_state(saved: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return saved.view(*shape, saved.shape[-1])

    @staticmethod
    def run(kind: str, t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return GRID_OPS[kind](t, blocks)

    @staticmethod
    def rows(t: torch.Tensor, d: int) -> torch.Tensor:
        """The chain's output as (M, d) rows (a transposed view)."""
        return t.reshape(-1, t.shape[-1])[:d].t()

    @staticmethod
    def grad_state(dy: torch.Tensor, weight: torch.Tensor, shape: tuple[int, int]):
        dht = torch.mm(weight.t(), dy.t())  # (d, M): the columns of d(h)
        width = shape[0] * shape[1]
        if width != dht.shape[0]:
            dht = torch.nn.functional.pad(dht, (0, 0, 0, width - dht.shape[0]))
        return dht.view(*shape, dht.shape[-1])

    @staticmethod
    def back(kind, t, blocks, grad, need_input):
        """(d(input) or None, d(blocks)) of one op from d(output)."""
        if kind == "low":
            dblocks = torch.bmm(grad, t.transpose(1, 2))
            return (torch.bmm(blocks.transpose(1, 2), grad) if need_input else None), dblocks
        g = grad.transpose(0, 1)
        dblocks = torch.bmm(g, t.transpose(0, 1).transpose(1, 2))
        if not need_input:
            return None, dblocks
        return torch.bmm(blocks.transpose(1, 2), g).transpose(0, 1), dblocks

    @staticmethod
    def input_grad(grad: torch.Tensor, d: int) -> torch.Tensor:
        return grad.reshape(-1, grad.shape[-1])[:d].t()


class _Rows:
    """Low ops only (e.g. BOFT): state (H, M, K) views of token rows, each block's K
    coordinates of stride 1, so x and d(x) keep their (M, d) layout (no transposes)."""

    @staticmethod
    def enter(x: torch.Tensor, width: int) -> torch.Tensor:
        if width == x.shape[1]:
            return x.contiguous()  # the ops view it as (M, H, K)
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))

    @staticmethod
    def first_state(saved: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        return saved.view(saved.shape[0], *shape).transpose(0, 1)

    @staticmethod
    def run(kind: str, t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        return torch.bmm(t, blocks.transpose(1, 2))

    @staticmethod
    def rows(t: torch.Tensor, d: int) -> torch.Tensor:
        return t.transpose(0, 1).reshape(t.shape[1], -1)[:, :d]

    @staticmethod
    def grad_state(dy: torch.Tensor, weight: torch.Tensor, shape: tuple[int, int]):
        dh = torch.mm(dy, weight)
        width = shape[0] * shape[1]
        if width != dh.shape[1]:
            dh = torch.nn.functional.pad(dh, (0, width - dh.shape[1]))
        return dh.view(dh.shape[0], *shape).transpose(0, 1)

    @staticmethod
    def back(kind, t, blocks, grad, need_input):
        dblocks = torch.bmm(grad.transpose(1, 2), t)
        return (torch.bmm(grad, blocks) if need_input else None), dblocks

    @staticmethod
    def input_grad(grad: torch.Tensor, d: int) -> torch.Tensor:
        return grad.transpose(0, 1).reshape(grad.shape[1], -1)[:, :d]


def column_dots(a: torch.Tensor, b: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """(a * b).sum(0) a few rows at a time: the backward's peak memory then holds no
    (tokens, out) product next to the layer's other gradients."""
    total = (a[:rows] * b[:rows]).sum(0)
    for start in range(rows, a.shape[0], rows):
        total += (a[start : start + rows] * b[start : start + rows]).sum(0)
    return total


def _states(layout, saved: torch.Tensor, ops: list, shape: tuple[int, int]) -> list:
    """The input of every op, recomputed without autograd."""
    states = [layout.first_state(saved, shape)]
    for kind, blocks in ops[:-1]:
        states.append(layout.run(kind, states[-1], blocks))
    return states


class GridLinearFunction(torch.autograd.Function):
    """y = scale * (W (C_n ... C_1 x)) + bias for rows x (M, d), with the grid ops C_i.

    Keeps only its copy of x (and W h when ``scale`` trains, which its gradient needs); the
    ops' inputs are recomputed in the backward (batched GEMMs of k columns per coordinate,
    small next to the layer's own GEMM). Chains of low ops run on token rows, others on
    token columns (``_Rows`` / ``_Columns``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, kinds, *blocks):
        ops = list(zip(kinds, blocks, strict=True))
        shape = grid_shape(ops)
        layout = _Rows if all(kind == "low" for kind in kinds) else _Columns
        d = x.shape[1]
        saved = layout.enter(x, shape[0] * shape[1])
        last = ops[-1]
        h = layout.rows(layout.run(last[0], _states(layout, saved, ops, shape)[-1], last[1]), d)
        keep_u = scale is not None and ctx.needs_input_grad[3]
        if scale is None:
            y = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())
            u = None
        else:
            u = torch.mm(h, weight.t())
            y = u * scale if bias is None else torch.addcmul(bias, u, scale)
        ctx.kinds, ctx.d, ctx.shape, ctx.layout = kinds, d, shape, layout
        ctx.save_for_backward(saved, weight, scale, u if keep_u else None, *blocks)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, weight, scale, u, *blocks = ctx.saved_tensors
        ops, layout = list(zip(ctx.kinds, blocks, strict=True)), ctx.layout
        need = ctx.needs_input_grad
        # d(h) = W^T (s dy): scale whichever is smaller, the weight or the output gradient.
        scale_weight = scale is not None and dy.shape[0] > weight.shape[1]
        g = dy if scale is None or scale_weight else dy * scale
        dscale = column_dots(dy, u) if u is not None else None
        dbias = dy.sum(0) if need[2] else None
        states = _states(layout, saved, ops, ctx.shape)
        dweight = None
        if need[1]:
            h = layout.rows(layout.run(ops[-1][0], states[-1], ops[-1][1]), ctx.d)
            dweight = torch.mm((dy * scale if scale_weight else g).t(), h)
        if not (need[0] or any(need[5:])):
            return None, dweight, dbias, dscale, None, *[None] * len(blocks)
        scaled = weight * scale[:, None] if scale_weight else weight
        grad = layout.grad_state(g, scaled, ctx.shape)
        dblocks = [None] * len(ops)
        for i in reversed(range(len(ops))):
            kind, op_blocks = ops[i]
            grad, dblocks[i] = layout.back(kind, states[i], op_blocks, grad, i > 0 or need[0])
        dx = layout.input_grad(grad, ctx.d) if need[0] else None
        return dx, dweight, dbias, dscale, None, *dblocks


def grid_linear_plain(x, weight, bias, scale, ops):
    """The same function by autograd over ``grid_apply`` and ``F.linear`` (the reference,
    and the path under autocast or mixed dtypes)."""
    dtype = ops[0][1].dtype
    h = grid_rows(x.to(dtype), ops).to(weight.dtype)
    if scale is None:
        return torch.nn.functional.linear(h, weight, bias)
    y = torch.nn.functional.linear(h, weight)
    scale = scale.to(y.dtype)  # float32 adapters on a half-precision base: keep the base's
    return y * scale if bias is None else torch.addcmul(bias.to(y.dtype), y, scale)


def grid_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    ops: list[tuple[str, torch.Tensor]],
) -> torch.Tensor:
    """scale * (W (C_n ... C_1 x)) + bias for rows x (M, d); scale and bias may be None.

    One fused autograd function when every tensor shares a dtype, autocast is off and x
    is not on the meta device (``hand_written_step_fits``; its backward recomputes the ops
    instead of keeping their outputs), else the plain composition. Both run torch's batched GEMM on any device.
    """
    if hand_written_step_fits(x, weight, bias, scale, *(b for _, b in ops)):
        kinds = tuple(kind for kind, _ in ops)
        return GridLinearFunction.apply(x, weight, bias, scale, kinds, *(b for _, b in ops))
    return grid_linear_plain(x, weight, bias, scale, ops)
