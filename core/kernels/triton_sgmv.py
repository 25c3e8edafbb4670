"""Triton kernel for segment-gathered GEMMs (SGMV; see ``sgmv.py``).

    out[rows of s] (+)= scale[a] * x[rows of s] W[a]^T,     a = adapters[s], W (L, P, Q)

One program owns BLOCK_M rows of one segment and BLOCK_P output columns; it reads the
segment's bounds and adapter index and streams that adapter's W. The LoRA shrink is this
kernel with W = A (out = x A^T, (M, R)); the expand is it with W = B, scaled and
accumulated into the base output. The backward runs it with B^T and A^T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dispatch import dot_width, interpreting
from .triton_common import dot, ieee

BLOCK_M, BLOCK_P, BLOCK_Q = 32, 64, 32


@triton.jit
def segment_matmul_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr, start_ptr, adapter_ptr,
    P, Q,
    s_xm, s_xq, s_wl, s_wp, s_wq, s_om, s_op,
    ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    start = tl.load(start_ptr + seg)
    end = tl.load(start_ptr + seg + 1)
    adapter = tl.load(adapter_ptr + seg).to(tl.int64)
    rm = start + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rp = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    rows_ok = rm < end
    w_base = w_ptr + adapter * s_wl
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for q0 in range(0, Q, BLOCK_Q):
        rq = q0 + tl.arange(0, BLOCK_Q)
        x_ok = rows_ok[:, None] & (rq[None, :] < Q)
        x = tl.load(x_ptr + rm[:, None] * s_xm + rq[None, :] * s_xq, mask=x_ok, other=0.0)
        w_ok = (rq[:, None] < Q) & (rp[None, :] < P)
        w = tl.load(w_base + rq[:, None] * s_wq + rp[None, :] * s_wp, mask=w_ok, other=0.0)
        acc += dot(x, w, UPCAST, IEEE)
    acc *= tl.load(scale_ptr + adapter).to(tl.float32)
    out_ok = rows_ok[:, None] & (rp[None, :] < P)
    out_at = out_ptr + rm[:, None] * s_om + rp[None, :] * s_op
    if ACCUMULATE:
        acc += tl.load(out_at, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_at, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


def segment_matmul(x, w, scales, meta, out=None):
    """``out[seg] (+)= scales[a] x[seg] w[a]^T`` for x (M, Q), w (L, P, Q); a new (M, P)
    output (zero outside segments) when ``out`` is None, else accumulated into ``out``."""
    starts, adapters, longest = meta
    m, q = x.shape
    p = w.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.zeros(m, p, device=x.device, dtype=x.dtype)
    grid = (len(adapters), triton.cdiv(longest, BLOCK_M), triton.cdiv(p, BLOCK_P))
    block_q = BLOCK_Q if q > 16 else dot_width(q)
    segment_matmul_kernel[grid](
        x, w, out, scales, starts, adapters,
        p, q,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, UPCAST=interpreting(), IEEE=ieee(x.dtype),
        BLOCK_M=BLOCK_M, BLOCK_P=BLOCK_P, BLOCK_Q=block_q,
    )  # fmt: skip
    return out
