"""The nlp demo: CodeReviewer-format data from real Python source, a tiny LLaMA, LoRA.

    python -m nlp.demo [--out DIR]

1. ``nlp.synth`` writes a small CodeReviewer release (the three task folders) from hunks
   of the standard library's own files with mechanically introduced defects and their
   reviewer comments.
2. ``configs/nlp/demo.yaml`` trains LoRA on review comment generation through the same
   LightningCLI as ``python -m nlp.train fit`` (a tiny LLaMA from a config, random init
   since no weights can be downloaded, and the built-in byte tokenizer).
3. ``nlp.generate`` decodes the test set with the exported adapter and ``nlp.evaluate``
   prints BLEU-4; a model this small learns the comment templates, not code review.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from . import evaluate, generate
from .synth import write_release
from .train import ReviewCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "nlp"


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = Path(args.out or tempfile.mkdtemp(prefix="nlp-demo-"))
    start = time.time()
    root = write_release(out / "CodeReviewer", sizes=(240, 16, 16))
    cli = ReviewCLI(
        args=[
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--data.root",
            str(root),
            "--trainer.default_root_dir",
            str(out / "runs"),
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    hp = cli.model.hparams
    predictions = generate.main(
        [
            "--pretrained",
            hp.backbone,
            "--backbone-config",
            json.dumps(dict(hp.backbone_config)),
            "--tokenizer",
            "byte",
            "--adapter",
            str(cli.model.exported_adapter),
            "--task",
            "comment",
            "--input",
            str(root / "Comment_Generation" / "msg-test.jsonl"),
            "--output",
            str(out / "predictions.jsonl"),
            "--max-length",
            "512",
            "--max-new-tokens",
            "48",
        ]
    )
    scores = evaluate.main(["--task", "comment", "--predictions", str(predictions)])
    first = json.loads(Path(predictions).read_text().splitlines()[0])
    print(f"example: {first['prediction']!r}\n  reference: {first['reference']!r}")
    print(f"nlp demo finished in {time.time() - start:.0f} s; outputs in {out}")
    return scores


if __name__ == "__main__":
    main()
