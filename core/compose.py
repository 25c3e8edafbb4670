"""Adapter arithmetic, merging, compression and run-time composition.

Weight-space operations take named LoRA or (IA)^3 adapters of a model (or saved adapter
folders, from the command line) and make a new adapter. A module's *update* is what its
adapter adds to the frozen layer: Delta W = s B A for LoRA (s = alpha / r), and l - 1 for
(IA)^3, whose identity is l = 1 (y = l * W x, so the update (l - 1) * W x is linear in l).

* Arithmetic (Zhang et al., 2023, "Composing Parameter-Efficient Modules with Arithmetic
  Operations", Sec. 3): addition theta = sum_i w_i theta_i and negation. LoRA negation is
  (A, -B), which negates the product B A (negating both factors would leave it unchanged);
  (IA)^3 negation is 2 - l, the deviation from one negated. ``add`` works in update space
  by default: LoRA factors are concatenated, A = [A_1; A_2], B = [w_1 s_1 B_1, w_2 s_2 B_2],
  so the new update is exactly sum_i w_i s_i B_i A_i (rank sum_i r_i). ``space="parameters"``
  is the paper's element-wise form A = sum_i w_i A_i, B = sum_i w_i B_i (equal ranks), whose
  product is not the sum of the updates. (IA)^3: l = 1 + sum_i w_i (l_i - 1) in both spaces.
* Language and task arithmetic (Chronopoulou et al., 2024, "Language and Task Arithmetic
  with Parameter-Efficient Layers for Zero-Shot Summarization"): a task module trained in a
  source language composed with language modules,
  theta = w_t theta_task + w_l (theta_lang(target) - theta_lang(source)).
* Extraction-before-subtraction (Hu et al., 2024, "Separate the Wheat from the Chaff: Model
  Deficiency Unlearning via Parameter-Efficient Module Operation", Ext-Sub): subtract from an
  expert only the part of an anti-expert (trained on the deficient data) that the two do not
  share. Per row i of the updates (w+ expert, w- anti-expert), with n = w / ||w||:
  c = (n+ + n-) / ||n+ + n-||,  w = w+ - lambda (w- - (w- . c) c).
  For LoRA every row of the result is a combination of the two adapters' rows, so it is the
  exact LoRA of rank r+ + r-: A = [A+; A-], B = [diag(u) s+ B+, diag(v) s- B-].
* Merging several adapters into one, HF PEFT's ``add_weighted_adapter`` combination types:
  "linear", "ties" (Yadav et al., 2023, "TIES-Merging": trim to the top-density magnitudes,
  elect a sign per entry, average the agreeing entries), "dare_linear" / "dare_ties" (Yu et
  al., 2024, "Language Models are Super Mario": drop entries with probability 1 - density,
  rescale by 1 / density), "magnitude_prune", "cat" (concatenation: exact, rank sum) and
  "svd" plus the pruned "*_svd" variants, which re-compress the merged update
  sum_i w_i s_i B_i A_i to a target rank by truncated SVD. As in PEFT, "linear", "ties",
  "dare_*" and "magnitude_prune" combine the LoRA factors, A with sign(w s) sqrt(|w s|) and B
  with sqrt(|w s|) (an approximation of the summed update); their result equals PEFT's for
  the same adapters and the same random draws. (IA)^3 merges combine l - 1 (PEFT's only
  combination, sum_i w_i l_i, agrees when the weights sum to one).
* ComPEFT (Yadav et al., 2023, "ComPEFT: Compression for Communicating Parameter Efficient
  Updates via Sparsification and Quantization"): each tensor's task vector tau (the tensor
  minus its identity value: 0 for LoRA factors, 1 for (IA)^3 scales) keeps its top-k
  entries by magnitude (k = density * numel) as signs times one scale per tensor,
  tau~ = alpha * sign(tau) * mask. ``compress(path, density=...)`` writes a checkpoint that
  stores positions (a bitmask or int32 indices, whichever is smaller), packed sign bits and
  the scale; ``core.load_adapter`` decodes it and loads it as a normal adapter.

Run-time composition (AdapterHub's blocks: Pfeiffer et al., 2020, "AdapterHub: A Framework
for Adapting Transformers"), nestable, for weight-space and activation-space adapters:
``Stack`` (one after another), ``Parallel`` (the batch is replicated, one copy per child:
outputs per adapter), ``Average`` (weighted output averaging), ``Fuse`` (AdapterFusion,
Pfeiffer et al., 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning": trainable attention over the adapters' outputs), ``Split`` (different adapters
for parts of the sequence) and ``BatchSplit`` (for parts of the batch)::

    with core.compose.composed(model, Stack("lang_de", Average("task_a", "task_b"))):
        out = model(x)

Each adapted module applies the composition to the adapters it holds (AdapterHub's
per-location semantics); a module computing one part of the batch runs that part's child in
the modules nested inside it too. Where the mathematics does not allow a combination the
activation raises (a Parallel / Split / BatchSplit inside Average or Fuse; Parallel below
the top) and so does the forward (an input-transforming adapter such as OFT asked to act on
the output of adapters stacked before it; parts whose outputs differ in shape).
Command line, on saved adapter folders, printing sizes before and after::

    python -m core.compose add OUT a:1 b:-0.5
    python -m core.compose merge OUT a:0.5 b:0.5 --method ties --density 0.5
    python -m core.compose compress IN --density 0.2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import sys
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import (
    ENCODED_FORMAT_VERSION,
    FORMAT_VERSION,
    TENSOR_DECODERS,
    TENSORS,
    install,
    module_fingerprint,
    read_checkpoint,
    write_folder,
)
from .config import AdapterConfig, check_float
from .errors import CheckpointError, ConfigError, MergeError, OmniPeftError
from .inject import adapter_config, adapter_names, check_adapter_name, inject
from .layers import AdaptedModule, Adapter, PrimaryCall, is_fan_in_fan_out
from .methods.bottleneck import block_sizes
from .methods.lora import LoRA
from .methods.scaling import IA3, IA3Adapter
from .peft_format import exact_names_regex
from .registry import config_from_dict, register
from .targeting import adapted_modules, base_of, find_targets, walk

# ``python -m core.compose``: runpy imports the package first, and core/__init__ already
# imports this module, so runpy warns that it found it loaded. Running that loaded copy is
# exactly right (executing this file a second time would register its method twice), so
# that one message is silenced and the loaded copy's command line runs.
warnings.filterwarnings(
    "ignore", message=r"'core\.compose' found in sys\.modules", category=RuntimeWarning
)
if __name__ == "__main__":
    from core.compose import main as _loaded_main

    raise SystemExit(_loaded_main())

WEIGHT_SPACE_METHODS = ("lora", "ia3")

# =========================================================================================
# An adapter as tensors
# =========================================================================================


@dataclass
class AdapterState:
    """One adapter as plain tensors, the unit every weight-space operation reads and makes.

    Args:
        config: the adapter's method config.
        modules: per adapted module, its tensors as in ``adapter.safetensors``
            (``{"blocks.0.attn.qkv": {"A": ..., "B": ...}}``).
        fingerprint: per adapted module, its type and weight shape (checked on install).
        saved: ``modules_to_save`` tensors, flat (``{"head.weight": ...}``).
        saved_modules: the names of those modules.
    """

    config: AdapterConfig
    modules: dict[str, dict[str, torch.Tensor]]
    fingerprint: dict[str, dict[str, Any]]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    saved_modules: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.config.method

    def num_params(self) -> int:
        own = sum(t.numel() for tensors in self.modules.values() for t in tensors.values())
        return own + sum(t.numel() for t in self.saved.values())

    def flat(self) -> dict[str, torch.Tensor]:
        """Tensors keyed ``<module>.<tensor>``, as a checkpoint stores them."""
        out = {f"{p}.{k}": t for p, tensors in self.modules.items() for k, t in tensors.items()}
        out.update(self.saved)
        return out

    @classmethod
    def from_model(cls, model: nn.Module, name: str) -> AdapterState:
        """The tensors of adapter ``name`` in ``model`` (detached, not copied)."""
        if name not in adapter_names(model):
            raise KeyError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
        cfg = adapter_config(model, name)
        modules, fingerprint = {}, {}
        for path, wrapper in adapted_modules(model):
            if name in wrapper.adapters:
                state = wrapper.adapters[name].state_dict()
                modules[path] = {k: v.detach() for k, v in state.items()}
                fingerprint[path] = module_fingerprint(wrapper)
        saved_modules = find_targets(model, cfg.modules_to_save) if cfg.modules_to_save else []
        saved = {
            f"{path}.{k}": v.detach()
            for path, module in saved_modules
            for k, v in module.state_dict().items()
        }
        return cls(cfg, modules, fingerprint, saved, [p for p, _ in saved_modules])

    @classmethod
    def load(cls, path: str | Path) -> AdapterState:
        """Read a checkpoint folder (plain, or compressed by ``compress``)."""
        meta, tensors = read_checkpoint(path)
        cfg = config_from_dict(meta.get("method"), meta.get("config", {}))
        fingerprint = meta["fingerprint"].get("modules", {})
        saved_modules = list(meta["fingerprint"].get("modules_to_save", []))
        owners = sorted(fingerprint, key=len, reverse=True)  # longest prefix wins
        modules: dict[str, dict[str, torch.Tensor]] = {p: {} for p in fingerprint}
        saved = {}
        for key, value in tensors.items():
            owner = next((p for p in owners if key.startswith(p + ".")), None)
            if owner is None:
                saved[key] = value
            else:
                modules[owner][key[len(owner) + 1 :]] = value
        return cls(cfg, modules, fingerprint, saved, saved_modules)

    def save(self, path: str | Path) -> Path:
        """Write this adapter as a checkpoint folder that ``core.load_adapter`` reads."""
        return write_checkpoint(path, self, self.flat(), FORMAT_VERSION, encoding=None)

    def install(self, model: nn.Module, name: str) -> nn.Module:
        """Put this adapter into ``model`` as a new adapter ``name`` (frozen) that runs."""
        _check_new_name(model, name)
        present = dict(walk(model))
        bases, problems = {}, []
        for path, want in self.fingerprint.items():
            if path not in present:
                problems.append(f"{path}: not in this model")
            elif (have := module_fingerprint(present[path])) != want:
                problems.append(f"{path}: adapter made for {want}, model has {have}")
            else:
                bases[path] = base_of(present[path])
        if problems:
            raise CheckpointError(
                "the adapter does not fit this model:\n  " + "\n  ".join(problems[:8])
            )
        flat = self.flat()
        return install(model, name, self.config, bases, self.saved_modules, flat, trainable=False)


def write_checkpoint(
    path: str | Path,
    state: AdapterState,
    tensors: dict[str, torch.Tensor],
    version: int,
    *,
    encoding: dict[str, Any] | None,
) -> Path:
    """Write ``tensors`` with ``state``'s metadata in ``core.save_adapter``'s format."""
    return write_folder(
        path,
        tensors,
        method=state.method,
        config=state.config.to_dict(),
        modules=state.fingerprint,
        modules_to_save=state.saved_modules,
        version=version,
        encoding=encoding,
    )


# --- what the weight-space operations accept ---------------------------------------------


def common_method(states: Sequence[AdapterState], operation: str) -> str:
    """The one method all ``states`` share, checked to be one these operations know."""
    if not states:
        raise ConfigError(f"{operation} needs at least one adapter.")
    methods = sorted({s.method for s in states})
    if len(methods) > 1:
        raise ConfigError(
            f"{operation} combines adapters of one method, got {methods}; their parameters "
            "mean different things. Combine adapters of the same method."
        )
    method = methods[0]
    if method not in WEIGHT_SPACE_METHODS:
        raise ConfigError(
            f"{operation} is defined for {list(WEIGHT_SPACE_METHODS)} adapters (their updates "
            f"are s B A and l - 1), not {method!r}. For other methods compose them at run time "
            "with core.compose.Stack / Average instead."
        )
    for state in states:
        if state.saved:
            raise ConfigError(
                f"{operation}: an adapter trains modules_to_save {state.saved_modules} in full; "
                "whole modules (e.g. a new head) have no update to combine. Drop "
                "modules_to_save from the adapters, or keep one head and combine the rest."
            )
        if method == "lora" and state.config.init == "pissa":
            raise ConfigError(
                f"{operation}: a PiSSA adapter (init='pissa') moved part of the base weight "
                "into its factors, so its factors are not an update of the original weights; "
                "export it with core.interop.save_peft (plain LoRA of rank 2r) and load that."
            )
    return method


def union_fingerprint(states: Sequence[AdapterState]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for state in states:
        for path, fp in state.fingerprint.items():
            if out.setdefault(path, fp) != fp:
                raise ConfigError(
                    f"the adapters were made for different models: {path} is {out[path]} in "
                    f"one and {fp} in another."
                )
    return out


def lora_parts(state: AdapterState, path: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, scale) of a LoRA adapter at ``path``."""
    tensors = state.modules[path]
    return tensors["A"], tensors["B"], state.config.rank_and_scale(path)[1]


def unit_scale_lora(like: LoRA, ranks: dict[str, int]) -> LoRA:
    """A LoRA config with the given rank per module and scale 1 everywhere (alpha = r); the
    weights of a combination live in the factors."""
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(p): v for p, v in ranks.items() if v != r}
    return LoRA(
        targets=exact_names_regex(ranks),
        r=r,
        alpha=float(r),
        dropout=like.dropout,
        rank_pattern=pattern,
        alpha_pattern={k: float(v) for k, v in pattern.items()},
    )


def ia3_sides(states: Sequence[AdapterState], paths: Sequence[str]) -> dict[str, bool]:
    """Per module, whether (IA)^3 scales its input (True) or output; all states must agree."""
    sides: dict[str, bool] = {}
    for state in states:
        for path in paths:
            if path in state.modules:
                side = state.config.is_feedforward(path)
                if sides.setdefault(path, side) != side:
                    raise ConfigError(
                        f"{path}: one (IA)^3 adapter scales this layer's input and another its "
                        "output; their vectors act on different sides and cannot be combined. "
                        "Give the adapters the same feedforward_modules."
                    )
    return sides


def ia3_state(
    sides: dict[str, bool], scales: dict[str, torch.Tensor], fingerprint: dict
) -> AdapterState:
    inputs = [p for p, side in sides.items() if side]
    cfg = IA3(
        targets=exact_names_regex(sides),
        feedforward_modules=exact_names_regex(inputs) if inputs else None,
    )
    modules = {p: {"scale": scales[p]} for p in sides}
    return AdapterState(cfg, modules, {p: fingerprint[p] for p in sides})


def module_paths(states: Sequence[AdapterState]) -> list[str]:
    """Every adapted module of any state, in first-seen order."""
    return list(dict.fromkeys(p for s in states for p in s.modules))


def check_weights(weights: Sequence[float], count: int, operation: str) -> list[float]:
    weights = list(weights)
    if len(weights) != count:
        raise ConfigError(f"{operation}: {count} adapters but {len(weights)} weights.")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ConfigError(f"{operation}: weights must be finite numbers, got {w!r}.")
    return [float(w) for w in weights]


# =========================================================================================
# Arithmetic (Zhang et al., 2023) and its recipes
# =========================================================================================

SPACES = ("update", "parameters")


def add_states(
    states: Sequence[AdapterState], weights: Sequence[float], space: str = "update"
) -> AdapterState:
    """The weighted sum of adapters (see the module docstring for both ``space`` forms)."""
    method = common_method(states, "add")
    weights = check_weights(weights, len(states), "add")
    if space not in SPACES:
        raise ConfigError(f"add: space must be one of {SPACES}, got {space!r}.")
    paths = module_paths(states)
    fingerprint = union_fingerprint(states)
    if method == "ia3":
        return add_ia3(states, weights, paths, fingerprint)
    if space == "update":
        return concat_lora(states, weights, paths, fingerprint)
    return elementwise_lora(states, weights, paths, fingerprint)


def add_ia3(states, weights, paths, fingerprint) -> AdapterState:
    sides = ia3_sides(states, paths)
    scales = {}
    for path in paths:
        present = [
            (s.modules[path]["scale"], w) for s, w in zip(states, weights) if path in s.modules
        ]
        tau = sum(w * (scale - 1) for scale, w in present)
        scales[path] = 1 + tau
    return ia3_state(sides, scales, fingerprint)


def concat_lora(states, weights, paths, fingerprint) -> AdapterState:
    """[A_1; A_2; ...] and [w_1 s_1 B_1, w_2 s_2 B_2, ...]: the update is the exact sum."""
    modules, ranks = {}, {}
    for path in paths:
        parts = [lora_parts(s, path) for s in states if path in s.modules]
        used = [w for s, w in zip(states, weights) if path in s.modules]
        a = torch.cat([a for a, _, _ in parts])
        b = torch.cat([w * scale * b for (_, b, scale), w in zip(parts, used)], dim=1)
        modules[path], ranks[path] = {"A": a, "B": b}, a.shape[0]
    return AdapterState(unit_scale_lora(states[0].config, ranks), modules, fingerprint)


def elementwise_lora(states, weights, paths, fingerprint) -> AdapterState:
    """The paper's element-wise sum: A = sum w_i A_i, B = s sum w_i B_i (scale folded in)."""
    modules, ranks = {}, {}
    for path in paths:
        parts = [(lora_parts(s, path), w) for s, w in zip(states, weights) if path in s.modules]
        shapes = {(tuple(a.shape), tuple(b.shape)) for (a, b, _), _ in parts}
        scales = {scale for (_, _, scale), _ in parts}
        if len(shapes) > 1 or len(scales) > 1:
            raise ConfigError(
                f"add(space='parameters'): at {path} the LoRA adapters differ in rank or scale "
                f"(shapes {sorted(shapes)}, scales {sorted(scales)}); element-wise addition needs "
                "identical configs. Use space='update', which adds the updates exactly."
            )
        scale = scales.pop()
        a = sum(w * a for (a, _, _), w in parts)
        b = sum(w * scale * b for (_, b, _), w in parts)
        modules[path], ranks[path] = {"A": a, "B": b}, a.shape[0]
    return AdapterState(unit_scale_lora(states[0].config, ranks), modules, fingerprint)


def negate_state(state: AdapterState) -> AdapterState:
    """The paper's negation: LoRA (A, -B), (IA)^3 2 - l."""
    method = common_method([state], "negate")
    modules = {}
    for path, tensors in state.modules.items():
        if method == "lora":
            modules[path] = {"A": tensors["A"], "B": -tensors["B"]}
        else:
            modules[path] = {"scale": 2 - tensors["scale"]}
    return AdapterState(state.config, modules, dict(state.fingerprint))


def language_task_states(
    task: AdapterState,
    language: AdapterState,
    source_language: AdapterState | None = None,
    *,
    task_weight: float = 1.0,
    language_weight: float = 1.0,
    space: str = "update",
) -> AdapterState:
    """Chronopoulou et al.: w_t task + w_l (language - source_language)."""
    states, weights = [task, language], [task_weight, language_weight]
    if source_language is not None:
        states.append(source_language)
        weights.append(-language_weight)
    return add_states(states, weights, space)


def ext_sub_states(expert: AdapterState, anti: AdapterState, weight: float = 1.0) -> AdapterState:
    """Hu et al.'s Ext-Sub: w+ - lambda (w- - (w- . c) c) per row (see the module docstring)."""
    method = common_method([expert, anti], "ext_sub")
    (weight,) = check_weights([weight], 1, "ext_sub")
    paths = module_paths([expert, anti])
    fingerprint = union_fingerprint([expert, anti])
    if method == "ia3":
        sides = ia3_sides([expert, anti], paths)
        scales = {}
        for path in paths:
            tau = [ia3_task_vector(s, path) for s in (expert, anti)]
            ref = next(t for t in tau if t is not None)
            plus, minus = (torch.zeros_like(ref) if t is None else t for t in tau)
            u, v = ext_sub_coefficients(plus.reshape(1, -1), minus.reshape(1, -1), weight)
            scales[path] = 1 + u * plus + v * minus
        return ia3_state(sides, scales, fingerprint)
    modules, ranks = {}, {}
    for path in paths:
        modules[path] = ext_sub_lora(expert, anti, path, weight)
        ranks[path] = modules[path]["A"].shape[0]
    return AdapterState(unit_scale_lora(expert.config, ranks), modules, fingerprint)


def ia3_task_vector(state: AdapterState, path: str) -> torch.Tensor | None:
    return state.modules[path]["scale"] - 1 if path in state.modules else None


def ext_sub_coefficients(
    plus: torch.Tensor, minus: torch.Tensor, weight: float, gram: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row factors (u, v) with result = u * w+ + v * w- (u, v shaped (rows, 1)).

    ``plus`` / ``minus`` are the rows (or, with ``gram``, the LoRA row factors whose Gram
    matrices give the row norms and dot products without forming the dense update)."""
    if gram is None:
        nn_pp = (plus * plus).sum(-1)
        nn_mm = (minus * minus).sum(-1)
        pm = (plus * minus).sum(-1)
    else:
        g_pp, g_mm, g_pm = gram
        nn_pp = ((plus @ g_pp) * plus).sum(-1)
        nn_mm = ((minus @ g_mm) * minus).sum(-1)
        pm = ((plus @ g_pm) * minus).sum(-1)
    norm_p, norm_m = nn_pp.clamp_min(0).sqrt(), nn_mm.clamp_min(0).sqrt()
    has_p, has_m = norm_p > 0, norm_m > 0
    inv_p = torch.where(has_p, 1 / torch.where(has_p, norm_p, 1), 0)
    inv_m = torch.where(has_m, 1 / torch.where(has_m, norm_m, 1), 0)
    # c = (n+ + n-) / m with n = w / ||w|| (0 for a zero row); m = ||n+ + n-||.
    m2 = has_p.to(pm.dtype) + has_m.to(pm.dtype) + 2 * pm * inv_p * inv_m
    m = m2.clamp_min(0).sqrt()
    inv = torch.where(m > 0, 1 / torch.where(m > 0, m, 1), 0)
    along_c = (pm * inv_p + norm_m) * inv  # w- . c
    u = 1 + weight * along_c * inv * inv_p
    v = weight * (along_c * inv * inv_m - 1)
    return u.unsqueeze(-1), v.unsqueeze(-1)


def ext_sub_lora(expert: AdapterState, anti: AdapterState, path: str, weight: float) -> dict:
    """Ext-Sub at one LoRA module: rows of s B A, kept in factored form."""
    parts = [lora_parts(s, path) if path in s.modules else None for s in (expert, anti)]
    ref = next(p for p in parts if p is not None)
    filled = []
    for part in parts:
        if part is None:  # no update here: a zero rank-1 factor pair of the right shapes
            a, b, _ = ref
            part = (torch.zeros_like(a[:1]), torch.zeros_like(b[:, :1]), 1.0)
        filled.append(part)
    (a_p, b_p, s_p), (a_m, b_m, s_m) = filled
    flat_a_p, flat_a_m = a_p.flatten(1).float(), a_m.flatten(1).float()
    rows_p = (s_p * b_p.flatten(1)).float()
    rows_m = (s_m * b_m.flatten(1)).float()
    gram = (flat_a_p @ flat_a_p.T, flat_a_m @ flat_a_m.T, flat_a_p @ flat_a_m.T)
    u, v = ext_sub_coefficients(rows_p, rows_m, weight, gram)
    b_new = torch.cat([u * rows_p, v * rows_m], dim=1)
    b_new = b_new.reshape(b_p.shape[0], -1, *b_p.shape[2:]).to(b_p.dtype)
    return {"A": torch.cat([a_p, a_m]), "B": b_new}


# =========================================================================================
# Merging (HF PEFT's add_weighted_adapter combination types)
# =========================================================================================

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
MERGE_METHODS = (*FACTOR_METHODS, "cat", *SVD_METHODS)
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class MergeSpec:
    """How ``merge_states`` combines task tensors; checked on construction."""

    method: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    svd_rank: int | None = None
    svd_clamp: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS:
            raise ConfigError(f"merge method must be one of {MERGE_METHODS}, got {self.method!r}.")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ConfigError(
                f"majority_sign_method must be one of {SIGN_METHODS}, got "
                f"{self.majority_sign_method!r}."
            )
        if self.prunes:
            if self.density is None:
                raise ConfigError(
                    f"merge method {self.method!r} prunes: pass density= (the fraction of "
                    "entries kept, e.g. 0.5)."
                )
            check_float(self, "density", low=0.0, high=1.0, low_open=self.drops_randomly)
        if self.svd_rank is not None and (
            isinstance(self.svd_rank, bool)
            or not isinstance(self.svd_rank, int)
            or self.svd_rank < 1
        ):
            raise ConfigError(f"svd_rank must be an int >= 1, got {self.svd_rank!r}.")
        if self.svd_clamp is not None:
            check_float(self, "svd_clamp", low=0.0, high=1.0)

    @property
    def base(self) -> str:
        """The combination without the SVD step ("ties_svd" -> "ties", "svd" -> "linear")."""
        if self.method == "svd":
            return "linear"
        return self.method.removesuffix("_svd")

    @property
    def prunes(self) -> bool:
        return self.base in ("ties", "dare_linear", "dare_ties", "magnitude_prune")

    @property
    def drops_randomly(self) -> bool:
        return self.base.startswith("dare")


def keep_top_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the int(density * numel) entries of largest magnitude (TIES' trim)."""
    if density >= 1:
        return t
    flat = t.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(int(density * flat.numel())).indices] = 1
    return t * mask.view_as(t)


def keep_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1 / density."""
    if density >= 1:
        return t
    keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * keep / density


def combine(tensors: list[torch.Tensor], weights: list[float], spec: MergeSpec) -> torch.Tensor:
    """One combined task tensor by ``spec.base`` (weights applied after pruning; TIES elects
    signs on the unweighted pruned tensors, as PEFT does)."""
    method = spec.base
    if method in ("ties", "magnitude_prune"):
        tensors = [keep_top_magnitude(t, spec.density) for t in tensors]
    elif method.startswith("dare"):
        tensors = [keep_random(t, spec.density, spec.generator) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, device=stacked.device).reshape(-1, *[1] * (stacked.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return (stacked * w).sum(0)
    if spec.majority_sign_method == "total":
        elected = stacked.sum(0)
    else:
        elected = stacked.sign().sum(0)
    majority = torch.where(elected >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == majority
    summed = (stacked * w * agree).sum(0)
    return summed / agree.sum(0).clamp(min=1)


def merge_states(
    states: Sequence[AdapterState], weights: Sequence[float], spec: MergeSpec
) -> AdapterState:
    """PEFT's ``add_weighted_adapter`` on adapter tensors (see the module docstring)."""
    method = common_method(states, "merge_adapters")
    weights = check_weights(weights, len(states), "merge_adapters")
    paths = module_paths(states)
    fingerprint = union_fingerprint(states)
    if method == "ia3":
        if spec.method not in FACTOR_METHODS:
            raise ConfigError(
                f"merge method {spec.method!r} re-factorises low-rank updates; (IA)^3 vectors "
                f"merge with {FACTOR_METHODS}."
            )
        return merge_ia3(states, weights, paths, fingerprint, spec)
    if spec.method == "cat":
        return concat_lora(states, weights, paths, fingerprint)
    if spec.method in SVD_METHODS:
        return merge_lora_svd(states, weights, paths, fingerprint, spec)
    return merge_lora_factors(states, weights, paths, fingerprint, spec)


def merge_ia3(states, weights, paths, fingerprint, spec: MergeSpec) -> AdapterState:
    sides = ia3_sides(states, paths)
    scales = {}
    for path in paths:
        present = [
            (s.modules[path]["scale"], w) for s, w in zip(states, weights) if path in s.modules
        ]
        tau = combine([scale - 1 for scale, _ in present], [w for _, w in present], spec)
        scales[path] = 1 + tau
    return ia3_state(sides, scales, fingerprint)


def merge_lora_factors(states, weights, paths, fingerprint, spec: MergeSpec) -> AdapterState:
    """Combine A's and B's separately, with sign(w s) sqrt(|w s|) on A and sqrt(|w s|) on B."""
    modules, ranks = {}, {}
    for path in paths:
        parts = [(lora_parts(s, path), w) for s, w in zip(states, weights) if path in s.modules]
        if len({tuple(a.shape) for (a, _, _), _ in parts}) > 1:
            raise ConfigError(
                f"merge method {spec.method!r} combines LoRA factors entry by entry, so all "
                f"adapters need the same rank, but they differ at {path}. Use 'cat' or 'svd'."
            )
        root = [math.sqrt(abs(w * scale)) for (_, _, scale), w in parts]
        sign = [1.0 if w * scale >= 0 else -1.0 for (_, _, scale), w in parts]
        a = combine([a for (a, _, _), _ in parts], [r * s for r, s in zip(root, sign)], spec)
        b = combine([b for (_, b, _), _ in parts], root, spec)
        modules[path], ranks[path] = {"A": a, "B": b}, a.shape[0]
    return AdapterState(unit_scale_lora(states[0].config, ranks), modules, fingerprint)


def merge_lora_svd(states, weights, paths, fingerprint, spec: MergeSpec) -> AdapterState:
    """Combine the dense updates s B A, then keep the top ``svd_rank`` singular triplets:
    B = U_r S_r, A = V_r^T (default rank: the largest rank among the adapters)."""
    rank = spec.svd_rank or max(s.modules[p]["A"].shape[0] for s in states for p in s.modules)
    modules, ranks = {}, {}
    for path in paths:
        parts = [(lora_parts(s, path), w) for s, w in zip(states, weights) if path in s.modules]
        a0, b0, _ = parts[0][0]
        if spec.method == "svd" and spec.svd_clamp is None:
            u, vh = lowrank_svd(parts, rank)
        else:
            # Pruned in the base weight's own layout, as PEFT does (so that DARE's random
            # drops land on the same entries), then back to B A's layout for the SVD.
            flip = stored_transposed(fingerprint[path])
            deltas = [scale * (b.flatten(1) @ a.flatten(1)) for (a, b, scale), _ in parts]
            deltas = [d.T if flip else d for d in deltas]
            merged = combine(deltas, [w for _, w in parts], spec)
            u, s, vh = torch.linalg.svd(merged.T if flip else merged, full_matrices=False)
            u, vh = u[:, :rank] * s[:rank], vh[:rank]
        if spec.svd_clamp is not None:
            limit = torch.quantile(torch.cat([u.flatten(), vh.flatten()]), spec.svd_clamp)
            u, vh = u.clamp(-limit, limit), vh.clamp(-limit, limit)
        r = u.shape[1]
        a = vh.reshape(r, *a0.shape[1:]).to(a0.dtype)
        b = u.reshape(b0.shape[0], r, *b0.shape[2:]).to(b0.dtype)
        modules[path], ranks[path] = {"A": a, "B": b}, r
    return AdapterState(unit_scale_lora(states[0].config, ranks), modules, fingerprint)


def stored_transposed(fingerprint: dict[str, Any]) -> bool:
    """Whether the module stores its weight as the transpose of LoRA's B A (an embedding
    table (num, dim); transformers' Conv1D (in, out))."""
    return fingerprint.get("type") in ("Embedding", "Conv1D")


def lowrank_svd(parts: list, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of sum_i w_i s_i B_i A_i without forming it: with P = [w s B_i],
    Q = [A_i] (M = P Q), QR both sides and take the SVD of the small core."""
    p = torch.cat([w * scale * b.flatten(1) for (_, b, scale), w in parts], dim=1).float()
    q = torch.cat([a.flatten(1) for (a, _, _), _ in parts]).float()
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.T)
    u, s, vh = torch.linalg.svd(rp @ rq.T)
    rank = min(rank, s.numel())
    return (qp @ u[:, :rank]) * s[:rank], vh[:rank] @ qq.T


# =========================================================================================
# Model-level API of the weight-space operations
# =========================================================================================


def _states(model: nn.Module, names: Sequence[str]) -> list[AdapterState]:
    if isinstance(names, str):
        names = [names]
    return [AdapterState.from_model(model, n) for n in names]


def _check_new_name(model: nn.Module, name: str) -> None:
    check_adapter_name(name)
    if name in adapter_names(model):
        raise ConfigError(
            f"the model already has an adapter named {name!r}; pick another name for the "
            "result or call core.delete_adapter(model, name) first."
        )


def add(
    model: nn.Module, weights: Mapping[str, float], name: str, *, space: str = "update"
) -> nn.Module:
    """New adapter ``name`` = sum of adapters ``{adapter: weight}`` (Zhang et al., 2023).

    ``space="update"`` (default) makes the update exactly sum_i w_i Delta_i (LoRA ranks add
    up); ``"parameters"`` adds LoRA factors element-wise as the paper does. The new adapter
    is frozen and runs (like ``core.load_adapter``).
    """
    _check_new_name(model, name)
    states = _states(model, list(weights))
    return add_states(states, list(weights.values()), space).install(model, name)


def negate(model: nn.Module, source: str, name: str) -> nn.Module:
    """New adapter ``name`` = the negation of ``source`` (LoRA: -B; (IA)^3: 2 - l)."""
    _check_new_name(model, name)
    return negate_state(AdapterState.from_model(model, source)).install(model, name)


def language_task_arithmetic(
    model: nn.Module,
    task: str,
    language: str,
    name: str,
    *,
    source_language: str | None = None,
    task_weight: float = 1.0,
    language_weight: float = 1.0,
    space: str = "update",
) -> nn.Module:
    """New adapter ``name`` = w_t task + w_l (language - source_language) (Chronopoulou et
    al., 2024): a task adapter trained in the source language moved to the target language
    whose language adapter is ``language``. Without ``source_language`` the two add."""
    _check_new_name(model, name)
    names = [task, language] + ([source_language] if source_language else [])
    states = _states(model, names)
    source = states[2] if source_language else None
    result = language_task_states(
        states[0],
        states[1],
        source,
        task_weight=task_weight,
        language_weight=language_weight,
        space=space,
    )
    return result.install(model, name)


def ext_sub(
    model: nn.Module, expert: str, anti_expert: str, name: str, *, weight: float = 1.0
) -> nn.Module:
    """New adapter ``name`` = ``expert`` minus the deficiency-specific part of
    ``anti_expert`` (Hu et al., 2024, Ext-Sub); ``weight`` is the paper's lambda."""
    _check_new_name(model, name)
    plus, minus = _states(model, [expert, anti_expert])
    return ext_sub_states(plus, minus, weight).install(model, name)


def merge_adapters(
    model: nn.Module,
    weights: Mapping[str, float],
    name: str,
    *,
    method: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """New adapter ``name`` merged from ``{adapter: weight}`` as HF PEFT's
    ``add_weighted_adapter(..., combination_type=method)`` does (see the module docstring).

    Unlike PEFT, a single adapter keeps the asked method (PEFT switches to "linear"), so
    ``method="svd", svd_rank=r`` re-compresses one adapter to rank r. DARE draws its masks
    with ``torch.bernoulli`` (the global generator unless ``generator`` is given)."""
    spec = MergeSpec(method, density, majority_sign_method, svd_rank, svd_clamp, generator)
    _check_new_name(model, name)
    states = _states(model, list(weights))
    return merge_states(states, list(weights.values()), spec).install(model, name)


# =========================================================================================
# ComPEFT compression
# =========================================================================================

ENCODING = "compeft"
# Identity value of each tensor, per method: the task vector is tensor - identity.
IDENTITY = {"lora": {"A": 0.0, "B": 0.0}, "ia3": {"scale": 1.0}}


@dataclass(frozen=True)
class TernaryTensor:
    """One tensor as ComPEFT stores it: ``identity + scale * sign * mask``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    identity: float
    positions: torch.Tensor  # flat indices of the kept entries, ascending
    negative: torch.Tensor  # bool per kept entry
    scale: float

    @property
    def kept(self) -> int:
        return self.positions.numel()

    def dense(self) -> torch.Tensor:
        numel = math.prod(self.shape)
        values = torch.where(self.negative, -self.scale, self.scale).to(torch.float32)
        flat = torch.zeros(numel, dtype=torch.float32)
        flat[self.positions.long()] = values
        return (flat + self.identity).reshape(self.shape).to(self.dtype)

    def storage(self) -> tuple[str, int]:
        """("mask" or "index", bytes of the positions): whichever is smaller."""
        numel = math.prod(self.shape)
        mask_bytes, index_bytes = (numel + 7) // 8, 4 * self.kept
        return ("mask", mask_bytes) if mask_bytes <= index_bytes else ("index", index_bytes)

    def payload_bytes(self) -> int:
        """Stored bytes: positions + one sign bit per kept entry + a float32 scale."""
        return self.storage()[1] + (self.kept + 7) // 8 + 4


def ternarise(
    t: torch.Tensor, identity: float, density: float, alpha: float | None
) -> TernaryTensor:
    """ComPEFT on one tensor: keep the top-k |tau| (k = int(density * numel), never more than
    the non-zero entries) as sign * scale. The scale is mean |tau| over the kept entries
    (least squares for that mask and those signs) or, with ``alpha``, the paper's
    alpha * std(tau)."""
    tau = (t.detach().float().cpu() - identity).reshape(-1)
    k = min(int(density * tau.numel()), int((tau != 0).sum()))
    positions = tau.abs().topk(k).indices.sort().values if k else torch.zeros(0, dtype=torch.long)
    kept = tau[positions]
    if alpha is None:
        scale = float(kept.abs().mean()) if k else 0.0
    else:
        scale = float(alpha * tau.std(correction=0))
    return TernaryTensor(
        tuple(t.shape), t.dtype, identity, positions.to(torch.int32), kept < 0, scale
    )


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans to bytes, 8 per byte, least significant bit first."""
    bits = bits.reshape(-1).to(torch.uint8)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (bits * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(data: torch.Tensor, count: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (data.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:count].bool()


def encode(key: str, tt: TernaryTensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored tensors and metadata of one compressed tensor."""
    kind, _ = tt.storage()
    numel = math.prod(tt.shape)
    if kind == "mask":
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[tt.positions.long()] = True
        positions = pack_bits(mask)
    else:
        positions = tt.positions
    stored = {
        f"{key}.compeft_{kind}": positions,
        f"{key}.compeft_sign": pack_bits(tt.negative),
        f"{key}.compeft_scale": torch.tensor(tt.scale, dtype=torch.float32),
    }
    info = {
        "shape": list(tt.shape),
        "dtype": str(tt.dtype).removeprefix("torch."),
        "identity": tt.identity,
        "kept": tt.kept,
        "positions": kind,
    }
    return stored, info


def decode_compeft(
    meta: dict[str, Any], stored: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of ``compress``'s encoding (registered with ``core.checkpoint``)."""
    infos = meta["encoding"]["tensors"]
    out = {k: v for k, v in stored.items() if not re.search(r"\.compeft_\w+$", k)}
    for key, info in infos.items():
        shape, kept = tuple(info["shape"]), int(info["kept"])
        numel = math.prod(shape)
        if info["positions"] == "mask":
            mask = unpack_bits(stored[f"{key}.compeft_mask"], numel)
            positions = mask.nonzero().reshape(-1)
        else:
            positions = stored[f"{key}.compeft_index"].long()
        if positions.numel() != kept:
            raise ValueError(f"{key}: {positions.numel()} positions stored, {kept} expected")
        tt = TernaryTensor(
            shape,
            getattr(torch, info["dtype"]),
            float(info["identity"]),
            positions,
            unpack_bits(stored[f"{key}.compeft_sign"], kept),
            float(stored[f"{key}.compeft_scale"]),
        )
        out[key] = tt.dense()
    return out


TENSOR_DECODERS[ENCODING] = decode_compeft


def compress(
    path: str | Path,
    density: float = 0.2,
    *,
    out: str | Path | None = None,
    alpha: float | None = None,
) -> Path:
    """ComPEFT-compress the adapter checkpoint at ``path`` into ``out`` (default
    ``<path>-compeft``) and return ``out``; ``core.load_adapter`` loads it as usual.

    Every LoRA factor / (IA)^3 vector keeps ``density`` of its task-vector entries as
    signs with one scale per tensor (mean |tau| of the kept entries, or ``alpha * std(tau)``
    as in the paper when ``alpha`` is given). ``modules_to_save`` tensors are kept as they
    are (a whole module has no identity to compress against).
    """
    state = AdapterState.load(path)
    if state.method not in IDENTITY:
        raise ConfigError(
            f"ComPEFT compresses task vectors of {sorted(IDENTITY)} adapters (tensor minus its "
            f"identity value); {state.method!r} is not one of them."
        )
    if state.method == "lora" and state.config.init == "pissa":
        raise ConfigError(
            "a PiSSA adapter's factors hold the principal part of the base weight, not an "
            "update; export it as plain LoRA (core.interop.save_peft) and compress that."
        )
    options = CompressOptions(density=density, alpha=alpha)
    stored: dict[str, torch.Tensor] = dict(state.saved)
    infos: dict[str, dict[str, Any]] = {}
    identities = IDENTITY[state.method]
    for module, tensors in state.modules.items():
        for name, tensor in tensors.items():
            key = f"{module}.{name}"
            tt = ternarise(tensor, identities[name], options.density, options.alpha)
            parts, infos[key] = encode(key, tt)
            stored.update(parts)
    encoding = {
        "name": ENCODING,
        "density": options.density,
        "alpha": options.alpha,
        "tensors": infos,
    }
    target = Path(out) if out is not None else Path(f"{Path(path)}-compeft")
    return write_checkpoint(target, state, stored, ENCODED_FORMAT_VERSION, encoding=encoding)


@dataclass(frozen=True)
class CompressOptions:
    """``compress``'s options, validated with the shared checkers."""

    density: float
    alpha: float | None

    def __post_init__(self) -> None:
        check_float(self, "density", low=0.0, high=1.0)
        if self.alpha is not None:
            check_float(self, "alpha", low=0.0, low_open=True)


# =========================================================================================
# Run-time composition
# =========================================================================================


class Block:
    """A composition of named adapters; children are adapter names or blocks."""

    def __init__(self, *children: Block | str) -> None:
        kind = type(self).__name__
        if not children:
            raise ConfigError(f"{kind}() needs adapter names or blocks, e.g. {kind}('a', 'b').")
        for child in children:
            if isinstance(child, str):
                check_adapter_name(child)
            elif not isinstance(child, Block):
                raise ConfigError(
                    f"{kind} children are adapter names or blocks (Stack, Average, ...), got "
                    f"{type(child).__name__} {child!r}."
                )
        self.children: tuple[Block | str, ...] = tuple(children)

    def options(self) -> dict[str, Any]:
        return {}

    def with_children(self, children: Sequence[Block | str]) -> Block:
        return type(self)(*children, **self.options())

    def names(self) -> list[str]:
        """Every adapter name in this block, in order (fusion layers not included)."""
        out: list[str] = []
        for child in self.children:
            out.extend([child] if isinstance(child, str) else child.names())
        return list(dict.fromkeys(out))

    def blocks(self) -> Iterator[Block]:
        yield self
        for child in self.children:
            if isinstance(child, Block):
                yield from child.blocks()

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.children == other.children
            and self.options() == other.options()
        )

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.children, repr(self.options())))

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children]
        parts += [f"{k}={v!r}" for k, v in self.options().items() if v is not None]
        return f"{type(self).__name__}({', '.join(parts)})"


class Stack(Block):
    """Children one after another on every adapted module: their input transforms, the base
    (or the one adapter that recomputes it), then their output transforms in order. For
    names only this is ``core.set_active(model, names)``."""


class Parallel(Block):
    """The model's input batch is replicated once per child and copy i runs through child i
    at every layer; rows [i*B, (i+1)*B) of the output belong to child i
    (``parallel_outputs`` splits them). Must be the outermost block (``Stack(a,
    Parallel(b, c))`` is fine: a runs on every copy)."""


class Average(Block):
    """Weighted average of the children's outputs at every adapted module,
    y = sum_i w_i y_i (weights normalised to sum to one unless ``normalize=False``); a child
    that does not adapt a module contributes the module's own output there."""

    def __init__(
        self, *children: Block | str, weights: Sequence[float] | None = None, normalize: bool = True
    ) -> None:
        super().__init__(*children)
        if weights is None:
            weights = [1.0] * len(self.children)
        weights = check_weights(weights, len(self.children), "Average")
        if normalize:
            total = sum(weights)
            if total == 0:
                raise ConfigError("Average weights sum to zero and cannot be normalised.")
            weights = [w / total for w in weights]
        self.weights = tuple(weights)

    def options(self) -> dict[str, Any]:
        return {"weights": self.weights, "normalize": False}


class Fuse(Block):
    """AdapterFusion over the children's outputs with the trainable fusion layer ``fusion``
    (create it with ``add_fusion``; default name ``"fuse_" + "_".join(names)``)."""

    def __init__(self, *children: Block | str, fusion: str | None = None) -> None:
        super().__init__(*children)
        self.fusion = fusion if fusion is not None else "fuse_" + "_".join(self.names())
        check_adapter_name(self.fusion)

    def options(self) -> dict[str, Any]:
        return {"fusion": self.fusion}


class Split(Block):
    """Different children for consecutive parts of the sequence (dim 1 of each adapted
    module's output): ``splits`` gives each part's length, or one int for two children (the
    first part's length; the second takes the rest). Each token's output is the one it has
    when the whole sequence runs through its part's child."""

    def __init__(self, *children: Block | str, splits: int | Sequence[int]) -> None:
        super().__init__(*children)
        if isinstance(splits, int) and not isinstance(splits, bool):
            if len(self.children) != 2:
                raise ConfigError("Split(splits=<int>) takes two children; give a list otherwise.")
            sizes: tuple[int | None, ...] = (splits, None)
        else:
            sizes = tuple(splits)
            if len(sizes) != len(self.children):
                raise ConfigError(
                    f"Split has {len(self.children)} children but {len(sizes)} split sizes."
                )
        _check_sizes([s for s in sizes if s is not None], "Split splits")
        self.splits = sizes

    def options(self) -> dict[str, Any]:
        first, rest = self.splits[0], self.splits[1:]
        return {"splits": first if rest == (None,) else list(self.splits)}

    def lengths(self, total: int) -> list[int]:
        sizes = list(self.splits)
        if sizes[-1] is None:
            sizes[-1] = total - sum(sizes[:-1])
        if sizes[-1] < 1 or sum(sizes) != total:
            raise ValueError(
                f"{self!r} splits a sequence of length {total}, but its parts need lengths "
                f"{self.splits}; match splits= to the sequence length."
            )
        return sizes


class BatchSplit(Block):
    """Different children for consecutive parts of the batch: ``batch_sizes`` samples each
    (a module seeing k times as many rows, e.g. flattened tokens, splits k times as many)."""

    def __init__(self, *children: Block | str, batch_sizes: Sequence[int]) -> None:
        super().__init__(*children)
        sizes = tuple(batch_sizes)
        if len(sizes) != len(self.children):
            raise ConfigError(
                f"BatchSplit has {len(self.children)} children but {len(sizes)} batch sizes."
            )
        _check_sizes(sizes, "BatchSplit batch_sizes")
        self.batch_sizes = sizes

    def options(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.batch_sizes)}


def _check_sizes(sizes: Sequence[Any], what: str) -> None:
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"{what} must be positive ints, got {list(sizes)}.")


SPLITTING = (Parallel, BatchSplit, Split)


def as_block(setup: Block | str | Sequence[str]) -> Block:
    if isinstance(setup, Block):
        return setup
    if isinstance(setup, str):
        return Stack(setup)
    return Stack(*setup)


def normalize(block: Block | str) -> Block | str:
    """Distribute stacks over the blocks that split the input, so that splitting blocks sit
    above stacks: Stack(a, Parallel(b, c)) -> Parallel(Stack(a, b), Stack(a, c)). Exact,
    since every adapter acts on each sample (token) of its part alone."""
    if isinstance(block, str):
        return block
    children = [normalize(c) for c in block.children]
    if isinstance(block, Stack):
        flat: list[Block | str] = []
        for child in children:
            flat.extend(child.children if isinstance(child, Stack) else [child])
        for i, child in enumerate(flat):
            if isinstance(child, SPLITTING):
                branches = [normalize(Stack(*flat[:i], c, *flat[i + 1 :])) for c in child.children]
                return child.with_children(branches)
        return Stack(*flat)
    if isinstance(block, Average | Fuse):
        for child in children:
            if isinstance(child, Block) and any(isinstance(b, SPLITTING) for b in child.blocks()):
                raise ConfigError(
                    f"{type(block).__name__} cannot contain {child!r}: it combines outputs "
                    "computed from the same input, and a Parallel / Split / BatchSplit inside "
                    "would cut that input apart. Put the splitting block outside, e.g. "
                    "BatchSplit(Average(a, b), c)."
                )
    return block.with_children(children)


# --- AdapterFusion: the trainable layer of a Fuse block --------------------------------------


def output_features(module: nn.Module, hidden_size: int | None) -> int | None:
    """Feature size (last dim) of a module's output, or None when unknown."""
    if hidden_size is not None:
        return hidden_size
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_fan_in_fan_out(module):
        return module.weight.shape[1]
    sizes = block_sizes(module)
    return None if sizes is None else sizes[1]


@register("adapter_fusion", mergeable=False)
@dataclass(frozen=True, kw_only=True)
class AdapterFusion(AdapterConfig):
    """AdapterFusion layer (Pfeiffer et al., 2021, Sec. 3.2), the trainable part of ``Fuse``.

    At each adapted module, with h_t the module's output before the fused adapters and
    z_{t,n} the update adapter n adds there (its output minus h_t):

        s_t = softmax_n((h_t Q) . (z_{t,n} K) / T),   o_t = h_t + sum_n s_{t,n} z_{t,n} V

    Q, K (with biases) ~ N(0, 0.02^2); V = I at start, so the fused output starts as an
    attention-weighted mixture of the adapters' outputs (a single adapter's output when one
    is fused), not as the frozen model. ``aux_loss`` is the paper's regulariser
    ``regularization * ||I - V||_F^2``. Parameters per module: 3 d^2 + 2 d.

    Args:
        hidden_size: d, the output features of the targeted modules; inferred from a Linear
            (out_features) or a block's last Linear when None.
        temperature: T in the softmax.
        regularization: weight of ||I - V||^2 (AdapterHub's 0.01).
    """

    hidden_size: int | None = None
    temperature: float = 1.0
    regularization: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_size is not None and (
            isinstance(self.hidden_size, bool)
            or not isinstance(self.hidden_size, int)
            or self.hidden_size < 1
        ):
            raise ConfigError(
                f"AdapterFusion.hidden_size must be an int >= 1 or None, got {self.hidden_size!r}."
            )
        check_float(self, "temperature", low=0.0, low_open=True)
        check_float(self, "regularization", low=0.0)

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if output_features(module, self.hidden_size) is None:
            return (
                "its output feature size cannot be inferred (no Linear inside); pass "
                "hidden_size=<features of its output>"
            )
        return None

    def build(self, module: nn.Module, path: str) -> FusionAdapter:
        ref = next(module.parameters(), None)
        opts: dict[str, Any] = {}
        if ref is not None:
            dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
            opts = {"device": ref.device, "dtype": dtype}
        return FusionAdapter(output_features(module, self.hidden_size), self, opts)


class FusionAdapter(Adapter):
    """The per-module fusion attention; run by a ``Fuse`` block, never on its own."""

    batch_separable = True  # each token attends over its own adapter outputs only

    def __init__(self, dim: int, cfg: AdapterFusion, opts: dict[str, Any]) -> None:
        super().__init__()
        self.temperature, self.regularization = cfg.temperature, cfg.regularization
        self.query = nn.Linear(dim, dim, **opts)
        self.key = nn.Linear(dim, dim, **opts)
        self.value = nn.Linear(dim, dim, bias=False, **opts)
        with torch.no_grad():
            for layer in (self.query, self.key):
                nn.init.normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
            self.value.weight.copy_(torch.eye(dim, **opts))

    def fuse(self, h: torch.Tensor, updates: list[torch.Tensor]) -> torch.Tensor:
        """h + sum_n softmax_n((h Q) . (z_n K) / T) z_n V over the last dimension.

        Computed with the key map moved onto the query, (z_n K) . q = z_n . (q W_k) + b_k . q,
        and the value map applied once after mixing, (sum_n p_n z_n) V: three d x d
        products per token instead of 2N + 1, the same numbers to float rounding.
        """
        dtype = self.value.weight.dtype
        z = torch.stack([u.to(dtype) for u in updates], dim=-2)  # (..., N, d)
        q = self.query(h.to(dtype))  # (..., d)
        key_side = (q @ self.key.weight).unsqueeze(-1)  # (..., d, 1)
        key_bias = (q * self.key.bias).sum(-1, keepdim=True)  # (..., 1), same for every n
        scores = ((z @ key_side).squeeze(-1) + key_bias) / self.temperature  # (..., N)
        mixed = (scores.softmax(dim=-1).unsqueeze(-2) @ z).squeeze(-2)  # (..., d)
        return h + self.value(mixed).to(h.dtype)

    def post(self, x: torch.Tensor, y: torch.Tensor, base: nn.Module) -> torch.Tensor:
        raise RuntimeError(
            f"the AdapterFusion layer at {getattr(self, 'path', '?')} attends over other "
            "adapters' outputs and runs only inside a Fuse block: core.compose.activate(model, "
            "Fuse('a', 'b', fusion=<its name>)), not through core.set_active."
        )

    def aux_loss(self) -> torch.Tensor:
        weight = self.value.weight
        eye = torch.eye(weight.shape[0], device=weight.device, dtype=weight.dtype)
        return self.regularization * (weight - eye).pow(2).sum()


def add_fusion(
    model: nn.Module, fuse: Fuse, *, hidden_size: int | None = None, **options: Any
) -> nn.Module:
    """Create ``fuse``'s fusion layer on every module that holds one of its adapters.

    As after ``core.inject``, only the new fusion layer is trainable; the active adapters
    stay as they were. Activate the composition with ``activate(model, fuse)`` to train or
    run it. ``options`` go to ``AdapterFusion`` (temperature, regularization).
    """
    if not isinstance(fuse, Fuse):
        raise ConfigError(f"add_fusion takes a Fuse block, got {fuse!r}.")
    _check_known(model, fuse.names())
    paths = [p for p, w in adapted_modules(model) if any(n in w.adapters for n in fuse.names())]
    cfg = AdapterFusion(targets=exact_names_regex(paths), hidden_size=hidden_size, **options)
    before = {p: list(w.active) for p, w in adapted_modules(model)}
    inject(model, cfg, name=fuse.fusion)
    for path, wrapper in adapted_modules(model):  # inject ran only the new layer
        wrapper.active = before.get(path, [])
    return model


# --- the router a composition installs in every adapted module ----------------------------


def acts_on_output(adapter: Adapter) -> bool:
    """Whether ``adapter`` only transforms its module's output (no input transform, no own
    computation of the base), so it can act on hidden states other adapters produced."""
    if adapter.replaces_base:
        return False
    if type(adapter).pre is Adapter.pre:
        return True
    return isinstance(adapter, IA3Adapter) and not adapter.input_side


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"a composed module returned {type(out).__name__}; Average, Fuse and Split combine "
        "tensor outputs (or the first tensor of a tuple)."
    )


def with_first(like: Any, first: torch.Tensor) -> Any:
    """``like`` with its (first) tensor replaced."""
    if isinstance(like, torch.Tensor):
        return first
    rest = list(like[1:])
    if isinstance(like, list):
        return [first, *rest]
    return type(like)(first, *rest) if hasattr(like, "_fields") else (first, *rest)


def fresh(out: Any) -> Any:
    """A copy of ``out``'s tensor an adapter may update in place (LoRA adds with addmm_)."""
    return with_first(out, first_tensor(out).clone())


def narrow_batch(value: Any, start: int, length: int, rows: int) -> Any:
    """``value`` with every tensor whose first dimension is ``rows`` cut to
    [start, start + length)."""
    if isinstance(value, torch.Tensor):
        return value.narrow(0, start, length) if value.dim() and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: narrow_batch(v, start, length, rows) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(narrow_batch(v, start, length, rows) for v in value)
    return value


def cat_batch(parts: list[Any], what: str) -> Any:
    """Join per-part outputs along the batch dimension."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise RuntimeError(
                f"{what}: its parts returned outputs of shapes "
                f"{[tuple(p.shape) for p in parts]} that cannot be joined into one batch; an "
                "adapter among them changes the shape (prompt tuning or VPT lengthen the "
                "sequence). Give every part adapters that keep the same shape."
            )
        return torch.cat(parts)
    if isinstance(first, tuple | list):
        items = [cat_batch([p[i] for p in parts], what) for i in range(len(first))]
        return type(first)(items) if not hasattr(first, "_fields") else type(first)(*items)
    return first


def repeat_batch(value: Any, copies: int, rows: int) -> Any:
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == rows:
            return value.repeat(copies, *[1] * (value.dim() - 1))
        return value
    if isinstance(value, dict):
        return {k: repeat_batch(v, copies, rows) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(repeat_batch(v, copies, rows) for v in value)
    return value


class Composer:
    """Computes one adapted module's call under a (normalised) composition.

    Every adapted module applies the block to the adapters it holds, and the modules nested
    inside it run the same block on their own adapters (AdapterHub's per-location
    semantics). The exception is a part of the batch (Parallel, BatchSplit): while a module
    computes child i on its samples, the modules nested inside see only those samples and
    run child i; ``stack`` holds the block of the part being computed.
    """

    def __init__(self, block: Block | str) -> None:
        self.stack: list[Block | str] = [block]

    def __call__(self, wrapper: AdaptedModule, args: tuple, kwargs: dict) -> Any:
        return self.output(wrapper, self.stack[-1], args, kwargs)

    # -- full outputs ----------------------------------------------------------------------

    def output(self, wrapper: AdaptedModule, block: Block | str, args: tuple, kwargs: dict) -> Any:
        if isinstance(block, str):
            return wrapper.run_adapters(present(wrapper, [block]), args, kwargs)
        if isinstance(block, Stack):
            return self.stack_output(wrapper, block, args, kwargs)
        if isinstance(block, Parallel | BatchSplit):
            return self.batch_output(wrapper, block, args, kwargs)
        x = PrimaryCall.split(args, kwargs).x
        if self.output_only(wrapper, block):  # the base once, the children on its output
            base_out = wrapper.run_adapters([], args, kwargs)
            if isinstance(block, Split):
                parts = [self.transform(wrapper, c, x, fresh(base_out)) for c in block.children]
                return self.stitch(block, parts)
            return self.transform(wrapper, block, x, base_out)
        parts = [self.output(wrapper, c, args, kwargs) for c in block.children]
        if isinstance(block, Split):
            return self.stitch(block, parts)
        if isinstance(block, Average):
            return average(parts, block.weights)
        base_out = wrapper.run_adapters([], args, kwargs)
        return self.fuse(wrapper, block, base_out, parts)

    def stack_output(self, wrapper: AdaptedModule, stack: Stack, args: tuple, kwargs: dict) -> Any:
        if all(isinstance(c, str) for c in stack.children):
            return wrapper.run_adapters(present(wrapper, stack.children), args, kwargs)
        # Nested Average / Fuse act on the output between the stack's own adapters.
        for child in stack.children:
            if isinstance(child, Block):
                self.require_output_only(wrapper, child, stack)
        call = PrimaryCall.split(args, kwargs)
        direct = present(wrapper, [c for c in stack.children if isinstance(c, str)])
        h = call.x
        for adapter in direct:
            h = adapter.pre(h)
        replacing = [a for a in direct if a.replaces_base]
        if len(replacing) > 1:
            raise ConfigError(
                f"{stack!r}: {len(replacing)} of its adapters recompute the layer at "
                f"{wrapper_path(wrapper)}; only one can."
            )
        if replacing:
            y = replacing[0].run_base(h, wrapper.base_layer, *call.args, **call.kwargs)
        else:
            y = call.run(wrapper.base_layer, h)
        for child in stack.children:
            if isinstance(child, Block):
                y = self.transform(wrapper, child, call.x, y)
            elif child in wrapper.adapters:
                y = wrapper.adapters[child].post(call.x, y, wrapper.base_layer)
        return y

    def batch_output(self, wrapper: AdaptedModule, block: Block, args: tuple, kwargs: dict) -> Any:
        rows = PrimaryCall.split(args, kwargs).x.shape[0]
        if isinstance(block, Parallel):
            copies = len(block.children)
            if rows % copies:
                raise RuntimeError(
                    f"{block!r}: a module at {wrapper_path(wrapper)} got {rows} rows, not a "
                    f"multiple of its {copies} copies; Parallel must be activated on the model "
                    "whose input it replicates (core.compose.activate(model, ...))."
                )
            sizes = [rows // copies] * copies
        else:
            total = sum(block.batch_sizes)
            if rows % total:
                raise RuntimeError(
                    f"{block!r} splits {total} samples but a module at {wrapper_path(wrapper)} "
                    f"got {rows} rows; match batch_sizes to the batch."
                )
            sizes = [s * (rows // total) for s in block.batch_sizes]
        parts, start = [], 0
        for child, size in zip(block.children, sizes):
            sub_args, sub_kwargs = narrow_batch((args, kwargs), start, size, rows)
            self.stack.append(child)
            try:
                parts.append(self.output(wrapper, child, sub_args, sub_kwargs))
            finally:
                self.stack.pop()
            start += size
        return cat_batch(parts, repr(block))

    # -- transforms of a given output (adapters that act on outputs only) -------------------

    def transform(self, wrapper: AdaptedModule, block: Block | str, x: Any, y: Any) -> Any:
        """The output after ``block`` acts on hidden states ``y`` (input ``x``)."""
        if isinstance(block, str):
            adapter = adapter_at(wrapper, block)
            return y if adapter is None else adapter.post(x, y, wrapper.base_layer)
        if isinstance(block, Stack):
            for child in block.children:
                y = self.transform(wrapper, child, x, y)
            return y
        parts = [self.transform(wrapper, c, x, fresh(y)) for c in block.children]
        if isinstance(block, Average):
            return average(parts, block.weights)
        return self.fuse(wrapper, block, y, parts)

    def fuse(self, wrapper: AdaptedModule, block: Fuse, h: Any, parts: list[Any]) -> Any:
        used = [p for c, p in zip(block.children, parts) if touches(wrapper, c)]
        if not used:
            return h
        layer = wrapper.adapters[block.fusion]
        query = first_tensor(h)
        updates = [first_tensor(p) - query for p in used]
        return with_first(h, layer.fuse(query, updates))

    def stitch(self, block: Split, parts: list[Any]) -> Any:
        outs = [first_tensor(p) for p in parts]
        if len({tuple(o.shape) for o in outs}) > 1 or outs[0].dim() < 2:
            raise RuntimeError(
                f"{block!r}: its parts returned shapes {[tuple(o.shape) for o in outs]}; Split "
                "needs outputs of one shape with the sequence on dim 1 (an adapter that "
                "lengthens the sequence, e.g. prompt tuning, cannot be split)."
            )
        pieces, start = [], 0
        for out, length in zip(outs, block.lengths(outs[0].shape[1])):
            pieces.append(out.narrow(1, start, length))
            start += length
        return with_first(parts[0], torch.cat(pieces, dim=1))

    # -- which path a block may take ----------------------------------------------------------

    def output_only(self, wrapper: AdaptedModule, block: Block) -> bool:
        """Whether ``block`` can run as transforms of one base output: every adapter in it
        acts on outputs only and nothing below it splits the input."""
        below = [b for c in block.children if isinstance(c, Block) for b in c.blocks()]
        if any(isinstance(b, SPLITTING) for b in below):
            return False
        return all(acts_on_output(a) for a in present(wrapper, block.names()))

    def require_output_only(self, wrapper: AdaptedModule, block: Block, stack: Stack) -> None:
        for name in block.names():
            adapter = adapter_at(wrapper, name)
            if adapter is not None and not acts_on_output(adapter):
                method = getattr(getattr(adapter, "config", None), "method", type(adapter).__name__)
                raise ConfigError(
                    f"{stack!r}: adapter {name!r} ({method}) at {wrapper_path(wrapper)} "
                    "transforms the layer's input or recomputes the layer, so it cannot act on "
                    f"the output of the adapters stacked before {block!r}. Put the block at "
                    "the top of the composition (e.g. Average(Stack(a, b), Stack(a, c)))."
                )


def adapter_at(wrapper: AdaptedModule, name: str) -> Adapter | None:
    return wrapper.adapters[name] if name in wrapper.adapters else None  # noqa: SIM401


def present(wrapper: AdaptedModule, names: Sequence[Any]) -> list[Adapter]:
    return [wrapper.adapters[n] for n in names if isinstance(n, str) and n in wrapper.adapters]


def touches(wrapper: AdaptedModule, child: Block | str) -> bool:
    names = [child] if isinstance(child, str) else child.names()
    return any(n in wrapper.adapters for n in names)


def average(parts: list[Any], weights: Sequence[float]) -> Any:
    total = sum(w * first_tensor(p) for w, p in zip(weights, parts))
    return with_first(parts[0], total)


def wrapper_path(wrapper: AdaptedModule) -> str:
    adapter = next(iter(wrapper.adapters.values()), None)
    return getattr(adapter, "path", type(wrapper.base_layer).__name__)


# --- activating a composition ----------------------------------------------------------------


@dataclass
class _Active:
    block: Block
    active: dict[str, list[str]]
    hook: Any = None


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, _Active] = weakref.WeakKeyDictionary()


def _check_known(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown adapter name(s) {unknown}; the model has {known}.")


def _check_fusions(model: nn.Module, block: Block) -> list[str]:
    fusions = []
    for fuse in (b for b in block.blocks() if isinstance(b, Fuse)):
        for path, wrapper in adapted_modules(model):
            if touches(wrapper, fuse) and fuse.fusion not in wrapper.adapters:
                raise ConfigError(
                    f"{fuse!r} needs its fusion layer {fuse.fusion!r} at {path}, which holds "
                    "fused adapters; create it with core.compose.add_fusion(model, "
                    f"{fuse!r}) (or load it with core.load_adapter)."
                )
            if fuse.fusion in wrapper.adapters and not isinstance(
                wrapper.adapters[fuse.fusion], FusionAdapter
            ):
                raise ConfigError(f"{fuse.fusion!r} is not an AdapterFusion layer.")
        fusions.append(fuse.fusion)
    return fusions


def _check_parallel(block: Block | str) -> None:
    if not isinstance(block, Block):
        return
    for child in block.children:
        for inner in child.blocks() if isinstance(child, Block) else []:
            if isinstance(inner, Parallel):
                raise ConfigError(
                    f"{inner!r} replicates the whole batch, so it must be the outermost "
                    "block (Stack(a, Parallel(b, c)) is fine); it cannot sit inside "
                    f"{type(block).__name__}."
                )


def activate(model: nn.Module, setup: Block | str | Sequence[str]) -> None:
    """Run ``setup`` on every call of ``model`` until ``deactivate(model)``.

    Every adapter it names must exist and none may be merged. While active, the adapters it
    names (and its fusion layers) are the model's active adapters, so ``core.aux_loss``
    sees their regularisers; ``core.set_active`` does not change what runs.
    """
    block = as_block(setup)
    deactivate(model)
    _check_known(model, block.names())
    fusions = _check_fusions(model, block)
    wrappers = list(adapted_modules(model))
    for _, wrapper in wrappers:
        if wrapper.merged:
            raise MergeError(
                "a composition runs unmerged adapters; call core.unmerge(model) first."
            )
        if wrapper.routing is not None:
            raise RuntimeError(
                "core.batch_adapters is routing this model; leave that block before composing."
            )
    normal = normalize(block)
    _check_parallel(normal)
    state = _Active(block, {p: list(w.active) for p, w in wrappers})
    composer = Composer(normal)
    runs = [*block.names(), *fusions]
    for _, wrapper in wrappers:
        wrapper.routing = composer
        wrapper.active = [n for n in runs if n in wrapper.adapters]
    if isinstance(normal, Parallel):
        state.hook = model.register_forward_pre_hook(
            _replicate(len(normal.children)), with_kwargs=True
        )
    _ACTIVE[model] = state


def _replicate(copies: int):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        x = PrimaryCall.split(args, kwargs).x
        rows = x.shape[0]
        return repeat_batch(args, copies, rows), repeat_batch(kwargs, copies, rows)

    return hook


def deactivate(model: nn.Module) -> None:
    """Stop the composition ``activate`` started; the previous active adapters run again."""
    state = _ACTIVE.pop(model, None)
    if state is None:
        return
    if state.hook is not None:
        state.hook.remove()
    for path, wrapper in adapted_modules(model):
        wrapper.routing = None
        wrapper.active = [n for n in state.active.get(path, []) if n in wrapper.adapters]


def active_composition(model: nn.Module) -> Block | None:
    state = _ACTIVE.get(model)
    return None if state is None else state.block


@contextlib.contextmanager
def composed(model: nn.Module, setup: Block | str | Sequence[str]) -> Iterator[None]:
    """``activate`` for the duration of a ``with`` block."""
    activate(model, setup)
    try:
        yield
    finally:
        deactivate(model)


def parallel_outputs(output: Any, copies: int) -> list[Any]:
    """Split a model output computed under ``Parallel`` (rows replicated ``copies`` times)
    into one output per child: tensors, tuples/lists and mappings of them."""
    if isinstance(output, torch.Tensor):
        return list(output.chunk(copies))
    if isinstance(output, tuple | list):
        items = [parallel_outputs(v, copies) for v in output]
        return [type(output)(item[i] for item in items) for i in range(copies)]
    if isinstance(output, Mapping):
        items = {k: parallel_outputs(v, copies) for k, v in output.items()}
        return [type(output)(**{k: v[i] for k, v in items.items()}) for i in range(copies)]
    return [output] * copies


# =========================================================================================
# Command line: python -m core.compose
# =========================================================================================


def parse_weighted(spec: str) -> tuple[str, float]:
    """``folder:weight`` (weight 1 when absent or when the suffix is not a number)."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def folder_size(path: str | Path) -> int:
    return (Path(path) / TENSORS).stat().st_size


def describe(path: str | Path) -> str:
    state = AdapterState.load(path)
    return f"{path}: {state.method}, {state.num_params():,} params, {folder_size(path):,} bytes"


def _report(inputs: Sequence[str], output: Path) -> None:
    before = sum(folder_size(p) for p in inputs)
    for path in inputs:
        print(f"before  {describe(path)}")
    after = folder_size(output)
    print(f"after   {describe(output)}")
    print(f"size    {before:,} -> {after:,} bytes ({after / before:.3f}x)")


def _run_add(args: argparse.Namespace) -> Path:
    pairs = [parse_weighted(s) for s in args.adapters]
    states = [AdapterState.load(p) for p, _ in pairs]
    return add_states(states, [w for _, w in pairs], args.space).save(args.out)


def _run_negate(args: argparse.Namespace) -> Path:
    return negate_state(AdapterState.load(args.adapter)).save(args.out)


def _run_merge(args: argparse.Namespace) -> Path:
    generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
    spec = MergeSpec(
        args.method,
        args.density,
        args.majority_sign_method,
        args.svd_rank,
        args.svd_clamp,
        generator,
    )
    pairs = [parse_weighted(s) for s in args.adapters]
    states = [AdapterState.load(p) for p, _ in pairs]
    return merge_states(states, [w for _, w in pairs], spec).save(args.out)


def _run_ext_sub(args: argparse.Namespace) -> Path:
    plus, minus = AdapterState.load(args.expert), AdapterState.load(args.anti_expert)
    return ext_sub_states(plus, minus, args.weight).save(args.out)


def _run_lang_task(args: argparse.Namespace) -> Path:
    source = AdapterState.load(args.source_language) if args.source_language else None
    result = language_task_states(
        AdapterState.load(args.task),
        AdapterState.load(args.language),
        source,
        task_weight=args.task_weight,
        language_weight=args.language_weight,
        space=args.space,
    )
    return result.save(args.out)


def _run_compress(args: argparse.Namespace) -> Path:
    return compress(args.adapter, args.density, out=args.out, alpha=args.alpha)


def _inputs(args: argparse.Namespace) -> list[str]:
    if args.command in ("add", "merge"):
        return [parse_weighted(s)[0] for s in args.adapters]
    if args.command == "ext-sub":
        return [args.expert, args.anti_expert]
    if args.command == "lang-task":
        return [p for p in (args.task, args.language, args.source_language) if p]
    return [args.adapter]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m core.compose",
        description="Arithmetic, merging and ComPEFT compression of saved LoRA / (IA)^3 "
        "adapter folders (core.save_adapter format); prints the sizes before and after.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    weighted = "adapter folders, each optionally with a weight: path:0.5"

    p = sub.add_parser("add", help="weighted sum (Zhang et al., 2023)")
    p.add_argument("out")
    p.add_argument("adapters", nargs="+", help=weighted)
    p.add_argument("--space", choices=SPACES, default="update")
    p.set_defaults(run=_run_add)

    p = sub.add_parser("negate", help="negation: LoRA -B, (IA)^3 2 - l")
    p.add_argument("out")
    p.add_argument("adapter")
    p.set_defaults(run=_run_negate)

    p = sub.add_parser("merge", help="PEFT add_weighted_adapter combinations (TIES, DARE, SVD)")
    p.add_argument("out")
    p.add_argument("adapters", nargs="+", help=weighted)
    p.add_argument("--method", choices=MERGE_METHODS, default="linear")
    p.add_argument("--density", type=float)
    p.add_argument("--majority-sign-method", choices=SIGN_METHODS, default="total")
    p.add_argument("--svd-rank", type=int)
    p.add_argument("--svd-clamp", type=float)
    p.add_argument("--seed", type=int, help="seed of DARE's random drops")
    p.set_defaults(run=_run_merge)

    p = sub.add_parser("ext-sub", help="Ext-Sub deficiency unlearning (Hu et al., 2024)")
    p.add_argument("out")
    p.add_argument("expert")
    p.add_argument("anti_expert")
    p.add_argument("--weight", type=float, default=1.0)
    p.set_defaults(run=_run_ext_sub)

    p = sub.add_parser("lang-task", help="language and task arithmetic (Chronopoulou et al.)")
    p.add_argument("out")
    p.add_argument("task")
    p.add_argument("language")
    p.add_argument("source_language", nargs="?")
    p.add_argument("--task-weight", type=float, default=1.0)
    p.add_argument("--language-weight", type=float, default=1.0)
    p.add_argument("--space", choices=SPACES, default="update")
    p.set_defaults(run=_run_lang_task)

    p = sub.add_parser("compress", help="ComPEFT: top-k signs and one scale per tensor")
    p.add_argument("adapter")
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--out")
    p.add_argument("--alpha", type=float, help="scale alpha * std(tau) instead of mean |tau|")
    p.set_defaults(run=_run_compress)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = args.run(args)
        _report(_inputs(args), output)
    except (OmniPeftError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "AdapterFusion",
    "AdapterState",
    "Average",
    "BatchSplit",
    "Block",
    "Fuse",
    "MergeSpec",
    "Parallel",
    "Split",
    "Stack",
    "activate",
    "active_composition",
    "add",
    "add_fusion",
    "add_states",
    "compress",
    "composed",
    "deactivate",
    "ext_sub",
    "ext_sub_states",
    "language_task_arithmetic",
    "language_task_states",
    "main",
    "merge_adapters",
    "merge_states",
    "negate",
    "negate_state",
    "parallel_outputs",
]
