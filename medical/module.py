"""The chest X-ray LightningModule: a backbone, a multi-label head, one tuning method.

Backbones: ``monai:densenet121`` (MONAI's DenseNet121, the CheXNet architecture of
Rajpurkar et al., 2017), any timm ViT (``vit_base_patch16_224...``) and an open_clip vision
tower (``open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224`` or
``open_clip:local-dir:/weights/biomedclip``), as "Less Could Be Better" (Lian et al., 2024)
and "PEFT for Medical Image Analysis" (Dutt et al., 2024) tune them. ``tuning`` is "peft"
(a method config trains, plus the new head), "full" or "linear", as in ``vision.module``.

The loss is multi-label BCE over the labels the uncertainty policy kept (U-Ignore masks),
optionally with positive-class weights; validation and test gather every score and
compute per-finding AUROC (``medical.metrics``); test also writes bootstrap 95% intervals
to ``<log_dir>/test_report.json`` and ``auroc.csv``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.backbones import BackboneError, build_backbone, split_qkv
from core.domain import check_tuning, with_head
from core.errors import ConfigError
from core.lightning import MethodArg, PeftModule

from .metrics import auroc_table, bootstrap_auroc, finding_auroc, mean_auroc

MONAI_PREFIX = "monai:"
MONAI_HEAD = "class_layers.out"


def build_monai_densenet(
    name: str, num_classes: int, pretrained: bool, checkpoint: str | None, kwargs: dict
) -> tuple[nn.Module, str]:
    """MONAI DenseNet121/169/201/264 (2-D, 3 channels) with a ``num_classes`` head.

    ``pretrained`` with no ``checkpoint`` asks MONAI for torchvision's ImageNet weights
    (a download); a ``checkpoint`` is a local state dict (e.g. CheXNet's) loaded except
    the head. ``backbone_kwargs`` (init_features, growth_rate, block_config) make small
    ones for tests.
    """
    from monai.networks import nets

    arch = name[len(MONAI_PREFIX) :]
    classes = {
        "densenet121": nets.DenseNet121,
        "densenet169": nets.DenseNet169,
        "densenet201": nets.DenseNet201,
        "densenet264": nets.DenseNet264,
    }
    if arch not in classes:
        raise BackboneError(f"unknown MONAI backbone {arch!r}; known: {sorted(classes)}.")
    hub = pretrained and checkpoint is None
    try:
        model = classes[arch](
            spatial_dims=2, in_channels=3, out_channels=num_classes, pretrained=hub, **kwargs
        )
    except Exception as err:
        if hub:
            raise BackboneError(
                f"{name}: ImageNet weights could not be fetched ({type(err).__name__}: {err}); "
                "give --model.checkpoint /path/to/densenet.pt or --model.pretrained false."
            ) from None
        raise
    if checkpoint is not None:
        _load_densenet(model, checkpoint)
    return model, MONAI_HEAD


def _load_densenet(model: nn.Module, checkpoint: str) -> None:
    from safetensors.torch import load_file

    path = Path(checkpoint)
    state = (
        load_file(str(path))
        if path.suffix == ".safetensors"
        else torch.load(path, map_location="cpu", weights_only=True)
    )
    state = state.get("state_dict", state)
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(MONAI_HEAD)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(MONAI_HEAD)]
    if missing or unexpected:
        raise BackboneError(
            f"checkpoint {path} does not fit the MONAI DenseNet: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; give weights of this architecture."
        )


class CXRClassifier(PeftModule):
    """Multi-label chest X-ray classification with a frozen backbone and one method.

    Args:
        method: the method config; None with ``tuning`` "full" or "linear".
        tuning: "peft", "full" or "linear".
        backbone: ``monai:densenet121``, a timm name, or ``open_clip:<arch>[:<tag>]``.
        backbone_kwargs: passed to the MONAI class, ``timm.create_model`` or open_clip.
        pretrained: load pretrained weights (``checkpoint``, else the hub).
        checkpoint: local weights file.
        num_classes: number of findings (linked from the data module).
        image_size: input side (linked from the data module).
        findings: finding names, for the reports (linked from the data module).
        pos_weight: BCE positive-class weights, one per finding, or None.
        split_qkv: split timm's fused qkv into q, k, v (LoRA on q and v).
        train_head: train the new head beside the method.
        bootstrap_samples: bootstrap resamples for the test report's intervals.
        init_seed: seed of the random parts of the base, so rebuilds are identical.
        **kwargs: ``PeftModule`` arguments (lr, weight_decay, warmup_steps, scheduler, ...).
    """

    def __init__(
        self,
        method: MethodArg | None = None,
        tuning: str = "peft",
        backbone: str = "monai:densenet121",
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = True,
        checkpoint: str | None = None,
        num_classes: int = 14,
        image_size: int = 224,
        findings: list[str] | None = None,
        pos_weight: list[float] | None = None,
        split_qkv: bool = False,
        train_head: bool = True,
        bootstrap_samples: int = 1000,
        init_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        check_tuning(tuning, method, train_head)
        if pos_weight is not None and len(pos_weight) != num_classes:
            raise ConfigError(
                f"pos_weight has {len(pos_weight)} values for {num_classes} findings."
            )
        self.head_name = "head"
        super().__init__(method, **kwargs)
        self.findings = list(findings or [f"finding_{k}" for k in range(num_classes)])
        self._outputs: dict[str, list[tuple[torch.Tensor, ...]]] = {"val": [], "test": []}
        self.test_report: dict[str, Any] | None = None

    def build_model(self) -> nn.Module:
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.init_seed)
            kwargs = dict(hp.backbone_kwargs or {})
            if hp.backbone.startswith(MONAI_PREFIX):
                model, self.head_name = build_monai_densenet(
                    hp.backbone, hp.num_classes, hp.pretrained, hp.checkpoint, kwargs
                )
            else:
                model, self.head_name = build_backbone(
                    hp.backbone,
                    num_classes=hp.num_classes,
                    image_size=hp.image_size,
                    pretrained=hp.pretrained,
                    checkpoint=hp.checkpoint,
                    kwargs=kwargs,
                )
        if hp.split_qkv and split_qkv(model) == 0:
            raise BackboneError(f"split_qkv is set but {hp.backbone!r} has no fused 'qkv'.")
        if hp.tuning == "peft":
            if hp.train_head:
                self.method = with_head(self.method, self.head_name)
                self.save_hyperparameters({"method": self.method_spec()})
        else:
            model.requires_grad_(hp.tuning == "full")
            model.get_submodule(self.head_name).requires_grad_(True)
        return model

    # -- loss -----------------------------------------------------------------------------

    def bce(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked multi-label BCE, averaged over the kept labels."""
        weight = None
        if self.hparams.pos_weight is not None:
            weight = torch.tensor(self.hparams.pos_weight, device=logits.device)
        loss = F.binary_cross_entropy_with_logits(
            logits.float(), labels, reduction="none", pos_weight=weight
        )
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        images, labels, mask = batch[0], batch[1], batch[2]
        return self.bce(self(images), labels, mask), {}

    # -- evaluation -----------------------------------------------------------------------

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: Any) -> torch.Tensor:
        images, labels, mask, index = batch
        logits = self(images)
        loss = self.bce(logits, labels, mask)
        self.log(f"{stage}_loss", loss, sync_dist=True)
        self._outputs[stage].append(
            (torch.sigmoid(logits.float()).detach(), labels.detach(), mask.detach(), index.detach())
        )
        return loss

    def gathered(self, stage: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(scores, labels, mask) of the epoch, from every device, each image once."""
        parts = [torch.cat(t) for t in zip(*self._outputs[stage], strict=True)]
        self._outputs[stage] = []
        if self.trainer is not None and self.trainer.world_size > 1:
            parts = [p.reshape(-1, *p.shape[2:]) for p in self.all_gather(parts)]
        scores, labels, mask, index = (p.cpu().numpy() for p in parts)
        _, first = np.unique(index, return_index=True)  # DDP pads by repeating samples
        return scores[first], labels[first], mask[first]

    def on_validation_epoch_end(self) -> None:
        if self._outputs["val"]:
            scores, labels, mask = self.gathered("val")
            self.log("val_auroc", mean_auroc(finding_auroc(scores, labels, mask)), prog_bar=True)

    def on_test_epoch_end(self) -> None:
        if not self._outputs["test"]:
            return
        scores, labels, mask = self.gathered("test")
        report = bootstrap_auroc(scores, labels, mask, samples=self.hparams.bootstrap_samples)
        self.log("test_auroc", report["mean"])
        for name, value in zip(self.findings, report["auroc"], strict=True):
            self.log(f"test_auroc/{name}", value)
        self.test_report = {**report, "findings": self.findings, "images": int(len(labels))}
        self.test_scores = (scores, labels, mask)
        if self.trainer.is_global_zero:
            self.write_report(Path(self.trainer.log_dir or self.trainer.default_root_dir))

    def write_report(self, folder: Path) -> None:
        """``test_report.json`` and ``auroc.csv`` (finding, AUROC, 95% CI) in ``folder``."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "test_report.json").write_text(json.dumps(self.test_report, indent=2))
        rows = auroc_table(self.test_report, self.findings)
        with (folder / "auroc.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


__all__ = ["CXRClassifier", "build_monai_densenet"]
