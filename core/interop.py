"""HF PEFT interop: read and write PEFT adapter folders (``adapter_config.json`` +
``adapter_model.safetensors``) so adapters move between omnipeft and ``peft`` with
identical outputs. LoRA now; each method family adds its own ``PeftFormat`` here.

Only safetensors are read: a PEFT folder with only ``adapter_model.bin`` (pickle) is
refused with instructions to convert it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from .checkpoint import atomic_write, install
from .config import AdapterConfig
from .errors import CheckpointError
from .inject import adapter_config, adapter_names
from .layers import is_fan_in_fan_out
from .methods.lora import LoRA, LoRAAdapter
from .targeting import adapted_modules, find_targets, walk

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class PeftFormat:
    """How one method's tensors and config are spelled in PEFT."""

    peft_type: str
    config_cls: type[AdapterConfig]
    # PEFT tensor suffix -> omnipeft tensor name, per base-layer kind
    tensor_names: dict[str, str]

    def is_adapter_key(self, suffix: str) -> bool:
        return any(suffix.endswith("." + k) for k in self.tensor_names)


LORA = PeftFormat(
    "LORA",
    LoRA,
    {
        "lora_A.weight": "A",
        "lora_B.weight": "B",
        "lora_embedding_A": "A",
        "lora_embedding_B": "B",
    },
)
FORMATS = {fmt.peft_type: fmt for fmt in (LORA,)}

# PEFT LoRA options whose effect omnipeft's LoRA does not reproduce (yet): refuse them
# instead of loading something that computes a different function.
_UNSUPPORTED_LORA = {
    "use_dora": False,
    "lora_bias": False,
    "bias": "none",
    "layers_to_transform": None,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
}


def lora_config_from_peft(pc: dict[str, Any]) -> LoRA:
    for key, neutral in _UNSUPPORTED_LORA.items():
        if pc.get(key, neutral) not in (neutral, [], {}):
            raise CheckpointError(
                f"this PEFT LoRA adapter sets {key}={pc[key]!r}, which omnipeft's LoRA does "
                "not load yet; export it from PEFT without that option."
            )
    return LoRA(
        targets=pc["target_modules"],
        exclude=pc.get("exclude_modules") or None,
        modules_to_save=pc.get("modules_to_save") or None,
        r=int(pc["r"]),
        alpha=float(pc["lora_alpha"]),
        dropout=float(pc.get("lora_dropout", 0.0)),
        use_rslora=bool(pc.get("use_rslora", False)),
        rank_pattern=dict(pc.get("rank_pattern") or {}),
        alpha_pattern=dict(pc.get("alpha_pattern") or {}),
    )


def load_peft(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False
) -> nn.Module:
    """Load an HF PEFT adapter folder into omnipeft layers as adapter ``name``."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder / CONFIG_FILE} is missing: not an HF PEFT adapter folder.")
    if not (folder / WEIGHTS_FILE).is_file():
        hint = (
            " It has adapter_model.bin, a pickle file omnipeft never opens; convert it with "
            "PEFT (save_pretrained(..., safe_serialization=True))."
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise CheckpointError(f"{folder / WEIGHTS_FILE} is missing.{hint}")
    try:
        pc = json.loads((folder / CONFIG_FILE).read_text())
        raw = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    except Exception as err:
        raise CheckpointError(f"{folder} cannot be read: {err}") from None
    fmt = FORMATS.get(pc.get("peft_type"))
    if fmt is None:
        raise CheckpointError(
            f"PEFT type {pc.get('peft_type')!r} has no omnipeft import yet; "
            f"supported: {sorted(FORMATS)}."
        )
    cfg = lora_config_from_peft(pc)

    present = dict(walk(model))
    tensors, bases, saved = {}, {}, set()
    for key, value in raw.items():
        inner = key.removeprefix(PREFIX)
        for peft_name, ours in fmt.tensor_names.items():
            if inner.endswith("." + peft_name):
                module = inner[: -len(peft_name) - 1]
                tensors[f"{module}.{ours}"] = value
                bases[module] = present.get(module)
                break
        else:
            if inner.endswith(".base_layer.weight"):
                # PEFT saves a targeted embedding's full weight beside its LoRA factors.
                _check_same_base(inner, value, present)
                continue
            # a modules_to_save tensor: "<module>.<param>"
            module = _owner(inner, cfg.modules_to_save or (), present)
            if module is None:
                raise CheckpointError(f"{key}: not a {fmt.peft_type} tensor of this model.")
            tensors[inner] = value
            saved.add(module)
    missing = sorted(p for p, m in bases.items() if m is None)
    if missing:
        raise CheckpointError(
            f"the PEFT adapter names modules this model lacks: {missing[:5]}; "
            "load it into the model it was trained on."
        )
    bases = {p: getattr(m, "base_layer", m) for p, m in bases.items()}
    return install(model, name, cfg, bases, sorted(saved), tensors, trainable=trainable)


def _check_same_base(inner: str, value: torch.Tensor, present: dict[str, nn.Module]) -> None:
    module = present.get(inner.removesuffix(".base_layer.weight"))
    weight = getattr(getattr(module, "base_layer", module), "weight", None)
    if weight is None or weight.shape != value.shape or not torch.equal(weight, value.to(weight)):
        raise CheckpointError(
            f"the PEFT adapter carries its own base weight for {inner} (e.g. a resized "
            "vocabulary) that differs from this model's; resize and load that weight into the "
            "model first, then load the adapter."
        )


def _owner(inner: str, names: tuple[str, ...], present: dict[str, nn.Module]) -> str | None:
    module = inner.rpartition(".")[0]
    if module in present and any(module == n or module.endswith("." + n) for n in names):
        return module
    return None


def save_peft(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` as an HF PEFT folder that ``PeftModel.from_pretrained`` loads
    with identical outputs.

    A PiSSA adapter is written as the equivalent plain LoRA of rank 2r on the original
    base weights ([B, -B0] [A; A0]), so PEFT needs no PiSSA conversion step.
    """
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    cfg = adapter_config(model, name)
    if not isinstance(cfg, LoRA):
        raise CheckpointError(f"PEFT export is not available for method {cfg.method!r} yet.")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    fan_in_fan_out = False
    for path_, wrapper in adapted_modules(model):
        if name not in wrapper.adapters:
            continue
        adapter: LoRAAdapter = wrapper.adapters[name]
        base = wrapper.base_layer
        fan_in_fan_out |= is_fan_in_fan_out(base)
        if adapter.kind == "conv" and any(d != 1 for d in base.dilation):
            raise CheckpointError(
                f"{path_}: PEFT's LoRA ignores a convolution's dilation, so this adapter "
                "would compute differently there; it cannot be exported exactly."
            )
        a, b, r = adapter.A.detach(), adapter.B.detach(), adapter.r
        if getattr(adapter, "principal_A", None) is not None:
            a = torch.cat([a, adapter.principal_A])
            b = torch.cat([b, -adapter.principal_B], dim=1)
            r = 2 * r
        ranks[path_] = r
        alphas[path_] = adapter.scale * (r**0.5 if cfg.use_rslora else r)
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if adapter.kind == "embedding"
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{PREFIX}{path_}.{a_key}"] = a
        tensors[f"{PREFIX}{path_}.{b_key}"] = b
    saved_paths = []
    for path_, module in find_targets(model, cfg.modules_to_save) if cfg.modules_to_save else []:
        saved_paths.append(path_)
        for key, value in module.state_dict().items():
            tensors[f"{PREFIX}{path_}.{key}"] = value
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "modules_to_save": saved_paths or None,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        # Per-module values, keyed by the escaped full name, keep every module exact.
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != cfg.r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != cfg.alpha},
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
    }
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    blob = safetensors.torch.save({k: v.contiguous().cpu() for k, v in tensors.items()})
    atomic_write(folder / WEIGHTS_FILE, blob)
    atomic_write(folder / CONFIG_FILE, json.dumps(peft_config, indent=2).encode())
    return folder


__all__ = ["FORMATS", "PeftFormat", "load_peft", "save_peft"]
