"""The Audio Spectrogram Transformer (Gong et al., 2021) from transformers, as a classifier
with a new head on the mean of all tokens (Cappellazzo et al., 2024).

``ASTClassifier`` keeps transformers' own modules (``embeddings``, the ``ASTLayer`` blocks,
the final ``norm``) and runs them itself, the blocks as one ``nn.Sequential`` (``blocks``)
so deep prompts (core's VPT, after AST's two prefix tokens) can wrap them. Sites for
methods: ``blocks.N.attention`` (MHSA, returns (output, weights)), ``blocks.N.mlp`` (FFN),
``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``, ``fc1`` / ``fc2``.

Weights: a hub id or a local folder in transformers format (``ASTModel.from_pretrained``,
the AudioSet-finetuned classification checkpoints included), else a config (tiny models
for tests and the demo). When the dataset's clip length differs from the checkpoint's,
the time axis of the position embeddings is cropped or interpolated, as AST's own
fine-tuning recipe does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import OmniPeftError

DEFAULT_PRETRAINED = "MIT/ast-finetuned-audioset-10-10-0.4593"
PREFIX_TOKENS = 2  # AST's class and distillation tokens
# The study's sites in this model: regular expressions over module names (core.targeting).
SITES = {"mhsa": r"(.*\.)?blocks\.\d+\.attention", "ffn": r"(.*\.)?blocks\.\d+\.mlp"}


class BackboneError(OmniPeftError, ValueError):
    """The AST weights or config cannot be loaded."""


def grid(config: Any, max_length: int) -> tuple[int, int]:
    """(frequency, time) patch counts for ``max_length`` frames (ASTEmbeddings' formula)."""
    f = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    t = (max_length - config.patch_size) // config.time_stride + 1
    return f, t


def resize_positions(model: nn.Module, config: Any, max_length: int) -> None:
    """Fit ``embeddings.position_embeddings`` to ``max_length`` frames: crop the time axis
    when shorter, interpolate it (bilinear) when longer; prefix tokens unchanged."""
    f, t_old = grid(config, config.max_length)
    _, t_new = grid(config, max_length)
    if t_new == t_old:
        return
    pos = model.embeddings.position_embeddings.data
    prefix, patches = pos[:, :PREFIX_TOKENS], pos[:, PREFIX_TOKENS:]
    patches = patches.reshape(1, f, t_old, -1).permute(0, 3, 1, 2)
    if t_new < t_old:
        patches = patches[..., :t_new]
    else:
        patches = F.interpolate(patches, size=(f, t_new), mode="bilinear", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, f * t_new, -1)
    model.embeddings.position_embeddings = nn.Parameter(torch.cat([prefix, patches], dim=1))
    model.config.max_length = max_length


def load_ast(pretrained: str | None, config: dict[str, Any] | None, max_length: int):
    """An ``ASTModel``: from ``pretrained`` (hub id or local folder), else from ``config``."""
    from transformers import ASTConfig, ASTModel

    if pretrained:
        if Path(pretrained).exists() and not (Path(pretrained) / "config.json").is_file():
            raise BackboneError(
                f"{pretrained} has no config.json: give a folder saved with "
                "save_pretrained (transformers format) or a hub id."
            )
        try:
            model = ASTModel.from_pretrained(pretrained, attn_implementation="eager")
        except OSError as err:
            raise BackboneError(f"cannot load AST weights from {pretrained!r}: {err}") from None
        resize_positions(model, model.config, max_length)
        return model
    cfg = ASTConfig(**{**(config or {}), "max_length": max_length})
    return ASTModel(cfg)


class ASTClassifier(nn.Module):
    """AST encoder + LayerNorm + a linear head on the mean over all tokens."""

    def __init__(self, ast: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.config = ast.config
        self.embeddings = ast.embeddings
        self.blocks = nn.Sequential(*ast.layers)
        self.norm = ast.layernorm
        self.head = nn.Linear(ast.config.hidden_size, num_classes)

    def features(self, input_values: torch.Tensor) -> torch.Tensor:
        """Token features after the final norm, (batch, tokens, hidden)."""
        return self.norm(self.blocks(self.embeddings(input_values)))

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(input_values).mean(dim=1))


def build_ast(
    pretrained: str | None,
    config: dict[str, Any] | None,
    num_classes: int,
    max_length: int,
) -> ASTClassifier:
    return ASTClassifier(load_ast(pretrained, config, max_length), num_classes)


__all__ = [
    "DEFAULT_PRETRAINED",
    "PREFIX_TOKENS",
    "SITES",
    "ASTClassifier",
    "BackboneError",
    "build_ast",
    "load_ast",
    "resize_positions",
]
