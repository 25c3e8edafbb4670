"""Triton kernels for fused LoRA (imported only when a kernel runs; see ``lora.py``).

One kernel serves the forward and the input gradient, since both have the form

    out = X Wt + scale * (H Lt) Rt  (+ bias),     and it also stores T = H Lt

forward:   X = x, Wt = W^T, Lt = A^T, Rt = B^T, T = h A^T (kept for dB)
backward:  X = dy, Wt = W, Lt = B, Rt = A^T, T = dy B (needed for dA)

Each program owns one (BLOCK_M, BLOCK_N) output tile and writes it once, the low-rank update
already in it (no update tensor, no second pass over the output). T comes one of two ways:

* one column of tiles (N <= BLOCK_N): the loop over the reduction dimension feeds each
  activation tile to both the base product and the (BLOCK_M, rank) product, so the
  activations are read exactly once; the program stores T;
* wider outputs: every column of tiles would recompute the same T (rank / BLOCK_N more
  flops, 25% at rank 16), so T = H Lt is computed once beforehand (cuBLAS; one more read of
  the activations, cheaper than the recomputation on a GPU) and each tile loads its rows.

The reductions over rows (dA = scale g^T h, dB = scale dy^T xa, and dW if the weight
trains) are plain GEMMs with a long reduction, left to cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import dot_width, interpreting
from .lora import lora_backward_rest
from .triton_common import dot, ieee

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


@triton.jit
def linear_lowrank_kernel(
    x_ptr, h_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, out_ptr, t_ptr,
    M, N, K, RANK, scale,
    s_xm, s_xk, s_hm, s_hk, s_wk, s_wn, s_lk, s_lr, s_rr, s_rn, s_om, s_on, s_tm, s_tr,
    HAS_BIAS: tl.constexpr, SEPARATE_H: tl.constexpr, ADD_LOWRANK: tl.constexpr,
    COMPUTE_T: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        row_ok = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * s_xm + rk[None, :] * s_xk, mask=row_ok, other=0.0)
        w_ok = (rk[:, None] < K) & (rn[None, :] < N)
        w = tl.load(w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn, mask=w_ok, other=0.0)
        acc += dot(x, w, UPCAST, IEEE)
        if COMPUTE_T:
            if SEPARATE_H:
                h_at = h_ptr + rm[:, None] * s_hm + rk[None, :] * s_hk
                x = tl.load(h_at, mask=row_ok, other=0.0)
            l_ok = (rk[:, None] < K) & (rr[None, :] < RANK)
            lo = tl.load(l_ptr + rk[:, None] * s_lk + rr[None, :] * s_lr, mask=l_ok, other=0.0)
            t += dot(x, lo, UPCAST, IEEE)
    t_ok = (rm[:, None] < M) & (rr[None, :] < RANK)
    t_at = t_ptr + rm[:, None] * s_tm + rr[None, :] * s_tr
    if COMPUTE_T:
        tl.store(t_at, t.to(t_ptr.dtype.element_ty), mask=t_ok & (pid_n == 0))
    else:
        t = tl.load(t_at, mask=t_ok, other=0.0).to(tl.float32)
    if ADD_LOWRANK:
        r_ok = (rr[:, None] < RANK) & (rn[None, :] < N)
        ro = tl.load(r_ptr + rr[:, None] * s_rr + rn[None, :] * s_rn, mask=r_ok, other=0.0)
        acc += scale * dot(t.to(ro.dtype), ro, UPCAST, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_ok = (rm[:, None] < M) & (rn[None, :] < N)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * s_om + rn[None, :] * s_on, out, mask=out_ok)


def linear_lowrank(x, h, wt, bias, lt, rt, scale, *, add_lowrank=True):
    """out = x wt + scale (h lt) rt + bias and t = h lt, for 2-D operands given as
    (M, K) x, (K, N) wt, (K, r) lt, (r, N) rt (any strides)."""
    m, k = x.shape
    n, rank = wt.shape[1], lt.shape[1]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    hh = x if h is None else h
    compute_t = grid[1] == 1
    t = torch.empty(m, rank, device=x.device, dtype=x.dtype) if compute_t else torch.mm(hh, lt)
    linear_lowrank_kernel[grid](
        x, hh, wt, x if bias is None else bias, lt, rt, out, t,
        m, n, k, rank, float(scale),
        x.stride(0), x.stride(1), hh.stride(0), hh.stride(1), wt.stride(0), wt.stride(1),
        lt.stride(0), lt.stride(1), rt.stride(0), rt.stride(1),
        out.stride(0), out.stride(1), t.stride(0), t.stride(1),
        HAS_BIAS=bias is not None, SEPARATE_H=h is not None, ADD_LOWRANK=add_lowrank,
        COMPUTE_T=compute_t, UPCAST=interpreting(), IEEE=ieee(x.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_R=dot_width(rank),
    )  # fmt: skip
    return out, t


def lora_forward_triton(x, h, weight, bias, a, b, scale):
    """Same contract as ``lora.lora_forward_torch``."""
    return linear_lowrank(x, h, weight.t(), bias, a.t(), b.t(), scale)


def lora_backward_triton(dy, x, h, xa, weight, a, b, scale, needs):
    """Same contract as ``lora.lora_backward_torch``."""
    need_x, need_h, need_a = needs[0], needs[1], needs[4]
    dx = g = None
    if need_x:  # dx = dy W (+ scale g A when h is x), and g = dy B on the way
        dx, g = linear_lowrank(dy, None, weight, None, b, a, scale, add_lowrank=h is None)
    elif need_h or need_a:
        g = torch.mm(dy, b)
    return (dx, *lora_backward_rest(dy, x, h, xa, a, g, scale, needs))
