"""Frozen vision towers of the Med-VQA model and PeFoMed's patch-token merge.

PeFoMed (He et al., 2024) follows MiniGPT-v2: the frozen ViT's last-layer patch tokens,
in raster order, are grouped 4 by 4 and each group of adjacent tokens is concatenated
into one token of 4x the width before the linear projection into the LLM, so a 448 px
image gives (448 / 14)^2 / 4 = 256 visual tokens instead of 1024.

A tower is any timm ViT (``eva_giant_patch14_560...``, ``vit_base_patch16_224``) or an
open_clip vision tower given as ``open_clip:<arch>[:<pretrained tag>]``,
``open_clip:hf-hub:<org>/<repo>`` (e.g. BiomedCLIP) or ``open_clip:local-dir:/folder``.
Both are built by ``core.backbones.build_backbone`` (local checkpoint, hub, or random on
purpose, with its clear errors); this module only reads their patch tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from core.backbones import OPEN_CLIP_PREFIX, BackboneError, build_backbone
from core.errors import ConfigError


class TimmTokens(nn.Module):
    """Patch tokens of a timm ViT: ``forward_features`` without the class / register tokens."""

    def __init__(self, tower: nn.Module) -> None:
        super().__init__()
        if not hasattr(tower, "forward_features") or not hasattr(tower, "num_prefix_tokens"):
            raise BackboneError(
                f"{type(tower).__name__} is not a timm ViT (no forward_features / "
                "num_prefix_tokens); Med-VQA needs a ViT's patch tokens."
            )
        self.tower = tower
        self.width = int(tower.num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.tower.forward_features(images)[:, self.tower.num_prefix_tokens :]


class OpenCLIPTokens(nn.Module):
    """Patch tokens of an open_clip ``VisionTransformer``: the tokens its own forward returns
    with ``output_tokens`` (after ``ln_post``, before the pooled projection), class token
    excluded."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None:
            raise BackboneError(
                "this open_clip tower pools its tokens with attention (CoCa): its outputs are "
                "learned queries, not patches. Use a plain ViT tower (e.g. ViT-B-16)."
            )
        if not hasattr(visual, "transformer") or not hasattr(visual, "output_tokens"):
            raise BackboneError(
                f"{type(visual).__name__} is not an open_clip VisionTransformer or timm-trunk "
                "tower; Med-VQA needs a ViT's patch tokens."
            )
        visual.output_tokens = True
        self.tower = visual
        self.width = int(visual.transformer.width)
        # pool_type "none" returns every token, the class token first
        self.skip = 1 if getattr(visual, "pool_type", "tok") == "none" else 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, tokens = self.tower(images)
        return tokens[:, self.skip :]


def patch_tokens_module(tower: nn.Module) -> nn.Module:
    """The token reader for a built tower: timm ViT, open_clip ViT, or open_clip's timm
    wrapper (BiomedCLIP: a timm ViT under ``visual.trunk``)."""
    if hasattr(tower, "trunk"):
        return TimmTokens(tower.trunk)
    if hasattr(tower, "output_tokens"):
        return OpenCLIPTokens(tower)
    return TimmTokens(tower)


def build_vision(
    name: str,
    image_size: int,
    pretrained: bool,
    checkpoint: str | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    """The patch-token module of a timm ViT or an open_clip vision tower (see module doc)."""
    clip = name.startswith(OPEN_CLIP_PREFIX)
    try:
        # build_backbone adds a classifier head (1 class for open_clip, none for timm);
        # Med-VQA keeps the tower only
        model, _ = build_backbone(
            name,
            num_classes=1 if clip else 0,
            image_size=image_size,
            pretrained=pretrained,
            checkpoint=checkpoint,
            kwargs=kwargs,
        )
    except BackboneError as err:
        raise BackboneError(_vision_flags(str(err))) from None
    return patch_tokens_module(model.visual if clip else model)


def _vision_flags(message: str) -> str:
    """core's backbone errors name the classifier's flags; Med-VQA's are vision_*."""
    for flag in ("checkpoint", "pretrained", "backbone_kwargs"):
        target = "vision_kwargs" if flag == "backbone_kwargs" else f"vision_{flag}"
        message = message.replace(f"--model.{flag}", f"--model.{target}")
        message = message.replace(f"check {flag}", f"check {target}")
    return message


def merge_tokens(tokens: torch.Tensor, merge: int) -> torch.Tensor:
    """(B, N, C) -> (B, N / merge, C * merge): every ``merge`` adjacent patch tokens
    concatenated along the channels (PeFoMed / MiniGPT-v2, merge = 4)."""
    batch, count, width = tokens.shape
    if merge < 1 or count % merge:
        raise ConfigError(
            f"{count} patch tokens cannot be merged in groups of {merge}; pick a merge that "
            f"divides {count} (PeFoMed: 4) or change --data.image_size."
        )
    return tokens.reshape(batch, count // merge, width * merge)


__all__ = [
    "OpenCLIPTokens",
    "TimmTokens",
    "build_vision",
    "merge_tokens",
    "patch_tokens_module",
]
