"""Mixtures of adapters: several small experts per layer and a router that mixes them per token.

Activation-space methods (the mixing weights depend on the token), so none of them merges
into the base weights; each registers with ``mergeable=False``. Every router here is a
bias-free linear map to one logit per expert, computed in float32 and initialised
N(0, 0.02^2) (the authors' MoV / MoLoRA router init, used for every router here):

    p(v) = softmax(W_g v),   W_g in R^{n x d_v}

* MoV / MoLoRA (Zadouri et al., 2023, "Pushing Mixture of Experts to the Limit: Extremely
  Parameter Efficient MoE for Instruction Tuning", Sec. 2.2): soft merging of n experts,
  ``E_mix = sum_i p_i(v) E_i``. MoV mixes (IA)^3 vectors, ``h = E_mix * v``, with the router
  reading the activation v it scales (as the authors' code does). MoLoRA mixes LoRA
  experts, ``h = W0 x + (alpha / r) sum_i p_i(x) B_i A_i x``.
* PESC (Wu et al., 2024, "Parameter-Efficient Sparsity Crafting from Dense to
  Mixture-of-Experts for Instruction Tuning on General Tasks", Sec. 3): a dense FFN F is
  upcycled into an MoE layer whose experts share F and differ by an adapter A_i,
  ``E_i(x) = A_i(F(x)) = F(x) + s W_up,i sigma(W_down,i F(x))``, top-k routed on the
  block input, ``y = sum_{i in topk} w_i(x) E_i(x)`` with w the softmax over the top-k
  logits, plus the load-balancing loss (below).
* PERFT (Liu et al., 2024, "PERFT: Parameter-Efficient Routed Fine-Tuning for
  Mixture-of-Expert Model", Sec. 3): PEFT experts ``E_i(x) = W_up,i sigma(W_down,i x)``
  (sigma = identity: LoRA form, the paper's main setting) beside a frozen MoE block,
  ``y = MoE(x) + sum_i g_i(x) E_i(x)`` with g from a new router (PERFT-R), the block's
  own frozen router, one PEFT expert per MoE expert (PERFT-E), all ones (PERFT-D), or one
  expert (PERFT-S).
* MPOE (Gao et al., 2022, "Parameter-Efficient Mixture-of-Experts Architecture for
  Pre-trained Language Models"): a weight matrix is written as a matrix product operator
  (MPO), ``W = T_1 T_2 ... T_m`` (local tensors T_k in R^{d_{k-1} x i_k x j_k x d_k}); the
  experts share the central tensor (most of the parameters) and each has its own
  auxiliary tensors; Switch-style top-1 routing.

Load-balancing loss (Switch Transformer, Fedus et al., 2022, eqs. 4-6; top-k counting as
transformers' Mixtral), for routers that pick experts (PESC, PERFT-R, MPOE):

    L_aux = alpha * n * sum_i f_i P_i,
    f_i = fraction of (token, top-k slot) pairs sent to expert i,  P_i = mean_t p_i(t)

``Adapter.aux_loss()`` returns it for the last training forward (``core.aux_loss`` sums
the adapters'), ``Adapter.expert_load()`` the mean routing weight per expert over the last
forward, and ``expert_loads(model)`` collects them for a logger.

This family extends LoRA, (IA)^3 and bottleneck adapters by design and imports their
layer helpers (``core.methods.lora``, ``core.methods.scaling``, ``core.methods.bottleneck``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, _check_name_list, check_choice, check_float, check_int
from ..errors import ConfigError
from ..layers import Adapter, is_fan_in_fan_out, weight_dtype
from ..registry import register
from ..targeting import adapted_modules, name_matches
from .bottleneck import ACTIVATIONS, block_problem, block_sizes
from .bottleneck import adapter_options as block_options
from .lora import linear_weight
from .scaling import in_features

ROUTER_INIT_STD = 0.02  # the MoV / MoLoRA authors' router init (normal, std 0.02)


# --- routing ----------------------------------------------------------------------------


@dataclass
class Routing:
    """One router call over tokens ``(..., n)``.

    Args:
        probs: softmax over all n experts (float32).
        gates: the weights applied to each expert's output; zero outside the top-k.
        chosen: 1 where an expert is in a token's top-k (None for soft routing).
    """

    probs: torch.Tensor
    gates: torch.Tensor
    chosen: torch.Tensor | None


def route(logits: torch.Tensor, top_k: int | None, *, renormalize: bool) -> Routing:
    """Softmax routing, soft (``top_k=None``) or over the top-k experts.

    ``renormalize`` rescales the kept probabilities to sum to one (the softmax over the
    top-k logits, as PESC and Mixtral); without it the kept probabilities are used as
    they are (Switch top-1)."""
    probs = logits.float().softmax(dim=-1)
    if top_k is None or top_k >= probs.shape[-1]:
        return Routing(probs, probs, None if top_k is None else torch.ones_like(probs))
    values, index = probs.topk(top_k, dim=-1)
    if renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, index, values)
    chosen = torch.zeros_like(probs).scatter(-1, index, 1.0)
    return Routing(probs, gates, chosen)


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's load-balancing loss without its coefficient:
    ``n * sum_i f_i P_i`` (1 * top_k when perfectly balanced)."""
    n = probs.shape[-1]
    f = chosen.reshape(-1, n).mean(dim=0)
    p = probs.reshape(-1, n).mean(dim=0)
    return n * (f * p).sum()


class Router(nn.Module):
    """``p = softmax(W_g v)``: one bias-free logit per expert, float32 arithmetic."""

    def __init__(
        self,
        d: int,
        n: int,
        *,
        top_k: int | None,
        renormalize: bool,
        opts: dict[str, Any],
    ) -> None:
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.weight = nn.Parameter(torch.empty(n, d, **opts))
        with torch.no_grad():
            nn.init.normal_(self.weight, std=ROUTER_INIT_STD)

    def forward(self, v: torch.Tensor) -> Routing:
        logits = F.linear(v.float(), self.weight.float())
        return route(logits, self.top_k, renormalize=self.renormalize)


class MixtureAdapter(Adapter):
    """Bookkeeping every mixture shares: the last forward's expert load and aux loss."""

    balance_coef: float = 0.0
    batch_separable = True  # routing is per token: a sample's output depends on it alone

    def __init__(self) -> None:
        super().__init__()
        self._load: torch.Tensor | None = None
        self._aux: torch.Tensor | None = None

    def record(self, routing: Routing) -> torch.Tensor:
        """Keep the load (and, in training, the balance loss) of ``routing``; return gates."""
        n = routing.gates.shape[-1]
        self._load = routing.gates.detach().reshape(-1, n).mean(dim=0)
        self._aux = None
        if self.training and self.balance_coef > 0 and routing.chosen is not None:
            self._aux = self.balance_coef * balance_loss(routing.probs, routing.chosen)
        return routing.gates

    def expert_load(self) -> torch.Tensor | None:
        """Mean routing weight per expert over the tokens of the last forward."""
        return self._load

    def aux_loss(self) -> torch.Tensor | None:
        return self._aux


def expert_loads(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<adapter name>/<module name>": load per expert}`` for every running mixture
    adapter that has seen a forward; what a logger reports as expert load."""
    loads: dict[str, torch.Tensor] = {}
    for path, wrapper in adapted_modules(model):
        for name in wrapper.active:
            adapter = wrapper.adapters[name]
            load = adapter.expert_load() if isinstance(adapter, MixtureAdapter) else None
            if load is not None:
                loads[f"{name}/{path}"] = load
    return loads


def map_first(y: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to a block's output tensor, or to the first item of a tuple output
    (e.g. older transformers MoE blocks return (hidden_states, router_logits))."""
    if isinstance(y, torch.Tensor):
        return fn(y)
    if isinstance(y, tuple | list) and y and isinstance(y[0], torch.Tensor):
        out = [fn(y[0]), *y[1:]]
        return out if isinstance(y, list) else tuple(out)
    raise TypeError(
        f"the adapted block returned {type(y).__name__}; mixture adapters act on a tensor "
        "output or the first tensor of a tuple. Target a block that returns hidden states."
    )


def token_linear_reason(module: nn.Module, method: str) -> str | None:
    if isinstance(module, nn.Linear) or is_fan_in_fan_out(module):
        return None
    return (
        f"{method} routes tokens whose features lie on the last dimension: it wraps nn.Linear "
        "and transformers Conv1D layers"
    )


# --- shared config fields ----------------------------------------------------------------


def check_bool(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, bool):
        raise ConfigError(f"{type(cfg).__name__}.{name} must be True or False, got {value!r}.")


def check_top_k(cfg: object, experts: int | None) -> None:
    """``top_k`` is None (soft routing) or an int in [1, experts]."""
    if cfg.top_k is None:
        return
    check_int(cfg, "top_k")
    if experts is not None and cfg.top_k > experts:
        raise ConfigError(
            f"{type(cfg).__name__}.top_k={cfg.top_k} exceeds num_experts={experts}; a token "
            "cannot pick more experts than exist. Lower top_k or add experts."
        )


# =========================================================================================
# MoV
# =========================================================================================


@register("mov", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class MoV(AdapterConfig):
    """MoV, mixture of (IA)^3 vectors (Zadouri et al., 2023, Sec. 2.2).

    Each targeted layer gets n vectors E_i (initialised to ones, as (IA)^3, so the model
    starts unchanged whatever the router says) and a router reading the activation v that
    is scaled: ``h = (sum_i softmax(W_g v)_i E_i) * v``. Like ``core.IA3``, layers named by
    ``feedforward_modules`` scale their input (the paper's l_ff before the FFN's second
    projection; v = x), all others their output (l_k, l_v; v = W x). Trainable per layer:
    ``n d + d_r n`` with d the scaled features and d_r the router's input (d, or
    ``head_dim``). Not mergeable: the scale depends on the token.

    On a LLaMA-shaped model with targets [k_proj, v_proj, down_proj] and
    feedforward_modules [down_proj]: ``L * 2 n (2 d_kv + d_ff)`` parameters.

    Args:
        num_experts: n (the paper's MoV-10 default; it studies 5 to 60).
        feedforward_modules: the targets scaled on the input side (same syntax as targets).
        head_dim: route each attention head of an output-side layer on its own with one
            router shared by the heads, experts per head (the authors' MoV for keys and
            values, ``MoVAttention``); None routes the whole output vector.
        top_k: None for the paper's soft merging; k keeps the k largest probabilities,
            renormalised to sum to one (the authors' top-k ablation does not renormalise,
            which would start the model below its frozen output).
    """

    num_experts: int = 10
    feedforward_modules: tuple[str, ...] | str | None = None
    head_dim: int | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_experts")
        _check_name_list(self, "feedforward_modules", allow_none=True)
        if self.head_dim is not None:
            check_int(self, "head_dim")
        check_top_k(self, self.num_experts)

    def is_feedforward(self, path: str) -> bool:
        return self.feedforward_modules is not None and name_matches(path, self.feedforward_modules)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if reason := token_linear_reason(module, "MoV"):
            return reason
        return None

    def head_size(self, size: int, input_side: bool) -> int:
        return self.head_dim if self.head_dim is not None and not input_side else size

    def build(self, module: nn.Module, path: str) -> MoVAdapter:
        input_side = self.is_feedforward(path)
        size = in_features(module) if input_side else linear_weight(module).shape[0]
        head = self.head_size(size, input_side)
        if size % head:
            raise ConfigError(
                f"MoV.head_dim={head} does not divide the {size} output features of {path}; "
                "pass the attention head size, or head_dim=None."
            )
        return MoVAdapter(self, module, size=size, head=head, input_side=input_side)


class MoVAdapter(MixtureAdapter):
    """``v * sum_i p_i(v) E_i`` on a layer's output (or input, ``input_side``)."""

    def __init__(
        self, cfg: MoV, base: nn.Module, *, size: int, head: int, input_side: bool
    ) -> None:
        super().__init__()
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self.input_side, self.head = input_side, head
        heads = size // head
        self.experts = nn.Parameter(torch.ones(heads, cfg.num_experts, head, **opts))
        self.router = Router(head, cfg.num_experts, top_k=cfg.top_k, renormalize=True, opts=opts)

    def gates(self, v: torch.Tensor) -> torch.Tensor:
        """Routing weights ``(..., heads, n)`` for activations ``v`` (recorded as the load)."""
        per_head = v.reshape(*v.shape[:-1], -1, self.head)
        return self.record(self.router(per_head))

    def mixed_scale(self, v: torch.Tensor) -> torch.Tensor:
        """sum_i p_i E_i, computed as 1 + sum_i p_i (E_i - 1): equal when the p_i sum to
        one, and exactly 1 while the experts are at their init (float sums of p_i are not)."""
        offsets = self.experts.float() - 1
        scale = 1 + torch.einsum("...hn,hnd->...hd", self.gates(v), offsets)
        return scale.reshape(v.shape)

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_side:
            return x
        return x * self.mixed_scale(x).to(x.dtype)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.input_side:
            return y
        return y * self.mixed_scale(y).to(y.dtype)


# =========================================================================================
# MoLoRA
# =========================================================================================


@register("molora", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class MoLoRA(AdapterConfig):
    """MoLoRA, mixture of LoRA experts (Zadouri et al., 2023, Sec. 2.2).

    ``h = W0 x + (alpha / r) sum_i p_i(x) B_i A_i x`` with ``p = softmax(W_g x)`` read from
    the layer input. A_i ~ N(0, init_std^2) and B_i = 0 (the authors' init), so the model
    starts unchanged. Trainable per layer: ``n r (d_in + d_out) + d_in n``. Not mergeable.

    Args (defaults: the authors' MoLoRA config, 10 experts of rank 4, alpha 16):
        num_experts: n.
        r: rank of each expert.
        alpha: scale numerator, the update is multiplied by alpha / r.
        dropout: dropout on the experts' input (not on the router's).
        init_std: standard deviation of the A_i init.
        top_k: None for soft merging; k keeps the k largest probabilities, renormalised.
    """

    num_experts: int = 10
    r: int = 4
    alpha: float = 16.0
    dropout: float = 0.0
    init_std: float = 0.02
    top_k: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_experts")
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        check_float(self, "init_std", low=0.0, low_open=True)
        check_top_k(self, self.num_experts)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return token_linear_reason(module, "MoLoRA")

    def build(self, module: nn.Module, path: str) -> MoLoRAAdapter:
        return MoLoRAAdapter(self, module)


class MoLoRAAdapter(MixtureAdapter):
    """``y + s sum_i p_i(x) B_i A_i x``. The experts are stacked, A (n r, d_in) and
    B (d_out, n r), expert i owning rows / columns i r ... (i + 1) r - 1, so the forward is
    two GEMMs whatever n is."""

    def __init__(self, cfg: MoLoRA, base: nn.Module) -> None:
        super().__init__()
        out_f, in_f = linear_weight(base).shape
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        n, self.r = cfg.num_experts, cfg.r
        self.scale = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.empty(n * cfg.r, in_f, **opts))
        self.B = nn.Parameter(torch.zeros(out_f, n * cfg.r, **opts))
        with torch.no_grad():
            nn.init.normal_(self.A, std=cfg.init_std)
        self.router = Router(in_f, n, top_k=cfg.top_k, renormalize=True, opts=opts)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return self.record(self.router(x))

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        gates = self.gates(x).to(self.A.dtype).repeat_interleave(self.r, dim=-1)
        xa = F.linear(self.dropout(x.to(self.A.dtype)), self.A) * gates
        return torch.add(y, F.linear(xa, self.B).to(y.dtype), alpha=self.scale)


# =========================================================================================
# PESC
# =========================================================================================


@register("pesc", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class PESC(AdapterConfig):
    """PESC, Parameter-Efficient Sparsity Crafting (Wu et al., 2024, Sec. 3).

    Wraps a dense FFN block F (LLaMA ``mlp``, timm ``mlp``) and turns it into an MoE layer
    whose n experts share F and differ by adapters:

        E_i(x) = F(x) + s W_up,i sigma(W_down,i dropout(F(x)))
        y      = sum_{i in topk(x)} w_i(x) E_i(x) = F(x) + sum_i w_i(x) (E_i(x) - F(x))

    with w the softmax over the router's top-k logits (read from the block input x), so F
    runs once. The training loss gains ``balance_coef * n sum_i f_i P_i`` (module doc).
    W_up starts at zero so the model starts unchanged (the authors' code keeps PyTorch's
    default init for both projections, which starts near the identity). Trainable per
    block: ``2 n m d_out + d_in n`` (no biases, as the authors).

    All experts' adapters run as two stacked GEMMs with the unrouted ones weighted zero:
    exact, and cheap while n m is small next to the FFN width.

    Args (defaults: the authors' Camelidae config, except top_k, which the paper sets to 2):
        num_experts: n.
        top_k: experts per token.
        bottleneck: m, the adapter width.
        scale: s.
        activation: sigma (GELU in the authors' code).
        dropout: on the adapters' input.
        balance_coef: alpha of the load-balancing loss (Switch Transformer's 0.01).
        hidden_size: override the inferred block sizes (see ``core.methods.bottleneck``).
    """

    num_experts: int = 8
    top_k: int = 2
    bottleneck: int = 64
    scale: float = 0.25
    activation: str = "gelu"
    dropout: float = 0.1
    balance_coef: float = 0.01
    hidden_size: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_experts")
        check_int(self, "top_k")
        check_top_k(self, self.num_experts)
        check_int(self, "bottleneck")
        check_float(self, "scale", low=0.0, low_open=True)
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        check_float(self, "balance_coef", low=0.0)
        if self.hidden_size is not None:
            check_int(self, "hidden_size")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return block_problem(module, self.hidden_size)

    def build(self, module: nn.Module, path: str) -> PESCAdapter:
        d_in, d_out = block_sizes(module, self.hidden_size)
        return PESCAdapter(self, d_in, d_out, block_options(module))


class PESCAdapter(MixtureAdapter):
    """``h + s sum_i w_i(x) up_i(sigma(down_i(h)))`` on the output h = F(x) of a block."""

    def __init__(self, cfg: PESC, d_in: int, d_out: int, opts: dict[str, Any]) -> None:
        super().__init__()
        n, self.m = cfg.num_experts, cfg.bottleneck
        self.scale, self.balance_coef = cfg.scale, cfg.balance_coef
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.down = nn.Parameter(torch.empty(n * self.m, d_out, **opts))
        self.up = nn.Parameter(torch.zeros(d_out, n * self.m, **opts))
        with torch.no_grad():  # PyTorch's Linear init, one expert at a time
            for block in self.down.view(n, self.m, d_out):
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.router = Router(d_in, n, top_k=cfg.top_k, renormalize=True, opts=opts)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return self.record(self.router(x))

    def post(self, x: torch.Tensor, y: Any, base: nn.Module) -> Any:
        return map_first(y, lambda h: self.adapt(x, h))

    def adapt(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        dtype = self.down.dtype
        gates = self.gates(x).to(dtype).repeat_interleave(self.m, dim=-1)
        z = self.act(F.linear(self.dropout(h.to(dtype)), self.down)) * gates
        return torch.add(h, F.linear(z, self.up).to(h.dtype), alpha=self.scale)


# =========================================================================================
# PERFT
# =========================================================================================

PERFT_VARIANTS = ("routed", "embedded", "dense", "single")
PERFT_DEFAULT_EXPERTS = {"routed": 4, "dense": 2, "single": 1}


def moe_router(block: nn.Module) -> nn.Module | None:
    """The router of a transformers sparse MoE block (Mixtral, Qwen2-MoE, OLMoE, ...): a
    ``gate`` child whose weight is (num_experts, hidden_size), else None."""
    gate = getattr(block, "gate", None)
    weight = getattr(gate, "weight", None)
    if isinstance(gate, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return gate
    return None


@register("perft", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class PERFT(AdapterConfig):
    """PERFT, PEFT experts beside a frozen MoE block (Liu et al., 2024, Sec. 3).

    Targets a transformers sparse MoE block (``mlp`` of Mixtral, Qwen2-MoE, OLMoE: a block
    with a ``gate`` router) and adds, in parallel to it,

        y = MoE(x) + s sum_i g_i(x) W_up,i sigma(W_down,i x)

    * "routed" (PERFT-R): g = top-k of a new router's softmax (renormalised by default),
      with the load-balancing loss; ``2 N m d + d N`` parameters per block.
    * "embedded" (PERFT-E): one PEFT expert per MoE expert, g = the block's own (frozen)
      routing weights, captured from its router as it runs; ``2 N_moe m d``.
    * "dense" (PERFT-D): N experts, all with g = 1; ``2 N m d``.
    * "single" (PERFT-S): one expert, g = 1; ``2 m d``.

    W_down starts Kaiming-uniform and W_up at zero, so the model starts unchanged.

    Args:
        variant: one of the four above.
        num_experts: N for "routed" (default 4) and "dense" (default 2); "single" has 1 and
            "embedded" the MoE's own count (leave None for those two).
        top_k: experts per token for "routed".
        bottleneck: m (the paper's D_B).
        scale: s.
        activation: sigma; "identity" is the paper's LoRA-form expert.
        renormalize: "routed" rescales the top-k weights to sum to one.
        balance_coef: alpha of the load-balancing loss of the "routed" router.
    """

    variant: str = "routed"
    num_experts: int | None = None
    top_k: int = 2
    bottleneck: int = 8
    scale: float = 1.0
    activation: str = "identity"
    renormalize: bool = True
    balance_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self, "variant", PERFT_VARIANTS)
        if self.num_experts is not None:
            check_int(self, "num_experts")
        fixed = {"single": (None, 1), "embedded": (None,)}
        if self.num_experts not in fixed.get(self.variant, (self.num_experts,)):
            source = "is one expert" if self.variant == "single" else "has one per MoE expert"
            raise ConfigError(
                f"PERFT variant {self.variant!r} {source}, got num_experts={self.num_experts}; "
                "leave num_experts=None."
            )
        check_int(self, "top_k")
        if self.variant == "routed":
            check_top_k(self, self.experts())
        check_int(self, "bottleneck")
        check_float(self, "scale", low=0.0, low_open=True)
        check_choice(self, "activation", tuple(ACTIVATIONS))
        check_bool(self, "renormalize")
        check_float(self, "balance_coef", low=0.0)

    def experts(self, block: nn.Module | None = None) -> int:
        """N: the MoE block's expert count for "embedded", else the configured one."""
        if self.variant == "embedded":
            return moe_router(block).weight.shape[0]
        if self.num_experts is not None:
            return self.num_experts
        return PERFT_DEFAULT_EXPERTS[self.variant]

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if moe_router(module) is None:
            return (
                "PERFT adds experts beside a sparse MoE block: target a block with a `gate` "
                "router whose weight is (num_experts, hidden_size), e.g. the `mlp` of "
                "transformers' Mixtral / Qwen2-MoE / OLMoE decoder layers"
            )
        return None

    def build(self, module: nn.Module, path: str) -> PERFTAdapter:
        gate = moe_router(module)
        hidden = gate.weight.shape[1]
        opts = block_options(module)
        return PERFTAdapter(self, hidden, self.experts(module), opts)


class PERFTAdapter(MixtureAdapter):
    """``y + s sum_i g_i(x) up_i(sigma(down_i(x)))`` beside a frozen MoE block."""

    def __init__(self, cfg: PERFT, hidden: int, n: int, opts: dict[str, Any]) -> None:
        super().__init__()
        self.variant, self.m, self.scale = cfg.variant, cfg.bottleneck, cfg.scale
        self.balance_coef = cfg.balance_coef if cfg.variant == "routed" else 0.0
        self.act = ACTIVATIONS[cfg.activation]
        self.down = nn.Parameter(torch.empty(n * self.m, hidden, **opts))
        self.up = nn.Parameter(torch.zeros(hidden, n * self.m, **opts))
        with torch.no_grad():
            for block in self.down.view(n, self.m, hidden):
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        if cfg.variant == "routed":
            self.router = Router(hidden, n, top_k=cfg.top_k, renormalize=cfg.renormalize, opts=opts)
        self._captured: Any = None
        self._hook: Any = None

    # PERFT-E reads the block's own routing as its router runs inside the block's forward
    # (calling the router a second time would also be recorded twice by transformers'
    # router-logit capture, doubling the model's own aux loss).

    def on_attach(self, base: nn.Module) -> None:
        if self.variant == "embedded":
            self._hook = moe_router(base).register_forward_hook(self._capture)

    def on_detach(self, base: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        self._captured = (module, output)

    def embedded_gates(self, base: nn.Module, tokens: int) -> torch.Tensor:
        """The MoE block's own routing weights (tokens, N), zero outside its top-k."""
        if self._captured is None:
            raise RuntimeError(
                f"PERFT-E at {getattr(self, 'path', '?')}: the MoE block's router did not run "
                "during this forward, so there are no routing weights to reuse."
            )
        gate, output = self._captured
        self._captured = None
        n = gate.weight.shape[0]
        if isinstance(output, tuple) and len(output) == 3:  # (logits, top-k weights, indices)
            _, scores, index = output
            gates = torch.zeros(index.shape[0], n, device=scores.device, dtype=torch.float32)
            gates = gates.scatter(-1, index, scores.float())
        else:  # a router that returns logits only: softmax top-k as its block does
            top_k = getattr(base, "top_k", None) or getattr(gate, "top_k", 1)
            renorm = getattr(base, "norm_topk_prob", getattr(gate, "norm_topk_prob", True))
            gates = route(output, top_k, renormalize=bool(renorm)).gates
        gates = gates.reshape(-1, n)
        if gates.shape[0] != tokens:
            raise RuntimeError(
                f"PERFT-E at {getattr(self, 'path', '?')}: the router saw {gates.shape[0]} "
                f"tokens, the block {tokens}."
            )
        return gates.detach()

    def gates(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        """(tokens, N) expert weights, or None when every expert counts fully."""
        flat = x.reshape(-1, x.shape[-1])
        if self.variant == "routed":
            return self.record(self.router(flat))
        if self.variant == "embedded":
            gates = self.embedded_gates(base, flat.shape[0])
            self._load = gates.mean(dim=0)
            return gates
        return None

    def post(self, x: torch.Tensor, y: Any, base: nn.Module) -> Any:
        return map_first(y, lambda h: self.adapt(x, h, base))

    def adapt(self, x: torch.Tensor, h: torch.Tensor, base: nn.Module) -> torch.Tensor:
        dtype = self.down.dtype
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        z = self.act(F.linear(flat, self.down))
        gates = self.gates(x, base)
        if gates is not None:
            z = z * gates.to(dtype).repeat_interleave(self.m, dim=-1)
        update = F.linear(z, self.up).reshape(h.shape)
        return torch.add(h, update.to(h.dtype), alpha=self.scale)


# =========================================================================================
# MPOE
# =========================================================================================


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def mpo_factors(size: int, num_tensors: int) -> tuple[int, ...]:
    """Split ``size`` into ``num_tensors`` factors with the central one the largest: each
    side position takes one of the smallest prime factors (outermost first), the rest
    multiply into the centre (768 -> (2, 2, 48, 2, 2)); 1 where primes run out."""
    primes = prime_factors(size)
    centre = num_tensors // 2
    sides = [i for i in range(num_tensors) if i != centre]
    # outermost positions first, alternating left / right
    order = sorted(sides, key=lambda i: min(i, num_tensors - 1 - i))
    factors = [1] * num_tensors
    for position in order:
        if len(primes) <= 1:
            break
        factors[position] = primes.pop(0)
    factors[centre] = math.prod(primes) if primes else 1
    return tuple(factors)


def mpo_bonds(
    out_factors: tuple[int, ...], in_factors: tuple[int, ...], bond_dim: int | None
) -> tuple[int, ...]:
    """Bond dimensions d_0 .. d_m of the MPO (d_0 = d_m = 1): lossless
    ``d_k = min(prod_{l<=k} i_l j_l, prod_{l>k} i_l j_l)``, capped at ``bond_dim``."""
    local = [i * j for i, j in zip(out_factors, in_factors, strict=True)]
    bonds = [1]
    for k in range(1, len(local)):
        lossless = min(math.prod(local[:k]), math.prod(local[k:]))
        bonds.append(lossless if bond_dim is None else min(lossless, bond_dim))
    bonds.append(1)
    return tuple(bonds)


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of u's column is positive:
    the decomposition is then the same wherever it is recomputed (trained auxiliary
    tensors are only meaningful against the same central tensor)."""
    rows = u.abs().argmax(dim=0)
    signs = torch.sign(u[rows, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def mpo_decompose(
    weight: torch.Tensor,
    out_factors: tuple[int, ...],
    in_factors: tuple[int, ...],
    bonds: tuple[int, ...],
) -> list[torch.Tensor]:
    """Local tensors T_k (d_{k-1}, i_k, j_k, d_k) with ``mpo_contract(T) ~ weight`` (exact
    for lossless bonds), in mixed-canonical form: SVD sweeps from both ends leave the
    auxiliary tensors orthonormal and the singular values in the central tensor."""
    m, centre = len(out_factors), len(out_factors) // 2
    t = weight.float().reshape(*out_factors, *in_factors)
    t = t.permute(*[p for k in range(m) for p in (k, m + k)])  # (i_1, j_1, i_2, j_2, ...)
    local = [i * j for i, j in zip(out_factors, in_factors, strict=True)]
    rest = t.reshape(-1)
    tensors: list[torch.Tensor | None] = [None] * m
    for k in range(centre):  # left sweep
        rows = bonds[k] * local[k]
        u, s, vh = torch.linalg.svd(rest.reshape(rows, -1), full_matrices=False)
        u, vh = canonical_signs(u[:, : bonds[k + 1]], vh[: bonds[k + 1]])
        tensors[k] = u.reshape(bonds[k], out_factors[k], in_factors[k], bonds[k + 1])
        rest = s[: bonds[k + 1], None] * vh
    rest = rest.reshape(bonds[centre], -1)
    for k in range(m - 1, centre, -1):  # right sweep
        cols = local[k] * bonds[k + 1]
        u, s, vh = torch.linalg.svd(rest.reshape(-1, cols), full_matrices=False)
        u, vh = canonical_signs(u[:, : bonds[k]], vh[: bonds[k]])
        tensors[k] = vh.reshape(bonds[k], out_factors[k], in_factors[k], bonds[k + 1])
        rest = u * s[None, : bonds[k]]
    tensors[centre] = rest.reshape(
        bonds[centre], out_factors[centre], in_factors[centre], bonds[centre + 1]
    )
    return tensors


def mpo_contract(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The matrix (..., I, J) of local tensors (..., d_{k-1}, i_k, j_k, d_k); a leading
    expert axis on some tensors broadcasts over all."""
    acc = tensors[0][..., 0, :, :, :]  # (..., i, j, d)
    for t in tensors[1:]:
        acc = torch.einsum("...abx,...xijy->...aibjy", acc, t)
        *lead, a, i, b, j, y = acc.shape
        acc = acc.reshape(*lead, a * i, b * j, y)
    return acc[..., 0]


def mpo_side_block(tensors: list[torch.Tensor], *, left: bool) -> torch.Tensor:
    """The auxiliary tensors on one side of the centre contracted into one, with the
    expert axis first: left (E, I, J, d_{c-1}) from T_1..T_{c-1}, right (E, d_c, I, J)
    from T_{c+1}..T_m (I, J: the merged row / column factors, outermost most significant).
    These are tiny (bond x local sizes), so einsum's copies cost nothing here."""
    if left:
        acc = tensors[0][:, 0]  # (E, i, j, d)
        for t in tensors[1:]:
            acc = torch.einsum("eabx,exijy->eaibjy", acc, t)
            e, a, i, b, j, y = acc.shape
            acc = acc.reshape(e, a * i, b * j, y)
        return acc
    acc = tensors[-1][..., 0]  # (E, d, i, j)
    for t in reversed(tensors[:-1]):
        acc = torch.einsum("exijy,eyab->exiajb", t, acc)
        e, x, i, a, j, b = acc.shape
        acc = acc.reshape(e, x, i * a, j * b)
    return acc


def mpo_expert_matrices(
    left: torch.Tensor,
    central: torch.Tensor,
    right: torch.Tensor,
    *,
    minus: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``mpo_contract`` of [left aux..., central, right aux...] for each expert, a list of
    (I, J) matrices, with a shared (expert-free) central tensor.

    Two GEMMs per expert instead of a chain of einsums over the full-size tensor: its
    left block times the central tensor (I_L J_L x d_{c-1}) @ (d_{c-1} x i_c j_c d_c),
    then that times its right block (... x d_c) @ (d_c x I_R J_R); both outputs are
    contiguous, and one copy puts the row and column factors in matrix order. Per expert,
    not batched: ``bmm`` with this skinny shape runs ~3x slower on CPU than a loop of
    ``mm``, and split / unbind outputs would cost a full-size stack in backward.
    ``minus`` (the same contraction of other tensors, in ``mpo_blocks`` layout) is
    subtracted inside the second GEMM (``addmm`` with beta = -1: no extra pass)."""
    sizes = (left.shape[1], left.shape[2], *central.shape[1:3], *right.shape[2:])
    return [
        blocks_to_matrix(mpo_blocks(left[e], central, right[e], minus=minus), sizes)
        for e in range(left.shape[0])
    ]


def blocks_to_matrix(blocks: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """``mpo_blocks`` layout (I_L, J_L, i_c, j_c, I_R, J_R) -> the (I_L i_c I_R, J_L j_c
    J_R) matrix, one copy (``BlockPermute``)."""
    il, jl, ic, jc, ir, jr = sizes
    matrix = BlockPermute.apply(blocks.reshape(sizes), (0, 2, 4, 1, 3, 5))
    return matrix.view(il * ic * ir, jl * jc * jr)


def mpo_blocks(
    left: torch.Tensor, central: torch.Tensor, right: torch.Tensor, *, minus=None
) -> torch.Tensor:
    """One expert's MPO in GEMM order, (I_L J_L i_c j_c, I_R J_R), minus ``minus``."""
    il, jl, a = left.shape
    b = central.shape[-1]
    mixed = left.reshape(il * jl, a) @ central.reshape(a, -1)
    side = right.reshape(b, -1)
    if minus is None:
        return mixed.view(-1, b) @ side
    return torch.addmm(minus, mixed.view(-1, b), side, beta=-1)


# Integer / complex types whose one element spans n bytes, to move n-byte runs as one.
WIDE_DTYPES = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64, 16: torch.complex128}


def permute_copy(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """``t.permute(dims).contiguous()``, bit for bit. When the last axis stays last, its
    rows are moved as single wide elements: a copy of 16-byte elements runs ~5x faster
    on CPU than one of 4-byte elements with short inner runs (the MPO layouts have 4)."""
    row = t.shape[-1] * t.element_size()
    wide = WIDE_DTYPES.get(row)
    aligned = t.is_contiguous() and (t.storage_offset() * t.element_size()) % row == 0
    if dims[-1] != t.dim() - 1 or wide is None or not aligned or t.is_complex():
        return t.permute(dims).contiguous()
    return t.view(wide).permute(dims).contiguous().view(t.dtype)


class BlockPermute(torch.autograd.Function):
    """``permute(dims).contiguous()`` with ``permute_copy`` both ways."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        ctx.inverse = tuple(sorted(range(len(dims)), key=dims.__getitem__))
        return permute_copy(t, dims)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return permute_copy(grad.contiguous(), ctx.inverse), None


@register("mpoe", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class MPOE(AdapterConfig):
    """MPOE, experts from an MPO decomposition (Gao et al., 2022).

    Each targeted linear weight W (d_out x d_in) is decomposed, lossless by default, as
    ``W = T_1 ... T_m`` with d_out = prod i_k, d_in = prod j_k (``mpo_factors``). The
    central tensor T_c is shared, frozen and recomputed from W on attach; every expert e
    has its own auxiliary tensors {T_k^e, k != c}, initialised to W's. With W_e their MPO
    and W_0 the MPO of the initial tensors (= W for lossless bonds):

        y = W x + b + sum_e g_e(x) (W_e - W_0) x,   g = top-1 of softmax(W_g x) (Switch)

    so the model starts exactly unchanged (W_e = W_0). Trainable per layer:
    ``E sum_{k != c} d_{k-1} i_k j_k d_k + d_in E``, plus the load-balancing loss.

    Deviations, on purpose: the update form ``W_0 x + g (W_e - W_0) x`` keeps the frozen
    output exact at start (Switch's ``g W_e x`` would scale it by g < 1), and the shared
    central tensor stays frozen (MPOE also lets it learn, under a gradient mask), so only
    the auxiliary tensors and the router train.

    Args:
        num_experts: E.
        num_tensors: m, the number of local tensors (odd, >= 3; 5 as in the paper).
        bond_dim: cap on the bond dimensions; None keeps the decomposition lossless.
        top_k: experts per token (1: Switch routing, probabilities not renormalised).
        balance_coef: alpha of the load-balancing loss.
    """

    num_experts: int = 4
    num_tensors: int = 5
    bond_dim: int | None = None
    top_k: int = 1
    balance_coef: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "num_experts")
        check_int(self, "num_tensors", minimum=3)
        if self.num_tensors % 2 == 0:
            raise ConfigError(
                f"MPOE.num_tensors must be odd so one central tensor sits between equal "
                f"numbers of auxiliary tensors, got {self.num_tensors}; use 3, 5 or 7."
            )
        if self.bond_dim is not None:
            check_int(self, "bond_dim")
        check_int(self, "top_k")
        check_top_k(self, self.num_experts)
        check_float(self, "balance_coef", low=0.0)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return token_linear_reason(module, "MPOE")

    def build(self, module: nn.Module, path: str) -> MPOEAdapter:
        return MPOEAdapter(self, module)


class MPOEAdapter(MixtureAdapter):
    """``y + sum_e g_e(x) (W_e - W_0) x``; see ``MPOE``.

    ``aux`` holds one parameter per auxiliary position, stacked over experts
    (E, d_{k-1}, i_k, j_k, d_k). The central tensor and W_0 are non-persistent buffers
    recomputed in ``on_attach`` (derived from the base weight; the decomposition is
    sign-canonical, so it comes out the same when a saved adapter is loaded again).
    """

    def __init__(self, cfg: MPOE, base: nn.Module) -> None:
        super().__init__()
        out_f, in_f = linear_weight(base).shape
        opts = {"device": base.weight.device, "dtype": weight_dtype(base)}
        self.balance_coef = cfg.balance_coef
        self.out_factors = mpo_factors(out_f, cfg.num_tensors)
        self.in_factors = mpo_factors(in_f, cfg.num_tensors)
        self.bonds = mpo_bonds(self.out_factors, self.in_factors, cfg.bond_dim)
        self.centre = cfg.num_tensors // 2
        shapes = [
            (self.bonds[k], self.out_factors[k], self.in_factors[k], self.bonds[k + 1])
            for k in range(cfg.num_tensors)
        ]
        self.aux = nn.ParameterList(
            nn.Parameter(torch.zeros(cfg.num_experts, *shape, **opts))
            for k, shape in enumerate(shapes)
            if k != self.centre
        )
        self.register_buffer("central", torch.zeros(shapes[self.centre], **opts), persistent=False)
        # W_0 in ``mpo_blocks`` layout, subtracted inside the experts' last GEMM
        self.register_buffer("initial_blocks", torch.zeros(out_f * in_f, **opts), persistent=False)
        self.router = Router(in_f, cfg.num_experts, top_k=cfg.top_k, renormalize=False, opts=opts)

    def on_attach(self, base: nn.Module) -> None:
        weight = linear_weight(base)
        if weight.is_meta:  # shapes only: counting on the meta device
            return
        with torch.no_grad():
            tensors = mpo_decompose(weight, self.out_factors, self.in_factors, self.bonds)
            dtype = self.central.dtype
            self.central = tensors[self.centre].to(dtype).contiguous()
            sides = [t for k, t in enumerate(tensors) if k != self.centre]
            for param, tensor in zip(self.aux, sides, strict=True):
                param.copy_(tensor.to(dtype).expand_as(param))
            # W_0 by the very sums ``deltas`` runs, so the update starts at exactly zero
            left, right = self.side_blocks([p[:1] for p in self.aux])
            self.initial_blocks = mpo_blocks(left[0], self.central, right[0])

    def tensors(self) -> list[torch.Tensor]:
        """The local tensors with an expert axis on the auxiliary ones."""
        sides = list(self.aux)
        return sides[: self.centre] + [self.central] + sides[self.centre :]

    @property
    def initial(self) -> torch.Tensor:
        """W_0 (d_out, d_in), the MPO of the initial tensors."""
        c = self.centre
        sizes = (
            math.prod(self.out_factors[:c]),
            math.prod(self.in_factors[:c]),
            self.out_factors[c],
            self.in_factors[c],
            math.prod(self.out_factors[c + 1 :]),
            math.prod(self.in_factors[c + 1 :]),
        )
        return blocks_to_matrix(self.initial_blocks, sizes)

    def deltas(self, experts: list[int] | None = None) -> list[torch.Tensor]:
        """W_e - W_0 (d_out, d_in) for the given experts (default all):
        ``mpo_contract(self.tensors())[e] - W_0`` computed by ``mpo_expert_matrices``."""
        sides = list(self.aux)
        if experts is not None:
            chosen = torch.tensor(experts, device=self.central.device)
            sides = [t.index_select(0, chosen) for t in sides]
        left, right = self.side_blocks(sides)
        initial = self.initial_blocks.view(-1, right.shape[-2] * right.shape[-1])
        return mpo_expert_matrices(left, self.central, right, minus=initial)

    def side_blocks(self, sides: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The contracted left and right blocks of auxiliary tensors ``sides``."""
        left = mpo_side_block(sides[: self.centre], left=True)
        return left, mpo_side_block(sides[self.centre :], left=False)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        return self.record(self.router(x))

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """Each expert multiplies only its own tokens (one GEMM per expert, only for the
        experts some token picked) and adds its rows into one copy of the output."""
        flat = x.reshape(-1, x.shape[-1]).to(self.central.dtype)
        gates = self.gates(flat)
        routes = expert_tokens(gates)
        out = y.reshape(-1, y.shape[-1]).clone()
        deltas = self.deltas([e for e, _ in routes])
        for (e, token), delta in zip(routes, deltas, strict=True):
            update = F.linear(flat.index_select(0, token), delta) * gates[token, e, None]
            out.index_add_(0, token, update.to(out.dtype))
        return out.view_as(y)


def expert_tokens(gates: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(expert, indices of its tokens) for every expert with a nonzero gate on some token."""
    token, expert = gates.nonzero(as_tuple=True)
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=gates.shape[-1]).tolist()
    groups = token[order].split(counts)
    return [(e, group) for e, group in enumerate(groups) if group.numel()]


__all__ = [
    "MPOE",
    "PERFT",
    "PESC",
    "MPOEAdapter",
    "MoLoRA",
    "MoLoRAAdapter",
    "MoV",
    "MoVAdapter",
    "PERFTAdapter",
    "PESCAdapter",
    "Router",
    "balance_loss",
    "expert_loads",
    "mpo_contract",
    "mpo_decompose",
    "route",
]
