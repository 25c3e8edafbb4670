"""AST prefix tuning (attention over learned + own keys/values, checked by hand) and the
prefix-tuning and BitFit configs' parameter counts on an AST-base-shaped meta model."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
import yaml
from audio_toy import TINY_AST

import core
from audio.backbones import build_ast
from audio.methods import ASTPrefixTuning, PrefixAttention, prefix_count
from core.errors import OmniPeftError

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "audio"
MHSA = r"(.*\.)?blocks\.\d+\.attention"


def method_from_yaml(name: str):
    """The method config a YAML of configs/audio names (class_path + init_args)."""
    spec = yaml.safe_load((CONFIGS / name).read_text())["model"]["method"]
    module, _, cls = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), cls)(**spec["init_args"])


def tiny_with_prefix(n: int = 3):
    torch.manual_seed(0)
    model = build_ast(None, TINY_AST, 4, 100).eval()
    core.inject(model, ASTPrefixTuning(num_virtual_tokens=n, targets=MHSA))
    return model


def attention_by_hand(attn, prefix_k, prefix_v, x):
    """Multi-head attention of x over [prefix; own] keys and values, one head at a time."""
    heads, d = attn.num_attention_heads, x.shape[-1]
    d_h = d // heads
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    outputs = []
    for b in range(x.shape[0]):
        per_head = []
        for h in range(heads):
            cols = slice(h * d_h, (h + 1) * d_h)
            keys = torch.cat([prefix_k[:, cols], k[b, :, cols]])
            values = torch.cat([prefix_v[:, cols], v[b, :, cols]])
            scores = q[b, :, cols] @ keys.T / math.sqrt(d_h)
            per_head.append(torch.softmax(scores, dim=-1) @ values)
        outputs.append(torch.cat(per_head, dim=-1))
    return attn.o_proj(torch.stack(outputs))


def test_prefix_attention_equals_concatenated_keys_values_by_hand():
    model = tiny_with_prefix(n=3)
    wrapped = model.blocks[0].attention
    adapter = wrapped.adapters["default"]
    assert isinstance(adapter, PrefixAttention) and adapter.prefix_keys.shape == (3, 32)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        out, weights = wrapped(x)
        expected = attention_by_hand(
            wrapped.base_layer, adapter.prefix_keys, adapter.prefix_values, x
        )
        plain, _ = wrapped.base_layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert weights.shape == (2, 4, 7, 3 + 7)  # every query sees 3 prefixes + 7 tokens
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))
    assert not torch.allclose(out, plain, atol=1e-4)  # the prefixes change the attention


def test_prefix_tuning_trains_only_the_prefixes_and_head():
    model = tiny_with_prefix(n=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("prefix_keys" in n or "prefix_values" in n for n in trainable)
    assert len(trainable) == 2 * TINY_AST["num_hidden_layers"]
    model(torch.randn(2, 100, 128)).sum().backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_prefix_tuning_refuses_a_non_attention_target():
    model = build_ast(None, TINY_AST, 4, 100)
    with pytest.raises(OmniPeftError, match="ASTAttention"):
        core.inject(model, ASTPrefixTuning(targets=r"(.*\.)?blocks\.\d+\.mlp"))


def base_shaped():
    with torch.device("meta"):
        return build_ast(None, {}, 50, 500)  # ASTConfig defaults: 768 hidden, 12 layers


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_prefix_tuning_config_count_on_ast_base():
    config = method_from_yaml("prefix_tuning.yaml")
    assert isinstance(config, ASTPrefixTuning) and config.num_virtual_tokens == 24
    model = base_shaped()
    core.inject(model, config)
    assert trainable_count(model) == 12 * prefix_count(768, 24) == 12 * 2 * 24 * 768 == 442_368


def test_bitfit_config_count_on_ast_base():
    spec = yaml.safe_load((CONFIGS / "bitfit.yaml").read_text())["model"]
    assert spec["lr"] == pytest.approx(5e-3)
    model = base_shaped()
    core.inject(model, method_from_yaml("bitfit.yaml"))
    d, ffn = 768, 3072
    per_block = d + 4 * d + d + ffn + d  # two LayerNorms, q/k/v/o, fc1, fc2
    assert trainable_count(model) == d + 12 * per_block + d == 102_912
    # every bias of the encoder is covered, nothing else: same count as the biases themselves
    plain = base_shaped()
    biases = sum(
        p.numel() for n, p in plain.named_parameters() if n.endswith("bias") and "head" not in n
    )
    assert trainable_count(model) == biases
