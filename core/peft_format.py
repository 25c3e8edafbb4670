"""How each method is spelled in HF PEFT folders; method files register their own.

A ``PeftFormat`` maps one omnipeft method to one PEFT ``peft_type``: the PEFT config
fields to and from our config, and each adapter's tensors to and from PEFT's names
(``base_model.model.<module>.<peft suffix>``). ``core.interop`` does the file work.

Two kinds of format exist:

* per-module (LoRA, OFT, IA3, ...): every PEFT tensor belongs to one adapted module, so
  ``tensor_names`` and the ``config_*`` functions say everything. ``import_tensor`` and
  ``import_tensors`` optionally convert a tensor's layout on import (per tensor from the
  config alone, or per module when the base module's weights are needed).
* whole-model (prompt learning: PROMPT_TUNING, PREFIX_TUNING): PEFT saves tensors that
  belong to the model as a whole (``"prompt_embeddings"``), with no module in their name
  and a config that names no target modules. ``import_model`` and ``export_model`` then
  replace the per-module mapping: they receive the model and decide which module the
  adapter wraps and how the tensors map onto it.

Several omnipeft methods may share one ``peft_type`` (PEFT spells weight-decomposed DoRA
as LORA with ``use_dora=True``): each format then says which PEFT configs it reads with
``matches``. ``format_for_peft`` picks the format for a PEFT config (formats with a
``matches`` first, in registration order, then the one without: the fallback), and
``PEFT_FORMATS[peft_type]`` is a format that dispatches the same way, so callers that look
a format up by type alone keep working. A format whose ``matches`` refuses every config
(e.g. DyLoRA, exported as the plain LoRA it truncates to) only writes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .config import AdapterConfig
from .errors import CheckpointError
from .layers import Adapter

# Where PEFT roots the keys of module tensors: under its LoRA-style tuner wrapper
# ("base_model.model.") or, for prompt learning, directly under the PeftModel ("base_model.").
MODULE_KEY_PREFIX = "base_model.model."
PROMPT_LEARNING_KEY_PREFIX = "base_model."

# (PEFT config, PEFT tensors that carry no module prefix, model) ->
#     (our config, {module path: {adapter tensor name: tensor}})
ModelImport = Callable[
    [dict[str, Any], dict[str, torch.Tensor], nn.Module],
    tuple[AdapterConfig, dict[str, dict[str, torch.Tensor]]],
]
# (our config, {module path: adapter}, model) -> (PEFT config fields, {PEFT key: tensor})
ModelExport = Callable[
    [AdapterConfig, dict[str, Adapter], nn.Module],
    tuple[dict[str, Any], dict[str, torch.Tensor]],
]


@dataclass(frozen=True)
class PeftFormat:
    """One method's PEFT spelling.

    Args:
        peft_type: PEFT's ``peft_type`` string, e.g. "LORA".
        method: omnipeft method name in ``core.METHODS``.
        tensor_names: PEFT tensor suffix -> omnipeft tensor name (adapter ``state_dict`` key).
        config_from_peft: PEFT config dict -> omnipeft config (refuse what it cannot express).
        config_to_peft: (config, {module name: adapter}) -> PEFT config fields.
        export_tensors: (adapter) -> {PEFT suffix: tensor}; default inverts tensor_names,
            taking the first suffix listed for each omnipeft name unless ``pick`` says.
        neutral: PEFT options omnipeft does not reproduce, with their harmless values;
            an adapter setting any other value is refused.
        import_tensor: (config, omnipeft tensor name, PEFT tensor) -> tensor in omnipeft's
            layout, for layouts that differ (e.g. BOFT's packed rotations).
        import_tensors: (base module, {omnipeft name: PEFT tensor}) -> {omnipeft name:
            tensor}, per module, for conversions that need the base weights (e.g. LN tuning
            stores the full affine, omnipeft its difference to the base).
        import_model / export_model: whole-model formats (see the module docstring); when
            set they replace ``tensor_names`` and ``config_from_peft`` / ``config_to_peft``.
        key_prefix: how PEFT roots module keys (modules_to_save) in this format's files.
        matches: (PEFT config) -> whether this format reads it, for a ``peft_type`` that
            several formats share; None: the fallback for that type.
        shared_keys: PEFT keys of tensors saved once for the whole model beside per-module
            ones (VeRA's ``base_model.vera_A``); ``check_shared`` (config, {key: tensor},
            {module path: base module}) raises ``CheckpointError`` when omnipeft cannot
            reproduce them (importers pop these keys before the per-module mapping).
    """

    peft_type: str
    method: str
    tensor_names: dict[str, str] = field(default_factory=dict)
    config_from_peft: Callable[[dict[str, Any]], AdapterConfig] | None = None
    config_to_peft: Callable[[AdapterConfig, dict[str, Adapter]], dict[str, Any]] | None = None
    export_tensors: Callable[[Adapter], dict[str, torch.Tensor]] | None = None
    neutral: dict[str, Any] = field(default_factory=dict)
    import_tensor: Callable[[AdapterConfig, str, torch.Tensor], torch.Tensor] | None = None
    import_tensors: (
        Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None
    ) = None
    import_model: ModelImport | None = None
    export_model: ModelExport | None = None
    key_prefix: str = MODULE_KEY_PREFIX
    matches: Callable[[dict[str, Any]], bool] | None = None
    shared_keys: tuple[str, ...] = ()
    check_shared: (
        Callable[[AdapterConfig, dict[str, torch.Tensor], dict[str, nn.Module]], None] | None
    ) = None

    def __post_init__(self) -> None:
        per_module = self.config_from_peft is not None and self.config_to_peft is not None
        whole_model = self.import_model is not None and self.export_model is not None
        if not (per_module or whole_model):
            raise TypeError(
                f"PeftFormat {self.peft_type!r} needs config_from_peft and config_to_peft "
                "(per-module tensors) or import_model and export_model (whole-model tensors)."
            )

    @property
    def whole_model(self) -> bool:
        return self.import_model is not None

    def check_options(self, peft_config: dict[str, Any]) -> None:
        for key, harmless in self.neutral.items():
            value = peft_config.get(key)
            if value not in (harmless, None, [], {}):
                raise CheckpointError(
                    f"this PEFT {self.peft_type} adapter sets {key}={value!r}, which omnipeft's "
                    f"{self.method} does not reproduce; export it from PEFT without that option."
                )

    def tensors_of(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's names."""
        if self.export_tensors is not None:
            return self.export_tensors(adapter)
        first: dict[str, str] = {}
        for suffix, ours in self.tensor_names.items():
            first.setdefault(ours, suffix)
        state = adapter.state_dict()
        return {suffix: state[ours] for ours, suffix in first.items() if ours in state}


def exact_names_regex(names) -> str:
    """A PEFT ``target_modules`` string matching exactly these full module names (a list
    would be read as suffixes: "norm" also catches "attn.norm")."""
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


PEFT_FORMATS: dict[str, PeftFormat] = {}  # peft_type -> its format (dispatching if shared)
_BY_TYPE: dict[str, list[PeftFormat]] = {}  # peft_type -> every format, in registration order


def register_peft_format(fmt: PeftFormat) -> PeftFormat:
    """Record ``fmt``; registering a method again replaces its earlier format."""
    formats = [f for f in _BY_TYPE.get(fmt.peft_type, []) if f.method != fmt.method]
    formats.append(fmt)
    if len(formats) > 1 and any(f.whole_model or f.import_tensors for f in formats):
        raise TypeError(
            f"PEFT type {fmt.peft_type!r} is shared by {[f.method for f in formats]}; shared "
            "types are dispatched per config, which whole-model formats and import_tensors "
            "(called without a config) do not support."
        )
    _BY_TYPE[fmt.peft_type] = formats
    PEFT_FORMATS[fmt.peft_type] = formats[0] if len(formats) == 1 else _dispatcher(formats)
    return fmt


def format_for_peft(peft_config: dict[str, Any]) -> PeftFormat | None:
    """The format that reads this PEFT config, or None when omnipeft has none."""
    formats = _BY_TYPE.get(peft_config.get("peft_type"), [])
    for fmt in formats:
        if fmt.matches is not None and fmt.matches(peft_config):
            return fmt
    return next((f for f in formats if f.matches is None), None)


def _pick(peft_type: str, peft_config: dict[str, Any]) -> PeftFormat:
    fmt = format_for_peft(peft_config)
    if fmt is None:
        raise CheckpointError(
            f"this PEFT {peft_type} adapter uses options no omnipeft method reads "
            f"(formats for {peft_type}: {[f.method for f in _BY_TYPE[peft_type]]})."
        )
    return fmt


def _by_method(peft_type: str, method: str) -> PeftFormat:
    return next(f for f in _BY_TYPE[peft_type] if f.method == method)


@dataclass(frozen=True)
class _DispatchingFormat(PeftFormat):
    """Several formats behind one ``peft_type``: config-level calls go to the format that
    ``format_for_peft`` picks, tensor-level calls to the format of the built config."""

    def check_options(self, peft_config: dict[str, Any]) -> None:
        _pick(self.peft_type, peft_config).check_options(peft_config)


def _dispatcher(formats: list[PeftFormat]) -> PeftFormat:
    peft_type = formats[0].peft_type
    names: dict[str, str] = {}
    for fmt in formats:  # suffixes of every variant (they must agree where they overlap)
        for suffix, ours in fmt.tensor_names.items():
            names.setdefault(suffix, ours)

    def config_from_peft(pc: dict[str, Any]) -> AdapterConfig:
        return _pick(peft_type, pc).config_from_peft(pc)

    def config_to_peft(cfg: AdapterConfig, adapters: dict[str, Adapter]) -> dict[str, Any]:
        return _by_method(peft_type, cfg.method).config_to_peft(cfg, adapters)

    def import_tensor(cfg: AdapterConfig, ours: str, value: torch.Tensor) -> torch.Tensor:
        hook = _by_method(peft_type, cfg.method).import_tensor
        return value if hook is None else hook(cfg, ours, value)

    return _DispatchingFormat(
        peft_type=peft_type,
        method=formats[0].method,
        tensor_names=names,
        config_from_peft=config_from_peft,
        config_to_peft=config_to_peft,
        import_tensor=import_tensor,
        key_prefix=formats[0].key_prefix,
    )


def format_for_method(method: str) -> PeftFormat:
    for formats in _BY_TYPE.values():
        for fmt in formats:
            if fmt.method == method:
                return fmt
    known = sorted(f.method for formats in _BY_TYPE.values() for f in formats)
    raise CheckpointError(
        f"PEFT export is not available for method {method!r}: HF PEFT has no equivalent "
        f"that omnipeft maps. Methods with a PEFT format: {known}."
    )
