"""The convolutional "conformer" adapter of Cappellazzo et al. (2024, "Parameter-Efficient
Transfer Learning of Audio Spectrogram Transformers"): a bottleneck whose middle is a
depthwise convolution over the token sequence, after the Conformer convolution module
(Gulati et al., 2020):

    a(z) = W_2 SiLU(LN(DWConv_k(GLU(W_1 z))))      W_1: d -> 2m,  DWConv: m channels,  W_2: m -> d

sequential: h <- h + a(h); parallel: h <- block(x) + a(x). W_2 starts at zero, so the model
starts as the frozen one. Per wrapped block: d 2m + 2m + m k + m + 2m + m d + d parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import check_choice, check_int
from core.methods.bottleneck import MODES, BlockAdapter, BlockConfig, adapter_options
from core.registry import register


@register("conformer_adapter", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class ConformerAdapter(BlockConfig):
    """Conformer adapter (module docstring). Args: ``bottleneck`` m, ``kernel_size`` k (odd;
    31 in the study), ``mode`` "sequential" or "parallel"; ``targets`` the MHSA or FFN blocks."""

    bottleneck: int = 8
    kernel_size: int = 31
    mode: str = "parallel"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "bottleneck")
        check_int(self, "kernel_size")
        check_choice(self, "mode", MODES)
        if self.kernel_size % 2 == 0:
            from core.errors import ConfigError

            raise ConfigError(
                f"kernel_size must be odd (same-length output), got {self.kernel_size}."
            )

    def build(self, module: nn.Module, path: str) -> ConformerAdapterLayer:
        d_in, d_out = self.sizes(module)
        return ConformerAdapterLayer(self, d_in, d_out, adapter_options(module))


class ConformerAdapterLayer(BlockAdapter):
    def __init__(self, cfg: ConformerAdapter, d_in: int, d_out: int, opts: dict) -> None:
        super().__init__(d_in, d_out)
        self.parallel = cfg.mode == "parallel"
        m, d_z = cfg.bottleneck, (d_in if cfg.mode == "parallel" else d_out)
        self.pointwise_in = nn.Linear(d_z, 2 * m, **opts)
        self.depthwise = nn.Conv1d(
            m, m, cfg.kernel_size, padding=cfg.kernel_size // 2, groups=m, **opts
        )
        self.norm = nn.LayerNorm(m, **opts)
        self.pointwise_out = nn.Linear(m, d_out, **opts)
        nn.init.zeros_(self.pointwise_out.weight)
        nn.init.zeros_(self.pointwise_out.bias)

    def branch(self, z: torch.Tensor) -> torch.Tensor:
        t = F.glu(self.pointwise_in(z), dim=-1)  # (batch, tokens, m)
        t = self.depthwise(t.transpose(1, 2)).transpose(1, 2)
        return self.pointwise_out(F.silu(self.norm(t)))

    def adapt(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.branch(x if self.parallel else h)


def conformer_count(d: int, m: int, k: int) -> int:
    """Parameters of one conformer adapter on a d-wide block."""
    return d * 2 * m + 2 * m + m * k + m + 2 * m + m * d + d


def bottleneck_count(d: int, m: int) -> int:
    """Parameters of one bottleneck adapter (down + up with biases)."""
    return d * m + m + m * d + d


def lora_count(d: int, r: int, matrices: int = 2) -> int:
    """LoRA on ``matrices`` square d x d projections per layer."""
    return matrices * r * (d + d)


__all__ = ["ConformerAdapter", "bottleneck_count", "conformer_count", "lora_count"]
