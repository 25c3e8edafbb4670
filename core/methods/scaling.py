"""The scaling family: learned per-feature scales and shifts of frozen layers.

Every method here trains a few vectors the size of a layer's features and is merged
into the layer's own weight and bias exactly (unmerge restores them to float tolerance).

(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
than In-Context Learning", the (IA)^3 method of T-Few): learned vectors rescale inner activations,

    k' = l_k * k,   v' = l_v * v          (output side of the key / value projections)
    h' = W_ff (l_ff * h)                  (input side of the feed-forward's second projection)

with every l initialised to ones, so the model starts unchanged.

SSF (Lian et al., 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient
Model Tuning"): y = gamma * f(x) + beta after an operation f, per output feature.

BitFit (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models"): only bias terms train, y = W x + (b + delta_b).

DiffFit (Xie et al., 2023, "DiffFit: Unlocking Transferability of Large Diffusion Models via
Simple Parameter-Efficient Fine-Tuning"): bias terms, norm affine parameters and
new per-channel scale factors gamma (initialised to ones) on each block's residual branches,
x = x + gamma_1 * MHSA(LN(x)),  x = x + gamma_2 * FFN(LN(x)).

LN tuning (Qi et al., 2022, "Parameter-Efficient Tuning on Layer Normalization for
Pre-trained Language Models"): only the norms' affine parameters train,
y = (w + delta_w) * normalise(x) + (b + delta_b). HF PEFT's LN_TUNING (which cites Zhao et
al., 2023, "Tuning LayerNorm in Attention") computes the same with a trained copy of the norm.

Layers: Linear and transformers' Conv1D (features on the last dim), Conv1d/2d/3d (features on
the channel dim), and norms: LayerNorm, GroupNorm, RMSNorm (torch, transformers' *RMSNorm,
timm's norms incl. the channels-first "...2d" ones) and BatchNorm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import AdapterConfig, _check_name_list, check_float
from ..errors import CheckpointError, ConfigError, MergeError, TargetError
from ..kernels import scale_shift
from ..layers import Adapter, is_fan_in_fan_out
from ..peft_format import PeftFormat, exact_names_regex, register_peft_format
from ..registry import register

# --- where a layer keeps its features ---------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How a layer's per-feature vectors line up with its output.

    Args:
        kind: "linear", "conv" or "norm".
        features: shape of one per-output-feature vector (a norm's affine shape).
        channel_axis: None when the features are the output's trailing dims; otherwise the
            axis that holds them (negative for convolutions, so unbatched inputs work too).
    """

    kind: str
    features: tuple[int, ...]
    channel_axis: int | None = None


def _norm_geometry(module: nn.Module) -> Geometry | None:
    name = type(module).__name__.lower().removesuffix("fp32")
    channel_axis = 1 if name.endswith("2d") else None  # timm's LayerNorm2d, RmsNorm2d, ...
    if isinstance(module, nn.GroupNorm):
        return Geometry("norm", (module.num_channels,), 1)
    if isinstance(module, _BatchNorm):
        return Geometry("norm", (module.num_features,), 1)
    if isinstance(module, nn.LayerNorm | nn.RMSNorm):
        return Geometry("norm", tuple(module.normalized_shape), channel_axis)
    weight = getattr(module, "weight", None)
    named_norm = "rmsnorm" in name or "layernorm" in name
    if named_norm and isinstance(weight, nn.Parameter) and weight.dim() == 1:
        return Geometry("norm", tuple(weight.shape), channel_axis)  # e.g. LlamaRMSNorm
    return None


def geometry(module: nn.Module) -> Geometry | None:
    """The feature layout of ``module``, or None for layers this family does not know."""
    if isinstance(module, nn.Linear):
        return Geometry("linear", (module.out_features,))
    if is_fan_in_fan_out(module):  # weight stored (in, out)
        return Geometry("linear", (module.weight.shape[1],))
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return Geometry("conv", (module.out_channels,), -(module.weight.dim() - 1))
    return _norm_geometry(module)


SUPPORTED = (
    "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, and norms (LayerNorm, GroupNorm, "
    "RMSNorm, BatchNorm and their timm/transformers variants)"
)


def along(vector: torch.Tensor, t: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """``vector`` shaped to broadcast along ``t``'s feature axis."""
    if channel_axis is None:
        return vector
    shape = [1] * t.dim()
    shape[channel_axis] = -1
    return vector.reshape(shape)


def adapter_options(base: nn.Module) -> dict[str, Any]:
    """Device and dtype for adapter tensors: the base's, but float32 under a half base."""
    ref = next(
        (t for t in (getattr(base, "weight", None), getattr(base, "bias", None)) if t is not None),
        None,
    )
    if ref is None:  # a norm without affine parameters
        return {"dtype": torch.get_default_dtype()}
    dtype = torch.float32 if ref.dtype in (torch.float16, torch.bfloat16) else ref.dtype
    return {"device": ref.device, "dtype": dtype}


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


def can_take_bias(module: nn.Module) -> bool:
    """A bias-less layer whose forward would use a bias if one were set (Linear(bias=False),
    Conv(bias=False), LayerNorm(bias=False), ...); RMSNorm has no such slot."""
    return "bias" in module._parameters


def has_affine_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def _matches(path: str, spec: tuple[str, ...] | str) -> bool:
    """The ``targets`` convention: a list entry equals the name or its dotted suffix; a
    string is a regular expression over the full name."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == entry or path.endswith("." + entry) for entry in spec)


def _check_bool(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must be True or False, got {type(value).__name__} "
            f"{value!r}."
        )


def _check_subset(cfg: AdapterConfig, name: str) -> None:
    """HF PEFT's rule: a list of special modules must be a subset of a list of targets."""
    chosen = getattr(cfg, name)
    if isinstance(chosen, tuple) and isinstance(cfg.targets, tuple):
        missing = [entry for entry in chosen if entry not in cfg.targets]
        if missing:
            raise ConfigError(
                f"{type(cfg).__name__}.{name} must be a subset of targets, but {missing} "
                f"are not in targets {list(cfg.targets)}; add them to targets or drop them."
            )


# --- exact in-place scaling, used by merge / unmerge ------------------------------------


def output_factor(base: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    """``scale`` shaped to multiply the base weight along its output features."""
    weight = base.weight
    if is_fan_in_fan_out(base):
        return scale.reshape(1, -1)
    if geometry(base).kind == "norm":
        return scale.reshape(weight.shape)
    return scale.reshape(-1, *[1] * (weight.dim() - 1))


def input_factor(base: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    """``scale`` shaped to multiply the base weight along its input features."""
    weight = base.weight
    if is_fan_in_fan_out(base):
        return scale.reshape(-1, 1)
    if isinstance(base, nn.Linear):
        return scale.reshape(1, -1)
    # A grouped conv's weight is (out, in / groups, *k): output channel o of group g reads
    # input channels g * in_per_group + j, so repeat each group's slice of the scale.
    groups, kernel = base.groups, [1] * (weight.dim() - 2)
    per_group = scale.reshape(groups, 1, -1, *kernel)
    out_per_group = weight.shape[0] // groups
    return per_group.expand(groups, out_per_group, *per_group.shape[2:]).reshape(
        weight.shape[0], -1, *kernel
    )


def scale_(param: torch.Tensor, factor: torch.Tensor) -> torch.Tensor | None:
    """``param *= factor`` in place (float32 arithmetic). Returns the entries a zero factor
    erases, which unscale_ needs to restore them; None when no factor is zero."""
    data = param.data
    full = factor.to(device=data.device, dtype=torch.float32).expand_as(data)
    zero = full == 0
    erased = data[zero].clone() if bool(zero.any()) else None
    data.copy_((data.float() * full).to(data.dtype))
    return erased


def unscale_(param: torch.Tensor, factor: torch.Tensor, erased: torch.Tensor | None) -> None:
    """Undo scale_: divide by the factor, and put back what zero factors erased."""
    data = param.data
    full = factor.to(device=data.device, dtype=torch.float32).expand_as(data)
    zero = full == 0
    data.copy_((data.float() / torch.where(zero, torch.ones_like(full), full)).to(data.dtype))
    if erased is not None:
        data[zero] = erased.to(data.device)


def add_(param: torch.Tensor, delta: torch.Tensor, sign: float = 1.0) -> None:
    data = param.data
    data.copy_((data.float() + sign * delta.detach().float().reshape(data.shape)).to(data.dtype))


def create_bias(base: nn.Module, shape: tuple[int, ...], like: torch.Tensor) -> None:
    """Give a bias-less layer a zero (frozen) bias; remove_bias takes it away again."""
    dtype = base.weight.dtype if has_affine_weight(base) else like.dtype
    base.bias = nn.Parameter(
        torch.zeros(shape, device=like.device, dtype=dtype), requires_grad=False
    )


def remove_bias(base: nn.Module) -> None:
    base.bias = None


def affine_is_elementwise(norm: nn.Module, geo: Geometry) -> bool:
    """Whether the norm computes ``weight * normalise(x) + bias``, so scaling its output
    can be folded into its weight. torch's norms do; for other classes (e.g. Gemma's
    ``(1 + weight)`` RMSNorm) a probe checks that doubling the weight doubles the output."""
    if isinstance(norm, nn.LayerNorm | nn.GroupNorm | nn.RMSNorm | _BatchNorm):
        return True
    weight = norm.weight
    shape = (2, *weight.shape) if geo.channel_axis is None else (2, weight.shape[0], 2, 2)
    probe = torch.randn(shape, device=weight.device, dtype=weight.dtype)
    bias = along(norm.bias, probe, geo.channel_axis) if has_bias(norm) else 0.0
    with torch.no_grad():
        once = norm(probe) - bias
        twice = functional_call(norm, {"weight": 2 * weight}, (probe,)) - bias
    return torch.allclose(twice, 2 * once, rtol=1e-3, atol=1e-5)


class ScalingAdapter(Adapter):
    """Shared bookkeeping: the layer geometry and what merging erased or created."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.geometry = geometry(base)
        self.erased: dict[str, torch.Tensor | None] = {}
        self.created_bias = False

    def feature_vector(self, value: float, base: nn.Module) -> nn.Parameter:
        shape = self.geometry.features
        return nn.Parameter(torch.full(shape, value, **adapter_options(base)))

    def along(self, vector: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return along(vector, t, self.geometry.channel_axis)

    def scale_shift(
        self, t: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None
    ) -> torch.Tensor:
        """scale * t + shift along the feature axis in one pass (``core.kernels``: a fused
        Triton kernel on CUDA, forward and backward; ``addcmul`` elsewhere)."""
        return scale_shift(t, scale, shift, self.geometry.channel_axis)

    # Merging "y -> gamma * y + beta" into the base. The checks run before any change, so a
    # refused merge leaves the layer exactly as it was.

    def check_scalable(self, base: nn.Module) -> None:
        if not has_affine_weight(base):
            raise MergeError(
                f"{self.path}: {type(base).__name__} has no affine weight to fold a scale "
                "into (e.g. LayerNorm(elementwise_affine=False)); keep this adapter unmerged."
            )
        if self.geometry.kind == "norm" and not affine_is_elementwise(base, self.geometry):
            raise MergeError(
                f"{self.path}: {type(base).__name__} does not compute weight * normalise(x), "
                "so a scale of its output cannot be folded into its weight; keep it unmerged."
            )

    def check_shiftable(self, base: nn.Module, delta: torch.Tensor, may_create: bool) -> None:
        if has_bias(base) or not bool((delta != 0).any()):
            return  # a bias to add to, or nothing to add
        undo = " Call core.unmerge(model) to undo adapters merged before this one."
        if not can_take_bias(base):
            raise MergeError(
                f"{self.path}: {type(base).__name__} has no bias and its forward cannot use "
                "one, so the learned shift cannot be merged into it; keep this adapter "
                "unmerged." + undo
            )
        if not may_create:
            raise MergeError(
                f"{self.path}: {type(base).__name__} has no bias to merge the learned shift "
                "into. Set create_missing_bias=True in the config to create one on merge "
                "(removed again on unmerge), or keep the adapter unmerged." + undo
            )

    def scale_output_(self, base: nn.Module, gamma: torch.Tensor) -> None:
        gamma = gamma.detach()
        self.erased["weight"] = scale_(base.weight, output_factor(base, gamma))
        if has_bias(base):
            self.erased["bias"] = scale_(base.bias, gamma.reshape(base.bias.shape))

    def unscale_output_(self, base: nn.Module, gamma: torch.Tensor) -> None:
        gamma = gamma.detach()
        unscale_(base.weight, output_factor(base, gamma), self.erased.pop("weight", None))
        if has_bias(base) and "bias" in self.erased:
            unscale_(base.bias, gamma.reshape(base.bias.shape), self.erased.pop("bias"))

    def add_to_bias_(self, base: nn.Module, delta: torch.Tensor) -> None:
        """bias += delta, creating a zero bias first when the layer has none (callers ran
        check_shiftable)."""
        if not has_bias(base):
            if not bool((delta != 0).any()):
                return
            create_bias(base, tuple(delta.shape), delta)
            self.created_bias = True
        add_(base.bias, delta)

    def remove_from_bias_(self, base: nn.Module, delta: torch.Tensor) -> None:
        if self.created_bias:
            remove_bias(base)
            self.created_bias = False
        elif has_bias(base):
            add_(base.bias, delta, sign=-1.0)


# =========================================================================================
# (IA)^3
# =========================================================================================


@register("ia3", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class IA3(AdapterConfig):
    """(IA)^3 config (Liu et al., 2022); HF PEFT's ``IA3Config`` conventions.

    Each targeted layer gets a vector l initialised to ones. Layers named by
    ``feedforward_modules`` scale their input, y = W (l * x) + b (the paper's l_ff before
    the feed-forward's second projection); all others scale their output, y = l * (W x + b)
    (the paper's l_k, l_v). Trainable parameters per layer: out_features (output side) or
    in_features (input side); channels for convolutions.

    Args:
        feedforward_modules: the subset of targets scaled on the input, e.g. ["down_proj"]
            or ["fc2"]; same syntax as ``targets`` (a list matches names or dotted suffixes,
            a string is a regex over full names). None: every target scales its output.
    """

    feedforward_modules: tuple[str, ...] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_name_list(self, "feedforward_modules", allow_none=True)
        _check_subset(self, "feedforward_modules")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        geo = geometry(module)
        if geo is None or geo.kind == "norm":
            return "(IA)^3 wraps nn.Linear, transformers Conv1D and nn.Conv1d/2d/3d"
        return None

    def is_feedforward(self, path: str) -> bool:
        return self.feedforward_modules is not None and _matches(path, self.feedforward_modules)

    def build(self, module: nn.Module, path: str) -> IA3Adapter:
        return IA3Adapter(module, input_side=self.is_feedforward(path))


def in_features(base: nn.Module) -> int:
    if is_fan_in_fan_out(base):
        return base.weight.shape[0]
    return base.in_features if isinstance(base, nn.Linear) else base.in_channels


class IA3Adapter(ScalingAdapter):
    """``y = l * base(x)`` (output side) or ``y = base(l * x)`` (input side).

    ``scale`` keeps HF PEFT's shape so PEFT folders map one to one: (out, 1) or (1, in)
    for linear layers, (1, channels, 1, ...) for convolutions.
    """

    def __init__(self, base: nn.Module, *, input_side: bool) -> None:
        super().__init__(base)
        self.input_side = input_side
        self.fan_in_fan_out = is_fan_in_fan_out(base)
        self.is_conv1d = isinstance(base, nn.Conv1d)  # HF PEFT has no (IA)^3 for it
        size = in_features(base) if input_side else self.geometry.features[0]
        if self.geometry.kind == "conv":
            shape = (1, size, *[1] * (base.weight.dim() - 2))
        else:
            shape = (1, size) if input_side else (size, 1)
        self.scale = nn.Parameter(torch.ones(shape, **adapter_options(base)))

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_side:
            return x
        return self.scale_shift(x, self.scale.flatten(), None)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.input_side:
            return y
        return self.scale_shift(y, self.scale.flatten(), None)

    def merge(self, base: nn.Module) -> None:
        scale = self.scale.detach().flatten()
        if self.input_side:  # W diag(l): the bias is not scaled
            self.erased["weight"] = scale_(base.weight, input_factor(base, scale))
        else:  # diag(l) W and l * b
            self.check_scalable(base)
            self.scale_output_(base, scale)

    def unmerge(self, base: nn.Module) -> None:
        scale = self.scale.detach().flatten()
        if self.input_side:
            unscale_(base.weight, input_factor(base, scale), self.erased.pop("weight", None))
        else:
            self.unscale_output_(base, scale)


# =========================================================================================
# SSF
# =========================================================================================


@register("ssf", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class SSF(AdapterConfig):
    """SSF config (Lian et al., 2022): ``y = gamma * f(x) + beta`` after each targeted layer.

    gamma and beta have one entry per output feature (channel for convolutions and
    GroupNorm/BatchNorm; the normalised shape for LayerNorm/RMSNorm): 2 * features trainable
    parameters per layer. Merging folds them into the layer: W' = diag(gamma) W,
    b' = gamma * b + beta (for a norm, into its affine weight and bias).

    Args:
        init_std: gamma ~ N(1, init_std), beta ~ N(0, init_std). The default 0 starts at the
            identity (gamma = 1, beta = 0: the model's output is unchanged); the authors'
            code uses 0.02, which starts slightly off the pretrained function.
        create_missing_bias: merging a non-zero beta into a layer without a bias (e.g. a
            LLaMA projection) creates a zero bias there first, removed again on unmerge.
            False: such a merge raises MergeError (the adapter still runs unmerged).
    """

    init_std: float = 0.0
    create_missing_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(self, "init_std", low=0.0, high=1.0)
        _check_bool(self, "create_missing_bias")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if geometry(module) is None:
            return f"SSF wraps {SUPPORTED}"
        return None

    def build(self, module: nn.Module, path: str) -> SSFAdapter:
        return SSFAdapter(module, init_std=self.init_std, may_create_bias=self.create_missing_bias)


class SSFAdapter(ScalingAdapter):
    """``y = gamma * base(x) + beta`` along the output features."""

    def __init__(self, base: nn.Module, *, init_std: float, may_create_bias: bool) -> None:
        super().__init__(base)
        self.may_create_bias = may_create_bias
        self.gamma = self.feature_vector(1.0, base)
        self.beta = self.feature_vector(0.0, base)
        if init_std > 0:
            with torch.no_grad():
                self.gamma.normal_(1.0, init_std)
                self.beta.normal_(0.0, init_std)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.scale_shift(y, self.gamma, self.beta)

    def merge(self, base: nn.Module) -> None:
        self.check_scalable(base)
        self.check_shiftable(base, self.beta, self.may_create_bias)
        self.scale_output_(base, self.gamma)
        self.add_to_bias_(base, self.beta)

    def unmerge(self, base: nn.Module) -> None:
        self.remove_from_bias_(base, self.beta)
        self.unscale_output_(base, self.gamma)


# =========================================================================================
# BitFit
# =========================================================================================


def _bias_reason(module: nn.Module, create_missing_bias: bool, method: str) -> str | None:
    if geometry(module) is None:
        return f"{method} wraps {SUPPORTED}"
    if has_bias(module):
        return None
    if not can_take_bias(module):
        return f"{type(module).__name__} has no bias and its forward cannot use one"
    if not create_missing_bias:
        return (
            f"this {type(module).__name__} has no bias to tune; set create_missing_bias=True "
            "to train a new zero-initialised one, or drop the layer from targets"
        )
    return None


@register("bitfit", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class BitFit(AdapterConfig):
    """BitFit config (Ben Zaken et al., 2022): only the bias terms train.

    Each targeted layer gets a zero-initialised delta of its bias, y = W x + (b + delta_b),
    which is exactly training b (features trainable parameters per layer) while the base
    stays frozen and shared. Merging adds delta_b to b.

    Args:
        create_missing_bias: let bias-less layers (Linear(bias=False), LayerNorm(bias=False),
            ...) train a new bias starting at zero; merging creates it in the layer and
            unmerging removes it. False: such layers are refused at injection.
    """

    create_missing_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_bool(self, "create_missing_bias")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return _bias_reason(module, self.create_missing_bias, "BitFit")

    def build(self, module: nn.Module, path: str) -> BiasAdapter:
        return BiasAdapter(module)


class BiasAdapter(ScalingAdapter):
    """``y = base(x) + delta_b`` along the output features."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.bias_delta = self.feature_vector(0.0, base)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        return self.scale_shift(y, None, self.bias_delta)

    def merge(self, base: nn.Module) -> None:
        # Bias-less layers only get here when the config allowed creating a bias.
        self.check_shiftable(base, self.bias_delta, may_create=True)
        self.add_to_bias_(base, self.bias_delta)

    def unmerge(self, base: nn.Module) -> None:
        self.remove_from_bias_(base, self.bias_delta)


# =========================================================================================
# LN tuning
# =========================================================================================


def _norm_reason(module: nn.Module, method: str) -> str | None:
    geo = geometry(module)
    if geo is None or geo.kind != "norm":
        return (
            f"{method} tunes norm layers (LayerNorm, GroupNorm, RMSNorm, BatchNorm and their "
            "timm/transformers variants)"
        )
    if not has_affine_weight(module):
        return "the norm has no affine parameters to tune (elementwise_affine/affine=False)"
    return None


@register("ln_tuning", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class LNTuning(AdapterConfig):
    """LN tuning config (Qi et al., 2022; HF PEFT's ``LN_TUNING``): only norm affine
    parameters train.

    Each targeted norm gets zero-initialised deltas of its weight and bias and is
    recomputed as ``norm(x; w + delta_w, b + delta_b)``: numel(weight) + numel(bias)
    trainable parameters per norm (just the weight for RMSNorm). Training deltas of a frozen
    base equals training the affine itself; weight decay pulls toward the pretrained values.
    Merging adds the deltas to the norm's parameters.
    """

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return _norm_reason(module, "LN tuning")

    def build(self, module: nn.Module, path: str) -> NormAffineAdapter:
        return NormAffineAdapter(module, tune_weight=True, tune_bias=True)


class NormAffineAdapter(ScalingAdapter):
    """A norm recomputed with ``weight + weight_delta`` and ``bias + bias_delta``.

    It replaces the base forward (one pass, no second run of the norm) by calling the
    norm's own forward with the shifted parameters, so any norm class computes as itself.
    """

    replaces_base = True

    def __init__(self, base: nn.Module, *, tune_weight: bool, tune_bias: bool) -> None:
        super().__init__(base)
        opts = adapter_options(base)
        if tune_weight:
            self.weight_delta = nn.Parameter(torch.zeros_like(base.weight, **opts))
        if tune_bias and has_bias(base):
            self.bias_delta = nn.Parameter(torch.zeros_like(base.bias, **opts))
        self.merged_in = False

    def deltas(self) -> dict[str, torch.Tensor]:
        return {
            name: getattr(self, f"{name}_delta")
            for name in ("weight", "bias")
            if hasattr(self, f"{name}_delta")
        }

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        tuned = {
            name: (getattr(base, name) + delta).to(getattr(base, name).dtype)
            for name, delta in self.deltas().items()
        }
        return functional_call(base, tuned, (x, *args), kwargs)

    # The base module is kept (unregistered, so not saved or moved twice) for PEFT export,
    # which writes the tuned affine itself.
    def on_attach(self, base: nn.Module) -> None:
        self.__dict__["norm_for_export"] = base

    def on_detach(self, base: nn.Module) -> None:
        self.__dict__.pop("norm_for_export", None)

    def tuned_affine(self) -> dict[str, torch.Tensor]:
        """The norm's weight and bias with the deltas applied (what PEFT stores)."""
        norm = self.__dict__["norm_for_export"]
        return {
            name: getattr(norm, name).detach()
            if self.merged_in
            else (getattr(norm, name) + delta.detach()).to(getattr(norm, name).dtype)
            for name, delta in self.deltas().items()
        }

    def merge(self, base: nn.Module) -> None:
        for name, delta in self.deltas().items():
            add_(getattr(base, name), delta)
        self.merged_in = True

    def unmerge(self, base: nn.Module) -> None:
        for name, delta in self.deltas().items():
            add_(getattr(base, name), delta, sign=-1.0)
        self.merged_in = False


# =========================================================================================
# DiffFit
# =========================================================================================


@register("difffit", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class DiffFit(AdapterConfig):
    r"""DiffFit config (Xie et al., 2023): bias terms, norm affines and scale factors gamma.

    The paper scales each DiT block's residual branches, x + gamma * branch(x), with gamma
    a per-channel vector initialised to ones (the model starts unchanged). A branch ends in
    a layer (the attention's output projection, the MLP's second linear), so gamma scales
    that layer's output: ``y = gamma * (W x + b + delta_b)``; it merges as W' = diag(gamma) W,
    b' = gamma * (b + delta_b). For each targeted module:

    - a layer matched by ``scale_modules`` (Linear/Conv) gets gamma, plus delta_b if
      ``bias`` and it has a bias: features (+ features) trainable parameters;
    - another Linear/Conv gets its bias tuned (needs ``bias`` and a bias): features;
    - a norm gets its weight tuned if ``norm`` and its bias if ``bias``: numel of each.

    The paper's recipe on a DiT (facebookresearch/DiT names; its norms have no affine
    parameters, so none are targeted; add norms in models whose norms have them)::

        DiffFit(
            targets=r"(x_embedder\.proj|t_embedder\.mlp\.[02]|final_layer\.(linear|"
                    r"adaLN_modulation\.1)|blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12]|"
                    r"adaLN_modulation\.1))",
            scale_modules=["attn.proj", "mlp.fc2"],  # the two residual branches
            modules_to_save=["y_embedder"],  # the paper trains the class embedding in full
        )

    With the defaults, ``DiffFit(targets=["attn.proj", "mlp.fc2"])`` scales and bias-tunes
    just the branch outputs.

    Args:
        scale_modules: the targets that get gamma (same syntax as ``targets``; a list must be
            a subset of a list of targets). None: every targeted Linear/Conv.
        bias: tune the bias terms of the targeted modules.
        norm: tune the weights (gains) of the targeted norms.
    """

    scale_modules: tuple[str, ...] | str | None = None
    bias: bool = True
    norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_name_list(self, "scale_modules", allow_none=True)
        _check_subset(self, "scale_modules")
        _check_bool(self, "bias")
        _check_bool(self, "norm")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        geo = geometry(module)
        if geo is None:
            return f"DiffFit wraps {SUPPORTED}"
        if geo.kind == "norm":
            tunes_weight = self.norm and has_affine_weight(module)
            tunes_bias = self.bias and has_bias(module)
            if not (tunes_weight or tunes_bias):
                return (
                    "nothing to tune in this norm: it has no affine parameters or both "
                    "DiffFit.norm and DiffFit.bias are off; drop it from targets"
                )
        return None

    def is_scaled(self, path: str) -> bool:
        return self.scale_modules is None or _matches(path, self.scale_modules)

    def build(self, module: nn.Module, path: str) -> Adapter:
        if geometry(module).kind == "norm":
            if self.norm:
                return NormAffineAdapter(module, tune_weight=True, tune_bias=self.bias)
            return BiasAdapter(module)
        if self.is_scaled(path):
            return GammaAdapter(module, tune_bias=self.bias and has_bias(module))
        if self.bias and has_bias(module):
            return BiasAdapter(module)
        raise TargetError(
            f"DiffFit: {path} ({type(module).__name__}) is neither in scale_modules nor has a "
            "bias to tune (or bias=False); add it to scale_modules or drop it from targets."
        )


class GammaAdapter(ScalingAdapter):
    """``y = gamma * (base(x) + delta_b)``: DiffFit's scale factor on a branch output."""

    def __init__(self, base: nn.Module, *, tune_bias: bool) -> None:
        super().__init__(base)
        self.gamma = self.feature_vector(1.0, base)
        if tune_bias:
            self.bias_delta = self.feature_vector(0.0, base)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        shift = self.bias_delta * self.gamma if hasattr(self, "bias_delta") else None
        return self.scale_shift(y, self.gamma, shift)

    def merge(self, base: nn.Module) -> None:
        self.check_scalable(base)
        if hasattr(self, "bias_delta"):
            add_(base.bias, self.bias_delta)
        self.scale_output_(base, self.gamma)

    def unmerge(self, base: nn.Module) -> None:
        self.unscale_output_(base, self.gamma)
        if hasattr(self, "bias_delta"):
            add_(base.bias, self.bias_delta, sign=-1.0)


# =========================================================================================
# HF PEFT spelling: IA3 and LN_TUNING
# =========================================================================================


def _suffix_regex(entries: list[str]) -> str:
    """A full-match regex equal to PEFT's plain ``name.endswith(entry)`` list test."""
    return ".*(?:" + "|".join(re.escape(e) for e in entries) + ")"


def _ia3_from_peft(pc: dict) -> IA3:
    feedforward = pc.get("feedforward_modules") or None
    if isinstance(feedforward, list | tuple | set):
        # PEFT tests feedforward names with a plain endswith (no dot), unlike targets.
        feedforward = _suffix_regex(sorted(feedforward))
    return IA3(
        targets=pc["target_modules"],
        exclude=pc.get("exclude_modules") or None,
        modules_to_save=pc.get("modules_to_save") or None,
        feedforward_modules=feedforward,
    )


def _peft_feedforward(adapters: dict[str, IA3Adapter]) -> list[str] | str:
    """The input-side modules for PEFT: their full names, or a regex when PEFT's plain
    endswith test on those names would also catch an output-side module."""
    inputs = sorted(p for p, a in adapters.items() if a.input_side)
    outputs = [p for p, a in adapters.items() if not a.input_side]
    if any(p.endswith(i) for p in outputs for i in inputs):
        return exact_names_regex(inputs)
    return inputs


def _ia3_to_peft(cfg: IA3, adapters: dict[str, IA3Adapter]) -> dict:
    for path, adapter in adapters.items():
        if adapter.is_conv1d:
            raise CheckpointError(
                f"{path}: HF PEFT's (IA)^3 has no nn.Conv1d layer, so this adapter cannot be "
                "exported; drop the Conv1d layers from targets to export the rest."
            )
    return {
        "feedforward_modules": _peft_feedforward(adapters),
        "fan_in_fan_out": any(a.fan_in_fan_out for a in adapters.values()),
        "init_ia3_weights": True,
    }


register_peft_format(
    PeftFormat(
        peft_type="IA3",
        method="ia3",
        tensor_names={"ia3_l": "scale"},
        config_from_peft=_ia3_from_peft,
        config_to_peft=_ia3_to_peft,
    )
)


def ln_tuning_tensors_from_peft(
    base: nn.Module, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """PEFT's tuned affine (under our delta names) -> our deltas: peft value - base value.
    (PEFT stores a whole trained copy of the norm; omnipeft its difference to the base.)"""
    out = {}
    for ours, value in tensors.items():
        name = ours.removesuffix("_delta")
        current = getattr(base, name).detach()
        out[ours] = value.to(device=current.device, dtype=torch.float32) - current.float()
    return out


def _ln_from_peft(pc: dict) -> LNTuning:
    return LNTuning(
        targets=pc["target_modules"],
        exclude=pc.get("exclude_modules") or None,
        modules_to_save=pc.get("modules_to_save") or None,
    )


def _ln_to_peft(cfg: LNTuning, adapters: dict[str, NormAffineAdapter]) -> dict:
    return {}  # core.interop writes the exact target names


def _ln_export(adapter: NormAffineAdapter) -> dict[str, torch.Tensor]:
    return {f"ln_tuning_layers.{name}": value for name, value in adapter.tuned_affine().items()}


register_peft_format(
    PeftFormat(
        peft_type="LN_TUNING",
        method="ln_tuning",
        tensor_names={
            "ln_tuning_layers.weight": "weight_delta",
            "ln_tuning_layers.bias": "bias_delta",
        },
        config_from_peft=_ln_from_peft,
        config_to_peft=_ln_to_peft,
        export_tensors=_ln_export,
        import_tensors=ln_tuning_tensors_from_peft,
    )
)
