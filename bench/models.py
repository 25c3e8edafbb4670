"""Base models and their tasks for the benchmarks, all built from configs (no downloads).

A ``Task`` is a base model plus one fixed batch and the two calls every benchmark makes on
it: ``outputs(model)`` (what is compared between libraries and timed for inference) and
``loss(model)`` (the scalar a training step differentiates).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class VitShape:
    """A timm ``vit_base_patch16_224`` re-sized from its config, and the batch it sees."""

    embed: int
    depth: int
    heads: int
    img: int
    patch: int
    batch: int

    def describe(self) -> str:
        tokens = (self.img // self.patch) ** 2 + 1
        return (
            f"ViT d{self.embed} L{self.depth} h{self.heads} /{self.patch} @{self.img}px "
            f"({tokens} tokens), batch {self.batch}"
        )


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    seq: int
    batch: int

    def describe(self) -> str:
        return f"LLaMA h{self.hidden} L{self.layers} h{self.heads}, batch {self.batch}x{self.seq}"


@dataclass
class Task:
    """A base model, one batch, and how to run a model on it. Both calls take extra keyword
    arguments for the model (Control Prefixes' ``control_ids``, PEFT's ``adapter_names``)."""

    name: str
    base: nn.Module
    inputs: torch.Tensor  # the batch's main input (images or token ids)
    outputs: Callable[..., torch.Tensor]
    loss: Callable[..., torch.Tensor]

    @property
    def batch(self) -> int:
        return self.inputs.shape[0]


def build_vit(shape: VitShape, seed: int = 0) -> nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=shape.img,
        patch_size=shape.patch,
        embed_dim=shape.embed,
        depth=shape.depth,
        num_heads=shape.heads,
    )
    return model.requires_grad_(False).eval()


def vit_task(shape: VitShape, seed: int = 0) -> Task:
    base = build_vit(shape, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.randn(shape.batch, 3, shape.img, shape.img, generator=gen)
    labels = torch.randint(0, base.num_classes, (shape.batch,), generator=gen)

    def outputs(model: nn.Module, images: torch.Tensor = images, **kwargs) -> torch.Tensor:
        return model(images, **kwargs)

    def loss(model: nn.Module, images: torch.Tensor = images, **kwargs) -> torch.Tensor:
        return F.cross_entropy(model(images, **kwargs), labels)

    return Task(shape.describe(), base, images, outputs, loss)


def llama_task(shape: LlamaShape, seed: int = 0) -> Task:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=512,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config).requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
    return _causal_lm_task(shape.describe(), base, ids)


def mixtral_task(shape: LlamaShape, experts: int, seed: int = 0) -> Task:
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=512,
        num_local_experts=experts,
        num_experts_per_tok=2,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    base = MixtralForCausalLM(config).requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
    size = f"h{shape.hidden} L{shape.layers} {experts} experts"
    name = f"Mixtral {size}, batch {shape.batch}x{shape.seq}"
    return _causal_lm_task(name, base, ids)


def _causal_lm_task(name: str, base: nn.Module, ids: torch.Tensor) -> Task:
    def outputs(model: nn.Module, ids: torch.Tensor = ids, **kwargs) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False, **kwargs).logits

    def loss(model: nn.Module, ids: torch.Tensor = ids, **kwargs) -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss

    return Task(name, base, ids, outputs, loss)
