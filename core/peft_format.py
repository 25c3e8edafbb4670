"""How each method is spelled in HF PEFT folders; method files register their own.

A ``PeftFormat`` maps one omnipeft method to one PEFT ``peft_type``: the PEFT config
fields to and from our config, and each adapter's tensors to and from PEFT's names
(``base_model.model.<module>.<peft suffix>``). ``core.interop`` does the file work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import AdapterConfig
from .errors import CheckpointError
from .layers import Adapter


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
    """

    peft_type: str
    method: str
    tensor_names: dict[str, str]
    config_from_peft: Callable[[dict[str, Any]], AdapterConfig]
    config_to_peft: Callable[[AdapterConfig, dict[str, Adapter]], dict[str, Any]]
    export_tensors: Callable[[Adapter], dict[str, torch.Tensor]] | None = None
    neutral: dict[str, Any] = field(default_factory=dict)

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
