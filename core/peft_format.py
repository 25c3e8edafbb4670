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


PEFT_FORMATS: dict[str, PeftFormat] = {}


def register_peft_format(fmt: PeftFormat) -> PeftFormat:
    PEFT_FORMATS[fmt.peft_type] = fmt
    return fmt


def format_for_method(method: str) -> PeftFormat:
    for fmt in PEFT_FORMATS.values():
        if fmt.method == method:
            return fmt
    raise CheckpointError(
        f"PEFT export is not available for method {method!r}: HF PEFT has no equivalent "
        f"that omnipeft maps. Methods with a PEFT format: "
        f"{sorted(f.method for f in PEFT_FORMATS.values())}."
    )
