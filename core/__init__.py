"""omnipeft core: parameter-efficient fine-tuning methods for any ``torch.nn.Module``.

import core
cfg = core.LoRA(r=8, alpha=16, targets=["qkv"])
core.inject(model, cfg, name="default")
print(core.param_report(model))
core.save_adapter(model, "out/adapter")
core.merge(model); core.unmerge(model)
"""

from . import compose, controllers, interop, methods  # noqa: F401  (methods registers every method)
from .batching import batch_adapters
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
from .methods.adaptive_rank import AdaLoRA, DiffoRA, DynamicDoRA, IncreLoRA, TriAdaptLoRA
from .methods.bottleneck import AdapterBias, Bottleneck, Compacter
from .methods.kronecker import SURM, KAdaptation, LoHa, LoKr
from .methods.lora import LoRA
from .methods.lora_variants import (
    CapaBoost,
    DoRA,
    DyLoRA,
    MELoRA,
    ShareLoRA,
    VeRA,
    set_dylora_rank,
)
from .methods.mixtures import MPOE, PERFT, PESC, MoLoRA, MoV, expert_loads
from .methods.orthogonal import BOFT, OFT, QGOFT
from .methods.prompts import VPT, ControlPrefix, LlamaAdapter, PrefixTuning, PromptTuning, control
from .methods.quantized import L4Q, export_quantized
from .methods.scaling import IA3, SSF, BitFit, DiffFit, LNTuning
from .methods.sparse import GPS, SPT, DiffPruning, prune, select
from .methods.spectral import SODA, SVFT, FourierFT, SVFit
from .methods.style import StyleInject
from .optim import StiefelAdam, split_stiefel, stiefel_adam_for
from .registry import METHODS
from .report import ParamReport, param_report

__all__ = [
    "StiefelAdam",
    "split_stiefel",
    "stiefel_adam_for",
    "StyleInject",
    "AdaLoRA",
    "DiffoRA",
    "DynamicDoRA",
    "IncreLoRA",
    "TriAdaptLoRA",
    "controllers",
    "MELoRA",
    "CapaBoost",
    "DoRA",
    "DyLoRA",
    "ShareLoRA",
    "VeRA",
    "set_dylora_rank",
    "MPOE",
    "PERFT",
    "PESC",
    "MoLoRA",
    "MoV",
    "expert_loads",
    "L4Q",
    "export_quantized",
    "GPS",
    "SPT",
    "DiffPruning",
    "prune",
    "select",
    "SURM",
    "KAdaptation",
    "LoHa",
    "LoKr",
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
    "batch_adapters",
    "compose",
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
