"""Method families; importing this package registers every method in ``core.METHODS``."""

from . import (  # noqa: F401
    adaptive_rank,
    bottleneck,
    kronecker,
    lora,
    lora_variants,
    mixtures,
    orthogonal,
    prompts,
    quantized,
    scaling,
    sparse,
    spectral,
    style,
)
