"""Med-VQA vision towers: PeFoMed's 4-adjacent-token merge, open_clip towers (a local
open_clip folder as BiomedCLIP ships, open_clip's timm-trunk wrapper) read as patch tokens,
and a tiny Med-VQA fit + generation on an open_clip tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn
from med_toy import QUIET

from core.backbones import BackboneError
from core.errors import ConfigError
from medical.vqa import VQACLI, write_tiny_llama
from medical.vqa_synthetic import vocabulary_texts, write_vqa_rad
from medical.vqa_vision import (
    OpenCLIPTokens,
    TimmTokens,
    build_vision,
    merge_tokens,
    patch_tokens_module,
)

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "medical"
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"layers": 2, "width": 32, "patch_size": 8, "head_width": 8, "image_size": 32},
    "text_cfg": {"layers": 1, "width": 16, "heads": 2, "context_length": 4, "vocab_size": 32},
}


def test_merge_concatenates_every_four_adjacent_patch_tokens():
    tokens = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(2, 8, 3)
    merged = merge_tokens(tokens, 4)
    assert merged.shape == (2, 2, 12)
    for b in range(2):
        for j in range(2):
            expected = torch.cat([tokens[b, 4 * j + i] for i in range(4)])
            assert torch.equal(merged[b, j], expected)
    with pytest.raises(ConfigError, match="6 patch tokens cannot be merged in groups of 4"):
        merge_tokens(tokens[:, :6], 4)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A local open_clip folder (open_clip_config.json + weights), as BiomedCLIP ships."""
    import open_clip

    torch.manual_seed(7)
    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_image_size=32, **TINY_CLIP)
    folder = tmp_path_factory.mktemp("clip")
    cfg = {"model_cfg": TINY_CLIP}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file(clip.state_dict(), folder / "open_clip_model.safetensors")
    return folder, clip.visual.eval()


def test_open_clip_local_folder_tower_gives_its_patch_tokens(clip_folder):
    folder, reference = clip_folder
    tower = build_vision(f"open_clip:local-dir:{folder}", 32, True, None, {}).eval()
    assert isinstance(tower, OpenCLIPTokens) and tower.width == 32
    images = torch.randn(2, 3, 32, 32)
    reference.output_tokens = True
    with torch.no_grad():
        want = reference(images)[1]  # open_clip's own patch tokens (class token excluded)
        got = tower(images)
    reference.output_tokens = False
    assert got.shape == (2, (32 // 8) ** 2, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_open_clip_timm_trunk_tower_reads_the_trunk_tokens():
    """BiomedCLIP's vision tower is open_clip's TimmModel: a timm ViT under ``trunk``."""
    wrapper = nn.Module()
    wrapper.trunk = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        patch_size=8,
        embed_dim=24,
        depth=1,
        num_heads=2,
    ).eval()
    tower = patch_tokens_module(wrapper)
    assert isinstance(tower, TimmTokens) and tower.width == 24
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tower(images), wrapper.trunk.forward_features(images)[:, 1:])


def test_attention_pooled_open_clip_tower_is_refused():
    visual = nn.Module()
    visual.attn_pool = nn.Identity()
    with pytest.raises(BackboneError, match="pools its tokens with attention"):
        OpenCLIPTokens(visual)


def test_med_vqa_fit_and_generate_on_an_open_clip_tower(clip_folder, tmp_path):
    folder, reference = clip_folder
    llama = write_tiny_llama(tmp_path / "llama", vocabulary_texts())
    cli = VQACLI(
        args=[
            "--config",
            str(CONFIGS / "vqa_demo.yaml"),
            "--model.llm",
            str(llama),
            "--model.vision",
            f"open_clip:local-dir:{folder}",
            "--model.vision_kwargs",
            "{}",
            "--model.vision_pretrained",
            "true",
            "--data.root",
            str(write_vqa_rad(tmp_path / "rad", images=6, test_images=1)),
            "--trainer.max_epochs",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            *QUIET,
        ],
        run=False,
    )
    model = cli.model.model
    assert isinstance(model.vision, OpenCLIPTokens)
    assert model.projector.in_features == 4 * 32  # 4 merged tokens of the tower's width
    projector_before = model.projector.weight.detach().clone()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert not torch.equal(model.projector.weight, projector_before)  # the projector trained
    tower = dict(model.vision.tower.named_parameters())
    shared = [n for n, _ in reference.named_parameters() if n in tower]  # MHA's renamed
    assert "conv1.weight" in shared and len(shared) > 10
    for name, value in reference.named_parameters():
        if name in tower:
            assert torch.equal(tower[name], value), name  # frozen: still the loaded weights
    assert not any(p.requires_grad for p in model.vision.parameters())
    report = json.loads((Path(cli.trainer.log_dir) / "vqa_report.json").read_text())
    assert report["overall_count"] == 4 and 0.0 <= report["overall_accuracy"] <= 1.0
    model.eval()
    images = torch.randn(2, 3, 32, 32)
    prompts = cli.model.prompts({"task": ["vqa"] * 2, "question": ["which side?"] * 2})
    answers = model.generate(images, prompts, max_new_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert model.image_tokens(images).shape == (2, 16 // 4, model.llm.config.hidden_size)


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("vqa_*.yaml")))
def test_shipped_vqa_configs_name_real_arguments(config):
    import inspect

    import yaml

    from medical.vqa import MedVQAModule
    from medical.vqa_data import VQADataModule

    settings = yaml.safe_load((CONFIGS / config).read_text())
    model_args = set(inspect.signature(MedVQAModule.__init__).parameters)
    model_args |= set(inspect.signature(MedVQAModule.__mro__[1].__init__).parameters)
    assert set(settings["model"]) <= model_args, set(settings["model"]) - model_args
    assert set(settings["data"]) <= set(inspect.signature(VQADataModule.__init__).parameters)
    vision = settings["model"]["vision"]
    assert vision.startswith("open_clip:") or timm.is_model(vision), vision
    if settings["model"]["method"]["init_args"]["targets"] == ["q_proj", "v_proj"]:
        assert settings["model"]["method"]["init_args"]["r"] == 64  # PeFoMed's LoRA


def test_missing_tower_weights_name_the_vqa_flags():
    with pytest.raises(BackboneError) as caught:
        build_vision("open_clip:ViT-B-16", 32, True, None, {})
    message = str(caught.value)
    assert "no pretrained tag given" in message
    assert "--model.vision_checkpoint" in message and "--model.vision_pretrained false" in message
    assert "--model.checkpoint" not in message
