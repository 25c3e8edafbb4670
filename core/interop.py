"""HF PEFT interop: read and write PEFT adapter folders (``adapter_config.json`` +
``adapter_model.safetensors``) so adapters move between omnipeft and ``peft`` with
identical outputs. Each method family registers its spelling as a
``core.peft_format.PeftFormat``; this module does the file and key work for all.

Only safetensors are read: a PEFT folder with only ``adapter_model.bin`` (pickle) is
refused with instructions to convert it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from .checkpoint import atomic_write, install
from .errors import CheckpointError
from .inject import adapter_config, adapter_names
from .peft_format import (
    MODULE_KEY_PREFIX,
    PEFT_FORMATS,
    PeftFormat,
    exact_names_regex,
    format_for_method,
    format_for_peft,
)
from .targeting import adapted_modules, find_targets, walk

PREFIX = MODULE_KEY_PREFIX  # kept for callers of the old name
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def read_peft_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
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
        return (
            json.loads((folder / CONFIG_FILE).read_text()),
            safetensors.torch.load_file(str(folder / WEIGHTS_FILE)),
        )
    except Exception as err:
        raise CheckpointError(f"{folder} cannot be read: {err}") from None


def load_peft(
    model: nn.Module, path: str | os.PathLike, name: str = "default", *, trainable: bool = False
) -> nn.Module:
    """Load an HF PEFT adapter folder into omnipeft layers as adapter ``name``."""
    peft_config, raw = read_peft_folder(Path(path))
    fmt = format_for_peft(peft_config)
    if fmt is None:
        raise CheckpointError(
            f"PEFT type {peft_config.get('peft_type')!r} has no omnipeft import yet; "
            f"supported: {sorted(PEFT_FORMATS)}."
        )
    fmt.check_options(peft_config)
    # Tensors PEFT saves once for the whole model (VeRA's shared projections).
    shared = {k: raw.pop(k) for k in fmt.shared_keys if k in raw}
    present = dict(walk(model))
    tensors: dict[str, dict[str, torch.Tensor]] = {}  # module -> {our tensor name: tensor}
    if fmt.whole_model:
        # Prompt learning: PEFT's own tensors carry no module prefix ("prompt_embeddings").
        own = {k: v for k, v in raw.items() if not k.startswith(fmt.key_prefix)}
        cfg, tensors = fmt.import_model(peft_config, own, model)
        raw = {k: v for k, v in raw.items() if k.startswith(fmt.key_prefix)}
    else:
        cfg = fmt.config_from_peft(peft_config)
    flat, saved = {}, set()
    for key, value in raw.items():
        inner = key.removeprefix(fmt.key_prefix)
        module, ours = (None, None) if fmt.whole_model else _split_adapter_key(fmt, inner)
        if module is not None:
            tensors.setdefault(module, {})[ours] = value
        elif inner.endswith(".base_layer.weight"):
            # PEFT saves a targeted embedding's full weight beside its adapter tensors.
            _check_same_base(inner, value, present)
        elif (owner := _owner(inner, cfg.modules_to_save or (), present)) is not None:
            flat[inner] = value
            saved.add(owner)
        else:
            raise CheckpointError(f"{key}: not a {fmt.peft_type} tensor of this model.")
    missing = sorted(p for p in tensors if present.get(p) is None)
    if missing:
        raise CheckpointError(
            f"the PEFT adapter names modules this model lacks: {missing[:5]}; "
            "load it into the model it was trained on."
        )
    bases = {p: getattr(present[p], "base_layer", present[p]) for p in tensors}
    if fmt.check_shared is not None:
        fmt.check_shared(cfg, shared, bases)
    for module, named in tensors.items():
        for ours, value in _converted(fmt, cfg, bases[module], named).items():
            flat[f"{module}.{ours}"] = value
    return install(model, name, cfg, bases, sorted(saved), flat, trainable=trainable)


def _converted(
    fmt: PeftFormat, cfg, base: nn.Module, named: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One module's PEFT tensors in omnipeft's layout (the format's optional hooks)."""
    if fmt.import_tensor is not None:
        named = {ours: fmt.import_tensor(cfg, ours, value) for ours, value in named.items()}
    if fmt.import_tensors is not None:
        named = fmt.import_tensors(base, named)
    return named


def _split_adapter_key(fmt: PeftFormat, inner: str) -> tuple[str | None, str | None]:
    for suffix, ours in fmt.tensor_names.items():
        if inner.endswith("." + suffix):
            return inner[: -len(suffix) - 1], ours
    return None, None


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


def save_peft(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    task_type: str | None = None,
) -> Path:
    """Write adapter ``name`` as an HF PEFT folder that ``PeftModel.from_pretrained`` loads
    with identical outputs.

    ``task_type`` overrides PEFT's task type, which picks the ``PeftModel`` class that
    loads the folder (prompt-learning formats infer it from the model class otherwise).
    """
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r}; the model has {adapter_names(model)}")
    cfg = adapter_config(model, name)
    fmt = format_for_method(cfg.method)
    adapters = {p: w.adapters[name] for p, w in adapted_modules(model) if name in w.adapters}
    tensors: dict[str, torch.Tensor] = {}
    if fmt.whole_model:
        fields, own = fmt.export_model(cfg, adapters, model)
        tensors.update(own)
        targeting = {}  # prompt learning names no target modules
    else:
        fields = fmt.config_to_peft(cfg, adapters)  # may refuse what PEFT cannot express
        for module, adapter in adapters.items():
            for suffix, value in fmt.tensors_of(adapter).items():
                tensors[f"{fmt.key_prefix}{module}.{suffix}"] = value
        targeting = {"target_modules": exact_names_regex(adapters), "exclude_modules": None}
    saved = find_targets(model, cfg.modules_to_save) if cfg.modules_to_save else []
    for module, holder in saved:
        for key, value in holder.state_dict().items():
            tensors[f"{fmt.key_prefix}{module}.{key}"] = value
    peft_config = {
        "peft_type": fmt.peft_type,
        "task_type": None,
        "base_model_name_or_path": None,
        **targeting,
        "modules_to_save": [p for p, _ in saved] or None,
        "inference_mode": True,
        **fields,
    }
    if task_type is not None:
        peft_config["task_type"] = task_type
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    blob = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    atomic_write(folder / WEIGHTS_FILE, blob)
    atomic_write(folder / CONFIG_FILE, json.dumps(peft_config, indent=2).encode())
    return folder


__all__ = ["load_peft", "read_peft_folder", "save_peft"]
