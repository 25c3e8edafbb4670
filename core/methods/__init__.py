"""Method families; importing this package registers every method in ``core.METHODS``."""

from . import bottleneck, lora, orthogonal, prompts, scaling, spectral  # noqa: F401
