"""Every registered method, one case each: identity at init (where its paper starts
there), merge equals the unmerged forward (or is refused), save/load reproduces outputs.

A new method must add a case here: the first test fails for any registered method
without one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import core
from conftest import make_llama, make_vit

VIT_IMAGES = (torch.randn(2, 3, 32, 32),)
TOKENS = (torch.randint(0, 128, (2, 7)),)


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: tuple
    cfg: dict
    starts_as_identity: bool = True  # False where the paper starts elsewhere
    call_kwargs: dict = field(default_factory=dict)
    prepare: Callable[[nn.Module, Case], None] | None = None  # a step before training


def vit(**cfg) -> Case:
    return Case(make_vit, VIT_IMAGES, cfg)


def llama(**cfg) -> Case:
    return Case(make_llama, TOKENS, cfg)


def select_by_gradients(model: nn.Module, case: Case) -> None:
    """GPS/SPT pick their entries from gradients on task data before training."""
    core.select(model, [case.inputs], loss_fn=lambda m, batch: m(*batch).pow(2).mean())


def selected(case: Case) -> Case:
    case.prepare = select_by_gradients
    return case


def starts_elsewhere(case: Case, **call_kwargs) -> Case:
    case.starts_as_identity = False
    case.call_kwargs = call_kwargs
    return case


CASES = {
    "lora": vit(targets=["qkv", "fc1"]),
    "oft": vit(targets=["qkv", "fc2"], block_size=16),
    "boft": vit(targets=["qkv"], block_size=4, butterfly_factors=2),
    "qgoft": vit(targets=["qkv"]),
    "fourierft": vit(targets=["qkv"], n_frequency=50, init="zeros"),
    "svft": vit(targets=["qkv"]),
    "svfit": vit(targets=["qkv"]),
    "soda": vit(targets=["qkv", "fc1"]),
    "ia3": vit(targets=["qkv", "fc2"], feedforward_modules=["fc2"]),
    "ssf": vit(targets=["qkv", "norm1"]),
    "bitfit": vit(targets=["qkv", "fc1"]),
    "difffit": vit(targets=["attn.proj", "fc2", "norm1"]),
    "ln_tuning": vit(targets=["norm1", "norm2"]),
    "bottleneck": vit(targets=["mlp"]),
    "adapter_bias": vit(targets=["fc2"]),
    "compacter": vit(targets=["mlp"], bottleneck=8),
    "vpt": starts_elsewhere(vit(targets=["blocks"], deep=True, num_virtual_tokens=3)),
    "prompt_tuning": starts_elsewhere(llama(targets=["model"], num_virtual_tokens=3)),
    "prefix_tuning": starts_elsewhere(llama(targets=["model"], num_virtual_tokens=3)),
    "control_prefix": starts_elsewhere(
        llama(targets=["model"], num_virtual_tokens=3), control_ids=torch.tensor([0, 1])
    ),
    "llama_adapter": llama(targets=["model.layers.1"]),
    "dora": vit(targets=["qkv", "proj", "fc1"]),
    "vera": vit(targets=["qkv", "fc1"], r=16),
    "dylora": vit(targets=["qkv", "fc1"]),
    "melora": vit(targets=["qkv", "fc1"], r=2, n=4),
    "sharelora": llama(targets=["q_proj", "v_proj"]),
    "capaboost": vit(targets=["qkv", "fc1"]),
    "loha": vit(targets=["qkv", "proj"]),
    "lokr": vit(targets=["qkv", "proj"]),
    "kadaptation": vit(targets=["qkv", "fc1"]),
    "surm": vit(targets=["qkv", "fc1"], structure="toeplitz"),
    "l4q": starts_elsewhere(vit(targets=["qkv", "fc1"], group_size=32)),
    "mov": vit(targets=["qkv", "fc2"], feedforward_modules=["fc2"], num_experts=3),
    "molora": vit(targets=["qkv", "fc1"], num_experts=3),
    "pesc": vit(targets=["mlp"], num_experts=3, bottleneck=8, dropout=0.0),
    "mpoe": vit(targets=["fc1"], num_experts=2, num_tensors=3),
    "diff_pruning": vit(targets=["qkv", "fc1"]),
    "adalora": vit(targets=["qkv", "fc1"], init_r=4, target_r=2),
    "increlora": vit(targets=["qkv", "fc1"]),
    "dora_dynamic": vit(targets=["qkv", "fc1"], r=4),
    "triadaptlora": vit(targets=["qkv", "fc1"], r=4),
    "diffora": vit(targets=["qkv", "fc1"], r=4),
    "styleinject": vit(targets=["qkv", "fc1"]),
    "gps": selected(vit(targets=["qkv", "fc1"])),
    "spt": selected(vit(targets=["qkv", "fc1"], density=0.05)),
}
# Methods whose contract is tested in their own file, because they need a setting the
# generic case cannot give: PERFT adapts an existing mixture-of-experts block (tiny
# Mixtral and Qwen2-MoE in test_mixtures.py), AdapterFusion fuses other adapters
# (test_compose.py).
ELSEWHERE = {"perft", "adapter_fusion"}


def run(model, case: Case, plain: bool = False):
    out = model(*case.inputs, **({} if plain else case.call_kwargs))
    return out.logits if hasattr(out, "logits") else out


def perturb(model):
    """Move every adapter tensor away from its initial value, as training would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_every_registered_method_has_a_case():
    # Domains may register their own methods (audio's Conformer adapter); those are tested
    # with their domain.
    in_core = [n for n, cls in core.METHODS.items() if cls.__module__.startswith("core.")]
    assert sorted(in_core) == sorted([*CASES, *ELSEWHERE])


@pytest.mark.parametrize("method", sorted(CASES))
def test_method_contract(method, tmp_path):
    case = CASES[method]
    cfg = core.METHODS[method](**case.cfg)
    torch.manual_seed(0)
    model = case.build().eval()
    pristine = copy.deepcopy(model)
    with torch.no_grad():
        before = run(model, case, plain=True)
    core.inject(model, cfg)
    if case.prepare is not None:
        case.prepare(model, case)
    assert core.param_report(model).trainable > 0
    with torch.no_grad():
        if case.starts_as_identity:
            torch.testing.assert_close(run(model, case), before, atol=1e-5, rtol=1e-5)
        perturb(model)
        adapted = run(model, case)
        assert not torch.allclose(adapted, before, atol=1e-4), "the adapter changes nothing"
        if cfg.mergeable:
            core.merge(model)
            torch.testing.assert_close(run(model, case), adapted, atol=1e-4, rtol=1e-4)
            core.unmerge(model)
            torch.testing.assert_close(run(model, case), adapted, atol=1e-4, rtol=1e-4)
        else:
            with pytest.raises(core.MergeError):
                core.merge(model)
        core.save_adapter(model, tmp_path)
        fresh = copy.deepcopy(pristine)
        core.load_adapter(fresh, tmp_path)
        torch.testing.assert_close(run(fresh, case), adapted, atol=1e-5, rtol=1e-5)


def test_unsupported_layer_is_named_for_every_weight_space_method():
    model = nn.Sequential(nn.GELU())
    for name, cls in core.METHODS.items():
        if not cls.mergeable or name in ("ssf", "ln_tuning", "difffit"):
            continue
        with pytest.raises(core.TargetError, match="GELU"):
            core.inject(model, cls(targets=["0"]))
        assert core.adapter_names(model) == []
