"""Fine-tune a diffusion model from the command line (LightningCLI).

    python -m diffusion.train fit --config configs/diffusion/lora.yaml \\
        --data.root /data/my_style --model.pretrained /weights/stable-diffusion-v1-5
    python -m diffusion.train fit --config configs/diffusion/difffit_dit.yaml \\
        --data.root /data/food_classes --model.pretrained facebook/DiT-XL-2-256

``fit`` prints the parameter report, writes a sample grid per epoch under
``<log_dir>/grids`` (and to TensorBoard when installed), keeps adapter-only checkpoints
(``--ckpt_path`` resumes the same run) and exports the adapter to ``<log_dir>/adapter``.
Defaults: bf16 (or fp16) mixed precision on a GPU, fp32 on CPU; seed 0.
"""

from __future__ import annotations

from core.domain import PeftCLI

from .data import DiffusionDataModule
from .module import DiffusionModule


class DiffusionCLI(PeftCLI):
    """LightningCLI over ``DiffusionModule`` and ``DiffusionDataModule``; the data's class
    count (class folders) goes to ``model.num_classes``."""

    model_class = DiffusionModule
    datamodule_class = DiffusionDataModule
    max_epochs = 10

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def main(args: list[str] | None = None) -> DiffusionCLI:
    """Run the CLI (``args`` instead of ``sys.argv`` when given, e.g. from tests)."""
    return DiffusionCLI(args=args)


if __name__ == "__main__":
    main()
