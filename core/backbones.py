"""Image backbones shared by the domains: any timm model, or an open_clip vision tower.

timm and open_clip are imported inside the functions that need them, so ``import core``
works without either installed.

``build_backbone`` returns a classifier whose new head (``head_name``) maps features to the
task's classes. Weights come from a local file, else from the hub, else (on purpose,
``pretrained=False``) from random init, never silently from random init.

Two structural helpers make attention projections addressable by weight-space methods
without copying a weight:

* ``split_qkv`` turns a fused ``qkv`` Linear into three Linears ``q``, ``k``, ``v`` whose
  weights are views of the fused one, so a method can adapt q and v only, as the LoRA
  paper and the VTAB-1k tables do (timm fuses q, k, v into one 768 -> 2304 Linear).
* ``unfuse_multihead_attention`` replaces ``nn.MultiheadAttention`` (open_clip's towers),
  which reads its projection weights directly so a wrapped projection would never run,
  by an equivalent module with ``qkv`` and ``proj`` Linears over the same parameters.
"""

from __future__ import annotations

import difflib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import OmniPeftError

OPEN_CLIP_PREFIX = "open_clip:"


class BackboneError(OmniPeftError, ValueError):
    """A backbone name, its weights or its options are wrong or unavailable."""


def no_weights_message(name: str, reason: str) -> str:
    return (
        f"cannot get pretrained weights for backbone {name!r}: {reason.rstrip('. ')}. "
        "Give a local file "
        "with --model.checkpoint /path/to/weights.safetensors (safetensors, or a timm / "
        "open_clip checkpoint), make the hub reachable (or its cache filled), or pass "
        "--model.pretrained false to train from random init on purpose."
    )


# --- building ------------------------------------------------------------------------------


def build_backbone(
    name: str,
    *,
    num_classes: int,
    image_size: int,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    kwargs: dict[str, Any] | None = None,
) -> tuple[nn.Module, str]:
    """Build ``name`` with a fresh ``num_classes``-way head; returns (model, head name).

    ``name`` is a timm model name (any tag, e.g. ``vit_base_patch16_224.augreg2_in21k_ft_in1k``)
    or ``open_clip:<arch>`` / ``open_clip:<arch>:<pretrained tag>`` for a CLIP vision tower.
    ``kwargs`` go to ``timm.create_model`` (e.g. img_size, patch_size, embed_dim, depth,
    num_heads) or ``open_clip.create_model``.
    """
    if checkpoint is not None and not pretrained:
        raise BackboneError(
            f"--model.checkpoint {checkpoint} was given with --model.pretrained false; drop one "
            "(the checkpoint loads pretrained weights, pretrained false means random init)."
        )
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise BackboneError(f"checkpoint file {checkpoint} does not exist; check the path.")
    kwargs = dict(kwargs or {})
    if name.startswith(OPEN_CLIP_PREFIX):
        return _build_open_clip(name, num_classes, image_size, pretrained, checkpoint, kwargs)
    return _build_timm(name, num_classes, image_size, pretrained, checkpoint, kwargs)


def _build_timm(name, num_classes, image_size, pretrained, checkpoint, kwargs):
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        raise BackboneError(
            f"timm has no model {name!r}; close names: {close}. Use a timm name "
            "(timm.list_models('vit_*')) or open_clip:<arch> for a CLIP vision tower."
        )
    size = kwargs.pop("img_size", image_size)
    if size != image_size:
        raise BackboneError(
            f"backbone_kwargs img_size={size} differs from the data's image_size={image_size}; "
            "set --data.image_size (the model follows it) and drop img_size."
        )
    opts = {"num_classes": num_classes, **kwargs}
    if checkpoint is None:
        return _timm_from_hub_or_random(timm, name, size, pretrained, opts)
    # timm's own loader reads safetensors / .pth / .bin, applies the model's key conversions
    # and resizes position embeddings to img_size; it drops the old head, and with it loads
    # non-strictly, so what the file left out is found by comparing with a random build.
    rng = torch.get_rng_state()
    reference = _timm_create(timm, name, size, False, opts).state_dict()
    torch.set_rng_state(rng)
    try:
        model = _timm_create(
            timm, name, size, True, {**opts, "pretrained_cfg_overlay": {"file": str(checkpoint)}}
        )
    except Exception as err:
        raise BackboneError(
            f"checkpoint {checkpoint} does not load into {name!r}: {type(err).__name__}: "
            f"{err}. Give the weights of this architecture (check backbone_kwargs too)."
        ) from None
    head = _timm_head(model)
    _check_loaded(model, reference, head, name, checkpoint)
    return model, head


def _timm_from_hub_or_random(timm, name: str, size: int, pretrained: bool, opts: dict):
    try:
        model = _timm_create(timm, name, size, pretrained, opts)
    except Exception as err:  # hub unreachable, or no weights published for this name
        if pretrained:
            raise BackboneError(no_weights_message(name, f"{type(err).__name__}: {err}")) from None
        raise
    return model, _timm_head(model)


def _check_loaded(model: nn.Module, reference: dict, head: str, name: str, checkpoint) -> None:
    """Error if the checkpoint set none of the backbone's randomly initialised tensors; warn
    about those it left at their random init (usually the wrong architecture or size).

    Tensors initialised to a constant (LayerNorm ones, zero biases) cannot be told apart
    from loaded ones this way and are not checked.
    """
    state = model.state_dict()
    random_init = [
        k
        for k, v in state.items()
        if not k.startswith(f"{head}.") and k in reference and _is_random(reference[k])
    ]
    unset = [k for k in random_init if torch.equal(state[k], reference[k])]
    if random_init and len(unset) == len(random_init):
        raise BackboneError(
            f"checkpoint {checkpoint} does not load into {name!r}: none of its tensors matches "
            f"the model's names and shapes (e.g. {random_init[:3]}). Give the weights of this "
            "architecture (check backbone_kwargs too)."
        )
    if unset:
        warnings.warn(
            f"{len(unset)} tensor(s) of {name!r} are not in {checkpoint} and keep their random "
            f"init: {unset[:8]}",
            stacklevel=3,
        )


def _is_random(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point() or tensor.is_meta or tensor.numel() < 2:
        return False
    return not bool((tensor == tensor.flatten()[0]).all())


def _timm_create(timm, name: str, size: int, pretrained: bool, opts: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, img_size=size, **opts)
    except TypeError as err:  # models without an img_size argument (CNNs) take any size
        if "img_size" not in str(err):
            raise
        return timm.create_model(name, pretrained=pretrained, **opts)


def _timm_head(model: nn.Module) -> str:
    """The classifier's module name as timm records it ("head", "fc", "head.fc", ...)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier")
    return classifier if isinstance(classifier, str) else "head"


class CLIPImageClassifier(nn.Module):
    """An open_clip vision tower (``visual``) with a linear head on its image embedding."""

    def __init__(self, visual: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        width = visual.output_dim
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # timm's classifier init
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images))


def parse_open_clip(name: str) -> tuple[str, str | None]:
    """``open_clip:ViT-B-16:openai`` -> ("ViT-B-16", "openai"); hub archs keep their colon."""
    rest = name[len(OPEN_CLIP_PREFIX) :]
    if rest.startswith(("hf-hub:", "local-dir:")):
        return rest, None
    arch, _, tag = rest.partition(":")
    return arch, tag or None


def _build_open_clip(name, num_classes, image_size, pretrained, checkpoint, kwargs):
    import open_clip

    arch, tag = parse_open_clip(name)
    schema = arch.startswith(("hf-hub:", "local-dir:"))
    if not schema and open_clip.get_model_config(arch) is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        raise BackboneError(f"open_clip has no architecture {arch!r}; close names: {close}.")
    if "vision_cfg" in kwargs:
        kwargs["vision_cfg"] = {**kwargs["vision_cfg"], "image_size": image_size}
    else:
        kwargs["force_image_size"] = image_size
    source = str(checkpoint) if checkpoint is not None else (tag if pretrained else None)
    if pretrained and source is None and not schema:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise BackboneError(
            no_weights_message(
                name, f"no pretrained tag given (open_clip:{arch}:<tag>, tags: {tags})"
            )
        )
    try:
        clip = open_clip.create_model(arch, pretrained=source, load_weights=pretrained, **kwargs)
    except Exception as err:  # open_clip loads strictly: a wrong file fails here
        if checkpoint is not None:
            raise BackboneError(
                f"checkpoint {checkpoint} does not load into {name!r}: {type(err).__name__}: "
                f"{err}. Give the weights of this architecture (check backbone_kwargs too)."
            ) from None
        if pretrained:
            raise BackboneError(no_weights_message(name, f"{type(err).__name__}: {err}")) from None
        raise
    visual = clip.visual
    unfuse_multihead_attention(visual)
    return CLIPImageClassifier(visual, num_classes), "head"


# --- attention projections as separate modules ------------------------------------------


def _param_view(weight: torch.Tensor, rows: slice, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(weight.detach()[rows], requires_grad=requires_grad)


class SplitQKV(nn.Module):
    """A fused q/k/v Linear as three Linears ``q``, ``k``, ``v`` over views of its weight.

    Nothing is copied: each child's weight (and bias) is a row slice of the fused tensor.
    The forward concatenates the three outputs, so the surrounding attention code that
    expects the fused output runs unchanged.
    """

    def __init__(self, fused: nn.Linear) -> None:
        super().__init__()
        if fused.out_features % 3:
            raise BackboneError(
                f"cannot split a qkv Linear with {fused.out_features} outputs into q, k, v."
            )
        rows = fused.out_features // 3
        for i, part in enumerate(("q", "k", "v")):
            span = slice(i * rows, (i + 1) * rows)
            linear = nn.Linear(fused.in_features, rows, bias=False, device="meta")
            linear.weight = _param_view(fused.weight, span, fused.weight.requires_grad)
            if fused.bias is not None:
                linear.bias = _param_view(fused.bias, span, fused.bias.requires_grad)
            setattr(self, part, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(model: nn.Module) -> int:
    """Replace every Linear named ``qkv`` by a ``SplitQKV`` over the same storage.

    Returns how many were split. Do it after loading weights (state-dict names change from
    ``...qkv.weight`` to ``...qkv.q.weight``) and before injecting adapters.
    """
    found = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name == "qkv" and type(child) is nn.Linear
    ]
    for parent, name in found:
        setattr(parent, name, SplitQKV(getattr(parent, name)))
    return len(found)


class FusedSelfAttention(nn.Module):
    """``nn.MultiheadAttention`` self-attention with its projections as Linear modules.

    ``qkv`` holds MHA's own ``in_proj_weight``/``in_proj_bias`` parameter objects and
    ``proj`` is MHA's ``out_proj``, so nothing is copied and the output is the same; but
    now a method wrapping ``qkv``/``proj`` actually runs. Called like MHA and returns
    ``(output, None)``. Self-attention only (key and value must be the query).
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if mha.in_proj_weight is None or mha.bias_k is not None or mha.add_zero_attn:
            raise BackboneError(
                "only MultiheadAttention with a packed in-projection and no bias_k / "
                "add_zero_attn can be unfused."
            )
        dim = mha.embed_dim
        self.num_heads, self.batch_first, self.dropout = mha.num_heads, mha.batch_first, mha.dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, device="meta")
        self.qkv.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.qkv.bias = mha.in_proj_bias
        self.proj = mha.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("FusedSelfAttention does self-attention only.")
        if key_padding_mask is not None or need_weights:
            raise NotImplementedError("key_padding_mask / need_weights are not supported.")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = ~attn_mask  # MHA: True = masked out; SDPA: True = attend
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def unfuse_multihead_attention(model: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` by a ``FusedSelfAttention``; returns the count."""
    found = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.MultiheadAttention)
    ]
    for parent, name in found:
        setattr(parent, name, FusedSelfAttention(getattr(parent, name)))
    return len(found)


__all__ = [
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
