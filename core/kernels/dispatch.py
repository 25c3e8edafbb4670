"""Choosing between a Triton kernel and its pure-torch twin.

A kernel runs when every tensor of the call lives on a CUDA device and Triton imports;
everything else (CPU, MPS, meta, no Triton) takes the twin. Triton is imported lazily,
on the first CUDA call, so importing ``core`` never pays for it and tests can set
``TRITON_INTERPRET=1`` before the first import.

Under the interpreter (``TRITON_INTERPRET=1``), kernels run on CPU tensors through numpy;
``force_triton()`` makes the dispatchers pick them there too, which is how the tests run
every kernel against its twin without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_FORCED: list[bool] = []


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` works here (cached: the answer does not change)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # missing, or broken by a driver/toolkit mismatch
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels through its CPU interpreter (set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def force_triton(on: bool = True) -> Iterator[None]:
    """Within the block, dispatchers choose the Triton kernel for CPU tensors too (needs
    the interpreter) or, with ``on=False``, the twin even on CUDA."""
    _FORCED.append(on)
    try:
        yield
    finally:
        _FORCED.pop()


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """The dispatch rule: all given tensors on CUDA and Triton importable, unless forced."""
    if _FORCED:
        return _FORCED[-1] and triton_available()
    present = [t for t in tensors if t is not None]
    return bool(present) and all(t.is_cuda for t in present) and triton_available()


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast is on for x's device (never for meta tensors, where
    ``torch.is_autocast_enabled`` refuses the device type)."""
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


def hand_written_step_fits(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether a method's own autograd step may run on x and ``tensors``: real storage
    (meta tensors carry shapes only: the plain formula runs there), autocast off (it would
    cast inside the forward only, leaving the backward's dtypes mixed) and one dtype."""
    if x.device.type == "meta" or autocast_on(x):
        return False
    return len({t.dtype for t in (x, *tensors) if t is not None}) == 1


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def dot_width(n: int) -> int:
    """Tile width for a dimension that enters ``tl.dot`` (at least 16, a power of two)."""
    return max(16, next_power_of_2(n))
