"""Hadamard, Kronecker and structured (unrestricted-rank) weight updates.

* LoHa (Hyeon-Woo et al., 2022, "FedPara: Low-Rank Hadamard Product for
  Communication-Efficient Federated Learning", eq. 2; LyCORIS): ``Delta W = s (W1a W1b) o
  (W2a W2b)``, rank up to r^2 from 2r (d_out + d_in) parameters; s = alpha / r.
* LoKr (Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS
  Fine-Tuning to Model Evaluation", LyCORIS' LoKr; after KronA, Edalati et al., 2022):
  ``Delta W = s W1 (x) W2`` with W1 (a x c) and W2 (b x d), a b = d_out, c d = d_in, W2 (and
  optionally W1) itself low-rank.
* KAdaptation (He et al., 2023, "Parameter-efficient Model Adaptation for Vision
  Transformers", eq. 5-6): ``Delta W = s sum_{i=1}^n A_i (x) B_i``, the n x n "slow" A_i
  shared by every adapted layer of one injection and the "fast" B_i = u_i v_i^T low-rank.
* SURM (Sehanobish et al., 2024, "Structured Unrestricted-Rank Matrices for Parameter
  Efficient Fine-tuning"): ``Delta W = s S`` with S circulant (n parameters), Toeplitz
  (d_out + d_in - 1), of low displacement rank r (sum of r circulant x skew-circulant
  products, 2 r n) or a Kronecker product of two unrestricted matrices; circulant, Toeplitz
  and LDR products run through the FFT in O(n log n) per token, never as a dense matrix.

LoHa and LoKr follow HF PEFT's layouts and defaults, so their adapters move between the two
with identical outputs (Linear, Conv1d, Conv2d; ``use_effective_conv2d`` included).
Every update here starts at zero (one factor zero), so each method starts as the identity.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..errors import ConfigError
from ..kernels.dispatch import hand_written_step_fits
from ..layers import Adapter, conv_forward, is_fan_in_fan_out, weight_dtype
from ..peft_format import PeftFormat, register_peft_format
from ..registry import register


def pattern_value(patterns: dict, path: str, default):
    """HF PEFT's rank_pattern / alpha_pattern lookup: a key matches a name's dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _check_patterns(cfg: AdapterConfig) -> None:
    for key, rank in cfg.rank_pattern.items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(
                f"{type(cfg).__name__}.rank_pattern[{key!r}] must be an int >= 1, got {rank!r}"
            )
    for key, alpha in cfg.alpha_pattern.items():
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
            raise ConfigError(
                f"{type(cfg).__name__}.alpha_pattern[{key!r}] must be > 0, got {alpha!r}"
            )


def _check_bool(cfg: object, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(
                f"{type(cfg).__name__}.{name} must be True or False, got {getattr(cfg, name)!r}."
            )


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as (out, in) for linear layers, as stored for convolutions."""
    return base.weight.T if is_fan_in_fan_out(base) else base.weight


def _add_to_base(base: nn.Module, delta: torch.Tensor) -> None:
    if is_fan_in_fan_out(base):
        delta = delta.T
    base.weight.data += delta.to(base.weight.dtype)


def _linear_sizes(base: nn.Module) -> tuple[int, int]:
    out_f, in_f = dense_weight(base).shape
    return out_f, in_f


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_fan_in_fan_out(module)


# --- LyCORIS: LoHa and LoKr -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LycorisConfig(AdapterConfig):
    """Fields LoHa and LoKr share (HF PEFT's defaults).

    Args:
        r: rank of the low-rank factors.
        alpha: the update is scaled by alpha / r.
        rank_dropout: in training, drop each output row of Delta W with this probability.
        module_dropout: in training, skip the whole adapter with this probability.
        use_effective_conv2d: convolutions with a kernel larger than 1 use the CP
            (Tucker) form: a core (r, r, k...) and factors on the two channel modes.
        rank_pattern / alpha_pattern: per-module r / alpha, keyed by a name suffix regex.
    """

    r: int = 8
    alpha: float = 8.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "rank_dropout", low=0.0, high=1.0, high_open=True)
        check_float(self, "module_dropout", low=0.0, high=1.0, high_open=True)
        _check_bool(self, "use_effective_conv2d")
        _check_patterns(self)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d):
            if isinstance(module, nn.Conv1d | nn.Conv2d) and module.padding_mode != "zeros":
                return f"{type(self).__name__} on convolutions needs padding_mode='zeros'"
            return None
        return f"{type(self).__name__} wraps nn.Linear, nn.Conv1d and nn.Conv2d (as HF PEFT)"

    def rank_and_scale(self, path: str) -> tuple[int, float]:
        r = pattern_value(self.rank_pattern, path, self.r)
        return r, pattern_value(self.alpha_pattern, path, self.alpha) / r


class LycorisAdapter(Adapter):
    """``y + base_op(x, Delta W)`` plus LyCORIS' rank and module dropout in training.

    How the training step runs on a linear layer (the maths is the same on every path):

    * a structured product where one exists and is cheaper than a dense Delta W: LoHa as
      a low-rank product of rank r^2 through the wrapper's fused LoRA path
      (``lowrank_factors``), LoKr as its Kronecker product applied to x (``kron_linear``);
    * else ``run_base``: one GEMM with W + Delta W (``replaces_base``). A dense Delta W's
      gradient is a full d_out x d_in product dY^T X in the backward, which the factored
      forms never form; computing the base and the update as two GEMMs would add a second
      forward GEMM and a second input-gradient GEMM on top.

    Convolutions, and a float32 adapter on a half-precision base, add ``base_op(x, Delta
    W)`` to the base output in ``post``.
    """

    normalise_rank_dropout = True

    def __init__(self, base: nn.Module, cfg: LycorisConfig, r: int, scale: float) -> None:
        super().__init__()
        self.r, self.scale = r, scale
        self.rank_dropout, self.module_dropout = cfg.rank_dropout, cfg.module_dropout
        self.weight_shape = tuple(base.weight.shape)
        kernel = tuple(base.weight.shape[2:])
        self.effective = cfg.use_effective_conv2d and bool(kernel) and math.prod(kernel) > 1
        self.opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        # A linear layer whose weight has the adapter's dtype computes W + Delta W itself.
        self.replaces_base = not kernel and self.opts["dtype"] == base.weight.dtype

    def new(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, **self.opts))

    def delta_weight(self) -> torch.Tensor:
        """Delta W in the base weight's shape."""
        raise NotImplementedError

    # -- LyCORIS' dropouts (random draws in the same order on every path) -------------------

    def module_dropped(self) -> bool:
        """Module dropout: whether this training forward skips the adapter."""
        if not (self.training and self.module_dropout):
            return False
        return torch.rand(1).item() < self.module_dropout

    def rank_dropping(self) -> bool:
        return bool(self.training and self.rank_dropout)

    def row_keep(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """Rank dropout's (rows,) multiplier of Delta W's output rows."""
        keep = (torch.rand(rows, device=like.device) > self.rank_dropout).to(like.dtype)
        return keep / keep.mean() if self.normalise_rank_dropout else keep

    def dropped_delta(self) -> torch.Tensor:
        delta = self.delta_weight()
        if self.rank_dropping():
            keep = self.row_keep(delta.shape[0], delta)
            delta = delta * keep.view(-1, *[1] * (delta.dim() - 1))
        return delta

    # -- the forward paths ----------------------------------------------------------------

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        """x (W + Delta W)^T + bias: one GEMM for base and update (linear layers)."""
        weight = dense_weight(base)
        if self.module_dropped():
            return F.linear(x, weight, base.bias)
        return F.linear(x, weight + self.dropped_delta().to(weight.dtype), base.bias)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.replaces_base or self.module_dropped():  # replacing: already in run_base's y
            return y
        delta = self.dropped_delta()
        h = x.to(delta.dtype)
        update = F.linear(h, delta) if delta.dim() == 2 else conv_forward(base, h, delta)
        return y + update.to(y.dtype)

    def merge(self, base: nn.Module) -> None:
        _add_to_base(base, self.delta_weight().float())

    def unmerge(self, base: nn.Module) -> None:
        _add_to_base(base, -self.delta_weight().float())


def _flat_in(shape: tuple[int, ...]) -> int:
    return math.prod(shape[1:])


def cp_rebuild(core: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor):
    """The CP/Tucker form of a conv kernel: W[p, r, k, l] = sum_ij T[i, j, k, l] U[i, p] V[j, r]."""
    return torch.einsum("ijkl,ip,jr->prkl", core, out_factor, in_factor)


@register("loha", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class LoHa(LycorisConfig):
    """LoHa (FedPara's low-rank Hadamard product, LyCORIS); HF PEFT's ``LoHaConfig``.

    Per layer 2 r (d_out + d_in k) parameters (k the kernel size; 1 for Linear), or with
    ``use_effective_conv2d`` 2 (r^2 k + r d_out + r d_in). W2b starts at zero.
    """

    def build(self, module: nn.Module, path: str) -> LoHaAdapter:
        r, scale = self.rank_and_scale(path)
        return LoHaAdapter(module, self, r, scale)


class LoHaAdapter(LycorisAdapter):
    """Delta W = s (W1a W1b) o (W2a W2b) (or the Hadamard product of two CP kernels)."""

    def __init__(self, base: nn.Module, cfg: LoHa, r: int, scale: float) -> None:
        super().__init__(base, cfg, r, scale)
        out_c, in_c, *kernel = self.weight_shape
        for i in ("1", "2"):
            if self.effective:
                spatial = (*kernel, 1) if len(kernel) == 1 else tuple(kernel)
                setattr(self, f"t{i}", self.new(r, r, *spatial))
                setattr(self, f"w{i}_a", self.new(r, out_c))
                setattr(self, f"w{i}_b", self.new(r, in_c))
            else:
                setattr(self, f"w{i}_a", self.new(out_c, r))
                setattr(self, f"w{i}_b", self.new(r, _flat_in(self.weight_shape)))
        # A linear layer takes the rank-r^2 product when it is cheaper than a dense Delta W.
        self.lowrank = not kernel and hadamard_lowrank_pays(r, out_c, in_c)
        self.replaces_base = self.replaces_base and not self.lowrank
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform everywhere (FedPara's He init) but W2b = 0: Delta W starts at 0."""
        with torch.no_grad():
            for tensor in self.parameters():
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            nn.init.zeros_(self.w2_b)

    def factor(self, i: str) -> torch.Tensor:
        if self.effective:
            return cp_rebuild(
                getattr(self, f"t{i}"), getattr(self, f"w{i}_a"), getattr(self, f"w{i}_b")
            )
        return getattr(self, f"w{i}_a") @ getattr(self, f"w{i}_b")

    def delta_weight(self) -> torch.Tensor:
        return (self.factor("1") * self.factor("2") * self.scale).reshape(self.weight_shape)

    # -- the rank-r^2 form on linear layers ------------------------------------------------

    def hadamard_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B A = (W1a W1b) o (W2a W2b): the Hadamard product of two rank-r
        products has rank r^2, B[i, (k, l)] = W1a[i, k] W2a[i, l] (the rows' Kronecker
        products) and A[(k, l), j] = W1b[k, j] W2b[l, j] (the columns')."""
        (out_f, r), in_f = self.w1_a.shape, self.w1_b.shape[1]
        b = (self.w1_a[:, :, None] * self.w2_a[:, None, :]).reshape(out_f, r * r)
        a = (self.w1_b[:, None, :] * self.w2_b[None, :, :]).reshape(r * r, in_f)
        return a, b

    def lowrank_factors(self):
        if not self.lowrank or (self.training and (self.module_dropout or self.rank_dropout)):
            return None  # the dropouts draw in ``post``
        a, b = self.hadamard_factors()
        return a, b, self.scale, None

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not self.lowrank:
            return super().post(x, y, base)
        if self.module_dropped():
            return y
        a, b = self.hadamard_factors()
        if self.rank_dropping():
            b = b * self.row_keep(b.shape[0], b)[:, None]
        update = F.linear(F.linear(x.to(a.dtype), a), b)
        return torch.add(y, update.to(y.dtype), alpha=self.scale)


def hadamard_lowrank_pays(r: int, out_f: int, in_f: int) -> bool:
    """Whether LoHa's rank-r^2 form beats a dense Delta W on a (out_f, in_f) linear layer.

    Per row the factored step costs a few r^2 (out_f + in_f) multiply-adds in skinny
    products (x A^T, dY B, dA, dB) that run well below GEMM speed on CPU; the dense form
    pays one out_f x in_f gradient GEMM, out_f in_f per row. Measured on one CPU core
    (1576 rows; 2304 x 768, 3072 x 768 and 768 x 768 layers; r = 8 to 24) the two cost the
    same near r^2 (out_f + in_f) = 0.4 out_f in_f.
    """
    return 5 * r * r * (out_f + in_f) <= 2 * out_f * in_f


# --- the Kronecker product applied to x -------------------------------------------------------


class KronLinearFunction(torch.autograd.Function):
    """y = x W^T + bias + scale x (W1 (x) W2)^T for 2-D x (M, c d), W1 (a, c), W2 (b, d).

    With x_m viewed as X_m (c, d), the update of row m is W1 X_m W2^T (a, b), i.e. row m of
    y viewed as (a, b): one thin GEMM T = X W2^T over all M c rows, then a batched (a, c) x
    (c, b) product added in place into the base GEMM's output. The backward mirrors it: dX
    gets dY W plus (scale W1^T dY_m) W2 added in place, dW2 is one thin GEMM and dW1 sums
    the per-row products dY_m T_m^T (T recomputed: one thin GEMM, so that only x is saved,
    as for LoRA). Nothing of size (M, a b) is made besides y and dx, and no d_out x d_in
    matrix at all (the dense form's gradient GEMM dY^T X is never needed).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w1, w2, scale):
        m, (a, c), (b, d) = x.shape[0], w1.shape, w2.shape
        y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
        t = torch.mm(x.view(m * c, d), w2.t()).view(m, c, b)
        y.view(m, a, b).baddbmm_((w1 * scale).expand(m, a, c), t)
        ctx.scale = scale
        ctx.save_for_backward(x, weight, w1, w2)  # T is recomputed: (M, c b) is not kept
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, w1, w2 = ctx.saved_tensors
        need_x, need_w, need_bias, need_w1, need_w2 = ctx.needs_input_grad[:5]
        m, (a, c), (b, d) = x.shape[0], w1.shape, w2.shape
        dy = dy.contiguous()
        dy3 = dy.view(m, a, b)
        dx = dweight = dbias = dw1 = dw2 = None
        if need_x or need_w2:
            dt = torch.bmm((w1.t() * ctx.scale).expand(m, c, a), dy3).view(m * c, b)
            if need_w2:
                dw2 = torch.mm(dt.t(), x.view(m * c, d))
            if need_x:
                dx = torch.mm(dy, weight)
                dx.view(m * c, d).addmm_(dt, w2)
        if need_w1:
            t = torch.mm(x.view(m * c, d), w2.t()).view(m, c, b)
            dw1 = torch.bmm(dy3, t.transpose(1, 2)).sum(0).mul_(ctx.scale)
        if need_w:
            dweight = torch.mm(dy.t(), x)
        if need_bias:
            dbias = dy.sum(0)
        return dx, dweight, dbias, dw1, dw2, None


def kron_linear(x, weight, bias, w1, w2, scale: float) -> torch.Tensor:
    """``x W^T + bias + scale x (W1 (x) W2)^T`` over the last axis of ``x`` (one dtype)."""
    k = x.shape[-1]
    y = KronLinearFunction.apply(x.reshape(-1, k).contiguous(), weight, bias, w1, w2, scale)
    return y.view(*x.shape[:-1], weight.shape[0])


def kron_apply_pays(a: int, b: int, c: int, d: int) -> bool:
    """Whether applying W1 (a x c) (x) W2 (b x d) to x beats a dense Delta W: per row it
    costs c d b + a c b multiply-adds (forward; the backward three times that) in thin and
    batched products, against one (a b) x (c d) gradient GEMM per row for the dense form;
    the factor 4 leaves room for the thin products' lower speed (on ViT-B's 2304 x 768 qkv,
    48 x 24 (x) 48 x 32: 0.05 of the GEMM, 22 ms against 52 ms extra per step, one core)."""
    return 4 * (c * d * b + a * c * b) <= a * b * c * d


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into m * n as LyCORIS (and HF PEFT) do: ``factor`` itself when it
    divides; else the divisor pair nearest the square root with m <= factor (any m when
    -1), returned with m <= n."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return min(m, n), max(m, n)


@register("lokr", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class LoKr(LycorisConfig):
    """LoKr (LyCORIS); HF PEFT's ``LoKrConfig``. Besides ``LycorisConfig``'s fields:

    Args:
        decompose_both: W1 low-rank too (when r < max(a, c) / 2).
        decompose_factor: the preferred size of W1's side in ``factorization`` (-1: near
            the square root).
        rank_dropout_scale: rescale kept rows by 1 / (kept fraction) under rank dropout.
        init: "default" (W1 zero, W2 Kaiming) or "lycoris" (W2 zero, W1 Kaiming).

    d_out = a b and d_in = c d from ``factorization``; W1 (a x c) is full unless
    decompose_both, W2 (b x d k) full when r >= max(b, d) / 2, else W2a (b x r) W2b
    (r x d k) (CP form for kernels with ``use_effective_conv2d``). Parameters: the sum of
    the chosen factors' sizes.
    """

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool(self, "decompose_both", "rank_dropout_scale")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise ConfigError(
                f"LoKr.decompose_factor must be an int, got {self.decompose_factor!r}"
            )
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ConfigError("LoKr.decompose_factor must be -1 (near the square root) or >= 1.")
        check_choice(self, "init", ("default", "lycoris"))

    def build(self, module: nn.Module, path: str) -> LoKrAdapter:
        r, scale = self.rank_and_scale(path)
        return LoKrAdapter(module, self, r, scale)


class LoKrAdapter(LycorisAdapter):
    """Delta W = s W1 (x) W2, reshaped to the base weight (HF PEFT's layout)."""

    def __init__(self, base: nn.Module, cfg: LoKr, r: int, scale: float) -> None:
        super().__init__(base, cfg, r, scale)
        self.normalise_rank_dropout = cfg.rank_dropout_scale
        out_c, in_c, *kernel = self.weight_shape
        (a, b), (c, d) = (
            factorization(out_c, cfg.decompose_factor),
            factorization(in_c, cfg.decompose_factor),
        )
        if cfg.decompose_both and r < max(a, c) / 2:
            self.w1_a, self.w1_b = self.new(a, r), self.new(r, c)
        else:
            self.w1 = self.new(a, c)
        if r >= max(b, d) / 2:
            self.w2 = self.new(b, d, *kernel)
        elif self.effective:
            spatial = (*kernel, 1) if len(kernel) == 1 else tuple(kernel)
            self.t2, self.w2_a, self.w2_b = self.new(r, r, *spatial), self.new(r, b), self.new(r, d)
        else:
            self.w2_a, self.w2_b = self.new(b, r), self.new(r, d * math.prod(kernel))
        self.structured = self.replaces_base and kron_apply_pays(a, b, c, d)
        self.reset_parameters(cfg.init)

    def reset_parameters(self, init: str) -> None:
        """One side zero so Delta W starts at 0: W1 ("default") or W2 ("lycoris")."""
        with torch.no_grad():
            for tensor in self.parameters():
                nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            zero = ("w1", "w1_a") if init == "default" else ("w2", "w2_b")
            for name in zero:
                if name in self._parameters:
                    nn.init.zeros_(self._parameters[name])
                    break

    def side(self, i: str) -> torch.Tensor:
        if f"w{i}" in self._parameters:
            return self._parameters[f"w{i}"]
        if i == "2" and "t2" in self._parameters:
            return cp_rebuild(self.t2, self.w2_a, self.w2_b)
        return getattr(self, f"w{i}_a") @ getattr(self, f"w{i}_b")

    def delta_weight(self) -> torch.Tensor:
        w1, w2 = self.side("1"), self.side("2")
        if w2.dim() == 4:  # a conv kernel on the W2 side: W1 spreads over the channels only
            w1 = w1[:, :, None, None]
        # flatten + view: canonical strides (a CP rebuild may carry an odd stride on a size-1
        # axis, which torch.kron's internal view refuses although the tensor is contiguous)
        w2 = w2.contiguous().flatten().view(w2.shape)
        return (torch.kron(w1, w2) * self.scale).reshape(self.weight_shape)

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        """The Kronecker product applied to x (``kron_linear``) where it pays, else one GEMM
        with W + Delta W. Rank dropout masks single rows of Delta W, which the Kronecker
        form cannot express: such steps take the dense form."""
        weight = base.weight  # in the adapter's dtype (``structured`` needs ``replaces_base``)
        if not self.structured or self.rank_dropping() or not hand_written_step_fits(x, weight):
            return super().run_base(x, base, *args, **kwargs)
        if self.module_dropped():
            return F.linear(x, weight, base.bias)
        return kron_linear(x, weight, base.bias, self.side("1"), self.side("2"), self.scale)


# --- KAdaptation ------------------------------------------------------------------------------


@register("kadaptation", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class KAdaptation(AdapterConfig):
    """KAdaptation (He et al., 2023).

    Args:
        n: number of Kronecker summands and size of each slow weight A_i (n x n); must
            divide d_in and d_out.
        r: rank of each fast weight B_i = u_i v_i^T (the paper uses rank 1).
        alpha: the update is scaled by alpha / r.

    Per layer n r (d_out/n + d_in/n) = r (d_out + d_in) parameters, plus n^3 for the slow
    weights once per injection. u_i start at zero (identity at start); A_i are
    Xavier-uniform per summand and v_i Kaiming-uniform, as PHM layers and LoRA start them.
    """

    n: int = 4
    r: int = 1
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n", minimum=2)
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_injection"}

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not _is_linear(module):
            return "KAdaptation wraps nn.Linear or transformers Conv1D"
        out_f, in_f = _linear_sizes(module)
        if out_f % self.n or in_f % self.n:
            return (
                f"KAdaptation splits {in_f} inputs and {out_f} outputs into n={self.n} blocks; "
                f"choose n dividing both"
            )
        return None

    def build(self, module: nn.Module, path: str) -> KAdaptationAdapter:
        owner = self._slow_owner(path)
        adapter = KAdaptationAdapter(module, self, owner=owner)
        if owner is None:
            object.__setattr__(self, "_injection", {"owner": weakref.ref(adapter), "paths": set()})
        self.__dict__["_injection"]["paths"].add(path)
        return adapter

    def _slow_owner(self, path: str) -> KAdaptationAdapter | None:
        """The adapter holding the slow weights of the injection being built, or None.

        One inject (or load) builds every adapter before attaching any (attach sets
        ``path``) and builds each path once: an attached owner or a path met again means a
        new injection, which gets its own slow weights.
        """
        state = self.__dict__.get("_injection")
        owner = state["owner"]() if state else None
        if owner is None or hasattr(owner, "path") or path in state["paths"]:
            return None
        return owner


class KAdaptationAdapter(Adapter):
    """``y + s sum_i (A_i (x) u_i v_i^T) x`` computed blockwise: x viewed as (n, d_in/n),
    never forming the Kronecker products. The first layer built owns ``slow`` (A, shape
    (n, n, n)); the others read it through the owner and write a copy of it in their
    state dict (safetensors refuses shared memory), so a checkpoint restores it from any
    layer."""

    def __init__(self, base: nn.Module, cfg: KAdaptation, *, owner) -> None:
        super().__init__()
        out_f, in_f = _linear_sizes(base)
        self.n, self.r, self.scale = cfg.n, cfg.r, cfg.alpha / cfg.r
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self.u = nn.Parameter(torch.zeros(cfg.n, out_f // cfg.n, cfg.r, **opts))
        self.v = nn.Parameter(torch.empty(cfg.n, in_f // cfg.n, cfg.r, **opts))
        with torch.no_grad():
            for v in self.v:
                nn.init.kaiming_uniform_(v.T, a=math.sqrt(5))
        if owner is None:
            self.slow = nn.Parameter(torch.empty(cfg.n, cfg.n, cfg.n, **opts))
            with torch.no_grad():
                for a in self.slow:
                    nn.init.xavier_uniform_(a)
            self._home: tuple = ()
        else:
            self._home = (owner,)  # a tuple: the owner is not a submodule here

    @property
    def slow_weights(self) -> torch.Tensor:
        return self.slow if not self._home else self._home[0].slow

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        slow = self.slow_weights.to(self.u.dtype)
        h = x.to(self.u.dtype).unflatten(-1, (self.n, -1))  # (..., b, q)
        t = torch.einsum("...bq,iqr->...ibr", h, self.v)
        s = torch.einsum("iab,...ibr->...iar", slow, t)
        update = torch.einsum("ipr,...iar->...ap", self.u, s).flatten(-2)
        return torch.add(y, update.to(y.dtype), alpha=self.scale)

    def delta_weight(self) -> torch.Tensor:
        fast = torch.einsum("ipr,iqr->ipq", self.u.float(), self.v.float())
        slow = self.slow_weights.float()
        return self.scale * sum(torch.kron(slow[i], fast[i]) for i in range(self.n))

    def merge(self, base: nn.Module) -> None:
        _add_to_base(base, self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        _add_to_base(base, -self.delta_weight())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._home:
            slow = self.slow_weights
            destination[prefix + "slow"] = slow if keep_vars else slow.detach().clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        key = prefix + "slow"
        if self._home and key in state_dict:
            value = state_dict.pop(key)
            if value.shape != self.slow_weights.shape:
                errors.append(f"size mismatch for {key}: {tuple(value.shape)}")
            else:
                with torch.no_grad():
                    self.slow_weights.copy_(value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )


# --- SURM -------------------------------------------------------------------------------------

STRUCTURES = ("circulant", "toeplitz", "ldr", "kronecker")


@register("surm", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class SURM(AdapterConfig):
    """SURM in LoRA's place (Sehanobish et al., 2024): ``W = W0 + alpha S``.

    Args:
        structure: "circulant" (S[i, j] = c[(i - j) mod n], n = max(d_in, d_out), cut to
            d_out x d_in: n parameters), "toeplitz" (S[i, j] = t[i - j + d_in - 1]:
            d_out + d_in - 1), "ldr" (sum of ``displacement_rank`` products circ(g_k)
            skew-circ(h_k): the matrices of (Z_1, Z_-1)-displacement rank <= r, 2 r n) or
            "kronecker" (A (x) B, A (a x c), B (b x d) unrestricted, a b = d_out, c d = d_in
            from LoKr's ``factorization``: a c + b d).
        displacement_rank: r for "ldr".
        decompose_factor: preferred size of A's side for "kronecker" (-1: near sqrt).
        alpha: scale of S.

    S starts at zero (c, t, g and A zero; h and B random so gradients flow).
    """

    structure: str = "circulant"
    displacement_rank: int = 1
    decompose_factor: int = -1
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "structure", STRUCTURES)
        check_int(self, "displacement_rank")
        check_float(self, "alpha", low=0.0, low_open=True)
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int):
            raise ConfigError(
                f"SURM.decompose_factor must be an int, got {self.decompose_factor!r}"
            )

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not _is_linear(module):
            return "SURM wraps nn.Linear or transformers Conv1D"
        return None

    def build(self, module: nn.Module, path: str) -> SURMAdapter:
        return SURMAdapter(module, self)


def circulant_matrix(c: torch.Tensor) -> torch.Tensor:
    """C[i, j] = c[(i - j) mod n]."""
    n = c.shape[-1]
    idx = (torch.arange(n)[:, None] - torch.arange(n)[None, :]) % n
    return c[..., idx.to(c.device)]


def skew_circulant_matrix(h: torch.Tensor) -> torch.Tensor:
    """S[i, j] = h[i - j] for i >= j, -h[i - j + n] above the diagonal."""
    n = h.shape[-1]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    sign = torch.where(i >= j, 1.0, -1.0).to(h)
    return h[..., ((i - j) % n).to(h.device)] * sign


def circulant_apply(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """C(c) x over the last axis by the FFT, x zero-padded to c's length n: the circular
    convolution c * x."""
    n = c.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(c, n=n) * torch.fft.rfft(x, n=n), n=n)


class CirculantLinear(torch.autograd.Function):
    """``(C(c) pad(x))[..., :d_out]`` by FFTs (``circulant_apply``), saving only x and c.

    Autograd through rfft/irfft would keep the complex spectra of x and of the product (about
    three copies of x in size, padded to n); here the backward recomputes rfft(x) and uses
    the two correlations of a circular convolution:
    dL/dx = (C(c)^T g)[:d_in] = irfft(conj(F c) F g)  and  dL/dc = irfft(sum_rows F g conj(F x)),
    the row sum taken in the frequency domain so only one inverse FFT of length n runs.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, c: torch.Tensor, d_out: int):
        ctx.save_for_backward(x, c)
        return circulant_apply(c, x)[..., :d_out]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, c = ctx.saved_tensors
        n, d_in = c.shape[-1], x.shape[-1]
        grad_f = torch.fft.rfft(grad, n=n)  # g zero-padded to n
        grad_x = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.fft.irfft(torch.fft.rfft(c, n=n).conj() * grad_f, n=n)[..., :d_in]
        if ctx.needs_input_grad[1]:
            x_f = torch.fft.rfft(x, n=n).reshape(-1, n // 2 + 1)
            cross = (grad_f.reshape(-1, n // 2 + 1) * x_f.conj()).sum(0)
            grad_c = torch.fft.irfft(cross, n=n)
        return grad_x, grad_c, None


def skew_phase(n: int, like: torch.Tensor) -> torch.Tensor:
    """omega^k, omega = exp(i pi / n): skew-circ(h) = D^-1 circ(D h) D with D = diag(omega^k)."""
    angle = torch.arange(n, device=like.device, dtype=like.dtype) * (math.pi / n)
    return torch.polar(torch.ones_like(angle), angle)


class SURMAdapter(Adapter):
    """``y + alpha S x`` with S one of the SURM structures (see ``SURM``)."""

    def __init__(self, base: nn.Module, cfg: SURM) -> None:
        super().__init__()
        self.out_features, self.in_features = _linear_sizes(base)
        self.structure, self.scale = cfg.structure, cfg.alpha
        self.n = max(self.in_features, self.out_features)
        self.dtype = weight_dtype(base)
        opts = {"device": base.weight.device, "dtype": self.dtype}
        if cfg.structure == "circulant":
            self.c = nn.Parameter(torch.zeros(self.n, **opts))
        elif cfg.structure == "toeplitz":
            self.t = nn.Parameter(torch.zeros(self.out_features + self.in_features - 1, **opts))
        elif cfg.structure == "ldr":
            r = cfg.displacement_rank
            self.g = nn.Parameter(torch.zeros(r, self.n, **opts))
            self.h = nn.Parameter(torch.empty(r, self.n, **opts))
            with torch.no_grad():
                nn.init.normal_(self.h, std=1.0 / math.sqrt(self.n))
        else:
            (a, b) = factorization(self.out_features, cfg.decompose_factor)
            (c, d) = factorization(self.in_features, cfg.decompose_factor)
            self.kron_a = nn.Parameter(torch.zeros(a, c, **opts))
            self.kron_b = nn.Parameter(torch.empty(b, d, **opts))
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.kron_b, a=math.sqrt(5))

    # -- S x, never forming S --------------------------------------------------------------

    def apply_structure(self, x: torch.Tensor) -> torch.Tensor:
        if self.structure == "kronecker":
            a, b = self.kron_a, self.kron_b
            h = x.unflatten(-1, (a.shape[1], b.shape[1]))
            return torch.einsum("...st,ps,qt->...pq", h, a, b).flatten(-2)
        if self.structure == "toeplitz":
            # y[i] = sum_j t[i - j + d_in - 1] x[j]: a slice of the linear convolution t * x.
            size = self.t.shape[0] + self.in_features - 1
            full = torch.fft.irfft(
                torch.fft.rfft(self.t, n=size) * torch.fft.rfft(x, n=size), n=size
            )
            return full[..., self.in_features - 1 : self.in_features - 1 + self.out_features]
        if self.structure == "circulant":
            return CirculantLinear.apply(x, self.c, self.out_features)
        xp = F.pad(x, (0, self.n - self.in_features))
        phase = skew_phase(self.n, xp)
        dx = torch.fft.fft(xp.to(phase.dtype) * phase)  # skew-circ(h_k) x = D^-1 circ(D h_k) D x
        skew = torch.fft.ifft(torch.fft.fft(self.h.to(phase.dtype) * phase) * dx[..., None, :])
        skew = (skew * phase.conj()).real.to(x.dtype)  # (..., r, n)
        return circulant_apply(self.g, skew).sum(-2)[..., : self.out_features]

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        update = self.apply_structure(x.to(self.dtype))
        return torch.add(y, update.to(y.dtype), alpha=self.scale)

    # -- the dense S, for merging ---------------------------------------------------------

    def structured_matrix(self) -> torch.Tensor:
        out_f, in_f = self.out_features, self.in_features
        if self.structure == "kronecker":
            return torch.kron(self.kron_a.float(), self.kron_b.float())
        if self.structure == "toeplitz":
            idx = torch.arange(out_f)[:, None] - torch.arange(in_f)[None, :] + in_f - 1
            return self.t.float()[idx.to(self.t.device)]
        if self.structure == "circulant":
            return circulant_matrix(self.c.float())[:out_f, :in_f]
        products = circulant_matrix(self.g.float()) @ skew_circulant_matrix(self.h.float())
        return products.sum(0)[:out_f, :in_f]

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.structured_matrix()

    def merge(self, base: nn.Module) -> None:
        _add_to_base(base, self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        _add_to_base(base, -self.delta_weight())


# --- HF PEFT spellings ------------------------------------------------------------------------

LYCORIS_NEUTRAL = {"layers_to_transform": None, "layers_pattern": None}


def _lycoris_fields(pc: dict) -> dict[str, Any]:
    return {
        "targets": pc["target_modules"],
        "exclude": pc.get("exclude_modules") or None,
        "modules_to_save": pc.get("modules_to_save") or None,
        "r": int(pc["r"]),
        "alpha": float(pc["alpha"]),
        "rank_dropout": float(pc.get("rank_dropout", 0.0)),
        "module_dropout": float(pc.get("module_dropout", 0.0)),
        "use_effective_conv2d": bool(pc.get("use_effective_conv2d", False)),
        "rank_pattern": dict(pc.get("rank_pattern") or {}),
        "alpha_pattern": dict(pc.get("alpha_pattern") or {}),
    }


def _lycoris_to_peft(cfg: LycorisConfig, adapters: dict[str, LycorisAdapter]) -> dict:
    ranks = {p: a.r for p, a in adapters.items()}
    alphas = {p: a.scale * a.r for p, a in adapters.items()}
    return {
        "r": cfg.r,
        "alpha": cfg.alpha,
        # Per-module values keyed by the escaped full name keep every module exact.
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != cfg.r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != cfg.alpha},
        "rank_dropout": cfg.rank_dropout,
        "module_dropout": cfg.module_dropout,
        "use_effective_conv2d": cfg.use_effective_conv2d,
        "init_weights": True,
    }


def _loha_from_peft(pc: dict) -> LoHa:
    return LoHa(**_lycoris_fields(pc))


def _lokr_from_peft(pc: dict) -> LoKr:
    return LoKr(
        **_lycoris_fields(pc),
        decompose_both=bool(pc.get("decompose_both", False)),
        decompose_factor=int(pc.get("decompose_factor", -1)),
        rank_dropout_scale=bool(pc.get("rank_dropout_scale", False)),
        init="lycoris" if pc.get("init_weights") == "lycoris" else "default",
    )


def _lokr_to_peft(cfg: LoKr, adapters: dict[str, LoKrAdapter]) -> dict:
    return {
        **_lycoris_to_peft(cfg, adapters),
        "decompose_both": cfg.decompose_both,
        "decompose_factor": cfg.decompose_factor,
        "rank_dropout_scale": cfg.rank_dropout_scale,
    }


register_peft_format(
    PeftFormat(
        peft_type="LOHA",
        method="loha",
        tensor_names={
            f"hada_{name}": name for name in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")
        },
        config_from_peft=_loha_from_peft,
        config_to_peft=_lycoris_to_peft,
        neutral=LYCORIS_NEUTRAL,
    )
)
register_peft_format(
    PeftFormat(
        peft_type="LOKR",
        method="lokr",
        tensor_names={
            f"lokr_{name}": name for name in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
        },
        config_from_peft=_lokr_from_peft,
        config_to_peft=_lokr_to_peft,
        neutral=LYCORIS_NEUTRAL,
    )
)


__all__ = [
    "SURM",
    "KAdaptation",
    "KAdaptationAdapter",
    "LoHa",
    "LoHaAdapter",
    "LoKr",
    "LoKrAdapter",
    "SURMAdapter",
    "circulant_matrix",
    "factorization",
    "skew_circulant_matrix",
]
