"""Sparse parameter selection: a few chosen entries of the frozen weights train.

Every method here updates a frozen module's parameters by a *sparse* delta, stored as
(indices, values) per tensor: a persistent int64 buffer of flat positions in the tensor's
own storage and a parameter of the same length, ``W' = W + scatter(indices, values)``. The
forward builds W' with one ``index_add`` and runs the module's own forward on it (one
GEMM, not the base plus a second product); on a linear layer its backward forms only the
selected entries of the weight gradient (``SparseDeltaLinear``) where that is cheaper than
the dense ``g^T x``; merging adds the values at their positions,
and unmerging writes the saved original entries back, so it is bitwise exact. A dense
delta is never stored. The trainable count is the number of selected entries.

* Diff pruning (Guo, Rush and Kim, 2021, "Parameter-Efficient Transfer Learning with Diff
  Pruning"): ``theta = theta_0 + delta``, ``delta = z * w`` with a hard-concrete gate z
  (Louizos et al., 2018) per entry,

      u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + alpha) / beta),
      z = min(1, max(0, s (r - l) + l)),

  trained with the expected-L0 penalty ``lambda sum_i sigmoid(alpha_i - beta log(-l/r))``
  (``Adapter.aux_loss``). The structured variant shares a second gate z_g per tensor
  (group), ``z_i z_g``, with penalty ``sum_g sum_{i in g} P(z_i != 0) P(z_g != 0)``. Then
  ``prune(model)`` keeps the top ``density`` fraction of |delta| over all adapted entries
  (magnitude pruning to the target sparsity) and turns the adapter into a fixed-mask
  sparse delta, which trains on.
* GPS (Zhang et al., 2024, "Gradient-based Parameter Selection for Efficient Fine-Tuning"):
  before training, for every neuron (row of a weight: output feature, or output channel
  of a convolution) pick the k input connections with the largest magnitude of the loss
  gradient accumulated over the task data, ``|sum_b dL_b/dW|``; only those entries train.
* SPT (He et al., 2023, "Sensitivity-Aware Visual Parameter-Efficient Fine-Tuning"): the
  sensitivity of an entry is the first-order Taylor estimate of the loss drop when it
  alone takes a gradient step, ``s = g^2`` (accumulated over batches, ``sum_b g_b^2``).
  The top-tau entries over all targeted weights are chosen for a budget tau; a matrix
  holding at least ``structured_threshold`` of them is tuned by a rank-r LoRA
  (``core.methods.lora``, which this family extends by design), the others by the
  unstructured sparse delta on exactly their chosen entries.

Workflow::

    core.inject(model, GPS(targets=[...]))        # or SPT(...)
    select(model, batches)                        # gradients on task data choose entries
    ... train (build the optimizer after select) ...

    core.inject(model, DiffPruning(targets=[...]))
    ... train with loss + core.aux_loss(model) ...
    prune(model)                                  # magnitude-prune to the target density
    ... train on (a new optimizer: the adapter's parameters changed) ...

``select`` and ``prune`` record what they chose in the adapter's config (``counts`` /
``ranks`` / ``kept``), so a saved adapter rebuilds with the same shapes when loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..config import AdapterConfig, check_float, check_int
from ..errors import ConfigError, MergeError
from ..kernels.dispatch import hand_written_step_fits
from ..layers import Adapter, is_fan_in_fan_out
from ..registry import register
from ..targeting import adapted_modules
from .lora import LoRAAdapter, linear_weight

LossFn = Callable[[nn.Module, Any], torch.Tensor]


# --- the sparse delta every method trains --------------------------------------------------


def direct_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's own floating-point parameters (not its children's), e.g. weight, bias."""
    return {
        n: p
        for n, p in module.named_parameters(recurse=False)
        if p is not None and p.is_floating_point()
    }


def run_with(base: nn.Module, params: dict[str, torch.Tensor], x, args, kwargs):
    """``base``'s forward with some of its parameters replaced."""
    if type(base) is nn.Linear and not args and not kwargs:
        return F.linear(x, params.get("weight", base.weight), params.get("bias", base.bias))
    return functional_call(base, params, (x, *args), kwargs)


class SparseDeltaAdapter(Adapter):
    """``p' = p + scatter(indices_p, values_p)`` for each tuned parameter p of the base.

    ``indices_<p>`` (persistent buffer) and ``values.<p>`` (parameter) have one entry per
    selected position; -1 marks an adapter whose entries are not chosen yet, which runs as
    the identity (``select`` chooses them; training it before then is an error).
    """

    replaces_base = True

    def __init__(self, base: nn.Module, counts: dict[str, int]) -> None:
        super().__init__()
        self.values = nn.ParameterDict()
        for name, k in counts.items():
            param = getattr(base, name)
            opts = {"device": param.device}
            self.register_buffer(f"indices_{name}", torch.full((k,), -1, dtype=torch.long, **opts))
            self.values[name] = nn.Parameter(torch.zeros(k, dtype=train_dtype(param), **opts))
        self.tuned = tuple(counts)
        self._selected = False
        self._originals: dict[str, torch.Tensor] = {}

    def indices(self, name: str) -> torch.Tensor:
        return getattr(self, f"indices_{name}")

    def assign(self, name: str, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Set the positions (and optionally the values; default zero) of tensor ``name``."""
        with torch.no_grad():
            self.indices(name).copy_(indices)
            self.values[name].copy_(torch.zeros(()) if values is None else values)
        self._selected = False

    def is_selected(self) -> bool:
        if not self._selected:  # checked once on the tensors (they may come from a load)
            self._selected = all(
                self.indices(n).numel() == 0 or bool((self.indices(n) >= 0).all())
                for n in self.tuned
            )
        return self._selected

    def updated(self, base: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.tuned:
            param, index = getattr(base, name), self.indices(name)
            if index.numel():
                values = self.values[name].to(param.dtype)
                out[name] = param.reshape(-1).index_add(0, index, values).view_as(param)
        return out

    def check_selected(self) -> None:
        if torch.is_grad_enabled() and self.training and not self.is_selected():
            raise RuntimeError(
                f"{type(self).__name__} at {getattr(self, 'path', '?')} has no entries chosen "
                "yet; call core.methods.sparse.select(model, batches) on task data before "
                "training."
            )

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        if any(getattr(base, n).is_meta for n in self.tuned) or not self.is_selected():
            self.check_selected()
            return base(x, *args, **kwargs)
        if (
            not args
            and not kwargs
            and "weight" in self.tuned
            and sparse_linear_fits(x, base, self.indices("weight"))
        ):
            bias = self.updated_bias(base)
            index, values = self.indices("weight"), self.values["weight"]
            return SparseDeltaLinear.apply(x, base.weight, bias, index, values)
        return run_with(base, self.updated(base), x, args, kwargs)

    def updated_bias(self, base: nn.Module) -> torch.Tensor | None:
        bias = base.bias
        if "bias" in self.tuned and self.indices("bias").numel():
            bias = bias.index_add(0, self.indices("bias"), self.values["bias"].to(bias.dtype))
        return bias

    def merge(self, base: nn.Module) -> None:
        if not self.is_selected():
            raise MergeError(f"{getattr(self, 'path', '?')}: no entries chosen yet to merge.")
        for name in self.tuned:
            flat, index = flat_view(getattr(base, name)), self.indices(name)
            self._originals[name] = flat[index].clone()
            flat.index_add_(0, index, self.values[name].detach().to(flat.dtype))

    def unmerge(self, base: nn.Module) -> None:
        for name in self.tuned:
            flat_view(getattr(base, name))[self.indices(name)] = self._originals.pop(name)

    def num_selected(self) -> int:
        return sum(self.values[n].numel() for n in self.tuned)


# --- the fast path on a linear layer ------------------------------------------------------

# A gathered multiply-add (one selected entry, one token) costs about as much on CPU as this
# many multiply-adds of the dense gradient GEMM g^T x: below d_out d_in / GATHER_COST
# entries, gathering the selected entries' gradients is cheaper than forming all of them.
GATHER_COST = 256
GATHER_BLOCK = 1 << 21  # elements gathered at once (8 MB in float32)


def sparse_linear_fits(x: Any, base: nn.Module, index: torch.Tensor) -> bool:
    """Whether ``SparseDeltaLinear`` computes this call: a plain nn.Linear whose frozen
    weight has entries chosen, x in its dtype, outside autocast (its dtype casts would go
    around it)."""
    return (
        type(base) is nn.Linear
        and isinstance(x, torch.Tensor)
        and index.numel() > 0
        and not base.weight.requires_grad
        and hand_written_step_fits(x, base.weight)
    )


class SparseDeltaLinear(torch.autograd.Function):
    """``F.linear(x, W + scatter(index, values), bias)`` whose backward forms only the
    selected entries of the weight gradient, ``dvalues_i = sum_t g[t, r_i] x[t, c_i]``
    (``selected_weight_grad``); the plain formula's autograd forms all d_out x d_in of
    ``g^T x`` and then picks k of them. Forward and the input gradient are unchanged."""

    @staticmethod
    def forward(ctx: Any, x, weight, bias, index, values):
        flat = weight.reshape(-1).index_add(0, index, values.to(weight.dtype))
        updated = flat.view_as(weight)
        ctx.values_dtype = values.dtype
        # the updated weight is kept only for the input gradient
        ctx.save_for_backward(x, updated if ctx.needs_input_grad[0] else None, index)
        return F.linear(x, updated, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, updated, index = ctx.saved_tensors
        need_x, _, need_bias, _, need_values = ctx.needs_input_grad
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ updated if need_x else None
        grad_bias = rows.sum(0) if need_bias else None
        grad_values = None
        if need_values:
            inputs = x.reshape(-1, x.shape[-1])
            grad_values = selected_weight_grad(rows, inputs, index).to(ctx.values_dtype)
        return grad_x, None, grad_bias, None, grad_values


def selected_weight_grad(g: torch.Tensor, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Entries ``index`` (flat, row-major) of the weight gradient ``g^T x`` for g (n, d_out)
    and x (n, d_in): gathered column pairs, multiplied and summed over the n rows, in
    blocks of ``GATHER_BLOCK``; the dense GEMM where gathering would cost more. When the
    entries are k per row in row order (GPS), g's columns are used as they lie."""
    (n, d_out), d_in, k = g.shape, x.shape[1], index.numel()
    if k * GATHER_COST >= d_out * d_in:
        return (g.t() @ x).reshape(-1).index_select(0, index)
    rows, cols = index.div(d_in, rounding_mode="floor"), index.remainder(d_in)
    per_row = k // d_out
    in_row_order = per_row * d_out == k and torch.equal(
        rows, torch.arange(d_out, device=rows.device).repeat_interleave(per_row)
    )
    work = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
    out = torch.empty(k, dtype=work, device=g.device)
    unit = per_row if in_row_order else 1
    step = unit * max(1, GATHER_BLOCK // (n * unit))
    for start in range(0, k, step):
        stop = min(k, start + step)
        picked_x = x.index_select(1, cols[start:stop]).to(work)
        if in_row_order:  # g's columns start // per_row .. stop // per_row, each per_row times
            picked_g = g[:, start // per_row : stop // per_row].to(work)
            picked_x = picked_x.view(n, -1, per_row) * picked_g.unsqueeze(-1)
            out[start:stop] = picked_x.sum(0).reshape(-1)
        else:
            picked_g = g.index_select(1, rows[start:stop]).to(work)
            out[start:stop] = (picked_g * picked_x).sum(0)
    return out


def train_dtype(param: torch.Tensor) -> torch.dtype:
    """Adapter values train in float32 under a half-precision base, else in its dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


def flat_view(param: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a parameter's storage, for in-place edits of chosen entries."""
    if not param.is_contiguous():
        raise MergeError("a sparse update can only be merged into a contiguous parameter.")
    return param.data.view(-1)


# --- choosing entries deterministically -------------------------------------------------------


def global_top_k(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Flat indices (sorted) of the k largest entries over all ``scores`` tensors.

    Ties at the threshold go to earlier tensors, then lower indices, so the choice is
    the same on every run and device. Only per-tensor candidates of size <= k are held
    at once, never one concatenation of every score.
    """
    flats = [s.detach().reshape(-1).float() for s in scores]
    total = sum(f.numel() for f in flats)
    if k > total:
        raise ConfigError(f"asked for {k} entries but the targeted tensors hold only {total}.")
    if k == 0:
        return [torch.zeros(0, dtype=torch.long, device=f.device) for f in flats]
    candidates = torch.cat([f.topk(min(k, f.numel())).values.cpu() for f in flats if f.numel()])
    threshold = candidates.topk(k).values.min()
    above = [f > threshold.to(f.device) for f in flats]
    left = k - sum(int(a.sum()) for a in above)
    chosen = []
    for flat, mask in zip(flats, above, strict=True):
        ties = torch.nonzero(flat == threshold.to(flat.device)).squeeze(1)[:left]
        left -= ties.numel()
        index = torch.cat([torch.nonzero(mask).squeeze(1), ties])
        chosen.append(index.sort().values)
    return chosen


def rowwise_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (rows, k) of each row's k largest scores, ties to lower columns."""
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Loss of one batch: ``model(**batch).loss`` for a mapping (transformers style), else
    cross-entropy of ``model(inputs)`` (or its ``.logits``) against ``targets`` for
    ``(inputs, targets, ...)``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
        loss = out["loss"] if isinstance(out, Mapping) else getattr(out, "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss for this batch; pass loss_fn=.")
        return loss
    inputs, targets = batch[0], batch[1]
    out = model(inputs)
    logits = getattr(out, "logits", out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def gradient_scores(
    model: nn.Module,
    weights: list[torch.Tensor],
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    squared: bool,
) -> list[torch.Tensor]:
    """Per entry of each frozen tensor in ``weights``: ``|sum_b g_b|`` or ``sum_b g_b^2``.

    The model is left as it was: requires_grad flags and every parameter's ``.grad`` are
    restored, and nothing else changes (no optimizer step).
    """
    params = list(model.parameters())
    saved = [(p, p.requires_grad, p.grad) for p in params]
    for p in params:
        p.grad = None
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    try:
        with torch.enable_grad():
            for batch in batches:
                loss_fn(model, batch).backward()
                for total, w in zip(sums, weights, strict=True):
                    if w.grad is not None:
                        grad = w.grad.float()
                        total.add_(grad.square() if squared else grad)
                        w.grad = None
    finally:
        for p, flag, grad in saved:
            p.requires_grad_(flag)
            p.grad = grad
    return sums if squared else [s.abs() for s in sums]


def _sparse_adapters(model: nn.Module, name: str, kinds: tuple[type, ...]):
    found = {
        path: (wrapper, wrapper.adapters[name])
        for path, wrapper in adapted_modules(model)
        if name in wrapper.adapters and isinstance(wrapper.adapters[name].config, kinds)
    }
    if not found:
        raise ValueError(
            f"the model has no {' / '.join(k.__name__ for k in kinds)} adapter named {name!r}; "
            "inject one first (core.inject(model, GPS(targets=[...])))."
        )
    return found


@contextlib.contextmanager
def inactive(found: dict, name: str):
    """Adapter ``name`` off on the given wrappers for the duration."""
    saved = {path: list(wrapper.active) for path, (wrapper, _) in found.items()}
    try:
        for wrapper, _ in found.values():
            wrapper.active = [n for n in wrapper.active if n != name]
        yield
    finally:
        for path, (wrapper, _) in found.items():
            wrapper.active = saved[path]


def swap(wrapper, name: str, path: str, cfg: AdapterConfig, new: Adapter) -> None:
    """Put ``new`` in place of adapter ``name`` of one wrapper (same config attributes,
    train/eval mode and trainability as ``attach`` gives)."""
    old = wrapper.adapters[name]
    if name in wrapper.merged:
        raise MergeError(f"adapter {name!r} is merged; call core.unmerge(model) first.")
    old.on_detach(wrapper.base_layer)
    new.config, new.path = cfg, path
    new.train(old.training)
    new.on_attach(wrapper.base_layer)
    params = list(old.parameters())  # an adapter not selected yet has none: it trains
    new.set_trainable(not params or any(p.requires_grad for p in params))
    wrapper.adapters[name] = new


def check_counts(cfg: object, name: str) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in value.items()
    ):
        raise ConfigError(
            f"{type(cfg).__name__}.{name} maps module / tensor names to counts >= 0 and is "
            f"filled by select() or prune(); got {value!r}."
        )


def weight_reason(module: nn.Module, method: str, *, convs: bool) -> str | None:
    if isinstance(module, nn.Linear) or is_fan_in_fan_out(module):
        return None
    if convs and isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return None
    kinds = "nn.Linear, transformers Conv1D" + (" and nn.Conv1d/2d/3d" if convs else "")
    return f"{method} selects entries of a weight matrix: it wraps {kinds}"


# =========================================================================================
# Diff pruning
# =========================================================================================


@register("diff_pruning", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class DiffPruning(AdapterConfig):
    """Diff pruning (Guo, Rush and Kim, 2021); see the module docstring for the equations.

    Phase 1 (after ``inject``): every targeted tensor gets a dense diff w (zero at start,
    so the model starts unchanged) and gate logits alpha; ``aux_loss`` is the L0 penalty.
    This phase trains ``2 N`` numbers for N adapted entries (plus one per tensor when
    structured). Phase 2 (after ``prune``): a fixed-mask sparse delta of exactly
    ``round(density N)`` entries. Both phases merge; phase 1 adds its dense delta at the
    gates' expected values (unmerge to float tolerance), phase 2 is bitwise exact.

    Args (defaults: the paper's hyperparameters):
        density: fraction of adapted entries kept by magnitude pruning (0.5%).
        l0_coef: lambda of the expected-L0 penalty.
        alpha_init: initial gate logit (z ~ 1 at start).
        stretch: (l, r), the hard-concrete stretch interval.
        temperature: beta of the hard-concrete distribution.
        structured: also gate each tensor as a group (the paper's structured variant).
        params: which of each module's own parameters get a diff, e.g. ["weight"]; None
            takes all of them (weights and biases, as the paper diffs every parameter).
        kept: filled by ``prune``: entries kept per tensor ("<module>.<param>"); when set
            the adapters are built in phase 2.
        prune_at: fraction of the training run after which ``core.lightning.PeftModule``
            prunes and goes on with fixed-mask training (None: prune by hand).
    """

    density: float = 0.005
    l0_coef: float = 1.25e-7
    alpha_init: float = 5.0
    stretch: tuple[float, float] = (-1.5, 1.5)
    temperature: float = 1.0
    structured: bool = False
    params: tuple[str, ...] | None = None
    kept: dict[str, int] = field(default_factory=dict)
    prune_at: float | None = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(self, "density", low=0.0, high=1.0, low_open=True)
        if self.prune_at is not None:
            check_float(self, "prune_at", low=0.0, high=1.0, low_open=True, high_open=True)
        check_float(self, "l0_coef", low=0.0)
        check_float(self, "alpha_init")
        check_float(self, "temperature", low=0.0, low_open=True)
        low, high = self.stretch
        if not (
            isinstance(low, int | float) and isinstance(high, int | float) and low < 0 < 1 < high
        ):
            raise ConfigError(
                f"DiffPruning.stretch must be (l, r) with l < 0 and r > 1 so that the gate can "
                f"reach exactly 0 and 1, got {self.stretch!r}; the paper uses (-1.5, 1.5)."
            )
        object.__setattr__(self, "stretch", (float(low), float(high)))
        if not isinstance(self.structured, bool):
            raise ConfigError(
                f"DiffPruning.structured must be True or False, got {self.structured!r}."
            )
        if self.params is not None:
            if isinstance(self.params, str) or not all(isinstance(p, str) for p in self.params):
                raise ConfigError(
                    f"DiffPruning.params must be a list of parameter names such as ['weight', "
                    f"'bias'], got {self.params!r}."
                )
            object.__setattr__(self, "params", tuple(self.params))
        check_counts(self, "kept")

    def tensors(self, module: nn.Module) -> list[str]:
        own = direct_parameters(module)
        return [n for n in own if self.params is None or n in self.params]

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if not self.tensors(module):
            wanted = "floating-point parameters" if self.params is None else list(self.params)
            return f"diff pruning needs a module with its own {wanted}; this one has none"
        return None

    def build(self, module: nn.Module, path: str) -> Adapter:
        names = self.tensors(module)
        if self.kept:
            counts = {n: self.kept.get(f"{path}.{n}", 0) for n in names}
            return SparseDeltaAdapter(module, counts)
        return DiffPruningAdapter(self, module, names)


class DiffPruningAdapter(Adapter):
    """Phase 1: ``p' = p + z(alpha) * w`` with hard-concrete gates z; see ``DiffPruning``."""

    replaces_base = True

    def __init__(self, cfg: DiffPruning, base: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.low, self.high = cfg.stretch
        self.beta, self.l0_coef = cfg.temperature, cfg.l0_coef
        self.diff = nn.ParameterDict()
        self.alpha = nn.ParameterDict()
        self.group_alpha = nn.ParameterDict() if cfg.structured else None
        for name in names:
            p = getattr(base, name)
            opts = {"dtype": train_dtype(p), "device": p.device}
            self.diff[name] = nn.Parameter(torch.zeros(p.shape, **opts))
            self.alpha[name] = nn.Parameter(torch.full(p.shape, cfg.alpha_init, **opts))
            if self.group_alpha is not None:
                self.group_alpha[name] = nn.Parameter(torch.full((), cfg.alpha_init, **opts))

    def gate(self, alpha: torch.Tensor) -> torch.Tensor:
        """A hard-concrete sample in training; its deterministic value otherwise."""
        if self.training:
            u = torch.rand_like(alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((u.log() - (-u).log1p() + alpha) / self.beta)
        else:
            s = torch.sigmoid(alpha)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def deltas(self) -> dict[str, torch.Tensor]:
        """delta = z * w per tensor (z_i z_g when structured)."""
        out = {}
        for name, w in self.diff.items():
            z = self.gate(self.alpha[name])
            if self.group_alpha is not None:
                z = z * self.gate(self.group_alpha[name])
            out[name] = z * w
        return out

    def updated(self, base: nn.Module) -> dict[str, torch.Tensor]:
        """``p + z * w`` per tuned parameter (``GatedDiff``: the same numbers as
        ``p + deltas()[name]``, fused and in cache-sized blocks)."""
        params = {}
        for name, w in self.diff.items():
            alpha = self.alpha[name]
            u = torch.rand_like(alpha) if self.training else None  # drawn as ``gate`` does
            if self.group_alpha is not None:  # z_i z_g w = z_i (z_g w)
                w = w * self.gate(self.group_alpha[name])
            temperature = self.beta if self.training else 1.0
            stretch = (self.low, self.high, temperature)
            params[name] = GatedDiff.apply(getattr(base, name), w, alpha, u, stretch)
        return params

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        if any(getattr(base, n).is_meta for n in self.diff):
            return base(x, *args, **kwargs)
        return run_with(base, self.updated(base), x, args, kwargs)

    def nonzero_probability(self, alpha: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(alpha - self.beta * math.log(-self.low / self.high))

    def expected_l0(self) -> torch.Tensor:
        """E[||delta||_0]: sum_i P(z_i != 0) (times P(z_g != 0) per group when structured)."""
        total = 0.0
        for name, alpha in self.alpha.items():
            per_entry = self.nonzero_probability(alpha).sum()
            if self.group_alpha is not None:
                per_entry = per_entry * self.nonzero_probability(self.group_alpha[name])
            total = total + per_entry
        return total

    def aux_loss(self) -> torch.Tensor | None:
        return self.l0_coef * self.expected_l0() if self.l0_coef > 0 else None

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name, delta in self.final_deltas().items():
                param = getattr(base, name)
                param.data.copy_((param.data.float() + delta.float()).to(param.dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name, delta in self.final_deltas().items():
                param = getattr(base, name)
                param.data.copy_((param.data.float() - delta.float()).to(param.dtype))

    def final_deltas(self) -> dict[str, torch.Tensor]:
        """The deterministic delta (gates at their expected value), what ``prune`` ranks."""
        mode = self.training
        self.train(False)
        try:
            with torch.no_grad():
                return self.deltas()
        finally:
            self.train(mode)


GATE_BLOCK = 1 << 16  # entries per block of GatedDiff (its ~6 temporaries stay in cache)


class GatedDiff(torch.autograd.Function):
    """``p + z * w`` with the hard-concrete gate ``z = clamp(s (r - l) + l, 0, 1)``,
    ``s = sigmoid((log u - log(1 - u) + alpha) / beta)`` (training; u ~ U(0, 1) given) or
    ``s = sigmoid(alpha)`` (``u`` None), and its gradients
    ``dw = G z``, ``dalpha = G w (r - l) s (1 - s) / beta`` where ``0 <= s (r - l) + l <= 1``
    (else 0, as clamp's gradient), for G the gradient of the result.

    The same arithmetic as autograd through ``gate``, but every full-size pass runs over
    blocks of ``GATE_BLOCK`` entries that stay in cache, and backward needs two products
    (autograd keeps ~6 full-size intermediates and runs ~10 passes over them)."""

    @staticmethod
    def forward(ctx, param, w, alpha, u, stretch):
        low, high, temperature = stretch
        z = torch.empty_like(alpha)
        slope = torch.empty_like(alpha) if ctx.needs_input_grad[2] else None
        out = torch.empty_like(param)
        flat = [t.reshape(-1) for t in (param, w, alpha, z, out)]
        noise = None if u is None else u.reshape(-1)
        for start in range(0, alpha.numel(), GATE_BLOCK):
            block = slice(start, start + GATE_BLOCK)
            p, wb, a, zb, ob = (t[block] for t in flat)
            s = a.clone() if noise is None else logistic(noise[block]).add_(a).div_(temperature)
            s.sigmoid_()
            torch.mul(s, high - low, out=zb).add_(low)  # the stretched gate, before clamping
            if slope is not None:  # (r - l) / beta * s (1 - s) * [0 <= zb <= 1] * w
                inside = (zb >= 0).logical_and_(zb <= 1)
                kb = torch.rsub(s, 1).mul_(s).mul_((high - low) / temperature).mul_(inside)
                torch.mul(kb, wb, out=slope.reshape(-1)[block])
            zb.clamp_(0.0, 1.0)
            if p.dtype == wb.dtype:
                torch.addcmul(p, zb, wb, out=ob)
            else:  # the delta in the adapter's dtype, added in the base's (as p + delta.to())
                torch.add(p, (zb * wb).to(p.dtype), out=ob)
        ctx.save_for_backward(z, slope)
        return out

    @staticmethod
    def backward(ctx, grad):
        z, slope = ctx.saved_tensors
        need_param, need_w, need_alpha, _, _ = ctx.needs_input_grad
        grad32 = grad.to(z.dtype)
        grad_w = grad32 * z if need_w else None
        grad_alpha = grad32 * slope if need_alpha else None
        return grad if need_param else None, grad_w, grad_alpha, None, None


def logistic(u: torch.Tensor) -> torch.Tensor:
    """``log u - log(1 - u)`` of ``u`` clamped to [1e-6, 1 - 1e-6], as ``gate`` takes it, by
    one ``logit`` (log(u / (1 - u))): a fifth of the time of the two logarithms on CPU."""
    return torch.logit(u.clamp(1e-6, 1 - 1e-6))


def prune(model: nn.Module, name: str = "default", density: float | None = None) -> int:
    """Magnitude-prune diff-pruning adapter ``name`` to ``density`` (default: its config's)
    of its adapted entries and switch it to fixed-mask sparse training; returns how many
    entries were kept, exactly ``round(density * N)``.

    The deterministic delta ``z * w`` is ranked by magnitude over every adapted tensor of
    the model at once; the kept entries keep their values and train on as a sparse delta.
    Build a new optimizer afterwards: the adapter's parameters are new objects.
    """
    found = _sparse_adapters(model, name, (DiffPruning,))
    cfg = next(iter(found.values()))[1].config
    if any(not isinstance(a, DiffPruningAdapter) for _, a in found.values()):
        raise ValueError(f"adapter {name!r} is already pruned (its config lists kept entries).")
    density = cfg.density if density is None else density
    if not 0 < density <= 1:
        raise ConfigError(f"density must lie in (0, 1], got {density}.")
    deltas = {
        f"{path}.{n}": d for path, (_, a) in found.items() for n, d in a.final_deltas().items()
    }
    k = round(density * sum(d.numel() for d in deltas.values()))
    chosen = dict(zip(deltas, global_top_k([d.abs() for d in deltas.values()], k), strict=True))
    pruned = dataclasses.replace(
        cfg, density=density, kept={key: int(i.numel()) for key, i in chosen.items()}
    )
    for path, (wrapper, _) in found.items():
        new = pruned.build(wrapper.base_layer, path)
        for tensor in new.tuned:
            index = chosen[f"{path}.{tensor}"]
            new.assign(tensor, index, deltas[f"{path}.{tensor}"].reshape(-1)[index])
        swap(wrapper, name, path, pruned, new)
    return k


# =========================================================================================
# GPS
# =========================================================================================


def neuron_rows(base: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (neurons, fan-in): output features / channels as rows."""
    return t.T if is_fan_in_fan_out(base) else t.reshape(t.shape[0], -1)


def storage_index(base: nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Flat storage positions of (neuron, connection) pairs of ``base.weight``."""
    if is_fan_in_fan_out(base):  # weight stored (in, out)
        return cols * base.weight.shape[1] + rows
    return rows * base.weight[0].numel() + cols


def fan_in(base: nn.Module) -> int:
    return neuron_rows(base, base.weight).shape[1]


@register("gps", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class GPS(AdapterConfig):
    """GPS, Gradient-based Parameter Selection (Zhang et al., 2024).

    ``select(model, batches)`` picks, for each neuron of each targeted weight, the k input
    connections with the largest accumulated gradient magnitude; only those train.
    Trainable per layer: ``out_features * k`` (output channels * k for convolutions).
    Starts unchanged (the values start at zero).

    Args:
        k: connections per neuron (the paper's K).
    """

    k: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "k")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if reason := weight_reason(module, "GPS", convs=True):
            return reason
        if fan_in(module) < self.k:
            return f"k={self.k} exceeds the {fan_in(module)} input connections of each neuron"
        return None

    def build(self, module: nn.Module, path: str) -> SparseDeltaAdapter:
        neurons = neuron_rows(module, module.weight).shape[0]
        return SparseDeltaAdapter(module, {"weight": neurons * self.k})


def select_gps(found: dict, scores: list[torch.Tensor]) -> dict[str, int]:
    chosen = {}
    for (path, (_, adapter)), score in zip(found.items(), scores, strict=True):
        base = adapter_base(found, path)
        cols = rowwise_top_k(neuron_rows(base, score), adapter.config.k)
        rows = torch.arange(cols.shape[0], device=cols.device)[:, None].expand_as(cols)
        adapter.assign("weight", storage_index(base, rows, cols).reshape(-1).sort().values)
        chosen[path] = adapter.num_selected()
    return chosen


def adapter_base(found: dict, path: str) -> nn.Module:
    return found[path][0].base_layer


# =========================================================================================
# SPT
# =========================================================================================


@register("spt", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class SPT(AdapterConfig):
    """SPT, Sensitivity-aware visual Parameter-efficient fine-Tuning (He et al., 2023).

    ``select(model, batches)`` scores every entry of the targeted weights by ``sum_b g_b^2``
    and takes the top ``budget`` of them. A weight holding at least ``structured_threshold``
    chosen entries is tuned by a rank-``rank`` LoRA instead; the budget it frees goes back
    to the next most sensitive entries of the other weights, until none crosses the
    threshold, so the trainable count is exactly the budget:
    ``sum_unstructured entries + sum_structured rank (d_in + d_out) = budget``.
    Starts unchanged (sparse values zero, LoRA B zero).

    Args:
        density: the budget as a fraction of the targeted weights' entries.
        budget: the budget tau as a number of trainable parameters (overrides density).
        rank: r of the structured (LoRA) updates.
        alpha: LoRA scale numerator (alpha / r).
        structured_threshold: chosen entries that make a weight structured; None uses
            ``rank (d_in + d_out)``, the LoRA's own size (structured where it is no dearer
            than the entries it replaces).
        counts / ranks: filled by ``select``: unstructured entries and LoRA rank per module.
    """

    density: float = 0.005
    budget: int | None = None
    rank: int = 8
    alpha: float = 8.0
    structured_threshold: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float(self, "density", low=0.0, high=1.0, low_open=True)
        if self.budget is not None:
            check_int(self, "budget")
        check_int(self, "rank")
        check_float(self, "alpha", low=0.0, low_open=True)
        if self.structured_threshold is not None:
            check_int(self, "structured_threshold")
        check_counts(self, "counts")
        check_counts(self, "ranks")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return weight_reason(module, "SPT", convs=False)

    def threshold(self, base: nn.Module) -> int:
        if self.structured_threshold is not None:
            return self.structured_threshold
        return self.lora_size(base)

    def lora_size(self, base: nn.Module) -> int:
        return self.rank * sum(linear_weight(base).shape)

    def build(self, module: nn.Module, path: str) -> SPTAdapter:
        planned = path in self.counts or path in self.ranks
        return SPTAdapter(self, module, self.counts.get(path, 0), self.ranks.get(path, 0), planned)


class SPTAdapter(SparseDeltaAdapter):
    """The sparse delta on the chosen entries plus, for structured weights, a LoRA."""

    def __init__(self, cfg: SPT, base: nn.Module, count: int, rank: int, planned: bool) -> None:
        super().__init__(base, {"weight": count})
        self.planned = planned
        self.replaces_base = count > 0
        self.lora = None
        if rank:
            scale = cfg.alpha / rank
            self.lora = LoRAAdapter(base, r=rank, scale=scale, dropout=0.0, init="kaiming")

    def is_selected(self) -> bool:
        return self.planned and super().is_selected()

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not self.planned:
            self.check_selected()
        return y if self.lora is None else self.lora.post(x, y, base)

    def merge(self, base: nn.Module) -> None:
        super().merge(base)
        if self.lora is not None:
            self.lora.merge(base)

    def unmerge(self, base: nn.Module) -> None:
        if self.lora is not None:
            self.lora.unmerge(base)
        super().unmerge(base)


def allocate_spt(cfg: SPT, bases: dict[str, nn.Module], scores: dict[str, torch.Tensor]):
    """(counts, ranks, chosen indices) spending exactly the budget; see ``SPT``."""
    total = sum(s.numel() for s in scores.values())
    budget = cfg.budget if cfg.budget is not None else round(cfg.density * total)
    if budget > total:
        raise ConfigError(f"SPT budget {budget} exceeds the {total} targeted entries.")
    structured: set[str] = set()
    while True:
        free = [p for p in scores if p not in structured]
        left = budget - sum(cfg.lora_size(bases[p]) for p in structured)
        free_entries = sum(scores[p].numel() for p in free)
        if left < 0 or left > free_entries:
            raise ConfigError(
                f"SPT cannot spend its budget of {budget} exactly: {len(structured)} of "
                f"{len(scores)} weights turned structured (LoRA rank {cfg.rank}) and "
                f"{max(left, 0)} parameters are left for {free_entries} unstructured entries. "
                "Use a smaller rank or budget, more targets, or another structured_threshold."
            )
        picked = dict(zip(free, global_top_k([scores[p] for p in free], left), strict=True))
        crossing = {p for p, i in picked.items() if i.numel() >= cfg.threshold(bases[p])}
        if not crossing:
            break
        structured |= crossing
    counts = {p: picked[p].numel() if p in picked else 0 for p in scores}
    ranks = {p: cfg.rank for p in sorted(structured)}
    return counts, ranks, picked


# =========================================================================================
# selection on task data
# =========================================================================================


def select(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    name: str = "default",
) -> dict[str, int]:
    """Choose the trained entries of GPS / SPT adapter ``name`` from gradients on task data.

    ``batches`` is an iterable of batches (e.g. a DataLoader over the training set);
    ``loss_fn(model, batch)`` returns a scalar loss (default: ``default_loss``). Gradients
    are taken in the model's current mode (call ``model.eval()`` first for dropout-free,
    reproducible scores); the model's parameters, flags and ``.grad`` are left as they were.
    Returns the trainable count per adapted module. Build the optimizer after this call:
    SPT adapters are rebuilt with their chosen shapes.
    """
    found = _sparse_adapters(model, name, (GPS, SPT))
    cfg = next(iter(found.values()))[1].config
    bases = {path: wrapper.base_layer for path, (wrapper, _) in found.items()}
    for path, base in bases.items():
        if base.weight.is_meta:
            raise ValueError(f"{path} lives on the meta device: selection needs real weights.")
    weights = [b.weight for b in bases.values()]
    with inactive(found, name):  # gradients of the frozen weights, without the updates
        scores = gradient_scores(
            model, weights, batches, loss_fn or default_loss, squared=isinstance(cfg, SPT)
        )
    if isinstance(cfg, GPS):
        return select_gps(found, scores)
    counts, ranks, picked = allocate_spt(cfg, bases, dict(zip(bases, scores, strict=True)))
    planned = dataclasses.replace(cfg, counts=counts, ranks=ranks)
    for path, (wrapper, _) in found.items():
        new = planned.build(wrapper.base_layer, path)
        if counts[path]:
            new.assign("weight", picked[path])
        swap(wrapper, name, path, planned, new)
    return {
        path: counts[path] + (cfg.lora_size(bases[path]) if path in ranks else 0) for path in bases
    }


__all__ = [
    "GPS",
    "SPT",
    "DiffPruning",
    "DiffPruningAdapter",
    "SPTAdapter",
    "SparseDeltaAdapter",
    "default_loss",
    "global_top_k",
    "prune",
    "select",
]
