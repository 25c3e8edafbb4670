"""Audio-only methods of Cappellazzo et al. (2024, "Parameter-Efficient Transfer Learning of
Audio Spectrogram Transformers"), registered with core's registry on import.

Conformer adapter: the study's convolutional adapter, a bottleneck whose middle is a
depthwise convolution over the token sequence, after the Conformer convolution module
(Gulati et al., 2020):

    a(z) = W_2 SiLU(LN(DWConv_k(GLU(W_1 z))))      W_1: d -> 2m,  DWConv: m channels,  W_2: m -> d

sequential: h <- h + a(h); parallel: h <- block(x) + a(x). W_2 starts at zero, so the model
starts as the frozen one. Per wrapped block: d 2m + 2m + m k + m + 2m + m d + d parameters.

Prefix tuning on AST (Li & Liang, 2021, "Prefix-Tuning"; the study's variant with 24 prefix
tokens). Every targeted self-attention (transformers' ``ASTAttention``, ``blocks.N.attention``)
attends over n learned keys and values before the tokens' own, per head h:

    head_h = softmax(q_h [P_k,h; K_h]^T / sqrt(d_h)) [P_v,h; V_h],    P_k, P_v in R^{n x d}

The prefixes are learned directly (no reparameterisation MLP: the study trains the key /
value prefixes themselves), so a layer has 2 n d parameters and AST-base with n = 24 has
12 * 2 * 24 * 768 = 442,368. Queries, the output length and the output projection are
unchanged; not the identity at initialisation (the prefixes take attention mass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import AdapterConfig, check_choice, check_int
from core.errors import ConfigError
from core.layers import Adapter
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


PREFIX_INIT_STD = 0.02  # ViT-style token init: small next to LayerNormed keys


@register("ast_prefix_tuning", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class ASTPrefixTuning(AdapterConfig):
    """Prefix tuning on AST's self-attention (module docstring). Args: ``num_virtual_tokens``
    n, the prefix length (24 in the study); ``targets`` the ``blocks.N.attention`` modules."""

    num_virtual_tokens: int = 24

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_virtual_tokens")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        needed = ("q_proj", "k_proj", "v_proj", "o_proj", "num_attention_heads", "scaling")
        if not all(hasattr(module, name) for name in needed):
            return (
                f"AST prefix tuning wraps a self-attention with q/k/v/o projections "
                f"(transformers' ASTAttention), not {type(module).__name__}: target "
                r"'(.*\.)?blocks\.\d+\.attention'"
            )
        return None

    def build(self, module: nn.Module, path: str) -> PrefixAttention:
        return PrefixAttention(module, self.num_virtual_tokens)


class PrefixAttention(Adapter):
    """``prefix_keys`` / ``prefix_values`` (n, d); computes the wrapped attention itself with
    them in front of the tokens' keys and values, returning (output, attention weights)."""

    replaces_base = True
    batch_separable = True  # the prefix is shared, each sample attends over its own tokens

    def __init__(self, attention: nn.Module, count: int) -> None:
        super().__init__()
        weight = attention.k_proj.weight
        shape = (count, attention.k_proj.out_features)
        opts = {"device": weight.device, "dtype": weight.dtype}
        self.prefix_keys = nn.Parameter(torch.empty(shape, **opts))
        self.prefix_values = nn.Parameter(torch.empty(shape, **opts))
        if weight.device.type != "meta":
            nn.init.normal_(self.prefix_keys, std=PREFIX_INIT_STD)
            nn.init.normal_(self.prefix_values, std=PREFIX_INIT_STD)
        self.heads = attention.num_attention_heads

    def on_attach(self, base: nn.Module) -> None:
        self.train(base.training)

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, heads * d_h) -> (batch, heads, tokens, d_h)."""
        return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def with_prefix(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        prefix = prefix.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([prefix, tokens], dim=1)

    def run_base(
        self, x: torch.Tensor, base: nn.Module, attention_mask: Any = None, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.split(base.q_proj(x))
        k = self.split(self.with_prefix(self.prefix_keys, base.k_proj(x)))
        v = self.split(self.with_prefix(self.prefix_values, base.v_proj(x)))
        scores = torch.matmul(q, k.transpose(-1, -2)) * base.scaling
        if attention_mask is not None:  # an additive mask over the tokens: prefixes visible
            scores = scores + F.pad(attention_mask, (k.shape[2] - attention_mask.shape[-1], 0))
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        dropout = base.attention_dropout if self.training else 0.0
        out = torch.matmul(F.dropout(weights, p=dropout, training=self.training), v)
        return base.o_proj(out.transpose(1, 2).flatten(2)), weights


def prefix_count(d: int, n: int) -> int:
    """Parameters of AST prefix tuning in one layer: n keys and n values of width d."""
    return 2 * n * d


def conformer_count(d: int, m: int, k: int) -> int:
    """Parameters of one conformer adapter on a d-wide block."""
    return d * 2 * m + 2 * m + m * k + m + 2 * m + m * d + d


def bottleneck_count(d: int, m: int) -> int:
    """Parameters of one bottleneck adapter (down + up with biases)."""
    return d * m + m + m * d + d


def lora_count(d: int, r: int, matrices: int = 2) -> int:
    """LoRA on ``matrices`` square d x d projections per layer."""
    return matrices * r * (d + d)


__all__ = [
    "ASTPrefixTuning",
    "ConformerAdapter",
    "PrefixAttention",
    "bottleneck_count",
    "conformer_count",
    "lora_count",
    "prefix_count",
]
