"""LoRA inference on a ViT-S/16 shape: unmerged, merged, and mixed batches of 16 adapters.

The base is timm's ``vit_base_patch16_224`` at ViT-S/16 size (384 wide, 12 blocks, 6
heads, 224 px, batch 32; ``--quick``: a small ViT), LoRA r=8 on every block's qkv,
attn.proj, fc1 and fc2. The six forwards below and the base run interleaved
round-robin in one loop, in eval mode under ``torch.no_grad``:

    unmerged   omnipeft's LoRA layers vs PEFT's, vs the plain base model
    merged     after ``core.merge`` / PEFT's ``merge_adapter`` (wrappers stay in place)
    mixed      16 adapters, each sample through its own:
               ``with core.batch_adapters(model, names): model(x)`` vs PEFT's
               ``model(x, adapter_names=names)``, vs the base

PEFT's adapters are omnipeft's, exported with ``core.interop.save_peft``; every output
is checked against omnipeft's before timing.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import core

from .common import Table, Timing, clock_name, paired_ratio, shared_copy, time_interleaved
from .models import Task, VitShape, vit_task
from .peft_bridge import OUTPUT_TOL, ParityError, to_peft

TARGETS = ["qkv", "attn.proj", "fc1", "fc2"]  # "proj" alone would also hit patch_embed.proj
RANK = 8
MIXED_ADAPTERS = 16
PERTURB_STD = 0.05


@dataclass(frozen=True)
class Sizes:
    vit: VitShape
    warmup: int
    repeats: int


FULL = Sizes(
    vit=VitShape(embed=384, depth=12, heads=6, img=224, patch=16, batch=32), warmup=1, repeats=7
)
QUICK = Sizes(
    vit=VitShape(embed=192, depth=4, heads=3, img=64, patch=16, batch=16), warmup=1, repeats=5
)


def perturb_adapters(model: nn.Module, seed: int) -> None:
    """Random values in every adapter tensor (LoRA's B starts at zero: no update)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name:
                param.add_(PERTURB_STD * torch.randn(param.shape, generator=gen))


def no_grad_call(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn()

    return run


def check_outputs(label: str, got: torch.Tensor, want: torch.Tensor) -> float:
    scale = max(1.0, want.abs().max().item())
    diff = (got - want).abs().max().item()
    if not diff <= OUTPUT_TOL * scale:
        raise ParityError(f"{label}: outputs differ by {diff:.3g} (scale {scale:.3g})")
    return diff


# --- unmerged and merged ----------------------------------------------------------------------


def lora_models(task: Task) -> dict[str, nn.Module]:
    """omnipeft and PEFT LoRA models over the task's base, unmerged and merged."""
    ours = shared_copy(task.base)
    core.inject(ours, core.LoRA(r=RANK, targets=TARGETS))
    perturb_adapters(ours, seed=1)
    ours_merged = copy.deepcopy(ours)  # its own weights: merging writes into them
    core.merge(ours_merged)
    theirs = to_peft(ours, shared_copy(task.base), trainable=False)
    theirs_merged = to_peft(ours, copy.deepcopy(task.base), trainable=False)
    theirs_merged.merge_adapter()
    models = {
        "omnipeft": ours,
        "peft": theirs,
        "omnipeft merged": ours_merged,
        "peft merged": theirs_merged,
    }
    for model in models.values():
        model.eval()
    return models


def check_lora_models(task: Task, models: dict[str, nn.Module]) -> dict[str, float]:
    with torch.no_grad():
        want = task.outputs(models["omnipeft"])
        effect = (want - task.outputs(task.base)).abs().max().item()
        diffs = {k: check_outputs(k, task.outputs(m), want) for k, m in models.items()}
    if effect < 1e-2:
        raise ParityError(f"LoRA inference: the adapter barely changes the output ({effect:.3g})")
    return diffs


# --- mixed batches ----------------------------------------------------------------------------


def sample_names(batch: int, seed: int = 0) -> list[str]:
    """Every adapter on batch / 16 samples, shuffled (not sorted by adapter)."""
    names = [f"a{i % MIXED_ADAPTERS}" for i in range(batch)]
    random.Random(seed).shuffle(names)
    return names


def mixed_calls(task: Task) -> dict[str, Callable[[], torch.Tensor]]:
    """Forwards of a mixed batch over 16 adapters: omnipeft's and PEFT's."""
    names = [f"a{i}" for i in range(MIXED_ADAPTERS)]
    per_sample = sample_names(task.batch)
    ours = shared_copy(task.base)
    for name in names:
        core.inject(ours, core.LoRA(r=RANK, targets=TARGETS), name=name)
    perturb_adapters(ours, seed=2)
    theirs = to_peft(ours, shared_copy(task.base), names=names, trainable=False)
    for model in (ours, theirs):
        model.eval()

    def ours_mixed() -> torch.Tensor:
        with core.batch_adapters(ours, per_sample):
            return task.outputs(ours)

    def theirs_mixed() -> torch.Tensor:
        return task.outputs(theirs, adapter_names=per_sample)

    core.set_active(ours, [names[0]])
    with torch.no_grad():
        single = task.outputs(ours)  # one adapter for every sample
    return {"omnipeft mixed": ours_mixed, "peft mixed": theirs_mixed, "single": lambda: single}


def check_mixed(calls: dict[str, Callable[[], torch.Tensor]]) -> float:
    with torch.no_grad():
        want = calls["omnipeft mixed"]()
        diff = check_outputs("mixed batch", calls["peft mixed"](), want)
    if (want - calls["single"]()).abs().max().item() < 1e-3:
        raise ParityError("mixed batch: the per-sample adapters change nothing")
    return diff


# --- tables -----------------------------------------------------------------------------------


def inference_table(task: Task, timings: dict[str, Timing]) -> Table:
    table = Table(
        f"LoRA r={RANK} inference vs HF PEFT and the base model, {task.name} "
        f"(median {clock_name()} ms; peft/omni > 1: omnipeft faster)",
        ["mode", "omni ms", "peft ms", "peft/omni", "base ms", "omni over base"]
        + ["peft over base"],
    )
    for mode, ours, theirs in (
        ("unmerged", "omnipeft", "peft"),
        ("merged", "omnipeft merged", "peft merged"),
        (f"mixed batch, {MIXED_ADAPTERS} adapters", "omnipeft mixed", "peft mixed"),
    ):
        t_o, t_p, t_b = timings[ours], timings[theirs], timings["base"]
        table.rows.append(
            [
                mode,
                t_o.median,
                t_p.median,
                paired_ratio(t_p, t_o),
                t_b.median,
                overhead(paired_ratio(t_o, t_b)),
                overhead(paired_ratio(t_p, t_b)),
            ]
        )
    table.notes += [
        f"LoRA on {', '.join(TARGETS)} of every block. Mixed batch: sample i runs adapter "
        f"names[i] (samples per adapter: {task.batch // MIXED_ADAPTERS}, shuffled; omnipeft: "
        "core.batch_adapters, PEFT: model(x, adapter_names=names)).",
        "All seven forwards ran interleaved in one loop; ratios and overheads are medians of "
        "per-round ratios. Every output was checked against omnipeft's before timing.",
    ]
    return table


def overhead(relative: float) -> str:
    return f"{100 * (relative - 1):+.1f}%"


def run(quick: bool, log: Callable[[str], None] = print) -> dict:
    s = QUICK if quick else FULL
    task = vit_task(s.vit)
    log(f"  building LoRA models on {task.name} ...")
    models = lora_models(task)
    diffs = check_lora_models(task, models)
    mixed = mixed_calls(task)
    diffs["mixed"] = check_mixed(mixed)
    log(f"    parity: max|diff| {max(diffs.values()):.1e}")
    fns = {"base": no_grad_call(lambda: task.outputs(task.base))}
    fns.update({k: no_grad_call(lambda m=m: task.outputs(m)) for k, m in models.items()})
    fns.update({k: no_grad_call(mixed[k]) for k in ("omnipeft mixed", "peft mixed")})
    log(f"    timing {len(fns)} forwards, interleaved ...")
    timings = time_interleaved(fns, warmup=s.warmup, repeats=s.repeats)
    table = inference_table(task, timings)
    return {
        "sizes": asdict(s),
        "model": task.name,
        "parity_max_abs_diff": diffs,
        "timings": {k: v.as_dict() for k, v in timings.items()},
        "tables": [table.as_dict()],
        "table_objects": [table],
    }
