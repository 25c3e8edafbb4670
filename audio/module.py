"""The audio LightningModule: a frozen AST, a new head on the mean of all tokens, and one
tuning method (Cappellazzo et al., 2024, "Parameter-Efficient Transfer Learning of Audio
Spectrogram Transformers").

``tuning``: "peft" injects ``method`` (LoRA, bottleneck / conformer adapters, deep prompts,
...) and trains it with the head (and, with ``train_norms``, the blocks' LayerNorms, as the
study trains them with adapters); "full" fine-tunes everything; "linear" trains the head.
The base is rebuilt identically on every load, so checkpoints hold trained tensors only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.domain import (
    TUNINGS,
    ExactAccuracy,
    ExactAccuracySteps,
    head_parameter_counts,
    with_head,
)
from core.errors import ConfigError
from core.lightning import MethodArg, PeftModule

from . import methods as _methods  # noqa: F401  (registers the conformer adapter)
from .backbones import build_ast

NORMS = ("layernorm_before", "layernorm_after")  # every block's two LayerNorms


@dataclasses.dataclass(frozen=True)
class Mixup:
    """One mixed batch: inputs, soft targets (batch, classes), lambda and the partners."""

    inputs: torch.Tensor
    targets: torch.Tensor
    lam: float
    perm: torch.Tensor


def _check(tuning: str, method: MethodArg | None, num_classes: Any, mixup: float) -> None:
    if tuning not in TUNINGS:
        raise ConfigError(f"tuning must be one of {TUNINGS}, got {tuning!r}.")
    if (tuning == "peft") != (method is not None):
        raise ConfigError(
            "tuning='peft' needs --model.method (e.g. --config configs/audio/lora.yaml); "
            "tuning 'full' / 'linear' take no method."
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}.")
    if mixup < 0:
        raise ConfigError(f"mixup_alpha must be >= 0, got {mixup!r}.")


class AudioClassifier(ExactAccuracySteps, PeftModule):
    """Audio classification with an AST backbone.

    Args:
        method: the method config (``{"class_path", "init_args"}``), None for full / linear.
        tuning: "peft", "full" or "linear".
        pretrained: a hub id or local transformers folder with AST weights; None builds the
            model from ``ast_config`` with random weights (seeded by ``init_seed``).
        ast_config: ``ASTConfig`` fields for a model built from a config.
        num_classes: head size (linked from the data module).
        max_length: frames per clip (linked from the data module).
        train_norms: train the blocks' LayerNorms beside the method (the study's adapters).
        mixup_alpha: mixup (Zhang et al., 2018) Beta(alpha, alpha) on training batches; 0: off.
        label_smoothing: cross-entropy label smoothing.
        init_seed: seed of the random parts (the head; the whole model without weights).
        **kwargs: ``PeftModule`` arguments (lr, weight_decay, betas, warmup_steps, ...).
    """

    def __init__(
        self,
        method: MethodArg | None = None,
        tuning: str = "peft",
        pretrained: str | None = None,
        ast_config: dict[str, Any] | None = None,
        num_classes: int = 50,
        max_length: int = 1024,
        train_norms: bool = False,
        mixup_alpha: float = 0.0,
        label_smoothing: float = 0.0,
        init_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        _check(tuning, method, num_classes, mixup_alpha)
        super().__init__(method, **kwargs)
        self.accuracy = nn.ModuleDict({"val": ExactAccuracy(), "test": ExactAccuracy()})

    def build_model(self) -> nn.Module:
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.init_seed)
            model = build_ast(hp.pretrained, hp.ast_config, hp.num_classes, hp.max_length)
        if hp.tuning == "peft":
            method = with_head(self.method, "head")
            if hp.train_norms:
                saved = tuple(method.modules_to_save or ())
                method = dataclasses.replace(method, modules_to_save=(*saved, *NORMS))
            self.method = method
            self.save_hyperparameters({"method": self.method_spec()})
        else:
            model.requires_grad_(hp.tuning == "full")
            model.head.requires_grad_(True)
        return model

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> Mixup:
        """Mixup (Zhang et al., 2018): lambda ~ Beta(alpha, alpha), each clip mixed with a
        random partner, x~ = lambda x + (1 - lambda) x[perm], and its one-hot label likewise,
        y~ = lambda y + (1 - lambda) y[perm], a soft target for the cross-entropy."""
        alpha = self.hparams.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(x.shape[0], device=x.device)
        one_hot = F.one_hot(y, self.hparams.num_classes).to(torch.float32)
        return Mixup(
            inputs=lam * x + (1 - lam) * x[perm],
            targets=lam * one_hot + (1 - lam) * one_hot[perm],
            lam=lam,
            perm=perm,
        )

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        x, y = batch[0], batch[1]
        smooth = self.hparams.label_smoothing
        target: torch.Tensor = y
        if self.training and self.hparams.mixup_alpha > 0:
            mixed = self.mix(x, y)
            x, target = mixed.inputs, mixed.targets
        logits = self(x).float()
        loss = F.cross_entropy(logits, target, label_smoothing=smooth)
        return loss, {"acc": (logits.argmax(-1) == y).float().mean()}

    def method_label(self) -> str:
        return self.method.method if self.method is not None else self.hparams.tuning

    def parameter_counts(self) -> dict[str, int]:
        """Trainable / total parameters and the trainable count without the head."""
        return head_parameter_counts(self.model, self.model.head)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        counts = self.parameter_counts()
        self.print(
            f"{self.method_label()}: {counts['trainable_without_head']:,} trainable parameters "
            f"besides the {counts['head']:,} of the head"
        )


__all__ = ["NORMS", "AudioClassifier", "Mixup"]
