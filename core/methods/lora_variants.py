"""Static variants of LoRA. This family extends LoRA by design: it imports the LoRA config,
layer and helpers from ``core.methods.lora`` and changes what the paper changes.

* DoRA, weight-decomposed (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank
  Adaptation", eq. 5): ``W' = m (W0 + s B A) / ||W0 + s B A||_c`` with a trainable
  magnitude m (one per output column of the paper's d x k weight, i.e. per output
  feature), started at ``||W0||_c`` so the model starts unchanged; the norm is treated as
  a constant in backpropagation (sec. 4.3). Registered as ``"dora"``; the rank-allocation
  DoRA of Mao et al. is another method with another name.
* VeRA (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation", eq. 1):
  ``h = W0 x + Lambda_b B Lambda_d A x`` with one frozen random pair A, B shared by every
  adapted layer (regenerated from a seed, never stored) and trainable vectors b (zero at
  start) and d: ``d_out + r`` parameters per layer.
* DyLoRA (Valipour et al., 2023, "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models
  using Dynamic Search-Free Low-Rank Adaptation", eq. 4): each training forward samples a
  rank b in [r_min, r] and runs ``W0 x + (alpha / b) B[:, :b] A[:b] x``; afterwards the
  adapter evaluates and exports at any rank <= r.
* MELoRA (Ren et al., 2024, "MELoRA: Mini-Ensemble Low-Rank Adapters for
  Parameter-Efficient Fine-Tuning", eq. 4): n mini LoRAs on disjoint slices of the input
  and output, ``Delta W = diag(B_1 A_1, ..., B_n A_n)``: rank up to n r for r (d + k)
  parameters.
* ShareLoRA (Y. Song et al., 2024, "ShareLoRA: Parameter Efficient and Robust Large Language
  Model Fine-tuning via Shared Low-Rank Adaptation"): A (ShareA), B (ShareB) or both
  (ShareAB) shared by every layer of one module type: ``Delta W_l = B_l A``.
* CapaBoost (H. Song et al., 2024, "Increasing Model Capacity for Free: A Simple Strategy
  for Parameter Efficient Fine-tuning", eq. 3): ``Delta W = sum_i (B o M^B_i)(A o M^A_i)``
  over d fixed random masks of density rho on one shared pair A, B: rank up to d r at the
  parameter cost of one LoRA.

Layers that share tensors across an injection (VeRA's projections, ShareLoRA's factors)
keep them in the first adapter built (the owner); the others reach them through it, so
parameters, optimizers and counts hold them once and a device move carries all.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..errors import CheckpointError, ConfigError
from ..layers import Adapter, active_dropout, conv_forward, is_fan_in_fan_out, weight_dtype
from ..peft_format import PeftFormat, register_peft_format
from ..registry import register
from ..targeting import adapted_modules
from .lora import (
    LORA_NEUTRAL,
    LORA_TENSOR_NAMES,
    LoRA,
    LoRAAdapter,
    _lora_from_peft,
    _lora_to_peft,
    layer_kind,
    linear_weight,
)

LINEAR_ONLY = "nn.Linear or transformers Conv1D"


def _check_bool(cfg: object, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(
                f"{type(cfg).__name__}.{name} must be True or False, got {getattr(cfg, name)!r}."
            )


def _refuse_pissa(cfg: LoRA) -> None:
    if cfg.init == "pissa":
        raise ConfigError(
            f"{type(cfg).__name__} starts from the base weight itself; init='pissa' is a "
            "LoRA option it does not support. Use init='kaiming' or 'gaussian'."
        )


def _linear_only(cfg: AdapterConfig, module: nn.Module) -> str | None:
    if layer_kind(module) != "linear":
        return f"{type(cfg).__name__} wraps {LINEAR_ONLY}"
    return None


def _set_base_weight(base: nn.Module, weight: torch.Tensor) -> None:
    """Write a weight given as (out, in) (or the conv/embedding layout) into ``base``."""
    if is_fan_in_fan_out(base):
        weight = weight.T
    base.weight.data.copy_(weight.to(base.weight.dtype))


# --- sharing across the adapters of one injection -------------------------------------------


class SharesAcrossLayers:
    """Config mixin: finds the injection now being built, to share tensors within it."""

    def __getstate__(self) -> dict[str, Any]:
        # The build-time book-keeping is not part of the config's value.
        return {k: v for k, v in self.__dict__.items() if k != "_injection"}

    def injection(self, path: str) -> dict[str, Any]:
        """Book-keeping of the injection being built: its paths and shared groups.

        One ``inject`` (or load) builds every adapter before ``attach`` puts any in place
        (which sets its ``path``), and builds each path once. So an attached member or a
        path met again means a new injection (the same config under another name or in
        another model), which shares nothing with the previous one.
        """
        state = self.__dict__.get("_injection")
        if state is None or path in state["paths"] or _any_attached(state["members"]):
            state = {"paths": set(), "members": [], "groups": {}}
            object.__setattr__(self, "_injection", state)
        state["paths"].add(path)
        return state


def _any_attached(members: list[weakref.ref]) -> bool:
    return any(hasattr(m, "path") for m in (ref() for ref in members) if m is not None)


# --- DoRA, weight-decomposed ------------------------------------------------------------------


@register("dora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class DoRA(LoRA):
    """Weight-decomposed DoRA (Liu et al., 2024); fields and defaults as ``LoRA`` (HF PEFT's
    ``LoraConfig(use_dora=True)``). Per layer: LoRA's r (d_in + d_out) plus d_out magnitudes
    (d = embedding width for embeddings). Starts as the identity: m = ||W0||_c, B = 0.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        _refuse_pissa(self)

    def build(self, module: nn.Module, path: str) -> DoRAAdapter:
        r, scale = self.rank_and_scale(path)
        return DoRAAdapter(module, r=r, scale=scale, dropout=self.dropout, init=self.init)


class DoRAAdapter(LoRAAdapter):
    """``m / ||W0 + s B A||_c * (W0 x + s B A x)`` on one layer, added as a correction to
    the base output so the frozen forward runs once: ``y + (g - 1) W0 x + g s B A x`` with
    ``g = m / ||.||_c`` (as HF PEFT; with active dropout the W0 term sees the dropped input).
    ``magnitude`` holds one entry per output feature (per embedding dimension)."""

    def __init__(self, base: nn.Module, **kwargs: Any) -> None:
        super().__init__(base, **kwargs)
        with torch.no_grad():
            norm = self.column_norm(self.oriented_weight(base).to(self.A.dtype))
        self.magnitude = nn.Parameter(norm)

    def oriented_weight(self, base: nn.Module) -> torch.Tensor:
        """The base weight in ``delta_weight``'s layout: (out, in), conv, or (num, dim)."""
        return linear_weight(base) if self.kind == "linear" else base.weight

    def column_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W||_c: one norm per output feature (per embedding dimension)."""
        if self.kind == "embedding":
            return torch.linalg.vector_norm(weight, dim=0)
        return torch.linalg.vector_norm(weight.flatten(1), dim=1)

    def magnitude_scale(self, base: nn.Module) -> torch.Tensor:
        """g = m / ||W0 + s B A||_c, the norm detached (the paper's sec. 4.3)."""
        weight = self.oriented_weight(base).to(self.A.dtype)
        with torch.no_grad():
            norm = self.column_norm(weight + self.delta_weight().to(weight.dtype))
        return self.magnitude / norm

    def lowrank_factors(self):
        return None  # not a plain low-rank sum: the fused LoRA path does not apply

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        g = self.magnitude_scale(base)
        if self.kind == "embedding":
            rows = F.embedding(x, self.A.T, padding_idx=base.padding_idx)
            return (g * (y.to(g.dtype) + self.scale * rows @ self.B.T)).to(y.dtype)
        h = x.to(self.A.dtype)
        dropout = active_dropout(self.dropout) if self.training else None
        if dropout is not None:
            h = dropout(h)
        if self.kind == "linear":
            lora = F.linear(F.linear(h, self.A), self.B)
            weight = self.oriented_weight(base)
            frozen = None if dropout is None else F.linear(h, weight.to(h.dtype))
        else:
            g = g.view(-1, *[1] * (y.dim() - 2))
            lora = conv_forward(base, h, self.A, groups=1)
            lora = conv_forward(base, lora, self.B, stride=1, padding=0, dilation=1)
            weight = base.weight
            frozen = None if dropout is None else conv_forward(base, h, weight.to(h.dtype))
        if frozen is None:  # without dropout the base output already holds W0 x (+ bias)
            return self.rescaled_output(y, lora, g, base)
        return y + ((g - 1) * frozen + g * self.scale * lora).to(y.dtype)

    def rescaled_output(self, y, lora, g, base: nn.Module) -> torch.Tensor:
        """g (W0 x + s B A x) + b from y = W0 x + b as g (y + s lora) + (1 - g) b: two passes
        over the output (add, then multiply-add), where the correction form takes six."""
        total = torch.add(y.to(g.dtype), lora, alpha=self.scale)
        if base.bias is None:
            return (total * g).to(y.dtype)
        bias = base.bias.to(g.dtype)
        bias = bias if self.kind == "linear" else bias.view(g.shape)
        return torch.addcmul(bias * (1 - g), total, g).to(y.dtype)

    def merge(self, base: nn.Module) -> None:
        weight = self.oriented_weight(base).float() + self.delta_weight()
        factor = self.magnitude.float() / self.column_norm(weight)
        self._merged_factor = factor  # the norm depends on W0: keep it to unmerge exactly
        _set_base_weight(base, self._apply_factor(weight, factor))

    def unmerge(self, base: nn.Module) -> None:
        weight = self.oriented_weight(base).float()
        restored = self._apply_factor(weight, 1.0 / self._merged_factor) - self.delta_weight()
        _set_base_weight(base, restored)
        del self._merged_factor

    def _apply_factor(self, weight: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return weight * factor[None, :]
        return weight * factor.view(-1, *[1] * (weight.dim() - 1))


# --- VeRA -------------------------------------------------------------------------------------


@register("vera", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class VeRA(SharesAcrossLayers, AdapterConfig):
    """VeRA (Kopiczko et al., 2024); defaults follow HF PEFT's ``VeraConfig``.

    Args:
        r: rank of the shared random pair A (r x max d_in), B (max d_out x r).
        d_initial: start value of every entry of d (b starts at zero: identity at start).
        projection_prng_key: seed of A and B (drawn Kaiming-uniform on the CPU, A first,
            exactly as HF PEFT does, so its adapters load with identical outputs).
        dropout: dropout on the adapter's input path.
    """

    r: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r")
        check_float(self, "d_initial")
        check_int(self, "projection_prng_key", minimum=0)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return _linear_only(self, module)

    def build(self, module: nn.Module, path: str) -> VeRAAdapter:
        state = self.injection(path)
        owner = next((m for m in (ref() for ref in state["members"]) if m is not None), None)
        adapter = VeRAAdapter(module, self, owner=owner)
        state["members"].append(weakref.ref(adapter))
        return adapter


def kaiming_uniform_like_peft(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound), bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1], drawn
    from ``generator`` on the CPU in float32 (the bound computed in this order, as HF PEFT's
    VeRA does, so both draw the same numbers)."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projections(r: int, max_in: int, max_out: int, key: int) -> tuple[torch.Tensor, ...]:
    """VeRA's shared (A, B): A (r, max_in) then B (max_out, r) from one seeded generator."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return kaiming_uniform_like_peft((r, max_in), generator), kaiming_uniform_like_peft(
        (max_out, r), generator
    )


class VeRAAdapter(Adapter):
    """``y + b * (B_s (d * (A_s dropout(x))))``, A_s / B_s the top-left corner of the shared
    pair. The owner (the first layer built) holds the pair as non-persistent buffers: they
    are regenerated from the seed, so checkpoints carry only b and d."""

    def __init__(self, base: nn.Module, cfg: VeRA, *, owner: VeRAAdapter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = linear_weight(base).shape
        self.fan_in_fan_out = is_fan_in_fan_out(base)
        self.r, self.seed = cfg.r, cfg.projection_prng_key
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, **opts))
        self.lambda_d = nn.Parameter(torch.full((cfg.r,), float(cfg.d_initial), **opts))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self._owner = () if owner is None else (owner,)  # a tuple: not a submodule here
        self._members: list[weakref.ref] = [weakref.ref(self)] if owner is None else []
        if owner is not None:
            owner._members.append(weakref.ref(self))

    # -- the shared projections ----------------------------------------------------------

    def on_attach(self, base: nn.Module) -> None:
        if self._owner:
            return
        # Every layer of the injection is built before the first attach: the shared pair
        # covers the largest input and output among them, as HF PEFT sizes it.
        members = [m for m in (ref() for ref in self._members) if m is not None]
        self.projection_shape = (
            max(m.out_features for m in members),
            max(m.in_features for m in members),
        )
        self._members = []
        self._generate(base.weight.device, self.lambda_d.dtype)

    def _generate(self, device: torch.device, dtype: torch.dtype) -> None:
        max_out, max_in = self.projection_shape
        if device.type == "meta":  # shapes only; generated once the model is materialised
            a = torch.empty(self.r, max_in, device=device, dtype=dtype)
            b = torch.empty(max_out, self.r, device=device, dtype=dtype)
        else:
            a, b = vera_projections(self.r, max_in, max_out, self.seed)
        self.register_buffer("vera_A", a.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("vera_B", b.to(device=device, dtype=dtype), persistent=False)
        self._ready = device.type != "meta"

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_s, B_s) for this layer: (r, d_in) and (d_out, r) slices of the shared pair."""
        owner = self._owner[0] if self._owner else self
        if not owner._ready and not owner.vera_A.is_meta:  # materialised after meta planning
            owner._generate(owner.vera_A.device, owner.vera_A.dtype)
        return owner.vera_A[:, : self.in_features], owner.vera_B[: self.out_features]

    # -- forward and merge ---------------------------------------------------------------

    def lowrank_factors(self):
        a, b = self.projections()
        return self.lambda_d[:, None] * a, self.lambda_b[:, None] * b, 1.0, self.dropout

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b = self.projections()
        h = self.dropout(x.to(self.lambda_d.dtype))
        update = self.lambda_b * F.linear(self.lambda_d * F.linear(h, a), b)
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(b B_s)(d A_s), as (out, in)."""
        a, b = self.projections()
        return (self.lambda_b[:, None] * b).float() @ (self.lambda_d[:, None] * a).float()

    def merge(self, base: nn.Module) -> None:
        _set_base_weight(base, linear_weight(base).float() + self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        _set_base_weight(base, linear_weight(base).float() - self.delta_weight())


# --- DyLoRA -----------------------------------------------------------------------------------


@register("dylora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class DyLoRA(LoRA):
    """DyLoRA (Valipour et al., 2023). LoRA's fields (r is the largest rank), plus:

    Args:
        r_min: smallest rank sampled in training (the paper samples b uniformly in
            [r_min, r] each step; here each layer draws its b on each training forward).
        frozen: update only the b-th row of A and column of B in a step (the paper's
            "frozen" variant); False trains all of A[:b], B[:, :b].
        eval_rank: rank used outside training and for merging and export (None: r);
            ``set_dylora_rank`` changes it on a live model.

    Per layer r (d_in + d_out) parameters; starts as the identity (B = 0).
    """

    r_min: int = 1
    frozen: bool = False
    eval_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _refuse_pissa(self)
        check_int(self, "r_min")
        _check_bool(self, "frozen")
        if self.r_min > self.r:
            raise ConfigError(f"DyLoRA.r_min ({self.r_min}) must be <= r ({self.r}).")
        if self.eval_rank is not None:
            check_int(self, "eval_rank")
            if self.eval_rank > self.r:
                raise ConfigError(
                    f"DyLoRA.eval_rank ({self.eval_rank}) must be <= r ({self.r}): the "
                    "adapter holds r ranks; pick eval_rank in [1, r] or None for r."
                )
        if self.rank_pattern or self.alpha_pattern:
            raise ConfigError(
                "DyLoRA samples one rank range for all layers: leave rank_pattern "
                "and alpha_pattern empty."
            )

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return _linear_only(self, module)

    def build(self, module: nn.Module, path: str) -> DyLoRAAdapter:
        return DyLoRAAdapter(module, self)


class DyLoRAAdapter(LoRAAdapter):
    """``y + s(b) B[:, :b] A[:b] dropout(x)``, s(b) = alpha / b (alpha / sqrt(b) with
    rsLoRA); b drawn per training forward, ``rank`` otherwise."""

    def __init__(self, base: nn.Module, cfg: DyLoRA) -> None:
        super().__init__(base, r=cfg.r, scale=1.0, dropout=cfg.dropout, init=cfg.init)
        self.alpha, self.use_rslora = cfg.alpha, cfg.use_rslora
        self.r_min, self.frozen = cfg.r_min, cfg.frozen
        self.set_rank(cfg.eval_rank or cfg.r)

    def scale_at(self, b: int) -> float:
        return self.alpha / (math.sqrt(b) if self.use_rslora else b)

    def set_rank(self, b: int) -> None:
        """Evaluate at rank b (``scale`` follows, as LoRA's scale of that rank)."""
        self.rank, self.scale = b, self.scale_at(b)

    def truncated(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A[:b], B[:, :b], s(b)); b sampled when training."""
        if not self.training:
            b = self.rank
            return self.A[:b], self.B[:, :b], self.scale_at(b)
        b = int(torch.randint(self.r_min, self.r + 1, ()).item())
        self.last_rank = b  # what this training forward used (for logs and tests)
        a, bb = self.A[:b], self.B[:, :b]
        if self.frozen:  # gradient reaches only the newest row / column
            a = torch.cat([a[:-1].detach(), a[-1:]])
            bb = torch.cat([bb[:, :-1].detach(), bb[:, -1:]], dim=1)
        return a, bb, self.scale_at(b)

    def lowrank_factors(self):
        a, b, scale = self.truncated()
        return a, b, scale, self.dropout

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b, scale = self.truncated()
        h = self.dropout(x.to(a.dtype))
        return torch.add(y, F.linear(F.linear(h, a), b).to(y.dtype), alpha=scale)

    def delta_weight(self) -> torch.Tensor:
        b = self.rank
        return self.scale_at(b) * (self.B[:, :b].float() @ self.A[:b].float())

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The plain LoRA this adapter is at ``rank``: (A[:b], B[:, :b], s(b))."""
        b = self.rank
        return self.A[:b].detach(), self.B[:, :b].detach(), self.scale_at(b)


def set_dylora_rank(model: nn.Module, rank: int, name: str = "default") -> None:
    """Evaluate (and merge, export) every DyLoRA layer of adapter ``name`` at ``rank``."""
    found = [w.adapters[name] for _, w in adapted_modules(model) if name in w.adapters]
    found = [a for a in found if isinstance(a, DyLoRAAdapter)]
    if not found:
        raise KeyError(f"the model has no DyLoRA adapter named {name!r}")
    if any(name in w.merged for _, w in adapted_modules(model)):
        raise ConfigError("the adapter is merged at its old rank; core.unmerge(model) first.")
    for adapter in found:
        if not 1 <= rank <= adapter.r:
            raise ConfigError(f"rank must lie in [1, {adapter.r}] (the trained r), got {rank}.")
    for adapter in found:
        adapter.set_rank(rank)


# --- MELoRA -----------------------------------------------------------------------------------


@register("melora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class MELoRA(AdapterConfig):
    """MELoRA (Ren et al., 2024); defaults follow the authors' LLaMA-2 script (n = 8 mini
    LoRAs of rank 1, alpha 16).

    Args:
        r: rank of each mini LoRA; the update has rank up to n r.
        n: number of mini LoRAs; must divide d_in and d_out.
        alpha: each mini LoRA is scaled by alpha / r (as the authors' code).
        dropout: dropout on the adapter's input path.

    Per layer r (d_in + d_out) parameters (n minis of r (d_in/n + d_out/n)); starts as the
    identity (every B_i = 0, A_i Kaiming-uniform).
    """

    r: int = 1
    n: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r")
        check_int(self, "n")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if reason := _linear_only(self, module):
            return reason
        out_f, in_f = linear_weight(module).shape
        if in_f % self.n or out_f % self.n:
            return (
                f"MELoRA splits features into n={self.n} slices, but {in_f} inputs x {out_f} "
                f"outputs are not both divisible by {self.n}; choose n dividing both"
            )
        return None

    def build(self, module: nn.Module, path: str) -> MELoRAAdapter:
        return MELoRAAdapter(module, self)


class MELoRAAdapter(Adapter):
    """``y_i += (alpha/r) B_i A_i x_i`` on slice i of the input and output: A (n, r, d_in/n),
    B (n, d_out/n, r). The block-diagonal update is the product of the block-diagonal factors,
    diag(B_1..B_n) diag(A_1..A_n) (a LoRA of rank n r), so on a linear layer it takes the
    wrapper's fused low-rank path like LoRA (never a dense d_out x d_in update); ``post``
    runs it as two batched products over the slices where that path does not apply."""

    def __init__(self, base: nn.Module, cfg: MELoRA) -> None:
        super().__init__()
        out_f, in_f = linear_weight(base).shape
        self.n, self.r, self.scale = cfg.n, cfg.r, cfg.alpha / cfg.r
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self.A = nn.Parameter(torch.empty(cfg.n, cfg.r, in_f // cfg.n, **opts))
        self.B = nn.Parameter(torch.zeros(cfg.n, out_f // cfg.n, cfg.r, **opts))
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        with torch.no_grad():
            for mini in self.A:  # each mini LoRA as LoRA initialises its A
                nn.init.kaiming_uniform_(mini, a=math.sqrt(5))

    def block_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """diag(A_1, ..., A_n) (n r, d_in) and diag(B_1, ..., B_n) (d_out, n r)."""
        return torch.block_diag(*self.A), torch.block_diag(*self.B)

    def lowrank_factors(self):
        a, b = self.block_factors()
        return a, b, self.scale, self.dropout

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        h = self.dropout(x.to(self.A.dtype)).unflatten(-1, (self.n, -1))
        mid = torch.einsum("...ni,nri->...nr", h, self.A)
        update = torch.einsum("...nr,nor->...no", mid, self.B).flatten(-2)
        return torch.add(y, update.to(y.dtype), alpha=self.scale)

    def delta_weight(self) -> torch.Tensor:
        blocks = torch.bmm(self.B.float(), self.A.float())
        return self.scale * torch.block_diag(*blocks)

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The same update as one LoRA of rank n r with block-diagonal factors."""
        a, b = self.block_factors()
        return a.detach(), b.detach(), self.scale

    def merge(self, base: nn.Module) -> None:
        _set_base_weight(base, linear_weight(base).float() + self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        _set_base_weight(base, linear_weight(base).float() - self.delta_weight())


# --- ShareLoRA --------------------------------------------------------------------------------

SHARE_CHOICES = ("A", "B", "AB")


@register("sharelora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class ShareLoRA(SharesAcrossLayers, LoRA):
    """ShareLoRA (Y. Song et al., 2024). LoRA's fields, plus:

    Args:
        share: "A" (ShareA, the paper's recommended form), "B" or "AB": which factor every
            layer of one module type (same last name component and factor shape, e.g. all
            ``q_proj``) shares within one injection.

    Parameters: each shared factor once per module type, the others per layer: ShareA
    costs r d_in per type + r d_out per layer. Starts as the identity (B = 0).
    """

    share: str = "A"

    def __post_init__(self) -> None:
        super().__post_init__()
        _refuse_pissa(self)
        check_choice(self, "share", SHARE_CHOICES)

    def build(self, module: nn.Module, path: str) -> ShareLoRAAdapter:
        r, scale = self.rank_and_scale(path)
        adapter = ShareLoRAAdapter(module, r=r, scale=scale, dropout=self.dropout, init=self.init)
        state = self.injection(path)
        state["members"].append(weakref.ref(adapter))
        groups, kind = state["groups"], path.rsplit(".", 1)[-1]
        shapes = {"A": adapter.A.shape, "B": adapter.B.shape}
        for factor in self.share:
            key = (kind, factor, tuple(shapes[factor]))
            owner = groups[key]() if key in groups else None
            if owner is None:
                groups[key] = weakref.ref(adapter)
            else:
                adapter.share_from(owner, factor)
        return adapter


class ShareLoRAAdapter(LoRAAdapter):
    """A LoRA layer whose A and/or B may live in another layer (the owner of its group).

    A non-owner drops its own copy and reads the owner's through ``__getattr__``, so every
    LoRA computation (fused path, merge, export) sees the shared tensor. Its state dict
    still carries the factor (a copy: safetensors refuses shared memory) and loading it
    writes the owner's, so a checkpoint restores from any layer whatever the build order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shared_from: dict[str, tuple[ShareLoRAAdapter]] = {}

    def share_from(self, owner: ShareLoRAAdapter, factor: str) -> None:
        del self._parameters[factor]
        self._shared_from[factor] = (owner,)  # a tuple: the owner is not a submodule here

    def __getattr__(self, name: str) -> Any:
        shared = self.__dict__.get("_shared_from")
        if shared and name in shared:
            return getattr(shared[name][0], name)
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for factor in self._shared_from:
            value = getattr(self, factor)
            destination[prefix + factor] = value if keep_vars else value.detach().clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        for factor in self._shared_from:
            key = prefix + factor
            if key in state_dict:
                value, dest = state_dict.pop(key), getattr(self, factor)
                if value.shape != dest.shape:
                    errors.append(
                        f"size mismatch for {key}: {tuple(value.shape)} vs model "
                        f"{tuple(dest.shape)}"
                    )
                else:
                    with torch.no_grad():
                        dest.copy_(value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A.detach(), self.B.detach(), self.scale


# --- CapaBoost --------------------------------------------------------------------------------


@register("capaboost", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class CapaBoost(LoRA):
    """CapaBoost on LoRA (H. Song et al., 2024). LoRA's fields (the authors' r = 8,
    alpha = 16), plus:

    Args:
        copies: d, the number of weight-tied copies (the paper's default 2).
        density: rho, the fraction of entries each fixed random mask keeps (0.5); each
            mask keeps exactly floor(rho * numel) entries, drawn uniformly.

    Parameters: LoRA's r (d_in + d_out) stored; only entries inside some mask ever act or
    receive gradient (``effective_parameters``). Masks are fixed random buffers saved with
    the adapter (they define it). Starts as the identity (B = 0).
    """

    r: int = 8
    alpha: float = 16.0
    copies: int = 2
    density: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _refuse_pissa(self)
        check_int(self, "copies")
        check_float(self, "density", low=0.0, high=1.0, low_open=True)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return _linear_only(self, module)

    def build(self, module: nn.Module, path: str) -> CapaBoostAdapter:
        r, scale = self.rank_and_scale(path)
        return CapaBoostAdapter(module, self, r=r, scale=scale)


def random_masks(copies: int, shape: torch.Size, density: float, device) -> torch.Tensor:
    """``copies`` boolean masks of ``shape``, each keeping exactly floor(density * numel)."""
    numel = math.prod(shape)
    keep = int(numel * density)
    if torch.device(device).type == "meta":
        return torch.empty(copies, *shape, dtype=torch.bool, device=device)
    masks = torch.zeros(copies, numel, dtype=torch.bool)
    for mask in masks:
        mask[torch.randperm(numel)[:keep]] = True
    return masks.view(copies, *shape).to(device)


class CapaBoostAdapter(LoRAAdapter):
    """LoRA whose update is the sum over copies i of ``(B o M^B_i)(A o M^A_i)``, run as
    one LoRA of rank d r with the masked factors concatenated (so it takes the fused path)."""

    def __init__(self, base: nn.Module, cfg: CapaBoost, *, r: int, scale: float) -> None:
        super().__init__(base, r=r, scale=scale, dropout=cfg.dropout, init=cfg.init)
        device = base.weight.device
        self.register_buffer("mask_A", random_masks(cfg.copies, self.A.shape, cfg.density, device))
        self.register_buffer("mask_B", random_masks(cfg.copies, self.B.shape, cfg.density, device))

    def masked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[A o M^A_1; ...; A o M^A_d] (d r, in) and [B o M^B_1, ..., B o M^B_d] (out, d r)."""
        a = (self.A * self.mask_A).flatten(0, 1)
        b = (self.B * self.mask_B).permute(1, 0, 2).flatten(1)
        return a, b

    def effective_parameters(self) -> int:
        """Entries of A and B inside at least one mask: the only ones that act and train."""
        return int(self.mask_A.any(0).sum() + self.mask_B.any(0).sum())

    def lowrank_factors(self):
        a, b = self.masked_factors()
        return a, b, self.scale, self.dropout

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        a, b = self.masked_factors()
        h = self.dropout(x.to(a.dtype))
        return torch.add(y, F.linear(F.linear(h, a), b).to(y.dtype), alpha=self.scale)

    def delta_weight(self) -> torch.Tensor:
        a, b = self.masked_factors()
        return self.scale * (b.float() @ a.float())

    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        a, b = self.masked_factors()
        return a.detach(), b.detach(), self.scale


# --- HF PEFT spellings ------------------------------------------------------------------------


def _dora_from_peft(pc: dict) -> DoRA:
    return DoRA(**_lora_from_peft(pc).to_dict())


def _dora_to_peft(cfg: DoRA, adapters: dict[str, DoRAAdapter]) -> dict:
    return {**_lora_to_peft(cfg, adapters), "use_dora": True}


def _dora_tensors(adapter: DoRAAdapter) -> dict[str, torch.Tensor]:
    magnitude = adapter.magnitude.detach()
    if adapter.kind == "conv":  # PEFT keeps the conv magnitude as (1, out, 1, ...)
        magnitude = magnitude.view(1, -1, *[1] * (adapter.A.dim() - 2))
    if adapter.kind == "embedding":
        a, b = "lora_embedding_A", "lora_embedding_B"
    else:
        a, b = "lora_A.weight", "lora_B.weight"
    return {a: adapter.A.detach(), b: adapter.B.detach(), "lora_magnitude_vector": magnitude}


def _dora_import(cfg: AdapterConfig, ours: str, value: torch.Tensor) -> torch.Tensor:
    return value.reshape(-1) if ours == "magnitude" else value


register_peft_format(
    PeftFormat(
        peft_type="LORA",
        method="dora",
        tensor_names={**LORA_TENSOR_NAMES, "lora_magnitude_vector": "magnitude"},
        config_from_peft=_dora_from_peft,
        config_to_peft=_dora_to_peft,
        export_tensors=_dora_tensors,
        import_tensor=_dora_import,
        neutral=LORA_NEUTRAL,
        matches=lambda pc: pc.get("use_dora") is True,
    )
)


def _as_lora_fields(cfg: AdapterConfig, adapters: dict[str, Any]) -> dict:
    """A plain PEFT LoRA config for adapters that each equal a LoRA (``as_lora``): every
    module's rank and alpha in rank_pattern / alpha_pattern under its escaped full name."""
    ranks = {p: a.as_lora()[0].shape[0] for p, a in adapters.items()}
    alphas = {p: a.as_lora()[2] * ranks[p] for p, a in adapters.items()}
    r = next(iter(ranks.values()))
    alpha = alphas[next(iter(alphas))]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "lora_dropout": getattr(cfg, "dropout", 0.0),
        "use_rslora": False,
        "fan_in_fan_out": any(getattr(a, "fan_in_fan_out", False) for a in adapters.values()),
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
    }


def _as_lora_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    a, b, _ = adapter.as_lora()
    a, b = a.clone(), b.clone()  # shared factors: one copy per layer (safetensors refuses aliases)
    if getattr(adapter, "kind", "linear") == "embedding":
        return {"lora_embedding_A": a, "lora_embedding_B": b}
    return {"lora_A.weight": a, "lora_B.weight": b}


def _never_imported(method: str):
    def refuse(pc: dict) -> AdapterConfig:
        raise CheckpointError(f"{method} is exported as a plain PEFT LoRA; it loads as 'lora'.")

    return refuse


# DyLoRA (at its eval rank), MELoRA, ShareLoRA and CapaBoost each equal a plain LoRA per
# layer, so they export as PEFT LORA folders (export only: such a folder loads as LoRA).
for _method in ("dylora", "melora", "sharelora", "capaboost"):
    register_peft_format(
        PeftFormat(
            peft_type="LORA",
            method=_method,
            tensor_names={"lora_A.weight": "A", "lora_B.weight": "B"},
            config_from_peft=_never_imported(_method),
            config_to_peft=_as_lora_fields,
            export_tensors=_as_lora_tensors,
            matches=lambda pc: False,
        )
    )


def _vera_from_peft(pc: dict) -> VeRA:
    return VeRA(
        targets=pc["target_modules"],
        exclude=pc.get("exclude_modules") or None,
        modules_to_save=pc.get("modules_to_save") or None,
        r=int(pc["r"]),
        d_initial=float(pc.get("d_initial", 0.1)),
        projection_prng_key=int(pc.get("projection_prng_key", 0)),
        dropout=float(pc.get("vera_dropout", 0.0)),
    )


def _vera_to_peft(cfg: VeRA, adapters: dict[str, VeRAAdapter]) -> dict:
    return {
        "r": cfg.r,
        "projection_prng_key": cfg.projection_prng_key,
        "save_projection": False,  # PEFT regenerates the pair from the key, as we do
        "vera_dropout": cfg.dropout,
        "d_initial": cfg.d_initial,
        "fan_in_fan_out": any(a.fan_in_fan_out for a in adapters.values()),
        "bias": "none",
        "init_weights": True,
    }


def check_vera_projections(
    cfg: VeRA, shared: dict[str, torch.Tensor], bases: dict[str, nn.Module]
) -> None:
    """Accept PEFT's saved pair only if it is the one omnipeft regenerates from the key."""
    if not shared:
        return
    shapes = [linear_weight(b).shape for b in bases.values()]
    a, b = vera_projections(
        cfg.r, max(s[1] for s in shapes), max(s[0] for s in shapes), cfg.projection_prng_key
    )
    want = {"base_model.vera_A": a, "base_model.vera_B": b}
    for key, value in shared.items():
        if (
            key not in want
            or value.shape != want[key].shape
            or not torch.equal(value.float(), want[key])
        ):
            raise CheckpointError(
                f"the PEFT VeRA folder's {key} is not the pair projection_prng_key="
                f"{cfg.projection_prng_key} generates, and omnipeft regenerates it rather than "
                "storing it; export it from PEFT with its default generator."
            )


register_peft_format(
    PeftFormat(
        peft_type="VERA",
        method="vera",
        tensor_names={"vera_lambda_b": "lambda_b", "vera_lambda_d": "lambda_d"},
        config_from_peft=_vera_from_peft,
        config_to_peft=_vera_to_peft,
        neutral={"bias": "none", "layers_to_transform": None, "layers_pattern": None},
        shared_keys=("base_model.vera_A", "base_model.vera_B"),
        check_shared=check_vera_projections,
    )
)


__all__ = [
    "CapaBoost",
    "CapaBoostAdapter",
    "DoRA",
    "DoRAAdapter",
    "DyLoRA",
    "DyLoRAAdapter",
    "MELoRA",
    "MELoRAAdapter",
    "ShareLoRA",
    "ShareLoRAAdapter",
    "VeRA",
    "VeRAAdapter",
    "check_vera_projections",
    "set_dylora_rank",
    "vera_projections",
]
