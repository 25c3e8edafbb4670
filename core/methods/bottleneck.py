"""Bottleneck adapters and their relatives: small modules that act on a block's hidden states.

These are activation-space methods (He et al., 2022, "Towards a Unified View of
Parameter-Efficient Transfer Learning"): a learned function of the hidden states is added
where they flow, so nothing can be folded into a weight. They register with
``mergeable=False`` and ``core.merge`` refuses them.

Each adapter wraps a *block*: a module whose output is a hidden-state tensor ``(..., d)``
(or a tuple whose first item is one), such as timm ViT ``blocks.N.attn`` / ``blocks.N.mlp``,
LLaMA ``self_attn`` / ``mlp``, diffusers ``attn1`` / ``ff``, or a sublayer's output
projection (BERT ``attention.output.dense``, a plain ``nn.Linear``). With ``x`` the block's
main input and ``h = block(x)`` its output:

* Bottleneck adapter (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning for
  NLP", Fig. 2), sequential:

      h <- h + s * W_up f(W_down LN(h) + b_down) + b_up,   W_down in R^{m x d}, W_up in R^{d x m}

  Houlsby puts one after the attention sublayer and one after the feed-forward sublayer,
  before the residual add; Pfeiffer et al. (2021, "AdapterFusion: Non-Destructive Task
  Composition for Transfer Learning") keep only the one after the feed-forward sublayer.
* Parallel adapter (He et al., 2022, Fig. 1 and Table 1): the same bottleneck reads the
  block's input instead, ``h <- block(x) + s * W_up f(W_down x)``; the *scaled* parallel
  adapter uses s = 4. Cappellazzo et al. (2024, "Parameter-Efficient Transfer Learning of
  Audio Spectrogram Transformers") compare the four placements {MHSA, FFN} x {sequential,
  parallel}: choose the block with ``targets`` and the form with ``mode``.
* AdapterBias (Fu et al., 2022, "AdapterBias: Parameter-efficient Token-dependent
  Representation Shift for Adapters in NLP Tasks"): a shift vector v in R^d weighted per
  token by a linear layer L_alpha: R^{d_in} -> R, ``h_i <- h_i + L_alpha(x_i) v``.
* Routing functions (Qu et al., 2024, "Introducing Routing Functions to Vision-Language
  Parameter-Efficient Fine-Tuning with Low-Rank Bottlenecks"): for vision-language
  tasks, the bottleneck representation of the text tokens is routed by the visual
  features passed through the same W_down, before the activation; no new parameters.
  With t = W_down z (text tokens, (L_t, m)) and v = W_down z_v (visual tokens, (L_v, m)):
  ``t v^T v`` (the paper's main form), the same with ReLU on t and v^T, ``t * v`` or
  ``t + v``. ``Bottleneck(routing=...)`` picks one; ``routing_features(model, visual)``
  supplies the visual features for a forward.
* Compacter / PHM-Adapter (Karimi Mahabadi et al., 2021, "Compacter: Efficient Low-Rank
  Hypercomplex Adapter Layers"): the bottleneck's two projections are
  parameterised hypercomplex multiplication (PHM) layers
  ``W = sum_{i=1}^n A_i (x) B_i`` (Kronecker products), where the n slow weights
  A_i in R^{n x n} are *shared* by every layer of one adapter and B_i is per layer: full
  (PHM-Adapter) or rank r, ``B_i = s_i t_i^T`` (Compacter).

Sizes: ``d_in`` is the block's first ``nn.Linear``'s ``in_features``, ``d_out`` its last
``nn.Linear``'s ``out_features`` (adapters already on sub-layers are seen through), else
``config.hidden_size``; ``hidden_size=`` in the config overrides both. Norms, dropouts,
activations, embeddings and containers are refused with a reason.

Placement presets per model family: ``placement_targets(site, family)`` and
``Bottleneck.preset("houlsby" | "pfeiffer" | "parallel" | "scaled_parallel", family)``.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..errors import ConfigError
from ..layers import AdaptedModule, Adapter, is_fan_in_fan_out
from ..registry import register
from ..targeting import adapted_modules

MODES = ("sequential", "parallel")
ROUTINGS = ("xt_xvT_xv", "xt_xvT_xv_relu", "xt_mul_xv", "xt_add_xv")
INITS = ("zero_up", "near_identity")
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "identity": lambda t: t,
}
# Houlsby et al.'s init: weights ~ N(0, 1e-2^2) truncated to two standard deviations.
HOULSBY_INIT_STD = 1e-2
# Compacter's shared rule A ~ N(0, std^2): the default of the authors' implementation.
PHM_RULE_INIT_STD = 1e-4


# --- placement presets --------------------------------------------------------------------

# Per model family, the modules an adapter wraps at the attention sublayer, the feed-forward
# sublayer, or both. Lists match a full name or its dotted suffix; a string is a full-match
# regular expression (core.targeting).
SITES: dict[str, dict[str, tuple[str, ...] | str]] = {
    # timm ViT / DeiT / AST-in-timm blocks: x + attn(norm1(x)), x + mlp(norm2(x)).
    "timm_vit": {"attention": ("attn",), "ffn": ("mlp",), "both": ("attn", "mlp")},
    # LLaMA, Mistral, Qwen: decoder layers with self_attn and mlp.
    "llama": {"attention": ("self_attn",), "ffn": ("mlp",), "both": ("self_attn", "mlp")},
    # Post-LN HF encoders (BERT, RoBERTa, HF ViT, AST): the sublayers' output projections,
    # so the adapter acts before the residual add and LayerNorm, as in Houlsby's Fig. 2.
    "bert": {
        "attention": ("attention.output.dense",),
        "ffn": r"(.*\.)?layer\.\d+\.output\.dense",
        "both": r"(.*\.)?layer\.\d+\.(attention\.)?output\.dense",
    },
    # diffusers BasicTransformerBlock: self-/cross-attention attn1/attn2 and ff.
    "diffusers": {
        "attention": r"(.*\.)?attn[12]",
        "ffn": ("ff",),
        "both": r"(.*\.)?(attn[12]|ff)",
    },
}

# Named placements from the papers: (site, config fields).
PLACEMENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "houlsby": ("both", {"mode": "sequential"}),
    "pfeiffer": ("ffn", {"mode": "sequential"}),
    "parallel": ("ffn", {"mode": "parallel", "scale": 1.0}),
    "scaled_parallel": ("ffn", {"mode": "parallel", "scale": 4.0}),
}


def placement_targets(site: str, family: str) -> tuple[str, ...] | str:
    """The ``targets`` that put an adapter at ``site`` ("attention", "ffn" or "both", or a
    placement name from ``PLACEMENTS``) in a model of ``family`` (a key of ``SITES``)."""
    if family not in SITES:
        raise ConfigError(
            f"unknown model family {family!r}; presets exist for {sorted(SITES)}. For another "
            "model pass targets=[...] naming its attention / MLP blocks."
        )
    site = PLACEMENTS[site][0] if site in PLACEMENTS else site
    if site not in SITES[family]:
        raise ConfigError(
            f"unknown placement {site!r}; use one of {sorted(SITES[family])} or a named "
            f"placement {sorted(PLACEMENTS)}."
        )
    return SITES[family][site]


# --- what a block is, and its feature sizes ------------------------------------------------


def base_modules(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` and its submodules, seeing an already adapted child as its base layer."""
    if isinstance(module, AdaptedModule):
        yield from base_modules(module.base_layer)
        return
    yield module
    for child in module.children():
        yield from base_modules(child)


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_fan_in_fan_out(module)


def linear_sizes(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of an nn.Linear or a transformers Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def block_sizes(module: nn.Module, hidden_size: int | None = None) -> tuple[int, int] | None:
    """(d_in, d_out) of a block, or None when they cannot be inferred; see the module doc."""
    if hidden_size is not None:
        return hidden_size, hidden_size
    linears = [m for m in base_modules(module) if is_linear(m)]
    if linears:
        return linear_sizes(linears[0])[0], linear_sizes(linears[-1])[1]
    hidden = getattr(getattr(module, "config", None), "hidden_size", None)
    if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0:
        return hidden, hidden
    return None


def non_block_kind(module: nn.Module) -> str | None:
    """What ``module`` is when it is clearly not a block (norms, dropout, ...), else None."""
    if isinstance(module, nn.ModuleList | nn.ModuleDict | nn.ParameterList | nn.ParameterDict):
        return "a container with no forward of its own (target the blocks inside it)"
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)
    if isinstance(module, norms + (nn.modules.batchnorm._NormBase,)):
        return "a normalisation layer"
    if type(module).__name__.endswith("Norm"):  # LlamaRMSNorm, T5LayerNorm, ...
        return "a normalisation layer"
    if isinstance(module, nn.modules.dropout._DropoutNd | nn.Identity):
        return "a dropout / identity layer"
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return "an embedding lookup (its input is token ids, not hidden states)"
    activation = type(module).__module__ == "torch.nn.modules.activation"
    if activation and not isinstance(module, nn.MultiheadAttention):
        return "an activation function"
    return None


def block_problem(module: nn.Module, hidden_size: int | None) -> str | None:
    kind = non_block_kind(module)
    if kind is not None:
        return (
            f"{type(module).__name__} is {kind}, not a block whose output hidden states an "
            "adapter can act on; target attention / MLP blocks or a sublayer's output "
            "projection (core.methods.bottleneck.placement_targets lists them per family)"
        )
    if block_sizes(module, hidden_size) is None:
        return (
            "its hidden size cannot be inferred: it holds no nn.Linear and has no "
            "config.hidden_size; pass hidden_size=<size of its output features> or target "
            "a block built from Linear layers"
        )
    return None


def adapter_options(module: nn.Module) -> dict[str, Any]:
    """Device and dtype for new adapter tensors: the block's, float32 under half precision."""
    ref = next((m.weight for m in base_modules(module) if is_linear(m)), None)
    if ref is None:
        ref = next(module.parameters(), None)
    if ref is None:
        return {}
    # Half-precision or quantised (integer) storage: train the adapter in float32.
    full = ref.is_floating_point() and ref.dtype not in (torch.float16, torch.bfloat16)
    return {"device": ref.device, "dtype": ref.dtype if full else torch.float32}


# --- configs -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BlockConfig(AdapterConfig):
    """Fields of every method here (not registered itself).

    Args:
        hidden_size: feature size of the targeted blocks' inputs and outputs; by default
            inferred per block (first Linear's in_features, last Linear's out_features,
            else ``config.hidden_size``).
    """

    hidden_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size is not None:
            check_int(self, "hidden_size")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return block_problem(module, self.hidden_size)

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        sizes = block_sizes(module, self.hidden_size)
        assert sizes is not None, "unsupported_reason admits only blocks with known sizes"
        return sizes


@register("bottleneck", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class Bottleneck(BlockConfig):
    """Bottleneck adapter (Houlsby et al., 2019), sequential or parallel (He et al., 2022).

    ``h <- h + s * W_up f(W_down LN(z) + b_down) + b_up`` with ``z = h`` (sequential) or
    ``z = x``, the block's input (parallel). Per wrapped block it trains
    ``m (d_z + 1) + d_out (m + 1)`` parameters, plus ``2 d_z`` with ``layer_norm``.

    Not mergeable: it is a nonlinear function of the hidden states.

    Args:
        reduction_factor: m = d_out // reduction_factor. Give this or ``bottleneck``, not
            both; with neither, 16 (Pfeiffer et al.; AdapterHub's default).
        bottleneck: m directly (Houlsby et al. use 8 to 256).
        mode: "sequential" (reads the block output: Houlsby, Pfeiffer) or "parallel"
            (reads the block input: He et al.).
        scale: s; 1 for the classic adapters, 4 for He et al.'s scaled parallel adapter.
        activation: f: "relu" (default: Pfeiffer et al., He et al.), "gelu", "silu"/"swish"
            (AdapterHub's Houlsby config), "tanh" or "identity".
        layer_norm: a trainable LayerNorm on the adapter's input z before W_down (the
            "ln_before" option of AdapterHub's configs); off by default, as in AdapterHub's
            Houlsby and Pfeiffer configs.
        init: "zero_up" (default): W_down Kaiming-uniform (PyTorch's Linear init, as in He
            et al.'s code), W_up and both biases zero, so the model starts *exactly* as the
            frozen one. "near_identity": Houlsby's init, every weight ~ N(0, 1e-2^2)
            truncated at two standard deviations, biases zero, so it starts near (not at)
            the identity.
        routing: None (default) or a routing function of Qu et al. (module docstring),
            applied between W_down and the activation, ``W_up f(R(t, v))``:
            "xt_xvT_xv" (t v^T v), "xt_xvT_xv_relu" (relu(t) relu(v)^T v), "xt_mul_xv"
            (t * v) or "xt_add_xv" (t + v). The visual tokens v come from
            ``routing_features``; the element-wise forms average them over their tokens
            unless their count matches the text's or is 1. No extra parameters.

    Houlsby et al. also train the base model's LayerNorms; add them with
    ``modules_to_save`` if wanted. Presets: ``Bottleneck.preset("houlsby", "timm_vit")``.
    """

    reduction_factor: float | None = None
    bottleneck: int | None = None
    mode: str = "sequential"
    scale: float = 1.0
    activation: str = "relu"
    layer_norm: bool = False
    init: str = "zero_up"
    routing: str | None = None

    DEFAULT_REDUCTION: ClassVar[float] = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_width()
        check_choice(self, "mode", MODES)
        check_float(self, "scale", low=0.0, low_open=True)
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_choice(self, "init", INITS)
        if self.routing is not None:
            check_choice(self, "routing", ROUTINGS)
        if not isinstance(self.layer_norm, bool):
            raise ConfigError(
                f"{type(self).__name__}.layer_norm must be True or False, got {self.layer_norm!r}."
            )

    def _check_width(self) -> None:
        name = type(self).__name__
        if self.reduction_factor is not None and self.bottleneck is not None:
            raise ConfigError(
                f"{name} got both reduction_factor={self.reduction_factor} and "
                f"bottleneck={self.bottleneck}; the width m is set by exactly one of them "
                "(m = d // reduction_factor, or m = bottleneck). Drop one."
            )
        if self.bottleneck is not None:
            check_int(self, "bottleneck")
            return
        if self.reduction_factor is None:
            object.__setattr__(self, "reduction_factor", self.DEFAULT_REDUCTION)
        check_float(self, "reduction_factor", low=0.0, low_open=True)

    @classmethod
    def preset(cls, placement: str, family: str, **fields: Any) -> Self:
        """A config at a named placement (see ``PLACEMENTS``) for a model family (``SITES``);
        ``fields`` override the preset's, e.g. ``scale`` or ``reduction_factor``."""
        if placement not in PLACEMENTS:
            raise ConfigError(
                f"unknown placement {placement!r}; named placements are {sorted(PLACEMENTS)}."
            )
        site, preset_fields = PLACEMENTS[placement]
        return cls(targets=placement_targets(site, family), **{**preset_fields, **fields})

    def width(self, d_out: int) -> int:
        if self.bottleneck is not None:
            return self.bottleneck
        return int(d_out // self.reduction_factor)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if reason := super().unsupported_reason(module):
            return reason
        d_out = self.sizes(module)[1]
        if self.width(d_out) < 1:
            return (
                f"reduction_factor={self.reduction_factor} leaves no bottleneck units for "
                f"hidden size {d_out}; use a smaller reduction_factor or set bottleneck"
            )
        return None

    def build(self, module: nn.Module, path: str) -> BottleneckAdapter:
        d_in, d_out = self.sizes(module)
        return BottleneckAdapter(self, d_in, d_out, self.width(d_out), adapter_options(module))


@register("adapter_bias", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class AdapterBias(BlockConfig):
    """AdapterBias (Fu et al., 2022): ``h_i <- h_i + L_alpha(x_i) v``.

    v in R^{d_out} is a shift shared by all tokens; L_alpha: R^{d_in} -> R (a Linear with
    bias) weighs it per token from the block's input x_i. As in the authors' code, v starts
    at zero and L_alpha has PyTorch's default Linear init, so the model starts exactly as
    the frozen one. Per wrapped block: ``d_out + d_in + 1`` parameters. Not mergeable (the
    shift depends on the token).

    The authors add it at the feed-forward sublayer's second projection with L_alpha
    reading that projection's input: target BERT ``output.dense`` (the "bert" preset's
    "ffn" site), timm ``mlp.fc2`` or LLaMA ``mlp.down_proj`` for exactly that; targeting a
    whole MLP block feeds L_alpha the block's input instead.
    """

    def build(self, module: nn.Module, path: str) -> AdapterBiasAdapter:
        d_in, d_out = self.sizes(module)
        return AdapterBiasAdapter(d_in, d_out, adapter_options(module))


@register("compacter", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class Compacter(Bottleneck):
    """Compacter / PHM-Adapter (Karimi Mahabadi et al., 2021): a bottleneck adapter whose
    projections are PHM layers. Extends ``Bottleneck`` by design (same fields and forms).

    Each projection a -> b is ``y = x W^T + bias`` with ``W = sum_{i=1}^n A_i (x) B_i``,
    ``A_i in R^{n x n}``, ``B_i in R^{(b/n) x (a/n)}``. The rule A (n^3 numbers) is one
    tensor shared by both projections of every layer of one adapter (one ``inject``);
    ``rank=r`` gives Compacter, ``B_i = s_i t_i^T`` (r (a + b) per projection), and
    ``rank=None`` the PHM-Adapter, full B_i (a b / n per projection). Per wrapped block:
    ``P(d_z, m) + P(m, d_out)`` with ``P(a, b) = r (a + b) + b`` (Compacter) or
    ``a b / n + b`` (PHM-Adapter), plus ``2 d_z`` with ``layer_norm``; plus ``n^3`` once per
    adapter. With Houlsby's placement (both sublayers of L layers, r = 1, biases left out)
    this is the paper's ``4 L (d + m) + n^3``; the "pfeiffer" placement is Compacter++.

    Args (besides ``Bottleneck``'s; reduction 32 and GELU are the paper's defaults):
        n: number of Kronecker summands; must divide d_in, d_out and the width m.
        rank: r of each B_i, or None for full B_i (PHM-Adapter).
        init: "zero_up" (default): the up projection's per-layer factor (s_i, or B_i) is
            zero, so the model starts exactly as the frozen one. "near_identity": as the
            authors' code, no factor zeroed, which starts near the identity. In both, the
            per-layer factors are Glorot-uniform per summand, biases zero and A ~ N(0, 1e-4^2).
    """

    activation: str = "gelu"
    n: int = 4
    rank: int | None = 1

    DEFAULT_REDUCTION: ClassVar[float] = 32.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "n", minimum=2)
        if self.routing is not None:
            raise ConfigError(
                "Compacter does not take routing; routing functions are an option of "
                "Bottleneck (core.methods.bottleneck.Bottleneck(routing=...))."
            )
        if self.rank is not None:
            check_int(self, "rank")

    def __getstate__(self) -> dict[str, Any]:
        # The build-time link to a shared rule is not part of the config's value.
        return {k: v for k, v in self.__dict__.items() if k != "_rule_group"}

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if reason := super().unsupported_reason(module):
            return reason
        d_in, d_out = self.sizes(module)
        d_z = d_in if self.mode == "parallel" else d_out
        sizes = {"input": d_z, "output": d_out, "bottleneck": self.width(d_out)}
        bad = {k: v for k, v in sizes.items() if v % self.n}
        if bad:
            return (
                f"Compacter splits features into n={self.n} blocks, but the "
                + ", ".join(f"{k} size {v}" for k, v in bad.items())
                + f" {'is' if len(bad) == 1 else 'are'} not divisible by {self.n}; choose n "
                "dividing every size, or a bottleneck that is a multiple of n"
            )
        return None

    def build(self, module: nn.Module, path: str) -> CompacterAdapter:
        d_in, d_out = self.sizes(module)
        owner = self._rule_owner(path)
        adapter = CompacterAdapter(
            self, d_in, d_out, self.width(d_out), adapter_options(module), rule_owner=owner
        )
        if owner is None:
            object.__setattr__(
                self, "_rule_group", {"owner": weakref.ref(adapter), "paths": {path}}
            )
        return adapter

    def _rule_owner(self, path: str) -> CompacterAdapter | None:
        """The adapter holding the rule of the injection being built, or None to start one.

        One ``inject`` (or ``load_adapter``) builds every adapter before ``attach`` puts any
        in place (and sets its ``path``), and builds each targeted path once. So an owner
        that is already attached, or a path met again, means a new injection (the same
        config under another name, or in another model), which gets its own rule.
        """
        group = self.__dict__.get("_rule_group")
        owner = group["owner"]() if group else None
        if owner is None or hasattr(owner, "path") or path in group["paths"]:
            return None
        group["paths"].add(path)
        return owner


# --- adapters ------------------------------------------------------------------------------


class BlockAdapter(Adapter):
    """Applies ``adapt(x, h)`` to a block's output ``h`` (the first item of a tuple output,
    e.g. transformers attention's (output, weights), keeping the rest)."""

    batch_separable = True  # acts on each token alone, so samples may use different adapters

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = d_in, d_out

    def adapt(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def post(self, x: torch.Tensor, y: Any, base: nn.Module) -> Any:
        if isinstance(y, torch.Tensor):
            return self.adapt(x, y)
        if isinstance(y, tuple | list) and y and isinstance(y[0], torch.Tensor):
            rest = list(y[1:])
            first = self.adapt(x, y[0])
            if isinstance(y, list):
                return [first, *rest]
            return type(y)(first, *rest) if hasattr(y, "_fields") else (first, *rest)
        raise TypeError(
            f"{type(self).__name__} at {getattr(self, 'path', '?')}: the block returned "
            f"{type(y).__name__}; these adapters act on a tensor output or on the first "
            "tensor of a tuple. Target a module that returns hidden states."
        )

    def check_features(self, t: Any, size: int, what: str) -> None:
        if not isinstance(t, torch.Tensor) or t.shape[-1] != size:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeError(
                f"{type(self).__name__} at {getattr(self, 'path', '?')} was built for {what} "
                f"with {size} features in the last dimension, got {got}. Pass hidden_size= "
                "to match, or target a block whose hidden states are (..., features) "
                "(channel-first feature maps are not supported)."
            )


class BottleneckAdapter(BlockAdapter):
    """``h + s * up(f(down(LN(z))))`` with z = h (sequential) or x (parallel)."""

    def __init__(
        self, cfg: Bottleneck, d_in: int, d_out: int, width: int, opts: dict[str, Any]
    ) -> None:
        super().__init__(d_in, d_out)
        self.config = cfg
        self.parallel = cfg.mode == "parallel"
        self.scale = cfg.scale
        self.act = ACTIVATIONS[cfg.activation]
        d_z = d_in if self.parallel else d_out
        self.norm = nn.LayerNorm(d_z, **opts) if cfg.layer_norm else None
        self.down = self.projection(d_z, width, opts)
        self.up = self.projection(width, d_out, opts)
        self.reset_parameters()

    def projection(self, d_in: int, d_out: int, opts: dict[str, Any]) -> nn.Module:
        return nn.Linear(d_in, d_out, **opts)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.config.init == "near_identity":
                bound = 2 * HOULSBY_INIT_STD
                for layer in (self.down, self.up):
                    nn.init.trunc_normal_(layer.weight, std=HOULSBY_INIT_STD, a=-bound, b=bound)
                    nn.init.zeros_(layer.bias)
                return
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def bottleneck_path(self, z: torch.Tensor) -> torch.Tensor:
        t = self.down(z)
        if self.config.routing is not None:
            t = route_bottleneck(self.config.routing, t, self.down(self.visual_input(z)))
        return self.up(self.act(t))

    def visual_input(self, z: torch.Tensor) -> torch.Tensor:
        """The visual features set by ``routing_features``, normalised like z."""
        visual = getattr(self, "visual", None)
        if visual is None:
            raise RuntimeError(
                f"the bottleneck adapter at {getattr(self, 'path', '?')} routes by visual "
                "features (routing="
                f"{self.config.routing!r}); run the model inside "
                "core.methods.bottleneck.routing_features(model, visual)."
            )
        self.check_features(visual, z.shape[-1], "visual features")
        visual = visual.to(device=z.device, dtype=z.dtype)
        return visual if self.norm is None else self.norm(visual)

    def adapt(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = x if self.parallel else h
        self.check_features(z, self.down_in_features, "inputs" if self.parallel else "outputs")
        self.check_features(h, self.out_features, "outputs")
        z = z.to(self.dtype)
        if self.norm is not None:
            z = self.norm(z)
        return torch.add(h, self.bottleneck_path(z).to(h.dtype), alpha=self.scale)

    @property
    def down_in_features(self) -> int:
        return self.in_features if self.parallel else self.out_features

    @property
    def dtype(self) -> torch.dtype:
        return self.up.bias.dtype


def route_bottleneck(kind: str, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A routing function of Qu et al. on down-projected text tokens t (B, L_t, m) and
    visual tokens v (B, L_v, m); see ``Bottleneck.routing``."""
    if kind in ("xt_xvT_xv", "xt_xvT_xv_relu"):
        if t.dim() != 3 or v.dim() != 3:
            raise RuntimeError(
                f"routing {kind!r} multiplies token matrices: text and visual hidden states "
                f"must be (batch, tokens, features), got {tuple(t.shape)} and {tuple(v.shape)}."
            )
        left, right = (F.relu(t), F.relu(v)) if kind.endswith("relu") else (t, v)
        return left @ right.transpose(-1, -2) @ v
    if v.dim() >= 2 and v.shape[-2] not in (1, t.shape[-2]):
        v = v.mean(dim=-2, keepdim=True)  # pooled visual features for element-wise routing
    return t * v if kind == "xt_mul_xv" else t + v


@contextlib.contextmanager
def routing_features(model: nn.Module, visual: torch.Tensor):
    """Supply the visual features that routing bottleneck adapters route by, for the
    forwards run inside this block (e.g. a vision encoder's output projected to the text
    model's width, (batch, visual tokens, features))."""
    routed = [
        adapter
        for _, wrapper in adapted_modules(model)
        for adapter in wrapper.adapters.values()
        if isinstance(adapter, BottleneckAdapter) and adapter.config.routing is not None
    ]
    if not routed:
        raise ValueError("the model has no bottleneck adapter with routing to give features to.")
    for adapter in routed:
        adapter.visual = visual
    try:
        yield
    finally:
        for adapter in routed:
            adapter.visual = None


class AdapterBiasAdapter(BlockAdapter):
    """``h + L_alpha(x) v``: ``shift`` is v, ``alpha`` is L_alpha."""

    def __init__(self, d_in: int, d_out: int, opts: dict[str, Any]) -> None:
        super().__init__(d_in, d_out)
        self.shift = nn.Parameter(torch.zeros(d_out, **opts))
        self.alpha = nn.Linear(d_in, 1, **opts)

    def adapt(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        self.check_features(x, self.in_features, "inputs")
        self.check_features(h, self.out_features, "outputs")
        weight = self.alpha(x.to(self.shift.dtype))  # (..., 1): one scalar per token
        return h + (weight * self.shift).to(h.dtype)


class PHMLinear(nn.Module):
    """A PHM layer ``y = x W^T + bias``, ``W = sum_i A_i (x) B_i`` (Zhang et al., 2021,
    "Beyond Fully-Connected Layers with Quaternions"; Compacter), with the rule A given at
    call time because it is shared. ``rank=None``: full B_i (PHM-Adapter); else
    ``B_i = s_i t_i^T`` of rank r (Compacter's low-rank parameterisation)."""

    def __init__(
        self, d_in: int, d_out: int, n: int, rank: int | None, opts: dict[str, Any]
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.n, self.rank = d_in, d_out, n, rank
        rows, cols = d_out // n, d_in // n
        if rank is None:
            self.B = nn.Parameter(torch.empty(n, rows, cols, **opts))
        else:
            self.s = nn.Parameter(torch.empty(n, rows, rank, **opts))
            self.t = nn.Parameter(torch.empty(n, cols, rank, **opts))
        self.bias = nn.Parameter(torch.zeros(d_out, **opts))

    def factors(self) -> list[nn.Parameter]:
        return [self.B] if self.rank is None else [self.s, self.t]

    def reset_parameters(self, *, zero: bool) -> None:
        """Glorot-uniform per summand (the authors' init); ``zero`` zeroes the factor that
        makes W vanish (B_i, or s_i) so the layer starts at W = 0."""
        with torch.no_grad():
            for factor in self.factors():
                for i in range(self.n):
                    nn.init.xavier_uniform_(factor[i])
            if zero:
                nn.init.zeros_(self.factors()[0])
            nn.init.zeros_(self.bias)

    def block_factors(self) -> torch.Tensor:
        """B_i, stacked (n, d_out/n, d_in/n)."""
        if self.rank is None:
            return self.B
        return torch.einsum("icr,idr->icd", self.s, self.t)

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """sum_i kron(A_i, B_i): entry (a p + c, b q + d) = sum_i A_i[a, b] B_i[c, d]."""
        kron = torch.einsum("iab,icd->acbd", rule.to(self.bias.dtype), self.block_factors())
        return kron.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(rule), self.bias)


class CompacterAdapter(BottleneckAdapter):
    """A bottleneck adapter with PHM projections sharing one rule A per adapter.

    The first layer built in an injection owns the rule as its parameter ``phm_rule``; the
    others read it through the owner, so ``model.parameters()`` (and the optimizer, and
    parameter counts) hold it once and a device move of the owner carries every layer.
    Every layer still writes ``phm_rule`` into its state dict (a copy for non-owners:
    safetensors refuses tensors that share memory) and accepts it when loading, so a
    checkpoint restores the rule from any layer's entry, whatever the build order.
    """

    def __init__(
        self,
        cfg: Compacter,
        d_in: int,
        d_out: int,
        width: int,
        opts: dict[str, Any],
        *,
        rule_owner: CompacterAdapter | None,
    ) -> None:
        super().__init__(cfg, d_in, d_out, width, opts)
        n = cfg.n
        if rule_owner is None:
            self.phm_rule = nn.Parameter(torch.empty(n, n, n, **opts))
            with torch.no_grad():
                nn.init.normal_(self.phm_rule, std=PHM_RULE_INIT_STD)
            self._rule_home: tuple[CompacterAdapter, ...] = ()
        else:
            self._rule_home = (rule_owner,)  # a tuple, so the owner is not a submodule here

    def projection(self, d_in: int, d_out: int, opts: dict[str, Any]) -> nn.Module:
        return PHMLinear(d_in, d_out, self.config.n, self.config.rank, opts)

    def reset_parameters(self) -> None:
        self.down.reset_parameters(zero=False)
        self.up.reset_parameters(zero=self.config.init == "zero_up")

    @property
    def owns_rule(self) -> bool:
        return "phm_rule" in self._parameters

    @property
    def rule(self) -> nn.Parameter:
        """The shared A, shape (n, n, n)."""
        return self.phm_rule if self.owns_rule else self._rule_home[0].phm_rule

    def bottleneck_path(self, z: torch.Tensor) -> torch.Tensor:
        rule = self.rule.to(z.device)
        return self.up(self.act(self.down(z, rule)), rule)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self.owns_rule:
            rule = self.rule
            destination[prefix + "phm_rule"] = rule if keep_vars else rule.detach().clone()

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        key = prefix + "phm_rule"
        if not self.owns_rule and key in state_dict:
            value = state_dict.pop(key)
            if value.shape != self.rule.shape:
                error_msgs.append(
                    f"size mismatch for {key}: checkpoint {tuple(value.shape)}, "
                    f"model {tuple(self.rule.shape)}"
                )
            else:
                with torch.no_grad():
                    self.rule.copy_(value)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


__all__ = [
    "PLACEMENTS",
    "SITES",
    "AdapterBias",
    "AdapterBiasAdapter",
    "BlockConfig",
    "Bottleneck",
    "BottleneckAdapter",
    "Compacter",
    "CompacterAdapter",
    "PHMLinear",
    "block_sizes",
    "placement_targets",
    "route_bottleneck",
    "routing_features",
]
