"""Mixed batches: every sample through its own adapter equals that sample run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import core
from conftest import make_llama, make_vit, perturb
from core.batching import batch_adapters
from core.config import AdapterConfig
from core.layers import Adapter
from core.methods.lora import LoRA
from core.methods.orthogonal import OFT
from core.methods.prompts import VPT
from core.methods.scaling import IA3, SSF


def alone(model: nn.Module, x: torch.Tensor, names: list, run=lambda m, x: m(x)) -> torch.Tensor:
    """Each sample run by itself with only its adapter active."""
    outs = []
    for i, name in enumerate(names):
        core.set_active(model, [] if name is None else [name])
        outs.append(run(model, x[i : i + 1]))
    return torch.cat(outs)


def lora_vit(names=("a", "b", "c")) -> nn.Module:
    model = make_vit()
    for i, name in enumerate(names):
        core.inject(model, LoRA(r=2 + i, alpha=4, targets=["qkv", "fc1", "fc2"]), name=name)
    perturb(model, std=0.2)
    return model


def test_lora_mixed_batch_equals_each_sample_alone_on_a_vit():
    model = lora_vit()
    x = torch.randn(6, 3, 32, 32)
    names = ["a", None, "c", "a", "b", None]
    with torch.no_grad():
        with batch_adapters(model, names):
            mixed = model(x)
        torch.testing.assert_close(mixed, alone(model, x, names), atol=1e-5, rtol=1e-5)


def test_lora_mixed_batch_equals_each_sample_alone_on_llama():
    model = make_llama()
    for name, r in (("x", 2), ("y", 4)):
        core.inject(model, LoRA(r=r, alpha=8, targets=["q_proj", "v_proj", "down_proj"]), name=name)
    perturb(model, std=0.2)
    ids = torch.randint(0, 128, (3, 7))
    names = ["y", "x", None]

    def logits(m, ids):
        return m(input_ids=ids).logits

    with torch.no_grad():
        with batch_adapters(model, names):
            mixed = logits(model, ids)
        torch.testing.assert_close(mixed, alone(model, ids, names, logits), atol=1e-5, rtol=1e-5)


def test_mixed_batch_gradients_are_the_per_sample_gradients_summed():
    model = lora_vit(("a", "b")).train()
    x = torch.randn(3, 3, 32, 32)
    names = ["b", "a", "b"]
    params = [p for n, p in model.named_parameters() if ".adapters." in n]
    for p in params:  # inject trains only the newest adapter; train both here
        p.requires_grad_(True)
    with batch_adapters(model, names):
        mixed = torch.autograd.grad(model(x).square().sum(), params)
    summed = [torch.zeros_like(p) for p in params]
    for i, name in enumerate(names):
        core.set_active(model, [name])
        per_sample = torch.autograd.grad(
            model(x[i : i + 1]).square().sum(), params, allow_unused=True
        )
        summed = [s if g is None else s + g for s, g in zip(summed, per_sample, strict=True)]
    for got, want in zip(mixed, summed, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_other_weight_space_methods_mix_in_one_batch():
    model = make_vit()
    core.inject(model, OFT(block_size=8, targets=["qkv"]), name="oft")
    core.inject(model, IA3(targets=["fc2", "qkv"], feedforward_modules=["fc2"]), name="ia3")
    core.inject(model, LoRA(r=2, targets=["patch_embed.proj", "fc1"]), name="conv_lora")
    core.inject(model, SSF(targets=["norm1"]), name="ssf")
    perturb(model, std=0.1)
    x = torch.randn(5, 3, 32, 32)
    names = ["ia3", "oft", None, "conv_lora", "ssf"]
    with torch.no_grad():
        with batch_adapters(model, names):
            mixed = model(x)
        torch.testing.assert_close(mixed, alone(model, x, names), atol=1e-5, rtol=1e-5)


class BlockScale(AdapterConfig):
    """A test method on whole blocks: y * (1 + s), declared separable per sample."""

    def build(self, module: nn.Module, path: str) -> Adapter:
        return BlockScaleAdapter()


class BlockScaleAdapter(Adapter):
    batch_separable = True

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.full((64,), 0.5))

    def post(self, x, y, base):
        return y * (1 + self.s)


def test_groups_inside_a_wrapped_block_route_their_own_samples():
    model = lora_vit(("a",))
    core.inject(model, BlockScale(targets=["blocks.0"]), name="block")
    x = torch.randn(4, 3, 32, 32)
    names = ["block", "a", "a", "block"]  # blocks.0 splits the batch; its qkv sees halves
    with torch.no_grad():
        with batch_adapters(model, names):
            mixed = model(x)
        torch.testing.assert_close(mixed, alone(model, x, names), atol=1e-5, rtol=1e-5)


def test_the_block_restores_routing_even_after_an_error():
    model = lora_vit(("a",))
    core.set_active(model, ["a"])
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    with pytest.raises(ValueError, match="first dimension must be the batch"):  # noqa: SIM117
        with batch_adapters(model, ["a", None, None]):
            model(x)
    torch.testing.assert_close(model(x), before)
    assert all(w.routing is None for _, w in core.targeting.adapted_modules(model))


def enter(model: nn.Module, names) -> None:
    with batch_adapters(model, names):
        pass


def test_names_and_methods_are_checked_on_entry():
    model = lora_vit(("a",))
    with pytest.raises(core.ConfigError, match="unknown adapter name"):
        enter(model, ["a", "nope"])
    with pytest.raises(core.ConfigError, match="one adapter name"):
        enter(model, "a")
    core.inject(model, VPT(num_virtual_tokens=2, patch_size=8, targets=["blocks"]), name="vpt")
    with pytest.raises(core.ConfigError, match="cannot share a batch"):
        enter(model, ["a", "vpt"])
    core.set_active(model, ["a"])
    core.merge(model)
    with pytest.raises(core.MergeError, match="unmerge"):
        enter(model, ["a"])


def test_bottleneck_adapters_mix_in_one_batch():
    model = make_vit()
    core.inject(model, core.Bottleneck(bottleneck=8, targets=["mlp"]), name="p")
    core.inject(model, core.Bottleneck(bottleneck=4, mode="parallel", targets=["mlp"]), name="q")
    perturb(model, std=0.2)
    x = torch.randn(4, 3, 32, 32)
    names = ["q", "p", None, "q"]
    with torch.no_grad():
        with batch_adapters(model, names):
            mixed = model(x)
        torch.testing.assert_close(mixed, alone(model, x, names), atol=1e-5, rtol=1e-5)


def test_batch_adapters_is_public():
    assert core.batch_adapters is batch_adapters
