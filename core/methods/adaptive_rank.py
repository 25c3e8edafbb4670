"""Low-rank adapters whose rank or placement changes while training.

This family extends LoRA (``core.methods.lora``) by design: every method here is a LoRA
layer whose update is built from rank-one components, plus a training-time controller
(``core.controllers``) that prunes, grows or selects them between optimizer steps. What a
controller decided lives in persistent buffers of the adapters, so ``core.save_adapter``
and ``core.load_adapter`` reproduce the trained structure exactly.

* **AdaLoRA** (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
  Fine-Tuning", eq. 1-11): W = W0 + (alpha / r) P Lambda Q with P = ``B`` (d x r),
  Lambda = diag(``E``), Q = ``A`` (r x k); an orthogonality regulariser
  ||P^T P - I||_F + ||Q Q^T - I||_F; a cubic budget schedule b(t) that keeps the b(t)
  triplets of highest importance S = s(lambda) + mean s(P_:,i) + mean s(Q_i,:), where
  s = I_bar * U_bar, I = |w grad w|, I_bar its EMA (beta1) and U_bar the EMA (beta2) of
  |I - I_bar|. Forward, importance, schedule and PEFT export equal HF PEFT's AdaLoRA.
* **IncreLoRA** (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method
  for Parameter-Efficient Fine-tuning"): the same SVD form, starting at a small rank; every
  ``incre_interval`` steps the ``top_h`` modules of highest importance (EMA of
  sum |dW * grad dW| / sqrt(numel dW), smoothed like AdaLoRA) gain ``add_rank``
  components, until the total rank reaches the budget. Reserve components train in
  advance with a fixed singular value 1e-5 ("advance learning"); newly added components
  restart their learning rate from zero ("restart warmup").
* **dynamic-rank DoRA** (Mao et al., 2024, "DoRA: Enhancing Parameter-Efficient Fine-Tuning
  with Dynamic Rank Distribution"; registered as ``dora_dynamic``, not to be confused with
  the weight-decomposed DoRA of Liu et al., 2024, registered as ``dora``): W = W0 +
  (alpha / r') sum_i c_i B_i A_i over r' = 1.5 r rank-one components; the importance of
  component i is ||c_i B_i A_i||_F / ||dW||_F (EMA); a cubic schedule prunes the least
  important until r components per module remain on average; the Dimensional Equilibrium
  Modulator adds the variance of each A_i and B_i to the loss while pruning runs.
* **TriAdaptLoRA** (Liang et al., 2025, "TriAdaptLoRA: Brain-Inspired Triangular Adaptive
  Low-Rank Adaptation for Parameter-Efficient Fine-Tuning"): W = W0 + (alpha / r) B C A
  with the r x r transformation matrix split into a block-lower and a block-upper
  triangular part, C = L + U, so that growing the rank by k only appends k rows to L and
  k columns to U; the importance of a module is the growth of its normalised Frobenius
  norm ||C||_F / (number of blocks) since the last allocation; the number of modules that
  grow is set by a linear or exponential threshold schedule.
* **DiffoRA** (Jiang et al., 2025, "DiffoRA: Enabling Parameter-Efficient Fine-Tuning via
  Differential Module Selection"): a Differential Adaptation Matrix gamma decides which
  modules keep a LoRA. Continuous relaxation: during a search phase every module runs
  W0 + sigmoid(gamma_m) (alpha / r) B A and gamma trains with the adapters; discretisation:
  then the modules with the largest gamma in each layer keep their adapter (weights shared
  with the search phase, the gate folded into B) and the others are switched off.

All of them start as the identity (the update is zero: E = 0, c = 0, C = 0 or B = 0) and
are mergeable. The full paper text of IncreLoRA, dynamic-rank DoRA, TriAdaptLoRA and
DiffoRA was not available while writing this; what is implemented follows their
abstracts and, where public, the authors' code. Each config's docstring says what was
taken from where and where this implementation departs.

Supported layers: nn.Linear, transformers Conv1D and nn.Conv1d/2d/3d (groups=1, zero
padding; the update is LoCon-shaped as in LoRA). Growing methods (IncreLoRA, TriAdaptLoRA)
preallocate ``max_rank`` components per module so parameter shapes, the optimizer and
checkpoints never change; components not yet added take no part in the forward and get no
gradient. ``active_parameter_count()`` gives the paper's count of live parameters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import AdapterConfig, check_choice, check_float, check_int
from ..controllers import Controller, needs_total_steps
from ..errors import CheckpointError, ConfigError
from ..layers import conv_forward, is_fan_in_fan_out
from ..peft_format import PeftFormat, register_peft_format
from ..registry import register
from .lora import LORA_NEUTRAL, LoRAAdapter, layer_kind, linear_weight

SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d (groups=1, zero padding)"
RESERVE_VALUE = 1e-5  # IncreLoRA's fixed singular value of a reserve component
# IncreLoRA reads its importance EMA only when it allocates: a step whose EMA weight at the
# next allocation is below this (beta^steps) cannot change the score a float32 can hold.
IMPORTANCE_TOL = 1e-12


def lowrank_reason(module: nn.Module, method: str) -> str | None:
    """Why a low-rank method of this family cannot wrap ``module``, or None."""
    kind = layer_kind(module)
    if kind not in ("linear", "conv"):
        return f"{method} wraps {SUPPORTED}"
    if kind == "conv" and (module.groups != 1 or module.padding_mode != "zeros"):
        return f"{method} on convolutions needs groups=1 and padding_mode='zeros'"
    return None


def check_optional_int(cfg: object, name: str, *, minimum: int = 1) -> None:
    if getattr(cfg, name) is not None:
        check_int(cfg, name, minimum=minimum)


def check_bool(cfg: object, name: str) -> None:
    if not isinstance(getattr(cfg, name), bool):
        raise ConfigError(
            f"{type(cfg).__name__}.{name} must be True or False, got {getattr(cfg, name)!r}."
        )


def buffer_int(module: nn.Module, name: str, default: int) -> int:
    """The integer held in buffer ``name`` as a Python int.

    Read from the device only when the buffer changed (its version counter moves on every
    in-place write, including the ``copy_`` of a checkpoint load), so a forward pass does
    not synchronise with the GPU. On the meta device: ``default``.
    """
    buf = module._buffers[name]
    if buf.is_meta:
        return default
    key = (buf.data_ptr(), buf._version)
    cache = module.__dict__.setdefault("_buffer_ints", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        hit = cache[name] = (key, int(buf.item()))
    return hit[1]


def orthogonality(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||A A^T - I||_F + ||B^T B - I||_F over the components (A rows, B columns); the
    unsquared norms of the AdaLoRA authors' code and HF PEFT."""
    a, b = a.flatten(1), b.flatten(1)
    eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
    return torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)


def per_component(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``weights`` (r,) shaped to scale the rows of a factor shaped like ``like``."""
    return weights.view(-1, *[1] * (like.dim() - 1))


def normal_(tensor: torch.Tensor) -> None:
    nn.init.normal_(tensor, mean=0.0, std=0.02)


# --- the layer the family shares ----------------------------------------------------------


class ComponentAdapter(LoRAAdapter):
    """``y + s * B_eff A_eff x``: a LoRA layer whose factors are assembled from rank-one
    components (scaled, masked or mixed). Subclasses define ``factors``; forward, fused
    path, merge and unmerge are shared.

    ``reg_scale`` weights the method's regulariser in ``aux_loss``; a controller sets it
    (e.g. to average over all the adapter's modules, as the authors' code does).
    """

    def __init__(self, base: nn.Module, *, r: int, scale: float, dropout: float) -> None:
        super().__init__(base, r=r, scale=scale, dropout=dropout, init="kaiming")
        self.reg_scale = 0.0

    def new_parameter(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(shape, device=self.A.device, dtype=self.A.dtype))

    def new_buffer(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value.to(self.A.device), persistent=True)

    # -- what subclasses define ---------------------------------------------------------

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_eff, B_eff): the live components, A_eff shaped like A's rows, B_eff like B's."""
        raise NotImplementedError

    def update_scale(self) -> float:
        return self.scale

    def idle(self) -> bool:
        """True when the update is known to be zero, so the forward can skip it."""
        return False

    # -- shared forward and merge -------------------------------------------------------

    def lowrank_factors(self):
        if self.kind != "linear" or self.idle():
            return None
        a, b = self.factors()
        return a, b, self.update_scale(), self.dropout

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.idle():
            return y
        a, b = self.factors()
        h = self.dropout(x.to(a.dtype))
        update = self.run_factors(h, a, b, base)
        return torch.add(y, update.to(y.dtype), alpha=self.update_scale())

    def run_factors(self, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, base: nn.Module):
        """B_eff A_eff h (unscaled) with the base layer's geometry."""
        if self.kind == "linear":
            return F.linear(F.linear(h, a), b)
        z = conv_forward(base, h, a, groups=1)
        return conv_forward(base, z, b, stride=1, padding=0, dilation=1)

    def delta_weight(self) -> torch.Tensor:
        """s * B_eff A_eff in the base weight's (out, in, *kernel) layout."""
        a, b = (t.float() for t in self.factors())
        delta = b.flatten(1) @ a.flatten(1)
        return self.update_scale() * delta.view(b.shape[0], *a.shape[1:])

    def merge(self, base: nn.Module) -> None:
        shift_weight(base, self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        shift_weight(base, -self.delta_weight())

    def on_attach(self, base: nn.Module) -> None:
        """Nothing to do to the base (LoRA's PiSSA start does not apply here)."""

    def on_detach(self, base: nn.Module) -> None:
        """Nothing to undo."""


def shift_weight(base: nn.Module, delta: torch.Tensor) -> None:
    """Add ``delta`` (out, in, ...) to the base weight, whatever its storage layout."""
    if is_fan_in_fan_out(base):
        delta = delta.T
    base.weight.data += delta.to(base.weight.dtype)


class SVDAdapter(ComponentAdapter):
    """P diag(lambda) Q: A (r x k) and B (d x r) drawn N(0, 0.02^2), lambda = ``E`` zero."""

    def __init__(self, base: nn.Module, *, r: int, scale: float, dropout: float) -> None:
        super().__init__(base, r=r, scale=scale, dropout=dropout)
        self.E = self.new_parameter(r)
        with torch.no_grad():
            normal_(self.A)
            normal_(self.B)


# --- importance bookkeeping shared by AdaLoRA and IncreLoRA ------------------------------


class SmoothedImportance:
    """AdaLoRA's eq. 9-10: sensitivity I_bar = b1 I_bar + (1 - b1) I, uncertainty
    U_bar = b2 U_bar + (1 - b2) |I - I_bar|; the score is I_bar * U_bar."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity: dict[str, torch.Tensor] = {}
        self.uncertainty: dict[str, torch.Tensor] = {}

    def update(self, key: str, ipt: torch.Tensor) -> None:
        if key not in self.sensitivity:
            self.sensitivity[key] = torch.zeros_like(ipt)
            self.uncertainty[key] = torch.zeros_like(ipt)
        s = self.beta1 * self.sensitivity[key] + (1 - self.beta1) * ipt
        self.sensitivity[key] = s
        self.uncertainty[key] = (
            self.beta2 * self.uncertainty[key] + (1 - self.beta2) * (ipt - s).abs()
        )

    def score(self, key: str) -> torch.Tensor:
        return self.sensitivity[key] * self.uncertainty[key]

    def reset(self) -> None:
        self.sensitivity, self.uncertainty = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"sensitivity": dict(self.sensitivity), "uncertainty": dict(self.uncertainty)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sensitivity = dict(state.get("sensitivity", {}))
        self.uncertainty = dict(state.get("uncertainty", {}))


def cubic_budget(step: int, *, start: int, end: int, initial: float, final: float) -> float:
    """AdaLoRA's eq. 12: ``initial`` until ``start``, then a cubic decrease to ``final`` at
    ``end``: final + (initial - final) (1 - (t - start) / (end - start))^3."""
    if step <= start:
        return initial
    progress = min(1.0, (step - start) / max(1, end - start))
    return (initial - final) * (1 - progress) ** 3 + final


# ==========================================================================================
# AdaLoRA
# ==========================================================================================


@register("adalora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class AdaLoRA(AdapterConfig):
    """AdaLoRA (Zhang et al., 2023, "Adaptive Budget Allocation for Parameter-Efficient
    Fine-Tuning"). Defaults and field meanings follow HF PEFT's ``AdaLoraConfig``.

    h = W0 x + (alpha / init_r) B diag(E) A x (eq. 1 with P = B, Lambda = E, Q = A). The
    controller (``controller()``) follows PEFT's ``update_and_allocate``: steps 1..tinit
    keep every triplet; until ``total_step - tfinal`` the budget falls cubically from
    ``init_r`` to ``target_r`` per module (eq. 12) and every ``delta_t`` steps the triplets
    of lowest importance (eq. 7-11) have E set to 0; at ``total_step - tfinal`` the final
    pattern (``target_r`` per module on average) is fixed. The pattern is the persistent
    buffer ``rank_mask``, so a saved adapter reloads with the same ranks. Regulariser:
    ``orth_reg_weight`` * mean over all A, B matrices of ||A A^T - I||_F, ||B^T B - I||_F
    (the authors' code and PEFT; the paper's eq. 4 squares the norms). Starts as the
    identity (E = 0).

    Departures from PEFT, both only visible when ``delta_t > 1``: between two allocations
    the last pattern is re-applied after every step (PEFT lets pruned values drift until
    the next allocation), so the rank budget holds at every step; and an allocation whose
    budget still equals the initial one prunes nothing (PEFT raises there).

    Args:
        init_r: rank every module starts with.
        target_r: average rank per module at the end of the budget phase.
        alpha: scale numerator; the update is multiplied by alpha / init_r.
        dropout: dropout on the adapter's input.
        tinit, tfinal: steps without pruning at the start / with the final pattern at the end.
        delta_t: steps between two budget allocations (PEFT's ``deltaT``).
        beta1, beta2: EMA coefficients of sensitivity and uncertainty.
        orth_reg_weight: weight of the orthogonality regulariser (``core.aux_loss``).
        total_step: the run's optimizer steps; None takes it from the trainer.
        rank_pattern: module name -> ``init_r`` booleans (PEFT's saved rank pattern): such a
            module is built with only the kept triplets (an adapter imported from PEFT).
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "init_r")
        check_int(self, "target_r")
        if self.target_r > self.init_r:
            raise ConfigError(
                f"AdaLoRA.target_r ({self.target_r}) must not exceed init_r ({self.init_r}): "
                "AdaLoRA only prunes. Raise init_r or lower target_r."
            )
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        check_int(self, "tinit", minimum=0)
        check_int(self, "tfinal", minimum=0)
        check_int(self, "delta_t")
        check_float(self, "beta1", low=0.0, high=1.0, low_open=True, high_open=True)
        check_float(self, "beta2", low=0.0, high=1.0, low_open=True, high_open=True)
        check_float(self, "orth_reg_weight", low=0.0)
        check_optional_int(self, "total_step")
        if self.total_step is not None:
            check_schedule(self.tinit, self.tfinal, self.total_step)
        self._check_rank_pattern()

    def _check_rank_pattern(self) -> None:
        if self.rank_pattern is None:
            return
        if not isinstance(self.rank_pattern, dict):
            raise ConfigError("AdaLoRA.rank_pattern must map module names to lists of booleans.")
        for key, kept in self.rank_pattern.items():
            ok = isinstance(kept, list | tuple) and all(isinstance(v, bool) for v in kept)
            if not ok or len(kept) != self.init_r:
                raise ConfigError(
                    f"AdaLoRA.rank_pattern[{key!r}] must be a list of {self.init_r} booleans "
                    f"(one per initial triplet: kept or pruned), got {kept!r}."
                )

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return lowrank_reason(module, "AdaLoRA")

    def kept_slots(self, path: str) -> list[int] | None:
        """Which of the ``init_r`` triplets a module imported with ``rank_pattern`` holds."""
        if not self.rank_pattern or path not in self.rank_pattern:
            return None
        return [i for i, kept in enumerate(self.rank_pattern[path]) if kept]

    def build(self, module: nn.Module, path: str) -> AdaLoRAAdapter:
        slots = self.kept_slots(path)
        r = self.init_r if slots is None else len(slots)
        return AdaLoRAAdapter(module, r=r, scale=self.alpha / self.init_r, dropout=self.dropout)

    def controller(self, model: nn.Module, name: str, total_steps: int | None) -> Controller:
        total = self.total_step or needs_total_steps("AdaLoRA", total_steps, "total_step")
        check_schedule(self.tinit, self.tfinal, total)
        return AdaLoRAController(self, model, name, total)


def check_schedule(tinit: int, tfinal: int, total: int) -> None:
    if tinit >= total - tfinal:
        raise ConfigError(
            f"AdaLoRA's schedule leaves no budget phase: tinit={tinit} must be below "
            f"total_step - tfinal = {total} - {tfinal}. Lower tinit/tfinal or train longer."
        )


class AdaLoRAAdapter(SVDAdapter):
    """AdaLoRA's SVD-form triplets with their rank pattern (``rank_mask``, persistent)."""

    def __init__(self, base: nn.Module, *, r: int, scale: float, dropout: float) -> None:
        super().__init__(base, r=r, scale=scale, dropout=dropout)
        self.new_buffer("rank_mask", torch.ones(r, dtype=torch.bool))

    def on_attach(self, base: nn.Module) -> None:
        # Without a controller each module's regulariser counts as its own mean over its
        # two matrices; AdaLoRAController averages over every module instead.
        self.reg_scale = self.config.orth_reg_weight / 2

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A * per_component(self.E, self.A), self.B

    def aux_loss(self) -> torch.Tensor | None:
        if self.reg_scale == 0 or self.r == 0:
            return None
        return self.reg_scale * orthogonality(self.A, self.B)

    def idle(self) -> bool:
        return self.r == 0

    def apply_mask(self) -> None:
        with torch.no_grad():
            self.E.masked_fill_(~self.rank_mask, 0.0)

    def kept_rank(self) -> int:
        return int(self.rank_mask.sum())


class AdaLoRAController(Controller):
    """PEFT's ``RankAllocator`` + ``update_and_allocate`` over our adapters (see AdaLoRA)."""

    def __init__(self, cfg: AdaLoRA, model: nn.Module, name: str, total: int) -> None:
        super().__init__(name)
        self.cfg, self.total = cfg, total
        adapters = self.adapters(model)
        if not adapters:
            raise ConfigError(f"adapter {name!r} has no modules to control.")
        self.init_budget = sum(a.r for a in adapters.values())
        self.target_budget = cfg.target_r * len(adapters)
        self.importance = SmoothedImportance(cfg.beta1, cfg.beta2)
        for adapter in adapters.values():
            adapter.reg_scale = cfg.orth_reg_weight / (2 * len(adapters))
        self.budget = self.init_budget

    def schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to allocate at ``step``), PEFT's ``budget_schedule``."""
        cfg, end = self.cfg, self.total - self.cfg.tfinal
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > end:
            return self.target_budget, True
        budget = cubic_budget(
            step, start=cfg.tinit, end=end, initial=self.init_budget, final=self.target_budget
        )
        return int(budget), step % cfg.delta_t == 0

    def after_step(self, model: nn.Module, step: int) -> None:
        adapters = self.adapters(model)
        end = self.total - self.cfg.tfinal
        with torch.no_grad():
            if step < end:
                self.update_importance(adapters)
                self.budget, allocate = self.schedule(step)
                if allocate:
                    self.allocate(adapters, self.budget)
            elif step == end:
                self.budget = self.target_budget
                self.allocate(adapters, self.budget)
                self.importance.reset()
            for adapter in adapters.values():
                adapter.apply_mask()

    def update_importance(self, adapters: dict[str, AdaLoRAAdapter]) -> None:
        """I = |w * grad w| for every entry of A, E, B (eq. 7), smoothed (eq. 9-10)."""
        for path, adapter in adapters.items():
            for key in ("A", "E", "B"):
                p = getattr(adapter, key)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                self.importance.update(f"{path}.{key}", (p * grad).abs().detach())

    def triplet_scores(self, path: str) -> torch.Tensor:
        """Eq. 11: s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji) (same op order as PEFT)."""
        a = self.importance.score(f"{path}.A").flatten(1).mean(dim=1)
        b = self.importance.score(f"{path}.B").flatten(1).mean(dim=0)
        return self.importance.score(f"{path}.E").view(-1) + (a + b)

    def allocate(self, adapters: dict[str, AdaLoRAAdapter], budget: int) -> None:
        """Keep the ``budget`` most important triplets of all modules (eq. 8)."""
        if any(f"{p}.E" not in self.importance.sensitivity for p in adapters):
            return  # no gradient seen yet
        scores = {path: self.triplet_scores(path) for path in adapters}
        prune = self.init_budget - budget
        if prune <= 0:
            keep = {path: torch.ones_like(s, dtype=torch.bool) for path, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=prune)[0].item()
            keep = {path: s > threshold for path, s in scores.items()}
        for path, adapter in adapters.items():
            adapter.rank_mask.copy_(keep[path])

    def rank_pattern(self, model: nn.Module) -> dict[str, list[bool]]:
        return {p: a.rank_mask.tolist() for p, a in self.adapters(model).items()}

    def metrics(self, model: nn.Module) -> dict[str, float]:
        ranks = sum(a.kept_rank() for a in self.adapters(model).values())
        return {"rank_total": float(ranks), "rank_budget": float(self.budget)}

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance.state_dict(), "budget": self.budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance.load_state_dict(state.get("importance", {}))
        self.budget = int(state.get("budget", self.budget))


# --- AdaLoRA in HF PEFT's spelling --------------------------------------------------------


def _adalora_from_peft(pc: dict) -> AdaLoRA:
    pattern = None
    if pc.get("rank_pattern"):
        # PEFT keys are "<module>.lora_E" (or "<module>.lora_E.<adapter>").
        pattern = {
            re.sub(r"\.lora_E(\..*)?$", "", k): list(v) for k, v in pc["rank_pattern"].items()
        }
    targets = pc["target_modules"]
    return AdaLoRA(
        targets=sorted(targets) if isinstance(targets, list | set) else targets,
        exclude=pc.get("exclude_modules") or None,
        modules_to_save=pc.get("modules_to_save") or None,
        init_r=int(pc.get("init_r", 12)),
        target_r=int(pc.get("target_r", 8)),
        alpha=float(pc.get("lora_alpha", 8)),
        dropout=float(pc.get("lora_dropout", 0.0)),
        tinit=int(pc.get("tinit", 0)),
        tfinal=int(pc.get("tfinal", 0)),
        delta_t=int(pc.get("deltaT", 1)),
        beta1=float(pc.get("beta1", 0.85)),
        beta2=float(pc.get("beta2", 0.85)),
        orth_reg_weight=float(pc.get("orth_reg_weight", 0.5)),
        total_step=pc.get("total_step"),
        rank_pattern=pattern,
    )


def _full_pattern(cfg: AdaLoRA, path: str, adapter: AdaLoRAAdapter) -> list[bool]:
    """The adapter's kept triplets as ``init_r`` booleans (a module imported compact keeps
    the positions its PEFT pattern gave it)."""
    mask = adapter.rank_mask.tolist()
    slots = cfg.kept_slots(path)
    if slots is None:
        return mask
    full = [False] * cfg.init_r
    for slot, kept in zip(slots, mask, strict=True):
        full[slot] = kept
    return full


def _adalora_to_peft(cfg: AdaLoRA, adapters: dict[str, AdaLoRAAdapter]) -> dict:
    if any(getattr(a, "dilation", (1,)) != (1,) * len(a.dilation) for a in adapters.values()):
        raise CheckpointError("PEFT's AdaLoRA convolutions ignore dilation; cannot export.")
    if any(a.kind == "conv" and a.A.dim() != 4 for a in adapters.values()):
        raise CheckpointError("PEFT's AdaLoRA supports Conv2d only among convolutions.")
    total = cfg.total_step or cfg.tinit + cfg.tfinal + 1  # PEFT needs one; unused at inference
    return {
        "r": 8,  # ignored by PEFT's AdaLoRA (init_r counts); 8 avoids its warning
        "init_r": cfg.init_r,
        "target_r": cfg.target_r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "tinit": cfg.tinit,
        "tfinal": cfg.tfinal,
        "deltaT": cfg.delta_t,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight,
        "total_step": total,
        "rank_pattern": {f"{p}.lora_E": _full_pattern(cfg, p, a) for p, a in adapters.items()},
        "fan_in_fan_out": any(a.fan_in_fan_out for a in adapters.values()),
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
    }


def _adalora_tensors(adapter: AdaLoRAAdapter) -> dict[str, torch.Tensor]:
    """Only the kept triplets, as PEFT saves them (its rank pattern says where they go)."""
    kept = adapter.rank_mask
    return {
        "lora_A": adapter.A.detach()[kept].flatten(1),
        "lora_E": adapter.E.detach()[kept].view(-1, 1),
        "lora_B": adapter.B.detach()[:, kept].flatten(1),
    }


def _adalora_import(base: nn.Module, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's (r, in * kernel) / (out, r) / (r, 1) layouts to ours; every loaded triplet is
    kept (PEFT saves only the kept ones)."""
    kernel = tuple(base.weight.shape[2:]) if layer_kind(base) == "conv" else ()
    in_dim = base.weight.shape[1] if kernel else None
    a, b, e = named["A"], named["B"], named["E"]
    if kernel:
        a = a.reshape(a.shape[0], in_dim, *kernel)
        b = b.reshape(b.shape[0], b.shape[1], *[1] * len(kernel))
    return {
        "A": a,
        "B": b,
        "E": e.reshape(-1),
        "rank_mask": torch.ones(e.shape[0], dtype=torch.bool),
    }


register_peft_format(
    PeftFormat(
        peft_type="ADALORA",
        method="adalora",
        tensor_names={"lora_A": "A", "lora_B": "B", "lora_E": "E"},
        config_from_peft=_adalora_from_peft,
        config_to_peft=_adalora_to_peft,
        export_tensors=_adalora_tensors,
        import_tensors=_adalora_import,
        neutral={"use_dora": False, **LORA_NEUTRAL},
    )
)


# ==========================================================================================
# IncreLoRA
# ==========================================================================================


@register("increlora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class IncreLoRA(AdapterConfig):
    """IncreLoRA (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method
    for Parameter-Efficient Fine-tuning").

    h = W0 x + (alpha / r_m) B diag(E) A x with r_m the module's current rank, as in the
    authors' code (their scaling divides by the current rank). Each module starts at
    ``init_r``. Importance of a module (authors' code): I = sum |dW * dL/d(dW)| /
    sqrt(numel dW), smoothed as in AdaLoRA (beta1, beta2; score = I_bar * U_bar). After
    ``init_warmup`` steps, every ``incre_interval`` steps the ``top_h`` modules of highest
    score gain ``add_rank`` components, until the total rank reaches ``target_r`` times
    the number of modules. Advance learning: every module holds ``add_rank`` reserve
    components whose A, B train while their singular value stays 1e-5; when the module is
    chosen they become ordinary components (E starts at 1e-5) and fresh reserves follow.
    Restart warmup: components added (or turned from reserve into active) have their
    updates scaled from 1/restart_warmup up to 1 over ``restart_warmup`` steps, a linear
    learning-rate warmup of the new parameters. Orthogonality regulariser on the live
    components, averaged over all modules' A and B (``orth_reg_weight``). Starts as the
    identity (E = 0). Cost: reading dL/d(dW) needs the dense dW (d x k) and its gradient
    GEMM dY^T X, as in the authors' code; a linear layer then runs one GEMM with W + dW.
    The score is only read at allocations and the EMA weighs a step n steps earlier by at
    most max(beta1, beta2)^n, so only the steps within ``IncreLoRAController.history()`` of
    an allocation (171 for beta 0.85: weight below 1e-12) record it; the others, and every
    step once the budget is reached, take LoRA's fused path.

    What is not from the paper text (not available here): the restart warmup's form and
    length; the authors' code adds new parameter tensors and optimizer groups, we
    preallocate ``max_rank`` components per module (the upper bound of a module's rank).
    The last allocation never exceeds the budget (the authors' code may overshoot by up to
    ``add_rank - 1``); ties in the score are broken by module order.

    Args:
        init_r: starting rank of every module.
        target_r: average final rank (budget = target_r * modules, or target_total_rank).
        add_rank: components a chosen module gains; None: target_r // 2 (authors' default).
        top_h: modules chosen per allocation.
        init_warmup: steps before the first allocation.
        incre_interval: steps between allocations.
        restart_warmup: warmup steps of new components; None: incre_interval // 2; 0: off.
        advance_learn: train reserve components before they are added.
        max_rank: components preallocated per module; None: 4 * target_r.
        target_total_rank: total budget over all modules; None: target_r * modules.
        alpha, dropout: as in LoRA. beta1, beta2: importance EMAs.
        orth_reg_weight: orthogonality regulariser weight (``core.aux_loss``).
    """

    init_r: int = 1
    target_r: int = 2
    add_rank: int | None = None
    top_h: int = 2
    init_warmup: int = 1000
    incre_interval: int = 1000
    restart_warmup: int | None = None
    advance_learn: bool = True
    max_rank: int | None = None
    target_total_rank: int | None = None
    alpha: float = 16.0
    dropout: float = 0.0
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("init_r", "target_r", "top_h", "incre_interval"):
            check_int(self, name)
        check_int(self, "init_warmup", minimum=0)
        check_optional_int(self, "add_rank")
        check_optional_int(self, "restart_warmup", minimum=0)
        check_optional_int(self, "max_rank")
        check_optional_int(self, "target_total_rank")
        check_bool(self, "advance_learn")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        check_float(self, "beta1", low=0.0, high=1.0, low_open=True, high_open=True)
        check_float(self, "beta2", low=0.0, high=1.0, low_open=True, high_open=True)
        check_float(self, "orth_reg_weight", low=0.0)
        if self.capacity < self.init_r + self.step_rank:
            raise ConfigError(
                f"IncreLoRA.max_rank ({self.capacity}) leaves no room to grow past init_r "
                f"({self.init_r}) by add_rank ({self.step_rank}); raise max_rank."
            )

    @property
    def step_rank(self) -> int:
        return self.add_rank or max(1, self.target_r // 2)

    @property
    def capacity(self) -> int:
        return self.max_rank or 4 * self.target_r

    @property
    def warmup_steps(self) -> int:
        return self.incre_interval // 2 if self.restart_warmup is None else self.restart_warmup

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return lowrank_reason(module, "IncreLoRA")

    def build(self, module: nn.Module, path: str) -> IncreLoRAAdapter:
        return IncreLoRAAdapter(
            module, capacity=self.capacity, init_r=self.init_r, alpha=self.alpha,
            dropout=self.dropout,
        )  # fmt: skip

    def controller(self, model: nn.Module, name: str, total_steps: int | None) -> Controller:
        return IncreLoRAController(self, model, name)


class IncreLoRAAdapter(SVDAdapter):
    """Components [0, rank) are active, [rank, rank + reserve) are reserves (fixed
    singular value 1e-5), the rest of the ``capacity`` slots are unused. ``rank`` and
    ``reserve`` are persistent buffers."""

    def __init__(
        self, base: nn.Module, *, capacity: int, init_r: int, alpha: float, dropout: float
    ):
        super().__init__(base, r=capacity, scale=alpha, dropout=dropout)
        self.alpha = alpha
        self.new_buffer("rank", torch.tensor(init_r))
        self.new_buffer("reserve", torch.tensor(0))
        self.track_importance = False  # the controller turns it on while ranks grow
        self.importance_sum: torch.Tensor | float = 0.0

    def active_rank(self) -> int:
        return buffer_int(self, "rank", self.r)

    def live(self) -> int:
        return min(self.r, self.active_rank() + buffer_int(self, "reserve", 0))

    def update_scale(self) -> float:
        return self.alpha / max(1, self.active_rank())

    def singular_values(self) -> torch.Tensor:
        rank, live = self.active_rank(), self.live()
        reserve = torch.full(
            (live - rank,), RESERVE_VALUE, device=self.E.device, dtype=self.E.dtype
        )
        return torch.cat([self.E[:rank], reserve])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        live = self.live()
        a = self.A[:live]
        return a * per_component(self.singular_values(), a), self.B[:, :live]

    def active_parameter_count(self) -> int:
        """The paper's count: r (in + out + 1) for the active rank r."""
        per_rank = self.A[0].numel() + self.B[:, 0].numel() + 1
        return self.active_rank() * per_rank

    # -- importance: sum |dW * grad dW| / sqrt(numel), from a hook on the materialised dW --

    def lowrank_factors(self):
        return None if self.tracking() else super().lowrank_factors()

    def tracking(self) -> bool:
        return self.track_importance and self.training and torch.is_grad_enabled()

    @property
    def replaces_base(self) -> bool:
        """While importance is tracked on a linear layer without dropout: the step needs the
        dense dW and its gradient dY^T X anyway, so base and update run as one GEMM with
        W + dW (three GEMMs per step, not five as for y + x dW^T)."""
        return self.kind == "linear" and self.tracking() and isinstance(self.dropout, nn.Identity)

    def tracked_delta(self) -> torch.Tensor:
        """s B_eff A_eff in the base layout, recording sum |dW * grad dW| in the backward."""
        a, b = self.factors()
        delta = self.update_scale() * (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])
        frozen = delta.detach()
        delta.register_hook(lambda grad: self._record(frozen, grad))
        return delta

    def run_base(self, x: torch.Tensor, base: nn.Module, *args: Any, **kwargs: Any):
        delta, weight = self.tracked_delta(), linear_weight(base)
        if weight.dtype == delta.dtype:
            return F.linear(x, weight + delta, base.bias)
        y = base(x)  # a half-precision base under a float32 adapter
        return y + F.linear(x.to(delta.dtype), delta).to(y.dtype)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not self.tracking():
            return super().post(x, y, base)
        if self.replaces_base:  # already in run_base's output
            return y
        delta = self.tracked_delta()
        h = self.dropout(x.to(delta.dtype))
        update = F.linear(h, delta) if self.kind == "linear" else conv_forward(base, h, delta)
        return y + update.to(y.dtype)

    def _record(self, delta: torch.Tensor, grad: torch.Tensor) -> None:
        score = (delta * grad).abs().sum() / math.sqrt(delta.numel())
        self.importance_sum = self.importance_sum + score.detach()

    def on_attach(self, base: nn.Module) -> None:
        self.reg_scale = self.config.orth_reg_weight / 2  # the controller averages

    def take_importance(self) -> torch.Tensor | float:
        value, self.importance_sum = self.importance_sum, 0.0
        return value

    def aux_loss(self) -> torch.Tensor | None:
        if self.reg_scale == 0:
            return None
        live = self.live()
        return self.reg_scale * orthogonality(self.A[:live], self.B[:, :live])


class IncreLoRAController(Controller):
    """Grows the rank of the most important modules (see IncreLoRA)."""

    def __init__(self, cfg: IncreLoRA, model: nn.Module, name: str) -> None:
        super().__init__(name)
        self.cfg = cfg
        adapters = self.adapters(model)
        if not adapters:
            raise ConfigError(f"adapter {name!r} has no modules to control.")
        self.target = cfg.target_total_rank or cfg.target_r * len(adapters)
        self.importance = SmoothedImportance(cfg.beta1, cfg.beta2)
        self.warming: dict[str, tuple[int, int, int]] = {}  # path -> (start step, lo, hi)
        self.snapshots: dict[str, tuple[torch.Tensor, ...]] = {}
        self.reserves_made = False
        self.step = 0  # the last optimizer step seen by after_step
        self.built_for = adapters  # tracking for the next step is set on these
        for adapter in adapters.values():
            adapter.reg_scale = cfg.orth_reg_weight / (2 * len(adapters))
        self._set_tracking(adapters, next_step=1)

    def total_rank(self, adapters: dict[str, IncreLoRAAdapter]) -> int:
        return sum(a.active_rank() for a in adapters.values())

    def growing(self, adapters: dict[str, IncreLoRAAdapter]) -> bool:
        return self.total_rank(adapters) < self.target

    # -- when importance is tracked ------------------------------------------------------

    def history(self) -> int:
        """Steps before an allocation whose importance reaches it: the EMA weighs step
        t - n by at most beta^n, below ``IMPORTANCE_TOL`` from n = history() on."""
        beta = max(self.cfg.beta1, self.cfg.beta2)
        return math.ceil(math.log(IMPORTANCE_TOL) / math.log(beta))

    def next_allocation(self, step: int) -> int:
        """The first allocation step (a multiple of incre_interval past init_warmup) >= step."""
        interval = self.cfg.incre_interval
        first = (self.cfg.init_warmup // interval + 1) * interval
        return max(first, -(-step // interval) * interval)

    def tracks(self, step: int) -> bool:
        """Whether the forward of ``step`` must record importance: only the ``history()``
        steps up to each allocation can change its scores, so the other steps skip the dense
        dW and its d_out x d_in gradient GEMM (every step when history() >= incre_interval)."""
        return self.next_allocation(step) - step < self.history()

    def _set_tracking(self, adapters: dict[str, IncreLoRAAdapter], next_step: int) -> None:
        on = self.growing(adapters) and self.tracks(next_step)
        for adapter in adapters.values():
            adapter.track_importance = on

    def after_backward(self, model: nn.Module, step: int) -> None:
        adapters = self.adapters(model)
        with torch.no_grad():
            if not self.reserves_made:
                self.reserves_made = True
                if self.cfg.advance_learn and self.growing(adapters):
                    for path, adapter in adapters.items():
                        self.make_reserve(path, adapter, step)
            for path, adapter in adapters.items():
                score = adapter.take_importance()
                if adapter.track_importance:
                    self.importance.update(path, torch.as_tensor(score, dtype=torch.float32))
            self.snapshot_warming(adapters)

    def after_step(self, model: nn.Module, step: int) -> None:
        adapters = self.adapters(model)
        with torch.no_grad():
            self.finish_warmup(adapters, step)
            due = step > self.cfg.init_warmup and step % self.cfg.incre_interval == 0
            if due and self.growing(adapters):
                self.grow(adapters, step)
        self.step = step
        self._set_tracking(adapters, next_step=step + 1)

    # -- restart warmup: the step of a new component is scaled by (step - start) / R -----

    def snapshot_warming(self, adapters: dict[str, IncreLoRAAdapter]) -> None:
        self.snapshots = {}
        for path, (_, lo, hi) in self.warming.items():
            a = adapters[path]
            self.snapshots[path] = (a.A[lo:hi].clone(), a.B[:, lo:hi].clone(), a.E[lo:hi].clone())

    def finish_warmup(self, adapters: dict[str, IncreLoRAAdapter], step: int) -> None:
        length = self.cfg.warmup_steps
        for path, (start, lo, hi) in list(self.warming.items()):
            weight = min(1.0, (step - start) / length) if length else 1.0
            if path in self.snapshots and weight < 1.0:
                a = adapters[path]
                old_a, old_b, old_e = self.snapshots[path]
                a.A[lo:hi] = old_a + weight * (a.A[lo:hi] - old_a)
                a.B[:, lo:hi] = old_b + weight * (a.B[:, lo:hi] - old_b)
                a.E[lo:hi] = old_e + weight * (a.E[lo:hi] - old_e)
            if weight >= 1.0:
                del self.warming[path]
        self.snapshots = {}

    def start_warmup(self, path: str, lo: int, hi: int, step: int) -> None:
        if self.cfg.warmup_steps and hi > lo:
            previous = self.warming.get(path)
            lo = min(lo, previous[1]) if previous else lo
            self.warming[path] = (step, lo, hi)

    # -- growing -----------------------------------------------------------------------

    def make_reserve(self, path: str, adapter: IncreLoRAAdapter, step: int) -> None:
        """Fresh reserve components after the active ones (drawn like new parameters)."""
        rank = adapter.active_rank()
        count = min(self.cfg.step_rank, adapter.r - rank)
        normal_(adapter.A[rank : rank + count])
        normal_(adapter.B[:, rank : rank + count])
        adapter.E[rank : rank + count] = 0.0
        adapter.reserve.fill_(count)
        self.start_warmup(path, rank, rank + count, step)

    def grow(self, adapters: dict[str, IncreLoRAAdapter], step: int) -> None:
        remaining = self.target - self.total_rank(adapters)
        eligible = [p for p, a in adapters.items() if a.active_rank() < a.r]
        if not eligible:
            return
        scores = torch.stack([self.score(p) for p in eligible])
        order = torch.argsort(scores, descending=True, stable=True).tolist()
        for index in order[: self.cfg.top_h]:
            if remaining <= 0:
                break
            path = eligible[index]
            remaining -= self.add_components(path, adapters[path], remaining, step)
        if remaining <= 0:  # budget reached: reserves are dropped, ranks stay as they are
            for adapter in adapters.values():
                adapter.reserve.fill_(0)
            self.warming = {
                p: (start, lo, min(hi, adapters[p].active_rank()))
                for p, (start, lo, hi) in self.warming.items()
                if lo < adapters[p].active_rank()
            }

    def score(self, path: str) -> torch.Tensor:
        if path not in self.importance.sensitivity:
            return torch.tensor(0.0)
        return self.importance.score(path).float().cpu()

    def add_components(self, path: str, adapter: IncreLoRAAdapter, remaining: int, step: int):
        rank = adapter.active_rank()
        count = min(self.cfg.step_rank, remaining, adapter.r - rank)
        if self.cfg.advance_learn and buffer_int(adapter, "reserve", 0) >= count:
            adapter.E[rank : rank + count] = RESERVE_VALUE  # the reserve becomes active
        else:
            normal_(adapter.A[rank : rank + count])
            normal_(adapter.B[:, rank : rank + count])
            adapter.E[rank : rank + count] = 0.0
        adapter.rank.fill_(rank + count)
        self.start_warmup(path, rank, rank + count, step)
        if self.cfg.advance_learn:
            self.make_reserve(path, adapter, step)
        return count

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {
            "rank_total": float(self.total_rank(self.adapters(model))),
            "rank_budget": self.target,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "importance": self.importance.state_dict(),
            "warming": {p: list(w) for p, w in self.warming.items()},
            "reserves_made": self.reserves_made,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance.load_state_dict(state.get("importance", {}))
        self.warming = {p: tuple(w) for p, w in state.get("warming", {}).items()}
        self.reserves_made = bool(state.get("reserves_made", self.reserves_made))
        self.step = int(state.get("step", self.step))
        self._set_tracking(self.built_for, next_step=self.step + 1)


# ==========================================================================================
# dynamic-rank DoRA (Mao et al.)
# ==========================================================================================


@register("dora_dynamic", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class DynamicDoRA(AdapterConfig):
    """DoRA with dynamic rank distribution (Mao et al., 2024, "DoRA: Enhancing
    Parameter-Efficient Fine-Tuning with Dynamic Rank Distribution"); registered as
    ``dora_dynamic``. Not the weight-decomposed DoRA of Liu et al. (registered ``dora``).

    h = W0 x + (alpha / r') sum_i c_i B_i A_i x over r' = ``init_r`` (default ceil(1.5 r))
    rank-one components; A_i, B_i start Kaiming-uniform and c = 0, so the model starts as
    the identity. Importance of component i (authors' code): s_i = ||c_i B_i A_i||_F /
    (||sum_j c_j B_j A_j||_F + eps), smoothed s_bar = beta s_bar + (1 - beta) s every step.
    Pruning runs from ``prune_start`` to ``prune_end`` (fractions of the run): every
    ``prune_interval`` steps the k(t) = int(N (r' - r) / r' (t / T)^3) components of lowest
    score over all N components are set to c = 0 (and held there between events, the
    persistent buffer ``keep``); after ``prune_end`` the last pattern is final, averaging r
    components per module. Dimensional Equilibrium Modulator: ``dem_weight`` * the mean over
    all components of var(A_i) and var(B_i), added while pruning has not finished.

    Departures (the paper text was not available; the authors' code was): pruned components
    are held at zero between pruning events (the code lets them drift until the next event),
    so the budget holds at every step; an event prunes exactly k(t) components (the code
    prunes every score up to the k-th, more on ties, and at least one); ||dW||_F is computed
    from r' x r' Gram matrices instead of the full d x k product.

    Args:
        r: average rank per module after pruning.
        init_r: components per module at the start; None: ceil(1.5 r).
        alpha: scale numerator (update multiplied by alpha / init_r).
        dropout: dropout on the adapter input (authors' default 0.1).
        prune_start, prune_end: the pruning window as fractions of the run.
        prune_interval: steps between pruning events.
        beta: EMA coefficient of the importance.
        eps: added to ||dW||_F.
        dem_weight: weight of the Dimensional Equilibrium Modulator (``core.aux_loss``).
        total_step: the run's optimizer steps; None takes it from the trainer.
    """

    r: int = 8
    init_r: int | None = None
    alpha: float = 8.0
    dropout: float = 0.1
    prune_start: float = 0.15
    prune_end: float = 0.5
    prune_interval: int = 100
    beta: float = 0.9
    eps: float = 1e-8
    dem_weight: float = 0.1
    total_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r")
        check_optional_int(self, "init_r")
        if self.components < self.r:
            raise ConfigError(
                f"DynamicDoRA.init_r ({self.components}) must be at least r ({self.r}): "
                "the method prunes from init_r down to r."
            )
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        check_float(self, "prune_start", low=0.0, high=1.0)
        check_float(self, "prune_end", low=0.0, high=1.0)
        if self.prune_end < self.prune_start:
            raise ConfigError(
                f"DynamicDoRA.prune_end ({self.prune_end}) must not precede prune_start "
                f"({self.prune_start}); both are fractions of the run."
            )
        check_int(self, "prune_interval")
        check_float(self, "beta", low=0.0, high=1.0, high_open=True)
        check_float(self, "eps", low=0.0, low_open=True)
        check_float(self, "dem_weight", low=0.0)
        check_optional_int(self, "total_step")

    @property
    def components(self) -> int:
        return self.init_r or math.ceil(1.5 * self.r)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return lowrank_reason(module, "DynamicDoRA")

    def build(self, module: nn.Module, path: str) -> DynamicDoRAAdapter:
        r = self.components
        return DynamicDoRAAdapter(module, r=r, scale=self.alpha / r, dropout=self.dropout)

    def controller(self, model: nn.Module, name: str, total_steps: int | None) -> Controller:
        total = self.total_step or needs_total_steps("DynamicDoRA", total_steps, "total_step")
        return DynamicDoRAController(self, model, name, total)


class DynamicDoRAAdapter(ComponentAdapter):
    """r' rank-one components c_i B_i A_i; ``keep`` (persistent) marks the unpruned."""

    def __init__(self, base: nn.Module, *, r: int, scale: float, dropout: float) -> None:
        super().__init__(base, r=r, scale=scale, dropout=dropout)
        self.c = self.new_parameter(r)
        self.new_buffer("keep", torch.ones(r, dtype=torch.bool))
        with torch.no_grad():  # the authors' init: both factors Kaiming-uniform, c = 0
            nn.init.kaiming_uniform_(self.A)
            nn.init.kaiming_uniform_(self.B)

    def on_attach(self, base: nn.Module) -> None:
        self.reg_scale = self.config.dem_weight / (2 * self.r)  # the controller averages

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A * per_component(self.c, self.A), self.B

    def component_scores(self, eps: float) -> torch.Tensor:
        """||c_i B_i A_i||_F / (||sum_j c_j B_j A_j||_F + eps) for every component."""
        a, b, c = self.A.flatten(1).float(), self.B.flatten(1).float(), self.c.float()
        gram_a, gram_b = a @ a.T, b.T @ b
        parts = c.abs() * gram_a.diagonal().sqrt() * gram_b.diagonal().sqrt()
        total = (c @ (gram_a * gram_b) @ c).clamp_min(0).sqrt()
        return parts / (total + eps)

    def aux_loss(self) -> torch.Tensor | None:
        """Dimensional Equilibrium Modulator: variance of every A_i and B_i."""
        if self.reg_scale == 0:
            return None
        spread = self.A.flatten(1).var(dim=1).sum() + self.B.flatten(1).var(dim=0).sum()
        return self.reg_scale * spread

    def apply_mask(self) -> None:
        with torch.no_grad():
            self.c.masked_fill_(~self.keep, 0.0)


class DynamicDoRAController(Controller):
    """Importance EMA, cubic pruning schedule, DEM on/off (see DynamicDoRA)."""

    def __init__(self, cfg: DynamicDoRA, model: nn.Module, name: str, total: int) -> None:
        super().__init__(name)
        self.cfg = cfg
        self.start = int(total * cfg.prune_start)
        self.length = int(total * (cfg.prune_end - cfg.prune_start))
        adapters = self.adapters(model)
        if not adapters:
            raise ConfigError(f"adapter {name!r} has no modules to control.")
        self.n_components = sum(a.r for a in adapters.values())
        self.reg_scale = cfg.dem_weight / (2 * self.n_components)
        self.scores: dict[str, torch.Tensor] = {}
        self.pruned = 0
        for adapter in adapters.values():
            adapter.reg_scale = self.reg_scale

    def prune_count(self, t: int) -> int:
        """k(t) = int(N (r' - r) / r' (t / T)^3), t steps into the pruning window of T."""
        cfg = self.cfg
        share = (cfg.components - cfg.r) / cfg.components
        progress = 1.0 if self.length <= 0 else min(1.0, t / self.length)
        return int(self.n_components * share * progress**3)

    def after_step(self, model: nn.Module, step: int) -> None:
        adapters = self.adapters(model)
        t = step - self.start
        with torch.no_grad():
            if t > self.length:  # pruning finished: final pattern, no DEM
                for adapter in adapters.values():
                    adapter.reg_scale = 0.0
                    adapter.apply_mask()
                return
            for path, adapter in adapters.items():
                s = adapter.component_scores(self.cfg.eps)
                old = self.scores.get(path, torch.zeros_like(s))
                self.scores[path] = self.cfg.beta * old + (1 - self.cfg.beta) * s
            if t >= 0 and (t % self.cfg.prune_interval == 0 or t == self.length):
                self.prune(adapters, self.prune_count(t))
            for adapter in adapters.values():
                adapter.apply_mask()

    def prune(self, adapters: dict[str, DynamicDoRAAdapter], k: int) -> None:
        """Keep all but the ``k`` components of lowest score (ties: model order)."""
        self.pruned = k
        scores = torch.cat([self.scores[p] for p in adapters])
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep[torch.argsort(scores, stable=True)[:k]] = False
        for adapter, kept in zip(adapters.values(), keep.split([a.r for a in adapters.values()])):
            adapter.keep.copy_(kept)

    def metrics(self, model: nn.Module) -> dict[str, float]:
        kept = sum(int(a.keep.sum()) for a in self.adapters(model).values())
        return {"rank_total": float(kept), "rank_budget": float(self.n_components - self.pruned)}

    def state_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores), "pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = dict(state.get("scores", {}))
        self.pruned = int(state.get("pruned", 0))


# ==========================================================================================
# TriAdaptLoRA
# ==========================================================================================

GROWTH = ("linear", "exponential")


@register("triadaptlora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class TriAdaptLoRA(AdapterConfig):
    """TriAdaptLoRA (Liang, Wang and Zeng, 2025, "TriAdaptLoRA: Brain-Inspired Triangular
    Adaptive Low-Rank Adaptation for Parameter-Efficient Fine-Tuning").

    h = W0 x + (alpha / r_m) B C A x, r_m the module's current rank. Triangular split: the
    r_m x r_m transformation matrix is C = L + U with L block-lower and U block-upper
    triangular (diagonal blocks in both), blocks being the initial ``init_r`` and each
    later growth of ``add_rank``; growing a module appends add_rank rows to L (over all
    columns so far) and add_rank columns to U, so existing parameters keep their place.
    Live parameters: r_m (k + d) + 2 sum_b k_b s_b (k_b the size of block b, s_b the rank
    once it is added). Importance (normalised Frobenius norm): n_m = ||C||_F / (number of
    blocks); a module's score is n_m minus its value at the previous allocation. Every
    ``incre_interval`` steps after ``init_warmup``, with p = (t - init_warmup) /
    (total_step - init_warmup) and R the rank still to allocate, the number of modules to
    grow is m = int(R p) ("linear") or int(R ** p) ("exponential"), at least 1; modules
    whose score reaches the m-th largest grow by ``add_rank`` while the budget
    ``r * modules`` allows. Orthogonality regulariser on A and B as in AdaLoRA.

    Taken from the authors' PEFT-style code (the paper text was not available here); our
    departures: B starts N(0, 0.02^2) like A (their B = C = 0 start leaves every gradient
    zero), new components get fresh N(0, 0.02^2) rows of A and columns of B with their
    rows/columns of C at zero, so growth adds nothing at first; growth never exceeds the
    budget; ``max_rank`` components are preallocated (see the module docstring).

    Args:
        r: reference (average target) rank; budget = r * modules or target_total_rank.
        init_r: starting rank of every module.
        add_rank: rank a growing module gains; None: r // 2 (authors' default).
        max_rank: components preallocated per module; None: about 4 r (whole blocks).
        alpha, dropout: as in LoRA.
        init_warmup, incre_interval: steps before / between allocations.
        growth: "linear" or "exponential" threshold schedule.
        orth_reg_weight: orthogonality regulariser weight (``core.aux_loss``).
        total_step: the run's optimizer steps; None takes it from the trainer.
        target_total_rank: total budget over all modules.
    """

    r: int = 8
    init_r: int = 1
    add_rank: int | None = None
    max_rank: int | None = None
    alpha: float = 8.0
    dropout: float = 0.0
    init_warmup: int = 0
    incre_interval: int = 1
    growth: str = "linear"
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    target_total_rank: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("r", "init_r", "incre_interval"):
            check_int(self, name)
        check_optional_int(self, "add_rank")
        check_optional_int(self, "max_rank")
        check_optional_int(self, "total_step")
        check_optional_int(self, "target_total_rank")
        check_int(self, "init_warmup", minimum=0)
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        check_float(self, "orth_reg_weight", low=0.0)
        check_choice(self, "growth", GROWTH)
        extra = self.capacity - self.init_r
        if extra < self.step_rank or extra % self.step_rank:
            raise ConfigError(
                f"TriAdaptLoRA.max_rank ({self.capacity}) must be init_r ({self.init_r}) plus "
                f"a positive multiple of add_rank ({self.step_rank}): the triangular blocks "
                "have that size."
            )
        if self.total_step is not None and self.total_step <= self.init_warmup:
            raise ConfigError("TriAdaptLoRA.total_step must exceed init_warmup.")

    @property
    def step_rank(self) -> int:
        return self.add_rank or max(1, self.r // 2)

    @property
    def capacity(self) -> int:
        if self.max_rank is not None:
            return self.max_rank
        blocks = max(1, math.ceil((4 * self.r - self.init_r) / self.step_rank))
        return self.init_r + blocks * self.step_rank

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return lowrank_reason(module, "TriAdaptLoRA")

    def build(self, module: nn.Module, path: str) -> TriAdaptLoRAAdapter:
        return TriAdaptLoRAAdapter(
            module, capacity=self.capacity, init_r=self.init_r, block=self.step_rank,
            alpha=self.alpha, dropout=self.dropout,
        )  # fmt: skip

    def controller(self, model: nn.Module, name: str, total_steps: int | None) -> Controller:
        total = self.total_step or needs_total_steps("TriAdaptLoRA", total_steps, "total_step")
        return TriAdaptLoRAController(self, model, name, total)


def block_ids(capacity: int, init_r: int, block: int) -> torch.Tensor:
    """Which growth block each component belongs to (0: the initial ``init_r``)."""
    index = torch.arange(capacity)
    return torch.where(index < init_r, 0, 1 + (index - init_r) // block)


class TriAdaptLoRAAdapter(ComponentAdapter):
    """A (cap x k), B (d x cap), the triangular halves L, U (cap x cap) and the current
    ``rank`` (persistent); components past the rank are not live."""

    def __init__(
        self, base: nn.Module, *, capacity: int, init_r: int, block: int, alpha: float,
        dropout: float,
    ) -> None:  # fmt: skip
        super().__init__(base, r=capacity, scale=alpha, dropout=dropout)
        self.alpha, self.init_r, self.block = alpha, init_r, block
        self.L = self.new_parameter(capacity, capacity)
        self.U = self.new_parameter(capacity, capacity)
        ids = block_ids(capacity, init_r, block).to(self.A.device)
        # Structure, derived from the config: not saved.
        self.register_buffer("lower", ids[None, :] <= ids[:, None], persistent=False)
        self.register_buffer("upper", ids[:, None] <= ids[None, :], persistent=False)
        self.new_buffer("rank", torch.tensor(init_r))
        with torch.no_grad():
            normal_(self.A)
            normal_(self.B)

    def active_rank(self) -> int:
        return buffer_int(self, "rank", self.r)

    def blocks(self, rank: int | None = None) -> int:
        rank = self.active_rank() if rank is None else rank
        return 1 + (rank - self.init_r) // self.block

    def update_scale(self) -> float:
        return self.alpha / self.active_rank()

    def transform(self) -> torch.Tensor:
        """C = L + U over the live components (each half masked to its triangle)."""
        n = self.active_rank()
        return self.L[:n, :n] * self.lower[:n, :n] + self.U[:n, :n] * self.upper[:n, :n]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.active_rank()
        a = self.A[:n]
        mixed = (self.transform() @ a.flatten(1)).view(a.shape)
        return mixed, self.B[:, :n]

    def normalized_norm(self) -> float:
        with torch.no_grad():
            return float(torch.linalg.matrix_norm(self.transform().float())) / self.blocks()

    def active_parameter_count(self) -> int:
        """r (k + d) + 2 sum_b k_b s_b: the live factor rows/columns and triangle entries."""
        n = self.active_rank()
        per_rank = self.A[0].numel() + self.B[:, 0].numel()
        sizes = [self.init_r] + [self.block] * (self.blocks(n) - 1)
        ends = torch.tensor(sizes).cumsum(0).tolist()
        return n * per_rank + 2 * sum(k * s for k, s in zip(sizes, ends, strict=True))

    def aux_loss(self) -> torch.Tensor | None:
        if self.reg_scale == 0:
            return None
        n = self.active_rank()
        return self.reg_scale * orthogonality(self.A[:n], self.B[:, :n])

    def on_attach(self, base: nn.Module) -> None:
        self.reg_scale = self.config.orth_reg_weight / 2  # the controller averages


class TriAdaptLoRAController(Controller):
    """Threshold-scheduled rank growth by normalised Frobenius norms (see TriAdaptLoRA)."""

    def __init__(self, cfg: TriAdaptLoRA, model: nn.Module, name: str, total: int) -> None:
        super().__init__(name)
        if total <= cfg.init_warmup:
            raise ConfigError(
                f"TriAdaptLoRA needs more steps ({total}) than init_warmup ({cfg.init_warmup})."
            )
        self.cfg, self.total = cfg, total
        adapters = self.adapters(model)
        if not adapters:
            raise ConfigError(f"adapter {name!r} has no modules to control.")
        self.target = cfg.target_total_rank or cfg.r * len(adapters)
        self.previous = {p: a.normalized_norm() for p, a in adapters.items()}
        for adapter in adapters.values():
            adapter.reg_scale = cfg.orth_reg_weight / (2 * len(adapters))

    def total_rank(self, adapters: dict[str, TriAdaptLoRAAdapter]) -> int:
        return sum(a.active_rank() for a in adapters.values())

    def growth_count(self, step: int, remaining: int, modules: int) -> int:
        progress = min(1.0, (step - self.cfg.init_warmup) / (self.total - self.cfg.init_warmup))
        if self.cfg.growth == "linear":
            count = int(remaining * progress)
        else:
            count = int(math.exp(progress * math.log(remaining)))
        return min(max(count, 1), modules)

    def after_step(self, model: nn.Module, step: int) -> None:
        cfg = self.cfg
        if step <= cfg.init_warmup or step % cfg.incre_interval:
            return
        adapters = self.adapters(model)
        remaining = self.target - self.total_rank(adapters)
        if remaining <= 0:
            return
        with torch.no_grad():
            self.grow(adapters, step, remaining)

    def grow(self, adapters: dict[str, TriAdaptLoRAAdapter], step: int, remaining: int) -> None:
        scores = {}
        for path, adapter in adapters.items():
            norm = adapter.normalized_norm()
            scores[path] = norm - self.previous.get(path, 0.0)
            self.previous[path] = norm
        m = self.growth_count(step, remaining, len(adapters))
        threshold = sorted(scores.values(), reverse=True)[m - 1]
        chosen = sorted((p for p in adapters if scores[p] >= threshold), key=lambda p: -scores[p])
        for path in chosen:
            adapter = adapters[path]
            k = adapter.block
            if k > remaining or adapter.active_rank() + k > adapter.r:
                continue
            self.add_block(adapter)
            remaining -= k

    def add_block(self, adapter: TriAdaptLoRAAdapter) -> None:
        """Append a block: fresh A rows, B columns; its rows of L and columns of U at 0."""
        lo = adapter.active_rank()
        hi = lo + adapter.block
        normal_(adapter.A[lo:hi])
        normal_(adapter.B[:, lo:hi])
        adapter.L[lo:hi] = 0.0
        adapter.U[:, lo:hi] = 0.0
        adapter.rank.fill_(hi)

    def metrics(self, model: nn.Module) -> dict[str, float]:
        return {
            "rank_total": float(self.total_rank(self.adapters(model))),
            "rank_budget": self.target,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"previous": dict(self.previous)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous.update(state.get("previous", {}))


# ==========================================================================================
# DiffoRA
# ==========================================================================================

GROUPS = ("layer", "all")


@register("diffora", mergeable=True)
@dataclass(frozen=True, kw_only=True)
class DiffoRA(AdapterConfig):
    """DiffoRA (Jiang, Wang and Yuan, 2025, "DiffoRA: Enabling Parameter-Efficient
    Fine-Tuning via Differential Module Selection").

    A Differential Adaptation Matrix gamma (one logit per targeted module, i.e. one entry
    per layer x module of the paper's matrix) decides which modules are fine-tuned.
    Continuous relaxation: for the first ``search_steps`` (default ``search_ratio`` of the
    run) every module computes h = W0 x + sigmoid(gamma_m) (alpha / r) B A x (the softmax
    over {LoRA, no LoRA}) and gamma trains with the adapters. Discretisation: then, in each
    layer (``group="layer"``; or over all modules, "all"), the ``keep_ratio`` of modules
    with the largest gamma keep their LoRA and the others are switched off (no compute, no
    gradient). Weight sharing: the kept modules continue from the weights learned during
    the search, with sigmoid(gamma) folded into B so their output is unchanged at the
    switch. The selection is the persistent buffer ``selected``. Starts as the identity
    (B = 0).

    The paper text was not available here, only its abstract: the DAM is trained jointly
    with the adapters on the training batches (a first-order, single-level version of the
    bi-level search), layers are found as the dotted prefix up to the first number in a
    module's name, and at least one module per group is kept.

    Args:
        r, alpha, dropout: the LoRA of every candidate module.
        keep_ratio: fraction of each group's modules that keep their adapter.
        group: "layer" (select within each layer) or "all".
        search_ratio: search phase as a fraction of the run (when search_steps is None).
        search_steps: search phase length in optimizer steps.
        gate_init: initial logit gamma (0: gate 0.5).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    keep_ratio: float = 0.5
    group: str = "layer"
    search_ratio: float = 0.1
    search_steps: int | None = None
    gate_init: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self, "r")
        check_float(self, "alpha", low=0.0, low_open=True)
        check_float(self, "dropout", low=0.0, high=1.0, high_open=True)
        check_float(self, "keep_ratio", low=0.0, high=1.0, low_open=True)
        check_choice(self, "group", GROUPS)
        check_float(self, "search_ratio", low=0.0, high=1.0, low_open=True, high_open=True)
        check_optional_int(self, "search_steps")
        check_float(self, "gate_init")

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return lowrank_reason(module, "DiffoRA")

    def build(self, module: nn.Module, path: str) -> DiffoRAAdapter:
        return DiffoRAAdapter(
            module, r=self.r, scale=self.alpha / self.r, dropout=self.dropout,
            gate_init=self.gate_init,
        )  # fmt: skip

    def controller(self, model: nn.Module, name: str, total_steps: int | None) -> Controller:
        steps = self.search_steps
        if steps is None:
            total = needs_total_steps("DiffoRA", total_steps, "search_steps")
            steps = max(1, round(self.search_ratio * total))
        return DiffoRAController(self, name, steps)


class DiffoRAAdapter(ComponentAdapter):
    """LoRA gated by sigmoid(``gate``) while searching, by ``selected`` once ``fixed``."""

    def __init__(self, base: nn.Module, *, r: int, scale: float, dropout: float, gate_init: float):
        super().__init__(base, r=r, scale=scale, dropout=dropout)
        self.gate = nn.Parameter(
            torch.full((), gate_init, device=self.A.device, dtype=self.A.dtype)
        )
        self.new_buffer("fixed", torch.tensor(False))
        self.new_buffer("selected", torch.tensor(True))

    def is_fixed(self) -> bool:
        return bool(buffer_int(self, "fixed", 0))

    def idle(self) -> bool:
        return self.is_fixed() and not buffer_int(self, "selected", 1)

    def gate_value(self) -> torch.Tensor:
        if self.is_fixed():
            return self.selected.to(self.B.dtype)
        return torch.sigmoid(self.gate)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B * self.gate_value()

    def set_trainable(self, on: bool) -> None:
        super().set_trainable(on)
        if self.is_fixed():
            self.gate.requires_grad_(False)
            if not buffer_int(self, "selected", 1):
                self.requires_grad_(False)

    def discretize(self, keep: bool) -> None:
        """Fix the selection; a kept module folds its gate into B (same output)."""
        with torch.no_grad():
            if keep:
                self.B.mul_(torch.sigmoid(self.gate))
            self.selected.fill_(keep)
            self.fixed.fill_(True)
        self.set_trainable(self.A.requires_grad or self.B.requires_grad)


def layer_of(path: str) -> str:
    """The dotted prefix up to the first numeric part ("model.layers.3.mlp.up" ->
    "model.layers.3"); modules without a number share one group."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""


class DiffoRAController(Controller):
    """Discretises the DAM at the end of the search phase (see DiffoRA)."""

    def __init__(self, cfg: DiffoRA, name: str, search_steps: int) -> None:
        super().__init__(name)
        self.cfg, self.search_steps = cfg, search_steps

    def after_step(self, model: nn.Module, step: int) -> None:
        adapters = self.adapters(model)
        if step < self.search_steps or all(a.is_fixed() for a in adapters.values()):
            return
        for path, keep in self.selection(adapters).items():
            adapters[path].discretize(keep)

    def selection(self, adapters: dict[str, DiffoRAAdapter]) -> dict[str, bool]:
        """Top ``keep_ratio`` of each group by gamma (ties: module order)."""
        groups: dict[str, list[str]] = {}
        for path in adapters:
            groups.setdefault(layer_of(path) if self.cfg.group == "layer" else "", []).append(path)
        chosen: dict[str, bool] = {}
        for paths in groups.values():
            gates = torch.stack([adapters[p].gate.detach().float().cpu() for p in paths])
            keep = max(1, round(self.cfg.keep_ratio * len(paths)))
            top = set(torch.argsort(gates, descending=True, stable=True)[:keep].tolist())
            chosen.update({p: i in top for i, p in enumerate(paths)})
        return chosen

    def metrics(self, model: nn.Module) -> dict[str, float]:
        adapters = self.adapters(model).values()
        return {"modules_selected": float(sum(not a.idle() for a in adapters))}


__all__ = [
    "AdaLoRA",
    "AdaLoRAAdapter",
    "AdaLoRAController",
    "DiffoRA",
    "DiffoRAAdapter",
    "DiffoRAController",
    "DynamicDoRA",
    "DynamicDoRAAdapter",
    "DynamicDoRAController",
    "IncreLoRA",
    "IncreLoRAAdapter",
    "IncreLoRAController",
    "TriAdaptLoRA",
    "TriAdaptLoRAAdapter",
    "TriAdaptLoRAController",
]
