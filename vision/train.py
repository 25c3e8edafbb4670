"""Train, validate and test on VTAB-1k from the command line (LightningCLI).

    python -m vision.train fit --config configs/vision/lora.yaml \\
        --data.root /data/vtab-1k --data.task cifar \\
        --model.checkpoint /weights/vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors
    python -m vision.train test --config configs/vision/lora.yaml \\
        --data.root /data/vtab-1k --data.task cifar --model.init_adapter runs/.../adapter

``fit`` shows a progress bar, scores the protocol's evaluation list after every epoch
(the test list under ``--data.protocol final``), prints the parameter report at the start,
and at the end exports the adapter (core's format, adapter tensors and head only) to
``<log_dir>/adapter`` and writes ``<log_dir>/metrics.json``. ``validate`` / ``test`` score
a saved adapter (``--model.init_adapter``) or a Lightning checkpoint (``--ckpt_path``).

Defaults: CSV logs (and TensorBoard when installed) under ``--trainer.default_root_dir``,
a learning-rate monitor, bf16 mixed precision on a GPU that has it, seed 0.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor

from core.domain import LOG_NAME, PeftCLI, default_loggers, default_precision  # noqa: F401

from .data import VTABDataModule
from .metrics import MetricsFile
from .module import VisionClassifier


class VisionCLI(PeftCLI):
    """LightningCLI over ``VisionClassifier`` and ``VTABDataModule``.

    The data module decides the head's class count and the model's input size
    (``data.num_classes`` -> ``model.num_classes``, ``data.image_size`` -> ``model.image_size``).
    """

    model_class = VisionClassifier
    datamodule_class = VTABDataModule
    max_epochs = 100

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.image_size", "model.image_size")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def extra_callbacks(self, logging: bool) -> list:
        """A learning-rate monitor when logging; the run's metrics file."""
        monitor = [LearningRateMonitor(logging_interval="step")] if logging else []
        return [*monitor, MetricsFile()]


def fit_and_test(config, root, task: str, out, *extra: str) -> tuple[VisionCLI, list[dict]]:
    """Fit then test ``config`` on VTAB ``task`` under ``root``, logging to ``out``; returns
    the CLI and the test results (one dict per test dataloader)."""
    cli = VisionCLI(
        args=[
            "--config",
            str(config),
            "--data.root",
            str(root),
            "--data.task",
            task,
            "--trainer.default_root_dir",
            str(out),
            *extra,
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, cli.trainer.test(cli.model, datamodule=cli.datamodule)


def main(args: list[str] | None = None) -> VisionCLI:
    """Run the CLI (``args`` instead of ``sys.argv`` when given, e.g. from tests)."""
    return VisionCLI(args=args)


if __name__ == "__main__":
    main()
