"""Backbones: timm and open_clip builds, weights from local files, clear errors without
weights, q/v-addressable attention without copies, and the VTAB-1k parameter counts."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml
from vtab_toy import IMAGE_SIZE, TINY_VIT

import core
from core.methods.lora import LoRA
from core.methods.scaling import BitFit
from vision.backbones import (
    BackboneError,
    FusedSelfAttention,
    SplitQKV,
    build_backbone,
    parse_open_clip,
    split_qkv,
    unfuse_multihead_attention,
)
from vision.module import VisionClassifier

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "vision"
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"layers": 2, "width": 32, "patch_size": 8, "head_width": 8, "image_size": 32},
    "text_cfg": {"layers": 1, "width": 16, "heads": 2, "context_length": 4, "vocab_size": 32},
}


def tiny_timm(num_classes: int = 1000) -> nn.Module:
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=IMAGE_SIZE,
        num_classes=num_classes,
        **TINY_VIT,
    ).eval()


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(5))


# --- q, k, v as separate modules -----------------------------------------------------------


def test_split_qkv_views_the_fused_weight_and_keeps_the_output():
    model = tiny_timm()
    fused = model.blocks[0].attn.qkv
    weight, bias = fused.weight, fused.bias
    total = sum(p.numel() for p in model.parameters())
    x = images()
    want = model(x)
    assert split_qkv(model) == 2
    split = model.blocks[0].attn.qkv
    assert isinstance(split, SplitQKV)
    assert torch.equal(model(x), want)
    assert sum(p.numel() for p in model.parameters()) == total  # nothing added
    # Views, not copies: each part starts at its row offset in the fused storage.
    rows = 32 * 32 * weight.element_size()
    for i, part in enumerate((split.q, split.k, split.v)):
        assert part.weight.shape == (32, 32) and part.bias.shape == (32,)
        assert part.weight.data_ptr() == weight.data_ptr() + i * rows
        assert part.bias.data_ptr() == bias.data_ptr() + i * 32 * bias.element_size()
        assert part.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()


def test_lora_on_q_and_v_only_leaves_the_key_rows_untouched():
    model = tiny_timm()
    split_qkv(model)
    core.inject(model, LoRA(r=2, targets=["q", "v"]))
    attn = model.blocks[0].attn.qkv
    with torch.no_grad():
        for part in (attn.q, attn.v):
            part.adapters["default"].B.fill_(0.1)
    x = torch.randn(5, 32)
    fused = torch.cat([attn.q(x), attn.k(x), attn.v(x)], dim=-1)
    assert torch.equal(attn(x), fused)
    base_k = attn.k.weight
    assert torch.equal(attn.k(x), x @ base_k.T + attn.k.bias)  # key rows: frozen base only
    assert not torch.allclose(attn.q(x), x @ attn.q.base_layer.weight.T + attn.q.base_layer.bias)


def test_split_qkv_on_a_model_without_qkv_is_a_clear_error():
    with pytest.raises(BackboneError, match="no Linear named 'qkv'"):
        VisionClassifier(
            LoRA(targets=["fc1"]),
            backbone="resnet18",
            pretrained=False,
            split_qkv=True,
            num_classes=3,
            image_size=IMAGE_SIZE,
        )


def test_multihead_attention_unfused_into_qkv_and_proj_gives_the_same_output():
    import open_clip

    clip = open_clip.create_model(
        "ViT-B-16", pretrained=None, force_image_size=IMAGE_SIZE, **TINY_CLIP
    )
    visual = clip.visual.eval()
    mha = visual.transformer.resblocks[0].attn
    in_proj, out_proj = mha.in_proj_weight, mha.out_proj
    x = images()
    want = visual(x)
    assert unfuse_multihead_attention(visual) == 2
    attn = visual.transformer.resblocks[0].attn
    assert isinstance(attn, FusedSelfAttention)
    assert attn.qkv.weight is in_proj and attn.proj is out_proj  # the same parameter objects
    torch.testing.assert_close(visual(x), want, rtol=1e-5, atol=1e-6)


def test_open_clip_tower_builds_and_lora_on_its_qkv_runs():
    assert parse_open_clip("open_clip:ViT-B-16:openai") == ("ViT-B-16", "openai")
    assert parse_open_clip("open_clip:ViT-B-16") == ("ViT-B-16", None)
    assert parse_open_clip("open_clip:hf-hub:org/repo") == ("hf-hub:org/repo", None)
    module = VisionClassifier(
        LoRA(r=2, targets=["qkv", "attn.proj"]),
        backbone="open_clip:ViT-B-16",
        backbone_kwargs=TINY_CLIP,
        pretrained=False,
        num_classes=3,
        image_size=IMAGE_SIZE,
    ).eval()
    x = images()
    before = module(x)
    assert before.shape == (2, 3)
    wrapped = module.model.visual.transformer.resblocks[1].attn.qkv
    with torch.no_grad():
        wrapped.adapters["default"].B.fill_(0.05)
    assert not torch.allclose(module(x), before)  # the adapter is on the path that runs
    assert module.parameter_counts()["trainable_without_head"] == 2 * (
        2 * (32 + 96) + 2 * (32 + 32)
    )


# --- weights -----------------------------------------------------------------------------


def test_timm_weights_load_from_a_local_safetensors_or_pth_file(tmp_path):
    source = tiny_timm()
    state = source.state_dict()
    safetensors.torch.save_file(state, tmp_path / "weights.safetensors")
    torch.save({"state_dict": state}, tmp_path / "weights.pth")  # a timm training checkpoint
    for name in ("weights.safetensors", "weights.pth"):
        model, head = build_backbone(
            "vit_base_patch16_224",
            num_classes=4,
            image_size=IMAGE_SIZE,
            checkpoint=tmp_path / name,
            kwargs=TINY_VIT,
        )
        assert head == "head" and model.head.weight.shape == (4, 32)  # a fresh head
        loaded = model.state_dict()
        for key, value in state.items():
            if not key.startswith("head."):
                assert torch.equal(loaded[key], value), key


def test_open_clip_weights_load_from_a_local_file(tmp_path):
    import open_clip

    clip = open_clip.create_model(
        "ViT-B-16", pretrained=None, force_image_size=IMAGE_SIZE, **TINY_CLIP
    )
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    model, _ = build_backbone(
        "open_clip:ViT-B-16",
        num_classes=3,
        image_size=IMAGE_SIZE,
        checkpoint=tmp_path / "clip.pt",
        kwargs=TINY_CLIP,
    )
    assert torch.equal(model.visual.proj, clip.visual.proj)
    assert torch.equal(
        model.visual.transformer.resblocks[1].attn.qkv.weight,
        clip.visual.transformer.resblocks[1].attn.in_proj_weight,
    )


def test_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    safetensors.torch.save_file({"weight": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(BackboneError, match=r"other\.safetensors does not load into.*none of"):
        build_backbone(
            "vit_base_patch16_224",
            num_classes=4,
            image_size=IMAGE_SIZE,
            checkpoint=tmp_path / "other.safetensors",
            kwargs=TINY_VIT,
        )
    # A shallower model's weights leave the second block random: said, not silent.
    shallow = timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=IMAGE_SIZE, **{**TINY_VIT, "depth": 1}
    )
    safetensors.torch.save_file(shallow.state_dict(), tmp_path / "shallow.safetensors")
    with pytest.warns(UserWarning, match=r"not in .*shallow\.safetensors.*blocks\.1\."):
        build_backbone(
            "vit_base_patch16_224",
            num_classes=4,
            image_size=IMAGE_SIZE,
            checkpoint=tmp_path / "shallow.safetensors",
            kwargs=TINY_VIT,
        )
    with pytest.raises(BackboneError, match=r"other\.safetensors does not load into 'open_clip"):
        build_backbone(
            "open_clip:ViT-B-16",
            num_classes=4,
            image_size=IMAGE_SIZE,
            checkpoint=tmp_path / "other.safetensors",
            kwargs=TINY_CLIP,
        )


def test_no_weights_and_no_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # An unreachable hub with an empty cache, without touching the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", tempfile.mkdtemp())
    with pytest.raises(BackboneError) as err:
        build_backbone(
            "vit_base_patch16_224.augreg2_in21k_ft_in1k",
            num_classes=4,
            image_size=IMAGE_SIZE,
            kwargs=TINY_VIT,
        )
    message = str(err.value)
    assert "cannot get pretrained weights" in message
    assert "--model.checkpoint" in message and "--model.pretrained false" in message
    with pytest.raises(BackboneError, match="no pretrained tag given"):
        build_backbone("open_clip:ViT-B-16", num_classes=4, image_size=IMAGE_SIZE)


def test_backbone_option_errors_are_clear(tmp_path):
    with pytest.raises(BackboneError, match=r"timm has no model 'vit_bsae_patch16_224'.*vit_base"):
        build_backbone(
            "vit_bsae_patch16_224", num_classes=2, image_size=IMAGE_SIZE, pretrained=False
        )
    with pytest.raises(BackboneError, match="open_clip has no architecture"):
        build_backbone("open_clip:ViT-Q-99", num_classes=2, image_size=IMAGE_SIZE, pretrained=False)
    with pytest.raises(BackboneError, match="with --model.pretrained false"):
        build_backbone(
            "vit_base_patch16_224",
            num_classes=2,
            image_size=32,
            pretrained=False,
            checkpoint="w.pt",
        )
    with pytest.raises(BackboneError, match="does not exist"):
        build_backbone(
            "vit_base_patch16_224", num_classes=2, image_size=32, checkpoint="missing.pt"
        )
    with pytest.raises(BackboneError, match="img_size=64 differs from the data's image_size=32"):
        build_backbone(
            "vit_base_patch16_224",
            num_classes=2,
            image_size=32,
            pretrained=False,
            kwargs={**TINY_VIT, "img_size": 64},
        )


def test_random_init_is_reproducible_from_init_seed():
    def build(seed: int) -> VisionClassifier:
        return VisionClassifier(
            LoRA(targets=["qkv"]),
            backbone="vit_base_patch16_224",
            backbone_kwargs=TINY_VIT,
            pretrained=False,
            num_classes=3,
            image_size=IMAGE_SIZE,
            init_seed=seed,
        )

    a, b, c = build(0).state_dict(), build(0).state_dict(), build(1).state_dict()
    base = [k for k in a if ".adapters." not in k and "accuracy" not in k]
    assert all(torch.equal(a[k], b[k]) for k in base)
    assert not torch.equal(
        a["model.blocks.0.attn.qkv.base_layer.weight"],
        c["model.blocks.0.attn.qkv.base_layer.weight"],
    )


# --- the parameter counts VTAB-1k papers report (ViT-B/16 on the meta device) -----------


def meta_module(config: str, num_classes: int = 100) -> VisionClassifier:
    model = yaml.safe_load((CONFIGS / config).read_text())["model"]
    model["pretrained"] = False
    with torch.device("meta"):
        return VisionClassifier(**model, num_classes=num_classes)


def test_lora_r8_on_q_and_v_of_vit_b16_trains_0_29_m_parameters():
    module = meta_module("lora.yaml")
    assert module.model.blocks[0].attn.qkv.q.weight.is_meta
    assert module.method == LoRA(
        r=8, alpha=8, dropout=0.1, targets=["q", "v"], modules_to_save=["head"]
    )
    counts = module.parameter_counts()
    assert counts["trainable_without_head"] == 12 * 2 * 8 * (768 + 768) == 294_912
    assert counts["head"] == 768 * 100 + 100
    per_layer = core.param_report(module.model).by_module_type["Linear"]
    assert per_layer["modules"] == 24 and per_layer["adapter_params"] == 294_912


def test_bitfit_on_vit_b16_trains_every_bias_0_10_m_parameters():
    module = meta_module("bitfit.yaml")
    assert isinstance(module.method, BitFit)
    per_block = 768 + 3 * 768 + 768 + 768 + 4 * 768 + 768  # norm1, qkv, proj, norm2, fc1, fc2
    expected = 768 + 12 * per_block + 768  # + patch embedding and the final norm
    assert expected == 102_912
    assert module.parameter_counts()["trainable_without_head"] == expected
    # ... which is every bias of the backbone, head excluded.
    plain = timm.create_model("vit_base_patch16_224", pretrained=False, device="meta")
    biases = sum(p.numel() for n, p in plain.named_parameters() if n.endswith("bias"))
    assert biases - 1000 == expected


def test_vpt_deep_on_vit_b16_trains_depth_x_prompts_x_width_parameters():
    module = meta_module("vpt_deep.yaml")
    prompts = module.method.num_virtual_tokens
    assert module.parameter_counts()["trainable_without_head"] == 12 * prompts * 768 == 460_800
