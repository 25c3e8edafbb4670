"""Every Triton kernel equals its torch twin, forward and gradients, run on CPU through
Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter must be switched on before Triton is imported, and the rest of the suite
must not run under it, so the comparisons run in one child process (this file executed as
a script); the tests below read its results. Shapes are odd on purpose (masks on every
edge); fp32 and bf16 inputs. bf16 note: numpy has no bfloat16, and the interpreter
computes ``tl.dot`` on bf16 operands as integers, so under the interpreter the kernels
upcast tiles to fp32 right before ``tl.dot`` (the ``UPCAST`` flag, set only there); loads,
masks, stores and every other step run in bf16 as on a GPU.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOL = {"float32": 1e-5, "bfloat16": 3e-2}  # max |kernel - twin| / max |twin|
DTYPES = ("float32", "bfloat16")


def rel_err(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None and want is None:
        return 0.0
    got, want = got.detach().float(), want.detach().float()
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def compare(kernel_fn, twin_fn, inputs: list[torch.Tensor], seed: int = 1) -> float:
    """Worst relative error over the output and the gradients of every float input."""
    errors = []
    results = []
    for fn in (kernel_fn, twin_fn):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        wanted = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(out, wanted, grad.to(out.dtype), allow_unused=True)
        results.append((out, grads))
    (out_k, grads_k), (out_t, grads_t) = results
    errors.append(rel_err(out_k, out_t))
    errors.extend(rel_err(a, b) for a, b in zip(grads_k, grads_t, strict=True))
    return max(errors)


# --- the cases (run in the child) -----------------------------------------------------------


def case_lora(dtype):
    from core.kernels import (
        lora_backward_torch,
        lora_backward_triton,
        lora_forward_torch,
        lora_forward_triton,
    )

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    # N = 29: one column of output tiles (T computed in the kernel's loop); N = 70: several
    # (T computed beforehand and loaded). The backward's dx has N = K = 45 or 75.
    shapes = ((37, 45, 29, 3), (21, 75, 70, 2))
    for (m, k, n, r), separate in itertools.product(shapes, (False, True)):
        x, h = (torch.randn(m, k, generator=g, dtype=dtype) for _ in range(2))
        w = torch.randn(n, k, generator=g, dtype=dtype)
        bias = torch.randn(n, generator=g, dtype=dtype)
        a = torch.randn(r, k, generator=g, dtype=dtype)
        b = torch.randn(n, r, generator=g, dtype=dtype)
        dy = torch.randn(m, n, generator=g, dtype=dtype)
        adapter_input = h if separate else None  # with dropout: a separate adapter input
        y_k, xa_k = lora_forward_triton(x, adapter_input, w, bias, a, b, 0.7)
        y_t, xa_t = lora_forward_torch(x, adapter_input, w, bias, a, b, 0.7)
        worst = max(worst, rel_err(y_k, y_t), rel_err(xa_k, xa_t))
        needs = (True, adapter_input is not None, True, True, True, True)
        grads_k = lora_backward_triton(dy, x, adapter_input, xa_t, w, a, b, 0.7, needs)
        grads_t = lora_backward_torch(dy, x, adapter_input, xa_t, w, a, b, 0.7, needs)
        worst = max(worst, *(rel_err(p, q) for p, q in zip(grads_k, grads_t, strict=True)))
    return worst


def case_lora_autograd(dtype):
    """The dispatcher end to end: force_triton picks the kernel for CPU tensors; its
    gradients equal autograd through the twin's plain formula."""
    import torch.nn.functional as F

    from core.kernels import force_triton, lora_linear, use_triton

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 11, 40, generator=g, dtype=dtype)
    w, bias = (
        torch.randn(24, 40, generator=g, dtype=dtype),
        torch.randn(24, generator=g, dtype=dtype),
    )
    a, b = (
        torch.randn(5, 40, generator=g, dtype=dtype),
        torch.randn(24, 5, generator=g, dtype=dtype),
    )
    assert not use_triton(x)

    def fused(*t):
        with force_triton():
            assert use_triton(t[0])
            return lora_linear(t[0], t[1], t[2], t[3], t[4], 1.5)

    def plain(x, w, bias, a, b):
        return F.linear(x, w, bias) + 1.5 * F.linear(F.linear(x, a), b)

    return compare(fused, plain, [x, w, bias, a, b])


def case_sgmv(dtype):
    from core.kernels import sgmv_lora_torch, sgmv_lora_triton

    g = torch.Generator().manual_seed(1)
    m, k, n, rank, adapters = 20, 37, 29, 5, 3
    inputs = [
        torch.randn(m, k, generator=g, dtype=dtype),
        torch.randn(m, n, generator=g, dtype=dtype),
        torch.randn(adapters, rank, k, generator=g, dtype=dtype),
        torch.randn(adapters, n, rank, generator=g, dtype=dtype),
    ]
    scales = torch.tensor([0.5, 2.0, 1.5], dtype=dtype)
    worst = 0.0
    # one segment per sample of 5 tokens (the twin's batched path), and ragged segments
    for starts, which in (([0, 5, 10, 15, 20], [1, 0, 2, 1]), ([0, 3, 4, 11, 19], [2, 2, 0, 1])):

        def run(fn, starts=starts, which=which):
            return lambda x, y, a, b: fn(x, y * 1, a, b, scales, starts, which)

        worst = max(worst, compare(run(sgmv_lora_triton), run(sgmv_lora_torch), inputs))
    return worst


def case_block_apply(dtype):
    from core.kernels import block_apply_torch, block_apply_triton

    g = torch.Generator().manual_seed(2)
    worst = 0.0
    # (rows, blocks, block size, gathered): packed small blocks, odd sizes, one wide block
    for rows, n, b, gathered in ((37, 6, 4, True), (19, 3, 6, False), (21, 2, 20, True)):
        d = n * b
        x = torch.randn(rows, d, generator=g, dtype=dtype)
        blocks = torch.randn(n, b, b, generator=g, dtype=dtype)
        gather = torch.randperm(d, generator=g) if gathered else None

        def run(fn, gather=gather):
            return lambda v, blocks_: fn(v, blocks_, gather)

        worst = max(worst, compare(run(block_apply_triton), run(block_apply_torch), [x, blocks]))
    return worst


def case_cayley(dtype):
    from core.kernels import cayley_torch, cayley_triton

    g = torch.Generator().manual_seed(4)
    worst = 0.0
    for b, lead in ((4, (2, 5)), (7, (3,)), (17, (2,))):
        upper = 0.3 * torch.randn(*lead, b * (b - 1) // 2, generator=g, dtype=dtype)
        twin = cayley_torch
        if dtype == torch.bfloat16:  # LAPACK has no bf16 solve: the twin runs in fp32

            def twin(u, b):
                return cayley_torch(u.float(), b).to(u.dtype)

        worst = max(
            worst,
            compare(lambda u, b=b: cayley_triton(u, b), lambda u, b=b, t=twin: t(u, b), [upper]),
        )
    return worst


def case_scale_shift(dtype):
    from core.kernels import scale_shift_torch, scale_shift_triton

    g = torch.Generator().manual_seed(5)
    worst = 0.0
    layouts = (
        ((3, 7, 33), None, 33, True, True),  # (batch, tokens, features)
        ((2, 5, 4, 3), 1, 5, True, False),  # channels first, scale only (IA3)
        ((2, 5, 4, 3), -3, 5, False, True),  # shift only (BitFit), negative axis
        ((130, 17), None, 17, True, True),  # more rows than one program's chunk
    )
    for shape, axis, features, has_scale, has_shift in layouts:
        x = torch.randn(shape, generator=g, dtype=dtype)
        params = [torch.randn(features, generator=g) for _ in range(2)]  # fp32, as adapters

        def run(fn, axis=axis, s=has_scale, b=has_shift):
            return lambda t, scale, shift: fn(t, scale if s else None, shift if b else None, axis)

        inputs = [x, *params]
        worst = max(worst, compare(run(scale_shift_triton), run(scale_shift_torch), inputs))
    return worst


CASES = {
    "fused_lora": case_lora,
    "fused_lora_autograd": case_lora_autograd,
    "sgmv": case_sgmv,
    "block_apply": case_block_apply,
    "cayley": case_cayley,
    "scale_shift": case_scale_shift,
}


def run_cases() -> dict[str, float]:
    import core.kernels.dispatch as dispatch

    assert dispatch.interpreting() and dispatch.triton_available()
    results = {}
    for name, case in CASES.items():
        for dtype in DTYPES:
            results[f"{name}-{dtype}"] = case(getattr(torch, dtype))
    return results


# --- the tests (parent process) --------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict[str, float]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, __file__], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_its_twin_under_the_interpreter(interpreted, case, dtype):
    error = interpreted[f"{case}-{dtype}"]
    assert error <= TOL[dtype], f"{case} ({dtype}): relative error {error:.2e}"


def test_this_process_does_not_interpret_and_cpu_takes_the_twins():
    from core.kernels import dispatch, use_triton

    assert not dispatch.interpreting()
    assert not use_triton(torch.zeros(2))  # CPU tensors: the twins


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run_cases()))
