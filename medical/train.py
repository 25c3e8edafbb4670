"""Chest X-ray classification from the command line (LightningCLI).

    python -m medical.train fit --config configs/medical/cxr_lora.yaml \\
        --data.root /data/ChestX-ray14 --data.dataset nih
    python -m medical.train test --config configs/medical/cxr_lora.yaml \\
        --data.root /data --data.dataset chexpert --model.init_adapter runs/.../adapter

``fit`` exports the adapter to ``<log_dir>/adapter``; ``test`` writes per-finding AUROC
with bootstrap 95% intervals to ``<log_dir>/test_report.json`` and ``auroc.csv``. Logs
hold metrics and file names only, never patient fields.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.cli import LightningCLI

from core.domain import default_loggers, default_precision

from .data import CXRDataModule
from .module import CXRClassifier


class CXRCLI(LightningCLI):
    """LightningCLI over ``CXRClassifier`` and ``CXRDataModule``; the data module sets the
    head's size, the input size and the finding names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault(
            "trainer_defaults",
            {"precision": default_precision(), "max_epochs": 20, "log_every_n_steps": 10},
        )
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(CXRClassifier, CXRDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.findings", "model.findings", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        logger = kwargs.get("logger", config.get("logger"))
        if logger is None or logger is True:
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = default_loggers(str(root))
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> CXRCLI:
    """Run the CLI (``args`` instead of ``sys.argv`` when given)."""
    return CXRCLI(args=args)


if __name__ == "__main__":
    main()
