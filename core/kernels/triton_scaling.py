"""Triton kernels for the fused scale-and-shift (see ``scaling.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_P, BLOCK_F = 64, 32
MAX_CHUNKS = 128  # programs along the positions in the backward (partial sums per program)


@triton.jit
def _offsets(rp, rf, F, inner):
    """Addresses of (position, feature) in x viewed as (outer, F, inner); a position is one
    (outer, inner) pair."""
    outer = rp // inner
    within = rp % inner
    return outer[:, None] * F * inner + rf[None, :] * inner + within[:, None]


@triton.jit
def scale_shift_forward_kernel(
    x_ptr, s_ptr, b_ptr, y_ptr, P, F, inner,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    rf = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    ok = (rp[:, None] < P) & (rf[None, :] < F)
    at = _offsets(rp, rf, F, inner)
    y = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        y = y * tl.load(s_ptr + rf, mask=rf < F, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        y = y + tl.load(b_ptr + rf, mask=rf < F, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def scale_shift_backward_kernel(
    dy_ptr, x_ptr, s_ptr, dx_ptr, ds_ptr, db_ptr, P, F, inner, per_chunk,
    HAS_SCALE: tl.constexpr, NEED_X: tl.constexpr, NEED_S: tl.constexpr, NEED_B: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    rf = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = rf < F
    s = tl.full((BLOCK_F,), 1.0, tl.float32)
    if HAS_SCALE:
        s = tl.load(s_ptr + rf, mask=f_ok, other=0.0).to(tl.float32)
    sum_s = tl.zeros((BLOCK_F,), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for p0 in range(chunk * per_chunk, tl.minimum((chunk + 1) * per_chunk, P), BLOCK_P):
        rp = p0 + tl.arange(0, BLOCK_P)
        ok = (rp[:, None] < P) & (rp[:, None] < (chunk + 1) * per_chunk) & f_ok[None, :]
        at = _offsets(rp, rf, F, inner)
        dy = tl.load(dy_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if NEED_X:
            tl.store(dx_ptr + at, (dy * s[None, :]).to(dx_ptr.dtype.element_ty), mask=ok)
        if NEED_S:
            x = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32)
            sum_s += tl.sum(dy * x, axis=0)
        if NEED_B:
            sum_b += tl.sum(dy, axis=0)
    if NEED_S:
        tl.store(ds_ptr + chunk * F + rf, sum_s, mask=f_ok)
    if NEED_B:
        tl.store(db_ptr + chunk * F + rf, sum_b, mask=f_ok)


def scale_shift_forward(x, scale, shift, layout):
    outer, features, inner = layout
    positions = outer * inner
    y = torch.empty_like(x)
    grid = (triton.cdiv(positions, BLOCK_P), triton.cdiv(features, BLOCK_F))
    scale_shift_forward_kernel[grid](
        x, x if scale is None else scale, x if shift is None else shift, y,
        positions, features, inner,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        BLOCK_P=BLOCK_P, BLOCK_F=BLOCK_F,
    )  # fmt: skip
    return y


def scale_shift_backward(dy, x, scale, layout, need_x, need_scale, need_shift):
    outer, features, inner = layout
    positions = outer * inner
    chunks = max(1, min(MAX_CHUNKS, triton.cdiv(positions, BLOCK_P)))
    per_chunk = triton.cdiv(triton.cdiv(positions, chunks), BLOCK_P) * BLOCK_P
    chunks = triton.cdiv(positions, per_chunk)
    dx = torch.empty_like(dy) if need_x else None
    partial = {"device": dy.device, "dtype": torch.float32}
    ds = torch.empty(chunks, features, **partial) if need_scale else None
    db = torch.empty(chunks, features, **partial) if need_shift else None
    grid = (chunks, triton.cdiv(features, BLOCK_F))
    scale_shift_backward_kernel[grid](
        dy, x, x if scale is None else scale, dy if dx is None else dx,
        dy if ds is None else ds, dy if db is None else db,
        positions, features, inner, per_chunk,
        HAS_SCALE=scale is not None, NEED_X=need_x, NEED_S=need_scale, NEED_B=need_shift,
        BLOCK_P=BLOCK_P, BLOCK_F=BLOCK_F,
    )  # fmt: skip
    return (
        dx,
        None if ds is None else ds.sum(0),
        None if db is None else db.sum(0),
    )
