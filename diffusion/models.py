"""Diffusion pipeline parts in diffusers format: load them, or build tiny ones from configs.

``load_parts(pretrained)`` reads a diffusers pipeline folder (local path or hub id):
Stable Diffusion 1.x/2.x (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``scheduler``), SDXL (plus ``text_encoder_2`` / ``tokenizer_2``) or a class-conditional
DiT (``transformer``, ``vae``, ``scheduler``). ``write_tiny_pipeline`` writes a small,
randomly initialised folder of either kind with the same layout, so tests and the demo
go through the same loading code as real checkpoints (no download is possible here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from core.errors import OmniPeftError

KINDS = ("sd", "sdxl", "dit")


class ModelError(OmniPeftError):
    """A pipeline folder is missing a part or holds an unsupported model."""


@dataclass
class Parts:
    """The denoiser (trained), and the frozen VAE, text encoders and noise scheduler."""

    kind: str
    denoiser: nn.Module
    vae: nn.Module
    scheduler: Any
    text_encoders: list[nn.Module] = field(default_factory=list)
    tokenizers: list[Any] = field(default_factory=list)


def detect_kind(pretrained: str | Path) -> str:
    """ "sd", "sdxl" or "dit" from ``model_index.json`` (or the sub-folders)."""
    root = Path(pretrained)
    index = root / "model_index.json"
    if index.is_file():
        names = set(json.loads(index.read_text()))
    elif root.is_dir():
        names = {p.name for p in root.iterdir() if p.is_dir()}
    else:
        names = _hub_index(str(pretrained))
    if "transformer" in names:
        return "dit"
    if "text_encoder_2" in names:
        return "sdxl"
    if "unet" in names:
        return "sd"
    raise ModelError(
        f"{pretrained} is not a diffusers pipeline folder with a 'unet' or 'transformer' "
        f"(found {sorted(names)}); give a folder saved by DiffusionPipeline.save_pretrained."
    )


def _hub_index(repo: str) -> set[str]:
    from diffusers import DiffusionPipeline

    try:
        return set(DiffusionPipeline.load_config(repo))
    except Exception as err:  # noqa: BLE001 - any hub/IO failure becomes one clear error
        raise ModelError(f"cannot read {repo!r} as a local folder or hub id: {err}") from None


def load_parts(pretrained: str | Path, dtype: torch.dtype = torch.float32) -> Parts:
    """Load a diffusers pipeline's parts; the frozen ones in ``dtype`` (fp16 on GPU)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DiTTransformer2DModel,
        UNet2DConditionModel,
    )

    kind, src = detect_kind(pretrained), str(pretrained)
    scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae", torch_dtype=dtype)
    if kind == "dit":
        denoiser = DiTTransformer2DModel.from_pretrained(src, subfolder="transformer")
        return Parts(kind, denoiser, vae, scheduler)
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    denoiser = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
    encoders = [CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype)]
    tokenizers = [AutoTokenizer.from_pretrained(src, subfolder="tokenizer")]
    if kind == "sdxl":
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder_2", dtype=dtype
            )
        )
        tokenizers.append(AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2"))
    return Parts(kind, denoiser, vae, scheduler, encoders, tokenizers)


# --- tiny pipelines for tests and the demo -----------------------------------------------

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32),
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 16,
}
TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "projection_dim": 32,
}
TINY_DIT = {
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 4,
    "num_layers": 4,
    "sample_size": 8,
    "patch_size": 2,
    "num_embeds_ada_norm": 4,
}


def tiny_tokenizer(folder: Path, max_length: int = 16):
    """A real ``CLIPTokenizer`` over a character vocabulary (no merges), saved to ``folder``."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789,.'-!?":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length
    )
    tok.save_pretrained(str(folder))
    return tok


def write_tiny_pipeline(folder: str | Path, kind: str = "sd", seed: int = 0) -> Path:
    """Write a small random pipeline of ``kind`` ("sd", "sdxl" or "dit") with diffusers'
    ``save_pretrained``, the layout of a real checkpoint folder."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    if kind not in KINDS:
        raise ModelError(f"tiny pipelines exist for {KINDS}, got {kind!r}.")
    folder = Path(folder)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
    )
    if kind == "dit":
        transformer = DiTTransformer2DModel(**TINY_DIT)
        DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder)
        return folder
    if kind == "sdxl":
        return _write_tiny_sdxl(folder, vae, scheduler)
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**TINY_UNET)
    tokenizer = tiny_tokenizer(folder / "tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY_TEXT
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


TINY_SDXL_UNET = {
    **TINY_UNET,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64,  # the two text encoders' hidden states concatenated
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled text + 6 time ids
    "use_linear_projection": True,
}


def _write_tiny_sdxl(folder: Path, vae: nn.Module, scheduler: Any) -> Path:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = [tiny_tokenizer(folder / name) for name in ("tokenizer", "tokenizer_2")]
    config = CLIPTextConfig(
        vocab_size=len(tokenizers[0]), bos_token_id=0, eos_token_id=1, pad_token_id=1, **TINY_TEXT
    )
    StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(config),
        text_encoder_2=CLIPTextModelWithProjection(config),
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=UNet2DConditionModel(**TINY_SDXL_UNET),
        scheduler=scheduler,
    ).save_pretrained(folder)
    return folder


def tie_embeddings(transformer: nn.Module) -> int:
    """Share block 0's timestep + class embedder across a diffusers DiT's blocks.

    diffusers' DiT gives every block's AdaLayerNormZero its own copy of the timestep and
    class (label) embedders, which the original DiT has once (``t_embedder``,
    ``y_embedder``); the checkpoint conversion fills every copy with the same weights.
    Sharing them restores the original model (DiT-XL/2: 675 M parameters), so they train
    once, as in DiffFit. Returns the number of blocks that share block 0's embedder.
    """
    blocks = getattr(transformer, "transformer_blocks", [])
    norms = [b.norm1 for b in blocks if hasattr(getattr(b.norm1, "emb", None), "class_embedder")]
    for norm in norms[1:]:
        norm.emb = norms[0].emb
    return len(norms)


__all__ = [
    "KINDS",
    "ModelError",
    "Parts",
    "detect_kind",
    "load_parts",
    "tie_embeddings",
    "tiny_tokenizer",
    "write_tiny_pipeline",
]
