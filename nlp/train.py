"""Instruction-tune a causal LM on a CodeReviewer task from the command line (LightningCLI).

    python -m nlp.train fit --config configs/nlp/review_comment_lora.yaml \\
        --data.root /data/CodeReviewer --model.pretrained /weights/llama-7b
    python -m nlp.train test --config configs/nlp/review_comment_lora.yaml \\
        --data.root /data/CodeReviewer --model.init_adapter runs/.../adapter

The task comes from ``--data.task`` (linked to the model); the tokenizer from
``--model.tokenizer``, else the model's weights (linked to the data). ``fit`` exports the
adapter to ``<log_dir>/adapter``; validation and test decode and log the task's metrics.
Two-stage tuning (instruction tuning, then the task) as the paper's ablation: fit stage
one, then fit stage two with ``--model.init_adapter <stage one>/adapter``.
"""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger

from core.domain import LOG_NAME, PeftCLI

from .data import CodeReviewDataModule
from .module import ReviewLM


def tokenizer_name(tokenizer: str | None, pretrained: str | None, backbone: str) -> str:
    return tokenizer or pretrained or backbone


class ReviewCLI(PeftCLI):
    """LightningCLI over ``ReviewLM`` and ``CodeReviewDataModule``."""

    model_class = ReviewLM
    datamodule_class = CodeReviewDataModule
    max_epochs = 3

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.task", "model.task")
        parser.link_arguments(
            ("model.tokenizer", "model.pretrained", "model.backbone"),
            "data.tokenizer",
            compute_fn=tokenizer_name,
        )

    def make_loggers(self, root: str) -> list:
        return [CSVLogger(save_dir=root, name=LOG_NAME)]


def main(args: list[str] | None = None, run: bool = True) -> ReviewCLI:
    """Run the CLI (``args`` instead of ``sys.argv`` when given, e.g. from tests)."""
    return ReviewCLI(args=args, run=run)


if __name__ == "__main__":
    main()
