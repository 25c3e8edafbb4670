"""Train, validate and test AST methods from the command line (LightningCLI).

    python -m audio.train fit --config configs/audio/lora.yaml --data.root /data/ESC-50 \\
        --data.fold 1 --model.pretrained MIT/ast-finetuned-audioset-10-10-0.4593

``fit`` shows a progress bar, validates every epoch, prints the parameter report, exports
the adapter (adapter tensors and head only) to ``<log_dir>/adapter`` and writes
``<log_dir>/metrics.json``; ``test`` scores a saved adapter (``--model.init_adapter``) or a
checkpoint (``--ckpt_path``).
"""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor

from core.domain import PeftCLI

from .data import AudioDataModule
from .metrics import MetricsFile
from .module import AudioClassifier


class AudioCLI(PeftCLI):
    """LightningCLI over ``AudioClassifier`` and ``AudioDataModule``; the data module sets
    the head's class count and the clip length (``data.max_length``)."""

    model_class = AudioClassifier
    datamodule_class = AudioDataModule
    max_epochs = 50

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.max_length", "model.max_length", apply_on="instantiate")

    def extra_callbacks(self, logging: bool) -> list:
        """A learning-rate monitor when logging; the run's metrics file."""
        monitor = [LearningRateMonitor(logging_interval="step")] if logging else []
        return [*monitor, MetricsFile()]


def fit_and_test(config, root, out, *extra: str) -> tuple[AudioCLI, list[dict]]:
    """Fit then test ``config`` on the dataset at ``root``, logging under ``out``."""
    cli = AudioCLI(
        args=[
            "--config",
            str(config),
            "--data.root",
            str(root),
            "--trainer.default_root_dir",
            str(out),
            *extra,
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli, cli.trainer.test(cli.model, datamodule=cli.datamodule)


def main(args: list[str] | None = None) -> AudioCLI:
    return AudioCLI(args=args)


if __name__ == "__main__":
    main()
