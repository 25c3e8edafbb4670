"""The LoRA family: low-rank updates of a frozen weight.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3):

    h = W0 x + (alpha / r) B A x,     A in R^{r x k},  B in R^{d x r},  B = 0 at start

so the update starts at zero and has r (d + k) trainable parameters per matrix.
rsLoRA (Kalajdzievski, 2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with
LoRA") scales by alpha / sqrt(r) instead. PiSSA (Meng et al., 2024, "PiSSA: Principal
Singular Values and Singular Vectors Adaptation") starts A, B at the top-r singular
triplets of W0 and freezes the residual W0 - (alpha/r) B A in the base.

Layers: Linear (and transformers' Conv1D), Conv1d/2d/3d (LoCon-style: A has the base's
kernel, B is 1x1, as in LyCORIS and HF PEFT) and Embedding (A is a lookup table).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..errors import CheckpointError, ConfigError
from ..layers import Adapter, conv_forward, is_fan_in_fan_out, weight_dtype
from ..peft_format import PeftFormat, register_peft_format
from ..registry import register

INITS = ("kaiming", "gaussian", "pissa")


def pattern_value(patterns: dict, path: str, default):
    """HF PEFT's rank_pattern/alpha_pattern lookup: a key matches a name's dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) or is_fan_in_fan_out(module):
        return "linear"
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d (groups=1, zero padding), nn.Embedding"


@register("lora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class LoRA(AdapterConfig):
    """LoRA config (Hu et al., 2021); defaults follow HF PEFT's ``LoraConfig``.

    Args:
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by alpha / r.
        dropout: dropout on the adapter's input path.
        use_rslora: scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r.
        init: "kaiming" (A Kaiming-uniform, B zero: HF PEFT's default), "gaussian"
            (A ~ N(0, 1/r), B zero) or "pissa" (principal singular init; Linear only).
        rank_pattern / alpha_pattern: per-module r / alpha, keyed by a name suffix regex.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    use_rslora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        check_choice(self, "init", INITS)
        if not isinstance(self.use_rslora, bool):
            raise ConfigError(f"LoRA.use_rslora must be True or False, got {self.use_rslora!r}")
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ConfigError(f"LoRA.rank_pattern[{key!r}] must be an int >= 1, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
                raise ConfigError(f"LoRA.alpha_pattern[{key!r}] must be > 0, got {alpha!r}")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        kind = layer_kind(module)
        if kind is None:
            return f"LoRA wraps {SUPPORTED}"
        if kind == "conv" and (module.groups != 1 or module.padding_mode != "zeros"):
            return "LoRA on convolutions needs groups=1 and padding_mode='zeros'"
        if self.init == "pissa" and kind != "linear":
            return "init='pissa' is defined for linear layers only"
        return None

    def rank_and_scale(self, path: str) -> tuple[int, float]:
        r = pattern_value(self.rank_pattern, path, self.r)
        alpha = pattern_value(self.alpha_pattern, path, self.alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)

    def build(self, module: nn.Module, path: str) -> LoRAAdapter:
        r, scale = self.rank_and_scale(path)
        return LoRAAdapter(module, r=r, scale=scale, dropout=self.dropout, init=self.init)


def linear_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in), whatever its storage layout."""
    return base.weight.T if is_fan_in_fan_out(base) else base.weight


class LoRAAdapter(Adapter):
    """``y + scale * B(A(dropout(x)))`` on one base layer; see the module docstring."""

    def __init__(self, base: nn.Module, *, r: int, scale: float, dropout: float, init: str):
        super().__init__()
        self.kind = layer_kind(base)
        self.r, self.scale, self.init = r, scale, init
        self.fan_in_fan_out = is_fan_in_fan_out(base)
        self.dilation = tuple(getattr(base, "dilation", (1,)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        a_shape, b_shape = self.factor_shapes(base, r)
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self.A = nn.Parameter(torch.empty(a_shape, **opts))
        self.B = nn.Parameter(torch.empty(b_shape, **opts))
        self.reset_parameters()

    def factor_shapes(self, base: nn.Module, r: int):
        if self.kind == "linear":
            out_f, in_f = linear_weight(base).shape
            return (r, in_f), (out_f, r)
        if self.kind == "conv":
            out_c, in_c, *kernel = base.weight.shape
            return (r, in_c, *kernel), (out_c, r, *[1] * len(kernel))
        num, dim = base.weight.shape  # embedding: A is a table over the vocabulary
        return (r, num), (dim, r)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.kind == "embedding":  # HF PEFT: A zero, B normal (zero output at start)
                nn.init.zeros_(self.A)
                nn.init.normal_(self.B)
                return
            nn.init.zeros_(self.B)
            if self.init == "gaussian":
                nn.init.normal_(self.A, std=1.0 / self.r)
            else:  # kaiming; pissa overwrites both in on_attach
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    # -- PiSSA: move the principal part of W0 into A, B --------------------------------

    def on_attach(self, base: nn.Module) -> None:
        if self.init != "pissa" or base.weight.is_meta:
            return
        with torch.no_grad():
            weight = linear_weight(base).float()
            u, s, vh = torch.linalg.svd(weight, full_matrices=False)
            root = (s[: self.r] / self.scale).sqrt()
            a = root[:, None] * vh[: self.r]
            b = u[:, : self.r] * root[None, :]
            self.A.copy_(a)
            self.B.copy_(b)
            # Kept (not saved) so the base can be restored and exports stay exact.
            self.register_buffer("principal_A", a.to(self.A.dtype), persistent=False)
            self.register_buffer("principal_B", b.to(self.B.dtype), persistent=False)
            self._add_to_base(base, -self.scale * (b @ a))

    def on_detach(self, base: nn.Module) -> None:
        if getattr(self, "principal_A", None) is not None:
            with torch.no_grad():
                self._add_to_base(base, self.scale * (self.principal_B @ self.principal_A))

    # -- forward and merge --------------------------------------------------------------

    def lowrank_factors(self):
        """Linear layers take the wrapper's fused path (``core.kernels.lora_linear``)."""
        if self.kind != "linear":
            return None
        return self.A, self.B, self.scale, self.dropout

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.kind == "embedding":
            rows = F.embedding(x, self.A.T, padding_idx=base.padding_idx)
            update = rows @ self.B.T
        else:
            h = self.dropout(x.to(self.A.dtype))
            if self.kind == "linear":
                return self._add_linear_update(F.linear(h, self.A), y)
            update = conv_forward(base, h, self.A, groups=1)
            update = conv_forward(base, update, self.B, stride=1, padding=0, dilation=1)
        return torch.add(y, update.to(y.dtype), alpha=self.scale)

    def _add_linear_update(self, xa: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + scale * xa B^T as one GEMM onto y (in place when no graph is recorded), not
        a separate update tensor added in a second pass. (Stacked with other adapters; a
        LoRA alone on a linear layer takes the fused path.)"""
        if y.dtype != xa.dtype:  # float32 adapter on a half base: add in y's dtype
            return torch.add(y, F.linear(xa, self.B).to(y.dtype), alpha=self.scale)
        xa2, y2 = xa.reshape(-1, self.r), y.reshape(-1, y.shape[-1])
        if not torch.is_grad_enabled() and y.is_contiguous():
            y2.addmm_(xa2, self.B.t(), alpha=self.scale)
            return y
        return torch.addmm(y2, xa2, self.B.t(), alpha=self.scale).view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in the base weight's own layout."""
        a, b = self.A.float(), self.B.float()
        if self.kind == "conv":
            delta = torch.einsum("or,ri...->oi...", b.flatten(1), a)
        else:
            delta = b @ a
            if self.kind == "embedding":
                delta = delta.T
        return self.scale * delta

    def _add_to_base(self, base: nn.Module, delta: torch.Tensor) -> None:
        if is_fan_in_fan_out(base):
            delta = delta.T
        base.weight.data += delta.to(base.weight.dtype)

    def merge(self, base: nn.Module) -> None:
        self._add_to_base(base, self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        self._add_to_base(base, -self.delta_weight())


# --- HF PEFT spelling -----------------------------------------------------------------


def _lora_from_peft(pc: dict) -> LoRA:
    return LoRA(
        targets=pc["target_modules"],
        exclude=pc.get("exclude_modules") or None,
        modules_to_save=pc.get("modules_to_save") or None,
        r=int(pc["r"]),
        alpha=float(pc["lora_alpha"]),
        dropout=float(pc.get("lora_dropout", 0.0)),
        use_rslora=bool(pc.get("use_rslora", False)),
        rank_pattern=dict(pc.get("rank_pattern") or {}),
        alpha_pattern=dict(pc.get("alpha_pattern") or {}),
    )


def _exported_factors(adapter: LoRAAdapter) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(A, B, r) for PEFT. A PiSSA adapter becomes the plain LoRA of rank 2r on the
    original base, [B, -B0] [A; A0], so PEFT needs no PiSSA conversion step."""
    a, b, r = adapter.A.detach(), adapter.B.detach(), adapter.r
    if getattr(adapter, "principal_A", None) is not None:
        a = torch.cat([a, adapter.principal_A])
        b = torch.cat([b, -adapter.principal_B], dim=1)
        r = 2 * r
    return a, b, r


def _lora_to_peft(cfg: LoRA, adapters: dict[str, LoRAAdapter]) -> dict:
    ranks, alphas = {}, {}
    for path, adapter in adapters.items():
        base_dilation = getattr(adapter, "dilation", (1,))
        if adapter.kind == "conv" and any(d != 1 for d in base_dilation):
            raise CheckpointError(
                f"{path}: PEFT's LoRA ignores a convolution's dilation, so this adapter "
                "would compute differently there; it cannot be exported exactly."
            )
        r = _exported_factors(adapter)[2]
        ranks[path] = r
        alphas[path] = adapter.scale * (math.sqrt(r) if cfg.use_rslora else r)
    return {
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        # Per-module values keyed by the escaped full name keep every module exact.
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != cfg.r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != cfg.alpha},
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": any(a.fan_in_fan_out for a in adapters.values()),
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
    }


def _lora_tensors(adapter: LoRAAdapter) -> dict[str, torch.Tensor]:
    a, b, _ = _exported_factors(adapter)
    if adapter.kind == "embedding":
        return {"lora_embedding_A": a, "lora_embedding_B": b}
    return {"lora_A.weight": a, "lora_B.weight": b}


# PEFT's LoRA tensor names, and the PEFT LoRA options omnipeft's LoRA family does not
# reproduce (refused, never ignored); shared with the LoRA variants and AdaLoRA.
LORA_TENSOR_NAMES = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_embedding_A": "A",
    "lora_embedding_B": "B",
}
LORA_NEUTRAL = {
    "lora_bias": False,
    "bias": "none",
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


register_peft_format(
    PeftFormat(
        peft_type="LORA",
        method="lora",
        tensor_names=LORA_TENSOR_NAMES,
        config_from_peft=_lora_from_peft,
        config_to_peft=_lora_to_peft,
        export_tensors=_lora_tensors,
        neutral={"use_dora": False, **LORA_NEUTRAL},
    )
)
