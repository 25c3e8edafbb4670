"""Triton kernels for block-diagonal transforms and the batched Cayley transform
(imported only when a kernel runs; see ``orthogonal.py`` for the maths)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import dot_width, interpreting
from .triton_common import dot, ieee

BLOCK_M = 32


def _packing(b: int) -> tuple[int, int]:
    """(blocks per program, tile width): small blocks share one 16-wide tile."""
    group = max(1, 16 // b)
    return group, dot_width(group * b)


@triton.jit
def _tile_columns(pid, n, b, GROUP: tl.constexpr, TILE: tl.constexpr):
    """Column indices of a program's tile: GROUP consecutive blocks of size b."""
    kk = tl.arange(0, TILE)
    local = kk // b
    block = pid * GROUP + local
    valid = (local < GROUP) & (block < n)
    return block * b + kk % b, block, kk % b, local, valid


@triton.jit
def block_apply_kernel(
    x_ptr, d_ptr, idx_ptr, out_ptr,
    M, n, b,
    s_xm, s_xd, s_dn, s_dc, s_dk, s_om, s_od,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    GROUP: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """out[m, blk*b + c] = sum_k D[blk, c, k] x[m, gather[blk*b + k]] (GATHER), or the same
    product stored at column gather[blk*b + c] of out (SCATTER)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col, block, within, local, valid = _tile_columns(tl.program_id(1), n, b, GROUP, TILE)
    src = col
    dst = col
    if GATHER:
        src = tl.load(idx_ptr + col, mask=valid, other=0)
    if SCATTER:
        dst = tl.load(idx_ptr + col, mask=valid, other=0)
    rows_ok = rm < M
    x = tl.load(
        x_ptr + rm[:, None] * s_xm + src[None, :] * s_xd,
        mask=rows_ok[:, None] & valid[None, :],
        other=0.0,
    )
    # dt[k, c] = D[block, c, k] when k and c lie in the same block of the tile, else 0.
    same = (local[:, None] == local[None, :]) & valid[:, None] & valid[None, :]
    dt = tl.load(
        d_ptr + block[None, :] * s_dn + within[None, :] * s_dc + within[:, None] * s_dk,
        mask=same,
        other=0.0,
    )
    out = dot(x, dt.to(x.dtype), UPCAST, IEEE)
    tl.store(
        out_ptr + rm[:, None] * s_om + dst[None, :] * s_od,
        out.to(out_ptr.dtype.element_ty),
        mask=rows_ok[:, None] & valid[None, :],
    )


@triton.jit
def block_grad_kernel(
    g_ptr, x_ptr, idx_ptr, dd_ptr,
    M, n, b,
    s_gm, s_gd, s_xm, s_xd, s_dn, s_dc, s_dk,
    GATHER: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    GROUP: tl.constexpr, TILE: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dD[blk, c, k] = sum_m g[m, blk*b + c] x[m, gather[blk*b + k]], one tile per program."""
    col, block, within, local, valid = _tile_columns(tl.program_id(0), n, b, GROUP, TILE)
    src = col
    if GATHER:
        src = tl.load(idx_ptr + col, mask=valid, other=0)
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        ok = (rm[:, None] < M) & valid[None, :]
        g = tl.load(g_ptr + rm[:, None] * s_gm + col[None, :] * s_gd, mask=ok, other=0.0)
        x = tl.load(x_ptr + rm[:, None] * s_xm + src[None, :] * s_xd, mask=ok, other=0.0)
        acc += dot(tl.trans(g), x, UPCAST, IEEE)
    same = (local[:, None] == local[None, :]) & valid[:, None] & valid[None, :]
    tl.store(
        dd_ptr + block[:, None] * s_dn + within[:, None] * s_dc + within[None, :] * s_dk,
        acc.to(dd_ptr.dtype.element_ty),
        mask=same,
    )


def block_apply_kernel_call(x, blocks, index, *, scatter):
    m, d = x.shape
    n, b, _ = blocks.shape
    group, tile = _packing(b)
    out = torch.empty(m, d, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, group))
    block_apply_kernel[grid](
        x, blocks, x if index is None else index, out,
        m, n, b,
        x.stride(0), x.stride(1), blocks.stride(0), blocks.stride(1), blocks.stride(2),
        out.stride(0), out.stride(1),
        GATHER=index is not None and not scatter, SCATTER=index is not None and scatter,
        UPCAST=interpreting(), IEEE=ieee(x.dtype),
        GROUP=group, TILE=tile, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return out


def block_grad_kernel_call(grad, x, index, b):
    m, d = x.shape
    n = d // b
    group, tile = _packing(b)
    dblocks = torch.empty(n, b, b, device=x.device, dtype=x.dtype)
    block_grad_kernel[(triton.cdiv(n, group),)](
        grad, x, x if index is None else index, dblocks,
        m, n, b,
        grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        dblocks.stride(0), dblocks.stride(1), dblocks.stride(2),
        GATHER=index is not None, UPCAST=interpreting(), IEEE=ieee(x.dtype),
        GROUP=group, TILE=tile, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return dblocks


# --- Cayley -----------------------------------------------------------------------------


@triton.jit
def _upper_offset(i, j, b):
    """Position of (i, j), i < j, in the row-major strict upper triangle of a b x b matrix."""
    return i * b - i * (i + 1) // 2 + j - i - 1


@triton.jit
def cayley_kernel(
    q_ptr, r_ptr, b, tri,
    TILE: tl.constexpr,
):  # fmt: skip
    """One block per program: R = (I + S)^{-1} (I - S) by Gauss-Jordan elimination."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, TILE)[:, None]
    j = tl.arange(0, TILE)[None, :]
    q = q_ptr + pid * tri
    # Loaded values go to float32 first: the interpreter cannot do bfloat16 arithmetic.
    upper = tl.load(q + _upper_offset(i, j, b), mask=(i < j) & (j < b), other=0.0)
    lower = tl.load(q + _upper_offset(j, i, b), mask=(j < i) & (i < b), other=0.0)
    skew = upper.to(tl.float32) - lower.to(tl.float32)
    eye = tl.where(i == j, 1.0, 0.0)
    lhs = eye + skew
    rhs = eye - skew
    lane = tl.arange(0, TILE)
    for p in range(0, b):
        at_p = i == p
        pivot_row = tl.sum(tl.where(at_p, lhs, 0.0), axis=0)
        pivot_rhs = tl.sum(tl.where(at_p, rhs, 0.0), axis=0)
        pivot = tl.sum(tl.where(lane == p, pivot_row, 0.0), axis=0)
        pivot_row = pivot_row / pivot
        pivot_rhs = pivot_rhs / pivot
        factor = tl.sum(tl.where(j == p, lhs, 0.0), axis=1)
        factor = tl.where(lane == p, 0.0, factor)
        lhs = tl.where(at_p, pivot_row[None, :], lhs - factor[:, None] * pivot_row[None, :])
        rhs = tl.where(at_p, pivot_rhs[None, :], rhs - factor[:, None] * pivot_rhs[None, :])
    out = r_ptr + pid * b * b
    tl.store(out + i * b + j, rhs.to(r_ptr.dtype.element_ty), mask=(i < b) & (j < b))


@triton.jit
def cayley_grad_kernel(
    r_ptr, g_ptr, dq_ptr, b, tri,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, TILE: tl.constexpr,
):  # fmt: skip
    """dq[i<j] = Gs[i, j] - Gs[j, i],  Gs = -1/2 (R + I)^T G (R + I)^T."""
    pid = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, TILE)[:, None]
    j = tl.arange(0, TILE)[None, :]
    inside = (i < b) & (j < b)
    r_t = tl.load(r_ptr + pid * b * b + j * b + i, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + pid * b * b + i * b + j, mask=inside, other=0.0).to(tl.float32)
    p_t = r_t + tl.where(i == j, 1.0, 0.0)
    g_skew = -0.5 * dot(dot(p_t, g, UPCAST, IEEE), p_t, UPCAST, IEEE)
    dq = g_skew - tl.trans(g_skew)
    out = dq_ptr + pid * tri + _upper_offset(i, j, b)
    tl.store(out, dq.to(dq_ptr.dtype.element_ty), mask=(i < j) & (j < b))


def cayley_kernel_call(upper, b):
    tri = b * (b - 1) // 2
    lead = upper.shape[:-1]
    q = upper.reshape(-1, tri).contiguous()
    blocks = torch.empty(q.shape[0], b, b, device=upper.device, dtype=upper.dtype)
    if q.shape[0]:
        cayley_kernel[(q.shape[0],)](q, blocks, b, tri, TILE=dot_width(b))
    return blocks.reshape(*lead, b, b)


def cayley_grad_kernel_call(blocks, grad, b):
    tri = b * (b - 1) // 2
    lead = blocks.shape[:-2]
    r = blocks.reshape(-1, b, b).contiguous()
    g = grad.reshape(-1, b, b).contiguous()
    dq = torch.empty(r.shape[0], tri, device=blocks.device, dtype=blocks.dtype)
    if r.shape[0]:
        cayley_grad_kernel[(r.shape[0],)](
            r, g, dq, b, tri,
            UPCAST=interpreting(), IEEE=ieee(blocks.dtype), TILE=dot_width(b),
        )  # fmt: skip
    return dq.reshape(*lead, tri)
