"""Shared helpers of the medical tests: one intra-op thread, tiny model settings."""

from __future__ import annotations

TINY_VIT = "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 4}"
TINY_DENSENET = "{init_features: 8, growth_rate: 4, block_config: [1, 1, 1, 1]}"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
