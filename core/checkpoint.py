"""Adapter checkpoints: ``adapter.safetensors`` + ``adapter.json``, never pickle.

``adapter.json`` holds the method, its config, a fingerprint of the base model (each
adapted module's name, type and weight shape), the SHA-256 of the tensor file and the
library versions. Files are written to a temporary name and renamed, so a crash never
leaves a half-written file under the real name. Loading checks everything (files,
digest, method, fingerprint, tensor names and shapes) before it touches the model, so a
bad checkpoint raises ``CheckpointError`` and leaves the model as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors

from .errors import CheckpointError, MergeError
from .inject import adapter_config, adapter_names, attach, check_adapter_name, set_active
from .registry import config_from_dict
from .targeting import adapted_modules, base_of, find_targets, walk

FORMAT = "omnipeft.adapter"
FORMAT_VERSION = 1
# Checkpoints whose tensors are stored encoded (adapter.json "encoding": {"name": ...}), such
# as core.compose.compress's ComPEFT files, carry this version, so that an omnipeft that
# cannot decode them refuses them instead of misreading the stored tensors.
ENCODED_FORMAT_VERSION = 2
TENSORS = "adapter.safetensors"
META = "adapter.json"

# encoding name -> decode(metadata, stored tensors) -> the adapter's own tensors; filled by
# the module that writes the encoding (core.compose registers "compeft").
TENSOR_DECODERS: dict[
    str, Callable[[dict[str, Any], dict[str, torch.Tensor]], dict[str, torch.Tensor]]
] = {}


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def module_fingerprint(module: nn.Module) -> dict[str, Any]:
    base = base_of(module)
    weight = getattr(base, "weight", None)
    shape = list(weight.shape) if isinstance(weight, torch.Tensor) else None
    return {"type": type(base).__name__, "weight_shape": shape}


def _saved_modules(model: nn.Module, cfg) -> list[tuple[str, nn.Module]]:
    return find_targets(model, cfg.modules_to_save) if cfg.modules_to_save else []


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor adapter ``name`` owns, keyed ``<module name>.<tensor name>``."""
    state: dict[str, torch.Tensor] = {}
    for path, wrapper in adapted_modules(model):
        if name in wrapper.adapters:
            for key, value in wrapper.adapters[name].state_dict().items():
                state[f"{path}.{key}"] = value
    for path, module in _saved_modules(model, adapter_config(model, name)):
        for key, value in module.state_dict().items():
            state[f"{path}.{key}"] = value
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` (and its ``modules_to_save``) to the folder ``path``."""
    if name not in adapter_names(model):
        raise KeyError(f"no adapter named {name!r} to save; the model has {adapter_names(model)}")
    cfg = adapter_config(model, name)
    state = adapter_state(model, name)
    if any(t.is_meta for t in state.values()):
        raise CheckpointError(
            "the adapter lives on the meta device and has no values to save; "
            "materialise the model (e.g. model.to_empty(device='cpu') and load weights) first."
        )
    modules = {p: module_fingerprint(w) for p, w in adapted_modules(model) if name in w.adapters}
    return write_folder(
        path,
        state,
        method=cfg.method,
        config=cfg.to_dict(),
        modules=modules,
        modules_to_save=[p for p, _ in _saved_modules(model, cfg)],
        version=FORMAT_VERSION,
    )


def write_folder(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    *,
    method: str,
    config: dict[str, Any],
    modules: dict[str, Any],
    modules_to_save: list[str],
    version: int,
    encoding: dict[str, Any] | None = None,
) -> Path:
    """Write ``tensors`` and their metadata as a checkpoint folder (``TENSORS`` + ``META``)."""
    blob = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
    meta = {
        "format": FORMAT,
        "format_version": version,
        "method": method,
        "config": config,
        "fingerprint": {"modules": modules, "modules_to_save": modules_to_save},
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "versions": {"omnipeft": _version(), "torch": torch.__version__},
    }
    if encoding is not None:
        meta["encoding"] = encoding
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / TENSORS, blob)
    atomic_write(folder / META, json.dumps(meta, indent=2, sort_keys=True).encode())
    return folder


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("omnipeft")
    except Exception:
        return "unknown"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a checkpoint folder; returns (metadata, tensors)."""
    folder = Path(path)
    for fname in (META, TENSORS):
        if not (folder / fname).is_file():
            raise CheckpointError(
                f"{folder / fname} is missing; an omnipeft adapter folder holds {META} and "
                f"{TENSORS} as written by core.save_adapter. For an HF PEFT folder use "
                "core.interop.load_peft."
            )
    try:
        meta = json.loads((folder / META).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{folder / META} is not valid JSON ({err}); it is corrupt."
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / META} is not an omnipeft adapter file (no format tag).")
    if meta.get("format_version", 0) > ENCODED_FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} uses checkpoint format {meta['format_version']}, newer than this "
            f"omnipeft reads ({ENCODED_FORMAT_VERSION}); upgrade omnipeft."
        )
    blob = (folder / TENSORS).read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise CheckpointError(
            f"{folder / TENSORS} does not match the digest in {META}: the file is truncated, "
            "corrupt, or from another save. Save the adapter again."
        )
    try:
        tensors = load_safetensors(blob)
    except Exception as err:
        raise CheckpointError(f"{folder / TENSORS} cannot be read as safetensors: {err}") from None
    return meta, _decoded(folder, meta, tensors)


def _decoded(
    folder: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The adapter's tensors from the stored ones (unchanged unless the file is encoded)."""
    encoding = meta.get("encoding")
    if encoding is None:
        return tensors
    name = encoding.get("name") if isinstance(encoding, dict) else None
    decode = TENSOR_DECODERS.get(name)
    if decode is None:
        raise CheckpointError(
            f"{folder} stores its tensors in the {name!r} encoding, which this omnipeft cannot "
            f"decode (known: {sorted(TENSOR_DECODERS)}); import core.compose, which registers "
            "'compeft', or upgrade omnipeft."
        )
    try:
        return decode(meta, tensors)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(
            f"{folder}: its {name} encoded tensors are inconsistent ({err}); the file is corrupt."
        ) from None


def _check_fingerprint(model: nn.Module, fingerprint: dict[str, Any]) -> dict[str, nn.Module]:
    present = dict(walk(model))
    problems, bases = [], {}
    for path, want in fingerprint.get("modules", {}).items():
        if path not in present:
            problems.append(f"{path}: not in this model")
            continue
        have = module_fingerprint(present[path])
        if have != want:
            problems.append(
                f"{path}: checkpoint has {want['type']}{want['weight_shape']}, "
                f"model has {have['type']}{have['weight_shape']}"
            )
        bases[path] = base_of(present[path])
    for path in fingerprint.get("modules_to_save", []):
        if path not in present:
            problems.append(f"{path}: module to save is not in this model")
    if problems:
        raise CheckpointError(
            f"the checkpoint was made for another base model ({len(problems)} mismatch(es)):\n  "
            + "\n  ".join(problems[:8])
            + "\nLoad it into the model it was trained on."
        )
    return bases


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    trainable: bool = False,
) -> nn.Module:
    """Load a checkpoint folder as adapter ``name`` (new, or replacing the values of an
    existing adapter of the same method) and make it the one that runs."""
    check_adapter_name(name)
    meta, tensors = read_checkpoint(path)
    cfg = config_from_dict(meta.get("method"), meta.get("config", {}))
    _check_unmerged(model)
    bases = _check_fingerprint(model, meta["fingerprint"])
    saved = meta["fingerprint"].get("modules_to_save", [])
    return install(model, name, cfg, bases, saved, tensors, trainable=trainable)


def _check_unmerged(model: nn.Module) -> None:
    if any(w.merged for _, w in adapted_modules(model)):
        raise MergeError("the model has merged adapters; call core.unmerge(model) before loading.")


def install(
    model: nn.Module,
    name: str,
    cfg,
    bases: dict[str, nn.Module],
    saved: list[str],
    tensors: dict[str, torch.Tensor],
    *,
    trainable: bool,
) -> nn.Module:
    """Put checked tensors into adapter ``name`` on the modules ``bases`` names.

    Builds the adapters detached, checks every tensor name and shape, and only then
    attaches them, so any error leaves the model unchanged.
    """
    _check_unmerged(model)
    existing = name in adapter_names(model)
    if existing:
        have = adapter_config(model, name)
        if have.method != cfg.method:
            raise CheckpointError(
                f"adapter {name!r} in the model is {have.method}, the checkpoint is {cfg.method}; "
                "load under another name."
            )
        targets = {p: w.adapters[name] for p, w in adapted_modules(model) if name in w.adapters}
        if set(targets) != set(bases):
            raise CheckpointError(
                f"adapter {name!r} in the model covers other modules than the checkpoint; "
                "load under another name."
            )
    else:
        for path, base in bases.items():
            if reason := cfg.unsupported_reason(base):
                raise CheckpointError(f"{path}: {reason}")
        targets = {p: cfg.build(b, p) for p, b in bases.items()}

    expected: dict[str, torch.Tensor] = {}
    for path, adapter in targets.items():
        for key, value in adapter.state_dict().items():
            expected[f"{path}.{key}"] = value
    present = dict(walk(model))
    for path in saved:
        for key, value in present[path].state_dict().items():
            expected[f"{path}.{key}"] = value
    _check_tensors(expected, tensors)

    # Everything is checked: from here on the model changes.
    if not existing:
        attach(model, name, cfg, targets)
    with torch.no_grad():
        for key, dest in expected.items():
            dest.copy_(tensors[key].to(dest.dtype))
    for param in model.parameters():  # as after inject: only this adapter may train
        param.requires_grad_(False)
    for adapter in targets.values():
        adapter.set_trainable(trainable)
    for path in saved:
        present[path].requires_grad_(trainable)
    set_active(model, [name])
    return model


def _check_tensors(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = [
        f"{k}: checkpoint {list(found[k].shape)} vs model {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if found[k].shape != expected[k].shape
    ]
    if missing or extra or wrong:
        lines = [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in extra[:5]]
        raise CheckpointError(
            "the checkpoint's tensors do not fit the adapter:\n  "
            + "\n  ".join(lines + wrong[:5])
            + "\nIt was saved from a different config or model."
        )


__all__ = ["install", "load_adapter", "read_checkpoint", "save_adapter"]
