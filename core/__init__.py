"""omnipeft core: parameter-efficient fine-tuning methods for any ``torch.nn.Module``.

import core
cfg = core.LoRA(r=8, alpha=16, targets=["qkv"])
core.inject(model, cfg, name="default")
print(core.param_report(model))
core.save_adapter(model, "out/adapter")
core.merge(model); core.unmerge(model)
"""

from . import interop, methods  # noqa: F401  (methods registers every method)
from .checkpoint import load_adapter, save_adapter
from .config import AdapterConfig
from .errors import CheckpointError, ConfigError, MergeError, OmniPeftError, TargetError
from .inject import (
    active_adapters,
    adapter_names,
    aux_loss,
    delete_adapter,
    inject,
    merge,
    set_active,
    unload,
    unmerge,
)
from .methods.bottleneck import AdapterBias, Bottleneck, Compacter
from .methods.lora import LoRA
from .methods.orthogonal import BOFT, OFT, QGOFT
from .methods.prompts import VPT, ControlPrefix, LlamaAdapter, PrefixTuning, PromptTuning, control
from .methods.scaling import IA3, SSF, BitFit, DiffFit, LNTuning
from .methods.spectral import SODA, SVFT, FourierFT, SVFit
from .registry import METHODS
from .report import ParamReport, param_report

__all__ = [
    "BOFT",
    "IA3",
    "METHODS",
    "OFT",
    "QGOFT",
    "SODA",
    "SSF",
    "SVFT",
    "VPT",
    "AdapterBias",
    "AdapterConfig",
    "BitFit",
    "Bottleneck",
    "CheckpointError",
    "Compacter",
    "ConfigError",
    "ControlPrefix",
    "DiffFit",
    "FourierFT",
    "LNTuning",
    "LlamaAdapter",
    "LoRA",
    "SVFit",
    "MergeError",
    "OmniPeftError",
    "ParamReport",
    "PrefixTuning",
    "PromptTuning",
    "TargetError",
    "active_adapters",
    "adapter_names",
    "aux_loss",
    "control",
    "delete_adapter",
    "inject",
    "interop",
    "load_adapter",
    "merge",
    "param_report",
    "save_adapter",
    "set_active",
    "unload",
    "unmerge",
]
