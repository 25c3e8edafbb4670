"""Mixed batches: every sample through its own named adapter, in one forward.

    with core.batch_adapters(model, ["style_a", "style_b", None, "style_a"]):
        out = model(x)            # x.shape[0] == 4; None runs the frozen base

Inside the block each adapted module sends sample i through adapter ``names[i]`` alone
(modules that do not hold that adapter run their base for it), whatever ``set_active``
says; the result equals running each sample by itself with ``set_active(model, [name])``.
Outside the block nothing changes. The batch dimension is the first dimension of each
adapted module's main input: (B, T, D) token sequences (a sample's rows are its T tokens),
(B, D) rows, (B, C, H, W) feature maps.

How a module computes its share of the batch:

* LoRA on linear layers (any adapter with ``lowrank_factors``): the base GEMM runs once
  over the whole batch, then ``core.kernels.sgmv_lora`` adds each sample's low-rank update
  with its own adapter's A and B gathered per segment (Punica/S-LoRA's SGMV; a Triton kernel
  on CUDA, two batched GEMMs over the gathered factors on CPU).
* any other adapter whose samples do not interact: the samples are grouped by adapter and
  each group runs through the module with that adapter alone (``index_select`` in,
  ``index_copy_`` out). Tensor arguments whose first dimension is the batch size (attention
  masks, position embeddings) are split with the samples.

Which adapters can mix (checked when the block is entered, ``ConfigError`` otherwise):
weight-space methods (every mergeable method: LoRA, OFT, BOFT, qGOFT, IA3, SSF, BitFit,
DiffFit, LN tuning, FourierFT, SVFT, ...), whose output for a sample depends on that sample
only, and adapters that declare ``batch_separable = True``. Bottleneck adapters act on each
token alone, so they are separable in principle and only need to declare it. Prompt and
prefix methods (prompt tuning, prefix tuning, Control Prefixes, VPT, LLaMA-Adapter) change
the sequence length or the attention itself, so a batch cannot mix them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ConfigError, MergeError
from .kernels import sgmv_lora
from .layers import (
    AdaptedModule,
    Adapter,
    PrimaryCall,
    active_dropout,
    linear_view,
    only_input,
)
from .targeting import adapted_modules


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names_per_sample: Sequence[str | None]) -> Iterator[None]:
    """Within the block, sample i of every batch runs through adapter ``names_per_sample[i]``
    (None: the frozen base). See the module docstring."""
    wrappers = [wrapper for _, wrapper in adapted_modules(model)]
    names = _checked_names(wrappers, names_per_sample)
    _check_can_mix(wrappers, names)
    router = SampleRouter(names)
    for wrapper in wrappers:
        wrapper.routing = router
    try:
        yield
    finally:
        for wrapper in wrappers:
            wrapper.routing = None


def _checked_names(wrappers: list[AdaptedModule], names: Sequence[str | None]) -> list:
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ConfigError(
            "batch_adapters needs one adapter name (or None for the base) per sample, e.g. "
            f"['a', 'b', None]; got {names!r}."
        )
    known = {name for wrapper in wrappers for name in wrapper.adapters}
    unknown = sorted({n for n in names if n is not None and n not in known}, key=str)
    if unknown:
        raise ConfigError(
            f"batch_adapters: unknown adapter name(s) {unknown}; the model has "
            f"{sorted(known)}. Use one of these, or None for the frozen base."
        )
    return list(names)


def is_batch_separable(adapter: Adapter) -> bool:
    """Whether a sample's output under this adapter depends on that sample only."""
    if adapter.batch_separable is not None:
        return adapter.batch_separable
    return bool(getattr(adapter.config, "mergeable", False))


def _check_can_mix(wrappers: list[AdaptedModule], names: list) -> None:
    wanted = {n for n in names if n is not None}
    for wrapper in wrappers:
        if wrapper.routing is not None:
            raise RuntimeError("batch_adapters blocks cannot be nested on the same model.")
        if wrapper.merged:
            raise MergeError(
                "batch_adapters needs unmerged adapters (a merged one is inside every sample's "
                "weights); call core.unmerge(model) first."
            )
        for name in wanted & set(wrapper.adapters):
            adapter = wrapper.adapters[name]
            if not is_batch_separable(adapter):
                method = getattr(adapter.config, "method", type(adapter).__name__)
                raise ConfigError(
                    f"adapter {name!r} ({method}) cannot share a batch with other adapters: "
                    "its samples are not computed independently of each other through it "
                    "(prompt and prefix methods change the sequence or the attention). Mixed "
                    "batches take weight-space methods (LoRA, OFT, IA3, ...); run this adapter "
                    "on its own batches with core.set_active(model, [name])."
                )


class SampleRouter:
    """Routes one call of an adapted module: groups of samples to their adapters.

    ``stack`` holds the names of the samples of the batch being computed: a module run on a
    group of samples pushes that group's names, so modules nested inside it route the
    sub-batch they receive.
    """

    def __init__(self, names: list) -> None:
        self.stack = [names]

    def __call__(self, wrapper: AdaptedModule, args: tuple, kwargs: dict) -> Any:
        names = self.stack[-1]
        x = PrimaryCall.split(args, kwargs).x
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != len(names):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"batch_adapters was given {len(names)} names but an adapted module received "
                f"an input of shape {got}; its first dimension must be the batch, one sample "
                "per name."
            )
        chosen = [n if n in wrapper.adapters else None for n in names]
        groups = group_samples(chosen)
        if len(groups) == 1:
            return wrapper.run_adapters(adapters_of(wrapper, chosen[0]), args, kwargs)
        fused = lowrank_mixed(wrapper, chosen, args, kwargs)
        if fused is not None:
            return fused
        return self.run_groups(wrapper, groups, args, kwargs)

    def run_groups(self, wrapper: AdaptedModule, groups: dict, args: tuple, kwargs: dict) -> Any:
        names = self.stack[-1]
        device = PrimaryCall.split(args, kwargs).x.device
        parts = []
        for name, samples in groups.items():
            index = torch.tensor(samples, device=device)
            sub_args, sub_kwargs = take_samples((args, kwargs), index, len(names))
            self.stack.append([names[i] for i in samples])
            try:
                out = wrapper.run_adapters(adapters_of(wrapper, name), sub_args, sub_kwargs)
            finally:
                self.stack.pop()
            parts.append((index, out))
        return put_samples(parts, len(names))


def adapters_of(wrapper: AdaptedModule, name: str | None) -> list[Adapter]:
    return [] if name is None else [wrapper.adapters[name]]


def group_samples(chosen: list) -> dict[str | None, list[int]]:
    """Sample indices per adapter name, in order of first appearance."""
    groups: dict[str | None, list[int]] = {}
    for i, name in enumerate(chosen):
        groups.setdefault(name, []).append(i)
    return groups


def take_samples(value: Any, index: torch.Tensor, batch: int) -> Any:
    """``value`` with every tensor whose first dimension is the batch cut to ``index``."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch:
            return value.index_select(0, index)
        return value
    if isinstance(value, dict):
        return {k: take_samples(v, index, batch) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(take_samples(v, index, batch) for v in value)
    return value


def put_samples(parts: list[tuple[torch.Tensor, Any]], batch: int) -> Any:
    """Reassemble per-group outputs (tensors, or tuples/lists of them) into batch order."""
    first = parts[0][1]
    if isinstance(first, torch.Tensor):
        out = first.new_zeros((batch, *first.shape[1:]))
        for index, part in parts:
            out.index_copy_(0, index, part.to(out.dtype))
        return out
    if isinstance(first, tuple | list):
        items = [
            put_samples([(index, part[i]) for index, part in parts], batch)
            for i in range(len(first))
        ]
        return type(first)(items)
    return first  # None or a value that does not depend on the samples


def lowrank_mixed(
    wrapper: AdaptedModule, chosen: list, args: tuple, kwargs: dict
) -> torch.Tensor | None:
    """Base GEMM over the batch plus per-sample LoRA updates by SGMV, or None when the
    call does not fit (not a plain linear base, another adapter kind, dropout, dtypes)."""
    base = wrapper.base_layer
    x, view = only_input(args, kwargs), linear_view(base)
    if x is None or view is None or base._forward_hooks or base._forward_pre_hooks:
        return None
    present = list(dict.fromkeys(n for n in chosen if n is not None))
    factors = [wrapper.adapters[n].lowrank_factors() for n in present]
    if any(f is None or active_dropout(f[3]) is not None for f in factors):
        return None
    weight, bias = view
    tensors = [x, weight, *(t for f in factors for t in f[:2])]
    dtypes = {t.dtype for t in tensors} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1 or torch.is_autocast_enabled(x.device.type):
        return None
    a_stack, b_stack, scales = stack_factors(factors, with_zero=None in chosen)
    slot = {name: i for i, name in enumerate(present)}
    adapters = [slot.get(name, len(present)) for name in chosen]
    batch, k = len(chosen), x.shape[-1]
    rows = x.numel() // (batch * k)
    y = F.linear(x, weight, bias)
    starts = [i * rows for i in range(batch + 1)]
    sgmv_lora(x.reshape(-1, k), y.view(-1, y.shape[-1]), a_stack, b_stack, scales, starts, adapters)
    return y


def stack_factors(
    factors: list[tuple], with_zero: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (L, R, K), B (L, N, R) and scales (L,), ranks padded with zeros to R; with
    ``with_zero`` one more all-zero adapter for the samples that run the base."""
    rank = max(f[0].shape[0] for f in factors)
    a_list = [F.pad(f[0], (0, 0, 0, rank - f[0].shape[0])) for f in factors]
    b_list = [F.pad(f[1], (0, rank - f[1].shape[1])) for f in factors]
    scales = [float(f[2]) for f in factors]
    if with_zero:
        a_list.append(a_list[0].new_zeros(a_list[0].shape))
        b_list.append(b_list[0].new_zeros(b_list[0].shape))
        scales.append(0.0)
    ref = a_list[0]
    return (
        torch.stack(a_list),
        torch.stack(b_list),
        torch.tensor(scales, dtype=ref.dtype, device=ref.device),
    )
