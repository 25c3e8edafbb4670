"""Small models built from configs: nothing here downloads weights."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_vit(num_classes: int = 10):
    import timm

    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=num_classes,
    ).eval()


def make_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture
def vit():
    return make_vit()


@pytest.fixture
def llama():
    return make_llama()


# --- shared test helpers ---------------------------------------------------------------------


def vit_input(batch: int = 2):
    return torch.randn(batch, 3, 32, 32)


def llama_input():
    return torch.randint(0, 128, (2, 9))


def run_vit(model, x):
    return model(x)


def run_llama(model, ids):
    return model(input_ids=ids).logits


def model_cases(vit_targets=None, llama_targets=None):
    """{"vit": (build, make_x, run[, targets]), "llama": ...}: targets appended where given."""
    cases = {"vit": (make_vit, vit_input, run_vit), "llama": (make_llama, llama_input, run_llama)}
    for case, targets in (("vit", vit_targets), ("llama", llama_targets)):
        if targets is not None:
            cases[case] += (targets,)
    return cases


def randomise(model, key=".adapters.", std=0.2):
    """Overwrite every parameter whose name contains ``key`` with N(0, std)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.normal_(std=std)


def perturb(model, key=".adapters.", std=0.1):
    """Add N(0, std) noise to every parameter whose name contains ``key``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if key in name:
                p.add_(torch.randn_like(p) * std)


def adapters_of(model, name="default"):
    from core.targeting import adapted_modules

    return {path: w.adapters[name] for path, w in adapted_modules(model) if name in w.adapters}


def own_params(module):
    return sum(p.numel() for p in module.parameters())


def assert_merge_exact(model, x, run):
    """Merging leaves outputs unchanged and unmerging restores the base weights."""
    import core

    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        unmerged = run(model, x)
        core.merge(model)
        torch.testing.assert_close(run(model, x), unmerged, atol=1e-5, rtol=1e-5)
        core.unmerge(model)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


def assert_identity_merge_and_checkpoint(tmp_path, cfg):
    """On a ViT: ``cfg`` starts as the identity, then (randomised) merges exactly and
    survives a save / load round trip into a fresh copy of the model."""
    import copy

    import core

    model = make_vit()
    pristine = copy.deepcopy(model)
    x = vit_input()
    with torch.no_grad():
        before = model(x)
    core.inject(model, cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    randomise(model, std=0.05)
    with torch.no_grad():
        adapted = model(x)
    assert not torch.allclose(adapted, before, atol=1e-4)
    assert_merge_exact(model, x, run_vit)
    core.save_adapter(model, tmp_path)
    core.load_adapter(pristine, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pristine(x), adapted, atol=1e-5, rtol=1e-5)


@pytest.fixture
def single_thread():
    """Tiny models run fastest on one intra-op thread: a second thread only hands work back
    and forth (and takes the other core from whatever else runs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
