"""Scores of generated images: FID, CLIP score and CLIP image-image similarity.

* FID (Heusel et al., 2017) through torchmetrics' ``FrechetInceptionDistance``: the
  standard Inception-v3 features from a local weights file (``inception_path``; needs the
  ``torch-fidelity`` package), or any feature extractor module a user passes.
* CLIP score (Hessel et al., 2021, "CLIPScore"): 100 * max(cos(E_img, E_txt), 0), and
  CLIP-I (the DreamBooth paper's subject fidelity): mean cosine similarity of the CLIP image
  embeddings of generated and reference images; both through open_clip, with weights from
  a local file or a hub tag, or a model the caller built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchvision.transforms import functional as TF

from core.errors import ConfigError


def fid_metric(
    feature: int | nn.Module = 2048, inception_path: str | None = None
) -> FrechetInceptionDistance:
    """torchmetrics FID over float images in [0, 1] (``normalize=True``).

    ``feature``: an Inception feature size (64, 192, 768, 2048; weights from
    ``inception_path``, else torch-fidelity downloads them) or a module mapping images to
    feature vectors.
    """
    if isinstance(feature, nn.Module):
        return FrechetInceptionDistance(feature=feature, normalize=True)
    try:
        return FrechetInceptionDistance(
            feature=feature, normalize=True, feature_extractor_weights_path=inception_path
        )
    except ModuleNotFoundError as err:
        raise ConfigError(
            f"{err} Or pass a feature extractor module as `feature` to avoid Inception."
        ) from None


def images_to_tensor(images: list[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> (n, 3, h, w) float in [0, 1], resized to ``size`` when given."""
    out = []
    for img in images:
        img = img.convert("RGB")
        if size is not None:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        out.append(TF.to_tensor(img))
    return torch.stack(out)


def fid(
    real: list[Image.Image], fake: list[Image.Image], feature: int | nn.Module = 2048, **kw: Any
) -> float:
    metric = fid_metric(feature, **kw)
    size = real[0].size[0]
    metric.update(images_to_tensor(real, size), real=True)
    metric.update(images_to_tensor(fake, size), real=False)
    return float(metric.compute())


class ClipScorer:
    """CLIP embeddings through open_clip: ``score`` (CLIPScore) and ``image_similarity``.

    Args:
        model / preprocess / tokenizer: an open_clip model with its image transform and
            tokenizer; or build them with ``ClipScorer.load``.
    """

    def __init__(self, model: nn.Module, preprocess: Any, tokenizer: Any) -> None:
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer

    @classmethod
    def load(cls, arch: str = "ViT-B-32", pretrained: str | None = "openai") -> ClipScorer:
        """``pretrained``: a local checkpoint path or an open_clip tag / hub id."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained)
        return cls(model, preprocess, open_clip.get_tokenizer(arch))

    @torch.no_grad()
    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = torch.stack([self.preprocess(img.convert("RGB")) for img in images]).to(device)
        return F.normalize(self.model.encode_image(batch).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(texts).to(device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def score(self, images: list[Image.Image], texts: list[str]) -> float:
        """Mean CLIPScore: 100 * max(cos, 0) of each image with its text."""
        cos = (self.image_features(images) * self.text_features(texts)).sum(-1)
        return float((100.0 * cos.clamp(min=0)).mean())

    def image_similarity(self, images: list[Image.Image], references: list[Image.Image]) -> float:
        """CLIP-I: mean pairwise cosine similarity of generated and reference images."""
        return float((self.image_features(images) @ self.image_features(references).T).mean())


__all__ = ["ClipScorer", "fid", "fid_metric", "images_to_tensor"]
