"""The vision LightningModule: a timm / open_clip backbone, a new head, one tuning method.

``tuning`` picks what trains:

* ``"peft"`` (default): the ``method`` config (LoRA, BitFit, ...) is injected and trains,
  together with the new classifier head, which is added to the method's
  ``modules_to_save`` so the exported adapter carries it (every VTAB-1k paper trains the
  head; their parameter counts exclude it, as ``parameter_counts`` does).
* ``"full"``: full fine-tuning, every parameter trains (no method).
* ``"linear"``: a linear probe, only the head trains (no method).

The base is rebuilt identically on every load (pretrained weights, or random init under
``init_seed``), which is what lets checkpoints hold the trained tensors only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.domain import (
    TUNINGS,
    ExactAccuracy,
    ExactAccuracySteps,
    check_tuning,
    head_parameter_counts,
    with_head,
)
from core.errors import ConfigError
from core.lightning import MethodArg, PeftModule

from .backbones import DEFAULT_BACKBONE, BackboneError, build_backbone, split_qkv

_check_tuning = check_tuning  # the name medical imported before core.domain


class VisionClassifier(ExactAccuracySteps, PeftModule):
    """Image classification with a frozen backbone and one tuning method.

    Args:
        method: the method config (``{"class_path", "init_args"}`` in YAML); None with
            ``tuning`` "full" or "linear".
        tuning: "peft", "full" or "linear" (see the module docstring).
        backbone: a timm model name (any ViT, e.g. ``vit_base_patch16_224.augreg2_in21k_ft_in1k``)
            or ``open_clip:<arch>[:<pretrained tag>]`` for a CLIP vision tower.
        backbone_kwargs: passed to ``timm.create_model`` (img_size is set from
            ``image_size``; patch_size, embed_dim, depth, num_heads... make small models)
            or ``open_clip.create_model``.
        pretrained: load pretrained weights (from ``checkpoint``, else the hub); false
            trains from random init on purpose.
        checkpoint: a local weights file (safetensors, or a timm / open_clip checkpoint).
        num_classes: classes of the new head (linked from the data module by the CLI).
        image_size: input side (linked from ``data.image_size``).
        split_qkv: split fused qkv Linears into q, k, v (views, no copy) so a method can
            target q and v alone, as the LoRA and VTAB-1k papers do.
        train_head: train the new head beside the method (the VTAB-1k protocol).
        label_smoothing: cross-entropy label smoothing.
        init_seed: seed of the random parts of the base (the head; the whole backbone when
            ``pretrained`` is false), so every rebuild is identical.
        **kwargs: ``PeftModule`` arguments: lr, weight_decay, betas, warmup_steps,
            scheduler, adapter_name, init_adapter.
    """

    def __init__(
        self,
        method: MethodArg | None = None,
        tuning: str = "peft",
        backbone: str = DEFAULT_BACKBONE,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = True,
        checkpoint: str | None = None,
        num_classes: int = 1000,
        image_size: int = 224,
        split_qkv: bool = False,
        train_head: bool = True,
        label_smoothing: float = 0.0,
        init_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        check_tuning(tuning, method, train_head)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}.")
        self.head_name = "head"
        super().__init__(method, **kwargs)
        self.accuracy = nn.ModuleDict({"val": ExactAccuracy(), "test": ExactAccuracy()})

    # -- building -------------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.init_seed)
            model, self.head_name = build_backbone(
                hp.backbone,
                num_classes=hp.num_classes,
                image_size=hp.image_size,
                pretrained=hp.pretrained,
                checkpoint=hp.checkpoint,
                kwargs=hp.backbone_kwargs,
            )
        if hp.split_qkv and split_qkv(model) == 0:
            raise BackboneError(
                f"split_qkv is set but {hp.backbone!r} has no Linear named 'qkv' to split; "
                "set --model.split_qkv false and target its own projection names."
            )
        self._choose_trainable(model)
        return model

    def _choose_trainable(self, model: nn.Module) -> None:
        tuning, head = self.hparams.tuning, model.get_submodule(self.head_name)
        if tuning == "peft":
            if self.hparams.train_head:
                self.method = with_head(self.method, self.head_name)
                self.save_hyperparameters({"method": self.method_spec()})
            return
        model.requires_grad_(tuning == "full")
        head.requires_grad_(True)

    # -- steps ----------------------------------------------------------------------------

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.hparams.label_smoothing)
        return loss, {"acc": (logits.argmax(dim=-1) == labels).float().mean()}

    # -- reporting ------------------------------------------------------------------------

    def method_label(self) -> str:
        """The registry name of the method, or "full" / "linear"."""
        return self.method.method if self.method is not None else self.hparams.tuning

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters; ``trainable_without_head`` is what the VTAB-1k
        tables report (the new classifier head excluded)."""
        return head_parameter_counts(self.model, self.model.get_submodule(self.head_name))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        counts = self.parameter_counts()
        self.print(
            f"{self.method_label()}: {counts['trainable_without_head']:,} trainable parameters "
            f"without the {counts['head']:,} of the head "
            f"({counts['trainable_without_head'] / 1e6:.4f} M, as VTAB-1k tables count)"
        )
        for logger in self.loggers:
            logger.log_metrics(
                {"params_trainable_without_head": counts["trainable_without_head"]}, step=0
            )


__all__ = ["TUNINGS", "VisionClassifier", "with_head"]
