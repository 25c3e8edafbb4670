"""Backbones for image classification: any timm model, or an open_clip vision tower.

The building and structural helpers live in ``core.backbones`` (medical uses them too) and
are re-exported here; see that module for ``build_backbone``, ``split_qkv`` and
``unfuse_multihead_attention``. ``DEFAULT_BACKBONE`` is the VTAB-1k papers' ViT-B/16.
"""

from __future__ import annotations

from core.backbones import (
    OPEN_CLIP_PREFIX,
    BackboneError,
    CLIPImageClassifier,
    FusedSelfAttention,
    SplitQKV,
    build_backbone,
    no_weights_message,
    parse_open_clip,
    split_qkv,
    unfuse_multihead_attention,
)

DEFAULT_BACKBONE = "vit_base_patch16_224.augreg2_in21k_ft_in1k"

__all__ = [
    "DEFAULT_BACKBONE",
    "OPEN_CLIP_PREFIX",
    "BackboneError",
    "CLIPImageClassifier",
    "FusedSelfAttention",
    "SplitQKV",
    "build_backbone",
    "no_weights_message",
    "parse_open_clip",
    "split_qkv",
    "unfuse_multihead_attention",
]
