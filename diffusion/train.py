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

from typing import Any

from lightning.pytorch.cli import LightningCLI

from core.domain import default_loggers, default_precision

from .data import DiffusionDataModule
from .module import DiffusionModule


class DiffusionCLI(LightningCLI):
    """LightningCLI over ``DiffusionModule`` and ``DiffusionDataModule``; the data's class
    count (class folders) goes to ``model.num_classes``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault(
            "trainer_defaults",
            {"precision": default_precision(), "max_epochs": 10, "log_every_n_steps": 10},
        )
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(DiffusionModule, DiffusionDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        logger = kwargs.get("logger", config.get("logger"))
        if logger is None or logger is True:
            import os

            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = default_loggers(str(root))
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> DiffusionCLI:
    """Run the CLI (``args`` instead of ``sys.argv`` when given, e.g. from tests)."""
    return DiffusionCLI(args=args)


if __name__ == "__main__":
    main()
