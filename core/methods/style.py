"""StyleInject: parallel low-rank down-projections mixed by a style router.

StyleInject (Zhou, Bai, Yang, Zhao, 2024, "StyleInject: Parameter Efficient Tuning of
Text-to-Image Diffusion Models", Dynamic Multi-Style Adaptation, the equation
``Delta h = B sum_i s_i A_i(x)``):

    h = W0 x + (alpha / r) B sum_{i=1..n} s_i(x) A_i x,    s(x) = softmax(G stat(x))

n down-projections A_i (r x k) share one up-projection B (d x r, zero at start, so the
model starts unchanged). The style router G maps instance-wise statistics of the incoming
visual features to n softmax weights: a Linear for Linear layers, a 1x1 convolution over
the spatially pooled features for Conv2d layers. Following the paper's variance-based
adjustment, the statistics are taken per sample and channel over the tokens (or pixels):
the standard deviation (``router_stats="std"``, the default), or mean and standard
deviation concatenated (``"mean_std"``), so that the mixing follows the feature variance
(the style) rather than the content at any one position.

Trainable parameters per layer: n r k + d r + (n c_stat + n), with c_stat = k or 2 k.
The router makes the update input-dependent, so StyleInject does not merge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..layers import Adapter, conv_forward, weight_dtype
from ..registry import register

ROUTER_STATS = ("std", "mean_std")
EPS = 1e-5


def instance_stats(x: torch.Tensor, kind: str, mode: str) -> torch.Tensor:
    """Per-sample, per-channel statistics of ``x`` over its tokens / pixels: (batch, c_stat).

    Linear inputs are (batch, ..., channels) (a single token gives a zero std); conv inputs
    are (batch, channels, *spatial).
    """
    if kind == "conv":
        flat = x.flatten(2).transpose(1, 2)  # (batch, positions, channels)
    else:
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
    var, mean = torch.var_mean(flat.float(), dim=1, correction=0)
    std = (var + EPS).sqrt()
    stats = std if mode == "std" else torch.cat([mean, std], dim=-1)
    return stats.to(x.dtype)


@register("styleinject", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class StyleInject(AdapterConfig):
    """StyleInject config (Zhou et al., 2024); see the module docstring for the equation.

    Args:
        r: rank of each down-projection A_i and of the shared B.
        num_styles: n, the parallel down-projections mixed by the router.
        alpha: scale numerator; the update is multiplied by alpha / r.
        router_stats: "std" (instance-wise std per channel) or "mean_std".
        router_temperature: softmax temperature of the router.
        dropout: dropout on the adapter's input path.
    """

    r: int = 4
    num_styles: int = 4
    alpha: float = 4.0
    router_stats: str = "std"
    router_temperature: float = 1.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r")
        check_int(self, "num_styles")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_choice(self, "router_stats", ROUTER_STATS)
        check_float(self, "router_temperature", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, nn.Conv2d):
            if module.groups != 1 or module.padding_mode != "zeros":
                return "StyleInject on Conv2d needs groups=1 and padding_mode='zeros'"
            return None
        return "StyleInject wraps nn.Linear and nn.Conv2d"

    def build(self, module: nn.Module, path: str) -> StyleInjectAdapter:
        return StyleInjectAdapter(module, cfg=self)


class StyleInjectAdapter(Adapter):
    """``y + scale * B sum_i s_i(x) A_i x`` on one Linear / Conv2d; see ``StyleInject``."""

    batch_separable = True  # each sample is routed by its own statistics

    def __init__(self, base: nn.Module, *, cfg: StyleInject) -> None:
        super().__init__()
        self.kind = "conv" if isinstance(base, nn.Conv2d) else "linear"
        self.r, self.n = cfg.r, cfg.num_styles
        self.scale = cfg.alpha / cfg.r
        self.stats_mode, self.temperature = cfg.router_stats, cfg.router_temperature
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        if self.kind == "linear":
            d, k = base.weight.shape
            self.A = nn.Parameter(torch.empty(self.n * self.r, k, **opts))
            self.B = nn.Parameter(torch.empty(d, self.r, **opts))
            stat_dim = k if self.stats_mode == "std" else 2 * k
            self.router = nn.Linear(stat_dim, self.n, **opts)
        else:
            d, k, *kernel = base.weight.shape
            self.A = nn.Parameter(torch.empty(self.n * self.r, k, *kernel, **opts))
            self.B = nn.Parameter(torch.empty(d, self.r, 1, 1, **opts))
            stat_dim = k if self.stats_mode == "std" else 2 * k
            self.router = nn.Conv2d(stat_dim, self.n, kernel_size=1, **opts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for a in self.A.view(self.n, self.r, *self.A.shape[1:]):
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(self.B)
            nn.init.zeros_(self.router.weight)  # uniform routing at the start
            nn.init.zeros_(self.router.bias)

    def style_weights(self, x: torch.Tensor) -> torch.Tensor:
        """s(x): (batch, n) softmax weights from the instance-wise statistics of ``x``."""
        stats = instance_stats(x, self.kind, self.stats_mode)
        if self.kind == "conv":
            logits = self.router(stats[:, :, None, None]).flatten(1)
        else:
            logits = self.router(stats)
        return torch.softmax(logits.float() / self.temperature, dim=-1).to(x.dtype)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        h = self.dropout(x.to(self.A.dtype))
        s = self.style_weights(h)  # (batch, n)
        if self.kind == "linear":
            down = F.linear(h, self.A).unflatten(-1, (self.n, self.r))  # (b, ..., n, r)
            shape = (s.shape[0],) + (1,) * (down.dim() - 3) + (self.n, 1)
            mixed = (down * s.view(shape)).sum(dim=-2)  # (b, ..., r)
            update = F.linear(mixed, self.B)
        else:
            down = conv_forward(base, h, self.A, groups=1)  # (b, n r, H, W)
            down = down.unflatten(1, (self.n, self.r))
            mixed = (down * s[:, :, None, None, None]).sum(dim=1)
            update = F.conv2d(mixed, self.B)
        return torch.add(y, update.to(y.dtype), alpha=self.scale)


__all__ = ["ROUTER_STATS", "StyleInject", "StyleInjectAdapter", "instance_stats"]
