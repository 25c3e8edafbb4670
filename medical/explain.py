"""Saliency maps for a trained chest X-ray classifier, written as PNG overlays.

    python -m medical.explain --run runs/lightning_logs/version_0 --out saliency \\
        [--finding Effusion] [--images 8] [--method gradcam|occlusion]

Loads the run's ``config.yaml`` and exported ``adapter`` (or ``trained``) folder, rebuilds
the model, and writes one overlay per test image: Grad-CAM (Selvaraju et al., 2017) via
MONAI's ``GradCAM`` on the last convolutional / transformer block, or MONAI's
``OcclusionSensitivity`` (Zeiler & Fergus, 2014). File names are the image files' names
only; no patient field is written or printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from .data import IMAGENET_MEAN, IMAGENET_STD, CXRDataModule
from .module import MONAI_PREFIX, CXRClassifier


def target_layer(module: CXRClassifier) -> str:
    """Grad-CAM layer: the last ReLU of MONAI's DenseNet (a CNN's last feature map)."""
    if not module.hparams.backbone.startswith(MONAI_PREFIX):
        raise ValueError(
            f"Grad-CAM needs a convolutional feature map; {module.hparams.backbone!r} is not "
            "a MONAI CNN: use --method occlusion (or auto)."
        )
    return "model.class_layers.relu"


def resolve_method(module: CXRClassifier, method: str) -> str:
    """ "auto": Grad-CAM for MONAI CNNs, occlusion sensitivity for transformers."""
    if method != "auto":
        return method
    return "gradcam" if module.hparams.backbone.startswith(MONAI_PREFIX) else "occlusion"


def saliency(module: CXRClassifier, images: torch.Tensor, finding: int, method: str) -> np.ndarray:
    """(B, H, W) maps in [0, 1] for class ``finding``."""
    from monai.visualize import GradCAM, OcclusionSensitivity

    module.eval()
    method = resolve_method(module, method)
    if method == "occlusion":
        occ = OcclusionSensitivity(
            nn_module=module,
            mask_size=max(2, images.shape[-1] // 8),
            n_batch=64,
            overlap=0.5,
            verbose=False,
        )
        with torch.no_grad():  # MONAI's occlusion takes one image at a time
            maps = torch.cat([occ(image[None])[0] for image in images])
        maps = -maps[:, finding : finding + 1]  # a drop in the score marks an important region
    else:
        with torch.enable_grad():
            maps = GradCAM(nn_module=module, target_layers=target_layer(module))(
                images, class_idx=finding
            )
    maps = maps[:, 0].detach().float()
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    return ((maps - low) / (high - low).clamp_min(1e-8)).numpy()


def overlay(image: torch.Tensor, heat: np.ndarray, alpha: float = 0.45) -> Image.Image:
    """The de-normalised gray image under a jet-coloured heat map."""
    from matplotlib import colormaps

    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    gray = (image * std + mean).clamp(0, 1).mean(0).numpy()
    base = np.repeat(gray[..., None], 3, axis=-1)
    colour = colormaps["jet"](heat)[..., :3]
    mixed = (1 - alpha) * base + alpha * colour
    return Image.fromarray((mixed * 255).astype(np.uint8))


def load_run(run: str | Path, root: str | None = None) -> tuple[CXRClassifier, CXRDataModule]:
    """Rebuild a run's model (with its exported adapter) and data module from its folder."""
    run = Path(run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    data_args = dict(config["data"])
    if root is not None:
        data_args["root"] = root
    data = CXRDataModule(**data_args)
    model_args: dict[str, Any] = dict(config["model"])
    export = run / ("adapter" if model_args.get("method") else "trained")
    model_args.update(
        num_classes=data.num_classes,
        image_size=data.hparams.image_size,
        findings=data.findings,
        init_adapter=str(export),
    )
    return CXRClassifier(**model_args), data


def write_overlays(
    module: CXRClassifier,
    data: CXRDataModule,
    out: str | Path,
    *,
    finding: int = 0,
    images: int = 8,
    method: str = "auto",
) -> list[Path]:
    """Overlays of the first ``images`` test images, as ``<out>/<image name>.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data.setup("test")
    records = data.splits["test"][:images]
    batch = torch.stack([data.test_dataloader().dataset[i][0] for i in range(len(records))])
    maps = saliency(module, batch, finding, method)
    written = []
    for record, image, heat in zip(records, batch, maps, strict=True):
        path = out / f"{len(written):03d}_{record.path.stem}_{data.findings[finding]}.png"
        overlay(image, heat).resize((256, 256)).save(path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a fit's log folder (config.yaml, adapter/)")
    parser.add_argument("--out", required=True, help="folder for the PNG overlays")
    parser.add_argument("--root", help="data root, if it moved since the run")
    parser.add_argument("--finding", help="finding name (default: the first)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--method", choices=("auto", "gradcam", "occlusion"), default="auto")
    args = parser.parse_args(argv)
    module, data = load_run(args.run, args.root)
    index = data.findings.index(args.finding) if args.finding else 0
    written = write_overlays(
        module, data, args.out, finding=index, images=args.images, method=args.method
    )
    print(f"wrote {len(written)} overlays to {args.out}")
    return written


if __name__ == "__main__":
    main()
