"""Shared helpers of the nlp tests: one thread, a tiny LLaMA config, a toy release."""

from __future__ import annotations

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 260,
    "max_position_embeddings": 512,
}
