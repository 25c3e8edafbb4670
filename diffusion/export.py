"""LoRA files in the formats diffusion users share, and full pipeline export.

Written (from core's LoRA / LoCon adapters on ``unet.*`` and ``text_encoder*.*``):

* diffusers / PEFT keys, what ``pipe.load_lora_weights`` reads: ``unet.<module>.lora_A.weight``
  and ``.lora_B.weight`` (the scale alpha / r folded into B, since the file carries no alpha),
  in ``pytorch_lora_weights.safetensors``;
* kohya keys (sd-scripts, A1111, ComfyUI): ``lora_unet_<module_with_underscores>.lora_down.weight``
  / ``.lora_up.weight`` / ``.alpha`` (``lora_te_`` for the text encoder, ``lora_te1_`` /
  ``lora_te2_`` for SDXL's two);
* from core's LoHa / LoKr adapters, LyCORIS keys in that kohya naming: ``<name>.hada_w1_a``
  ... ``.alpha`` (scale = alpha / r) and ``<name>.lokr_w1`` / ``.lokr_w2_a`` ... (a LoKr
  with no rank-decomposed side carries no alpha, LyCORIS' scale 1, so its scale is folded
  into ``lokr_w1``).

Read back: both, and LyCORIS LoHa (``hada_w1_a`` ...) and LoKr (``lokr_w1`` ...) keys in
kohya naming, into core's LoRA / LoHa / LoKr adapters. ``merge_and_save`` merges a
weight-space adapter into the denoiser and writes a complete diffusers pipeline folder.
"""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

import core
from core.errors import CheckpointError
from core.methods.kronecker import LoHa, LoHaAdapter, LoKr, LoKrAdapter
from core.methods.lora import LoRA, LoRAAdapter
from core.targeting import adapted_modules

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
FORMATS = ("diffusers", "kohya")
KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
LYCORIS = {"hada_": "loha", "lokr_": "lokr"}
LYCORIS_PREFIX = ((LoHaAdapter, "hada_"), (LoKrAdapter, "lokr_"))


def lora_adapters(model: nn.Module, name: str = "default") -> dict[str, LoRAAdapter]:
    """The LoRA / LoCon adapters called ``name`` in ``model``, by module path."""
    found = {
        path: w.adapters[name]
        for path, w in adapted_modules(model)
        if name in w.adapters and isinstance(w.adapters[name], LoRAAdapter)
    }
    if not found:
        raise CheckpointError(
            f"no LoRA adapter named {name!r} in the model; only LoRA / LoCon adapters can be "
            "written in the diffusers / kohya LoRA formats (merge_and_save exports the rest)."
        )
    return found


def kohya_name(path: str, sdxl: bool = False) -> str:
    """``unet.down_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_attn1_to_q``."""
    root, _, rest = path.partition(".")
    prefix = KOHYA_PREFIX.get(root)
    if prefix is None:
        raise CheckpointError(f"{path}: kohya names exist for {sorted(KOHYA_PREFIX)} only.")
    if sdxl and root == "text_encoder":
        prefix = "lora_te1"
    return f"{prefix}_{rest.replace('.', '_')}"


def lora_state_dict(
    model: nn.Module, fmt: str = "diffusers", name: str = "default", sdxl: bool = False
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under ``fmt``'s keys (see the module docstring): LoRA / LoCon in
    either format, LoHa / LoKr in kohya naming only (LyCORIS keys)."""
    if fmt not in FORMATS:
        raise CheckpointError(f"format must be one of {FORMATS}, got {fmt!r}.")
    if fmt == "kohya" and lycoris_adapters(model, name):
        return lycoris_state_dict(model, name, sdxl)
    out = {}
    for path, ad in lora_adapters(model, name).items():
        a, b = ad.A.detach().float().cpu(), ad.B.detach().float().cpu()
        if ad.kind == "embedding":
            raise CheckpointError(f"{path}: embedding LoRA has no diffusers/kohya key.")
        if fmt == "diffusers":
            out[f"{path}.lora_A.weight"] = a.contiguous()
            out[f"{path}.lora_B.weight"] = (b * ad.scale).contiguous()
        else:
            key = kohya_name(path, sdxl)
            out[f"{key}.lora_down.weight"] = a.contiguous()
            out[f"{key}.lora_up.weight"] = b.contiguous()
            out[f"{key}.alpha"] = torch.tensor(ad.scale * ad.r)
    return out


def lycoris_adapters(model: nn.Module, name: str = "default") -> dict[str, nn.Module]:
    """The LoHa / LoKr adapters called ``name`` in ``model``, by module path."""
    kinds = tuple(cls for cls, _ in LYCORIS_PREFIX)
    return {
        path: w.adapters[name]
        for path, w in adapted_modules(model)
        if name in w.adapters and isinstance(w.adapters[name], kinds)
    }


def lycoris_state_dict(
    model: nn.Module, name: str = "default", sdxl: bool = False
) -> dict[str, torch.Tensor]:
    """LoHa / LoKr adapters under LyCORIS' keys (``hada_*`` / ``lokr_*`` + ``alpha``), the
    layout ``load_lora`` reads back."""
    out = {}
    for path, ad in lycoris_adapters(model, name).items():
        prefix = next(p for cls, p in LYCORIS_PREFIX if isinstance(ad, cls))
        key = kohya_name(path, sdxl)
        tensors = {k: v.detach().float().cpu() for k, v in ad.named_parameters()}
        full_factors = prefix == "lokr_" and not any(k.endswith(("_a", "_b")) for k in tensors)
        if full_factors:  # LyCORIS reads such a LoKr with scale 1
            tensors["w1"] = tensors["w1"] * ad.scale
        else:
            out[f"{key}.alpha"] = torch.tensor(float(ad.scale * ad.r))
        out.update({f"{key}.{prefix}{k}": v.contiguous() for k, v in tensors.items()})
    if not out:
        raise CheckpointError(f"no LoHa / LoKr adapter named {name!r} in the model.")
    return out


def save_lora(
    model: nn.Module, path: str | Path, fmt: str = "diffusers", name: str = "default"
) -> Path:
    """Write the adapter as one safetensors file (a folder gets ``DIFFUSERS_FILE``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / DIFFUSERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model, fmt, name)
    safetensors.torch.save_file(state, str(path), metadata={"format": "pt"})
    return path


# --- import ------------------------------------------------------------------------------


def _kohya_paths(model: nn.Module) -> dict[str, str]:
    """kohya name -> module path for every module of ``model`` under a known root."""
    lookup = {}
    for path, _ in model.named_modules():
        root = path.partition(".")[0]
        if root in KOHYA_PREFIX and "." in path:
            clean = path.replace(".base_layer", "")
            lookup[kohya_name(clean)] = clean
            if root == "text_encoder":
                lookup[kohya_name(clean, sdxl=True)] = clean
    return lookup


def split_keys(
    state: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, dict[str, torch.Tensor]]:
    """Group a LoRA file's tensors by module path: {path: {"A"/"B"/"alpha"/hada_...: tensor}}."""
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    kohya = None
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            path, _, leaf = key.rpartition(".lora_")
            groups[path]["A" if leaf.startswith("A") else "B"] = value
            continue
        module, _, leaf = key.partition(".")
        kohya = kohya if kohya is not None else _kohya_paths(model)
        if module not in kohya:
            raise CheckpointError(
                f"key {key!r} names no module of this model (expected diffusers "
                "'unet.<module>.lora_A.weight' or kohya 'lora_unet_<module>.lora_down.weight')."
            )
        leaf = {"lora_down.weight": "A", "lora_up.weight": "B"}.get(leaf, leaf)
        groups[kohya[module]][leaf] = value
    return dict(groups)


def _kind(tensors: dict[str, torch.Tensor]) -> str:
    for prefix, kind in LYCORIS.items():
        if any(k.startswith(prefix) for k in tensors):
            return kind
    if {"A", "B"} <= set(tensors):
        return "lora"
    raise CheckpointError(f"unrecognised LoRA tensors {sorted(tensors)}.")


def _rank(kind: str, t: dict[str, torch.Tensor]) -> int | None:
    if kind == "lora":
        return t["A"].shape[0]
    if kind == "loha":
        return t["hada_w1_b"].shape[0]
    for key in ("lokr_w1_b", "lokr_w2_b"):
        if key in t:
            return t[key].shape[0]
    return None  # LoKr with full factors: scale 1


def load_lora(model: nn.Module, path: str | Path, name: str = "default") -> list[str]:
    """Inject and fill adapters from a diffusers / kohya / LyCORIS file; returns the adapter
    names added (``name``, or ``name_loha`` ... when a file mixes kinds) and activates them."""
    file = Path(path)
    file = file / DIFFUSERS_FILE if file.is_dir() else file
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist.")
    groups = split_keys(safetensors.torch.load_file(str(file)), model)
    by_kind: dict[str, dict[str, dict[str, torch.Tensor]]] = defaultdict(dict)
    for module, tensors in groups.items():
        by_kind[_kind(tensors)][module] = tensors
    names = []
    for kind, modules in sorted(by_kind.items()):
        label = name if len(by_kind) == 1 else f"{name}_{kind}"
        _load_kind(model, kind, modules, label)
        names.append(label)
    core.set_active(model, names)
    return names


def _load_kind(model: nn.Module, kind: str, modules: dict, label: str) -> None:
    ranks = {p: _rank(kind, t) for p, t in modules.items()}
    alphas = {}
    for p, t in modules.items():
        r = ranks[p]
        if kind == "lora" and "alpha" not in t:
            alphas[p] = float(r)  # diffusers: scale already folded into B
        else:
            alphas[p] = float(t["alpha"]) if "alpha" in t and r else float(r or 1)
    build_ranks = dict(ranks)
    extra = {}
    if kind == "lokr":  # core builds a full W2 when r >= max(W2's sides) / 2
        for p, t in modules.items():
            if ranks[p] is None:
                build_ranks[p] = max(t["lokr_w2"].shape[:2])
                alphas[p] = float(build_ranks[p])
        extra["decompose_both"] = any("lokr_w1_a" in t for t in modules.values())
    r0 = max(build_ranks.values(), default=1)
    cfg_cls = {"lora": LoRA, "loha": LoHa, "lokr": LoKr}[kind]
    cfg = cfg_cls(
        targets=tuple(sorted(modules)),
        r=r0,
        alpha=float(r0),
        rank_pattern={re.escape(p): r for p, r in build_ranks.items() if r != r0},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != r0},
        **extra,
    )
    core.inject(model, cfg, name=label)
    wrappers = dict(adapted_modules(model))
    with torch.no_grad():
        for p, tensors in modules.items():
            adapter = wrappers[p].adapters[label]
            _fill(adapter, kind, tensors, p)


def _fill(adapter: nn.Module, kind: str, tensors: dict[str, torch.Tensor], path: str) -> None:
    own = dict(adapter.named_parameters())
    for key, value in tensors.items():
        if key == "alpha":
            continue
        attr = key if kind == "lora" else key.split("_", 1)[1]
        if attr not in own or own[attr].shape != value.shape:
            have = {k: list(v.shape) for k, v in own.items()}
            raise CheckpointError(
                f"{path}: tensor {key} {list(value.shape)} does not fit the adapter {have}."
            )
        own[attr].copy_(value.to(own[attr].dtype))


# --- merged pipeline ---------------------------------------------------------------------


def merge_and_save(module, folder: str | Path) -> Path:
    """Merge the module's adapters into its denoiser (and trained text encoder) and write a
    complete diffusers pipeline folder: the pretrained folder's parts with those replaced."""
    folder = Path(folder)
    src = Path(module.hparams.pretrained)
    if not src.is_dir():
        raise CheckpointError(
            f"merge_and_save copies the other parts from a local pipeline folder; "
            f"{src} is not one (download the checkpoint first)."
        )
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(src, folder)
    model = module.model
    if module.method is not None:
        core.unload(model, merge_adapters=True)
    denoiser = model.denoiser
    shutil.rmtree(folder / model.denoiser_name)
    denoiser.save_pretrained(folder / model.denoiser_name)
    te = getattr(model, "text_encoder", None)
    if te is not None:
        shutil.rmtree(folder / "text_encoder")
        te.save_pretrained(folder / "text_encoder")
    return folder


__all__ = [
    "DIFFUSERS_FILE",
    "FORMATS",
    "kohya_name",
    "load_lora",
    "lora_state_dict",
    "lycoris_state_dict",
    "merge_and_save",
    "save_lora",
    "split_keys",
]
