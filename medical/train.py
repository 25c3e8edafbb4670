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

from core.domain import PeftCLI

from .data import CXRDataModule
from .module import CXRClassifier


class CXRCLI(PeftCLI):
    """LightningCLI over ``CXRClassifier`` and ``CXRDataModule``; the data module sets the
    head's size, the input size and the finding names."""

    model_class = CXRClassifier
    datamodule_class = CXRDataModule
    max_epochs = 20

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.findings", "model.findings", apply_on="instantiate")


def main(args: list[str] | None = None) -> CXRCLI:
    """Run the CLI (``args`` instead of ``sys.argv`` when given)."""
    return CXRCLI(args=args)


if __name__ == "__main__":
    main()
