"""Triton kernels for the hot paths, each with a pure-torch twin of the same signature.

=====================  ==============================  ==================================
operation              dispatcher                      kernel / twin
=====================  ==============================  ==================================
fused LoRA linear      ``lora_linear``                 ``lora_forward_triton`` /
                                                       ``lora_forward_torch`` (+ backward)
multi-adapter LoRA     ``sgmv_lora``                   ``sgmv_lora_triton`` /
                                                       ``sgmv_lora_torch``
block / butterfly      ``block_apply``,                ``block_apply_triton`` /
orthogonal transform   ``butterfly_apply``             ``block_apply_torch``
batched Cayley         ``cayley``                      ``cayley_triton`` / ``cayley_torch``
scale and shift        ``scale_shift``                 ``scale_shift_triton`` /
                                                       ``scale_shift_torch``
=====================  ==============================  ==================================

Dispatch (``dispatch.use_triton``): every tensor on CUDA and Triton importable -> kernel;
otherwise the twin, which is the CPU fast path. Triton is imported only when a kernel runs.
"""

from .dispatch import force_triton, interpreting, triton_available, use_triton
from .lora import (
    LoRALinearFunction,
    lora_backward_torch,
    lora_backward_triton,
    lora_forward_torch,
    lora_forward_triton,
    lora_linear,
)
from .orthogonal import (
    block_apply,
    block_apply_torch,
    block_apply_triton,
    butterfly_apply,
    cayley,
    cayley_torch,
    cayley_triton,
)
from .scaling import scale_shift, scale_shift_torch, scale_shift_triton
from .sgmv import sgmv_lora, sgmv_lora_torch, sgmv_lora_triton

__all__ = [
    "LoRALinearFunction",
    "block_apply",
    "block_apply_torch",
    "block_apply_triton",
    "butterfly_apply",
    "cayley",
    "cayley_torch",
    "cayley_triton",
    "force_triton",
    "interpreting",
    "lora_backward_torch",
    "lora_backward_triton",
    "lora_forward_torch",
    "lora_forward_triton",
    "lora_linear",
    "scale_shift",
    "scale_shift_torch",
    "scale_shift_triton",
    "sgmv_lora",
    "sgmv_lora_torch",
    "sgmv_lora_triton",
    "triton_available",
    "use_triton",
]
