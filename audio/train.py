"""Train, validate and test AST methods from the command line (LightningCLI).

    python -m audio.train fit --config configs/audio/lora.yaml --data.root /data/ESC-50 \\
        --data.fold 1 --model.pretrained MIT/ast-finetuned-audioset-10-10-0.4593

``fit`` shows a progress bar, validates every epoch, prints the parameter report, exports
the adapter (adapter tensors and head only) to ``<log_dir>/adapter`` and writes
``<log_dir>/metrics.json``; ``test`` scores a saved adapter (``--model.init_adapter``) or a
checkpoint (``--ckpt_path``).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningCLI

from core.domain import default_loggers, default_precision

from .data import AudioDataModule
from .metrics import MetricsFile
from .module import AudioClassifier


class AudioCLI(LightningCLI):
    """LightningCLI over ``AudioClassifier`` and ``AudioDataModule``; the data module sets
    the head's class count and the clip length (``data.max_length``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault(
            "trainer_defaults",
            {"precision": default_precision(), "max_epochs": 50, "log_every_n_steps": 10},
        )
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(AudioClassifier, AudioDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.max_length", "model.max_length", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any):
        config = self._get(self.config_init, "trainer", default={})
        logger = kwargs.get("logger", config.get("logger"))
        if logger is None or logger is True:
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = logger = default_loggers(str(root))
        callbacks = list(config.get("callbacks") or [])
        if logger:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(MetricsFile())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)


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
