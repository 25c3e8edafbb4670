"""The nlp demo: CodeReviewer-format data from real Python source, a tiny LLaMA, LoRA.

    python -m nlp.demo [--out DIR] [any nlp.train option, e.g. --trainer.max_epochs 4]

1. ``nlp.synth`` writes a small CodeReviewer release (the three task folders) from hunks
   of the standard library's own files with mechanically introduced defects (six kinds,
   balanced) and their reviewer comments.
2. A byte-level BPE is trained on the training prompts (``nlp.tokenizer.train_bpe``):
   sequences are ~3x shorter than in bytes, which is what makes the demo fast on a CPU.
3. ``configs/nlp/demo.yaml`` trains LoRA on review comment generation through the same
   LightningCLI as ``python -m nlp.train fit`` (a tiny LLaMA from a config, random init
   since no weights can be downloaded; validation without decoding, loss and perplexity).
4. ``nlp.generate`` decodes the test set with the exported adapter and ``nlp.evaluate``
   prints BLEU-4 as the CodeReviewer benchmark computes it; the table compares the model
   with two baselines: copying the input hunk, and always answering the commonest training
   comment. "exact" is the share of comments reproduced word for word: the model has to
   tell the six defect kinds apart from the hunk to beat the commonest comment (~17%).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import yaml

from . import evaluate, generate
from .data import read_jsonl, render_prompt, response
from .metrics import exact_match, review_scores
from .synth import write_release
from .tokenizer import train_bpe
from .train import ReviewCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "nlp"
SIZES = (480, 32, 96)  # hunks per split; comment generation uses the defective half
CONTEXT = 2  # unchanged lines around each edit
VOCAB = 1024


class Clock:
    """Wall and process-CPU seconds per phase (CPU time shows the work when the machine is
    shared and wall time does not)."""

    def __init__(self) -> None:
        self.laps: list[str] = []
        self.wall, self.cpu = time.time(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.time(), time.process_time()
        self.laps.append(f"{name} {wall - self.wall:.0f}/{cpu - self.cpu:.0f}")
        self.wall, self.cpu = wall, cpu

    def __str__(self) -> str:
        return ", ".join(self.laps)


def build_tokenizer(root: Path, folder: Path) -> Path:
    """A BPE trained on the training split's prompts and comments only."""
    records = read_jsonl(root / "Comment_Generation" / "msg-train.jsonl", "comment")
    texts = [render_prompt(r, "comment") + response(r, "comment") for r in records]
    return train_bpe(texts, VOCAB, folder)


def baselines(root: Path) -> dict[str, dict[str, float]]:
    """Scores of copying the input hunk and of always giving the commonest training comment."""
    test = read_jsonl(root / "Comment_Generation" / "msg-test.jsonl", "comment")
    train = read_jsonl(root / "Comment_Generation" / "msg-train.jsonl", "comment")
    references = [r["msg"] for r in test]
    commonest = Counter(r["msg"] for r in train).most_common(1)[0][0]
    guesses = {
        "copy the input hunk": [r["patch"] for r in test],
        "commonest comment": [commonest] * len(test),
    }
    return {name: scores(preds, references) for name, preds in guesses.items()}


def scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    table = review_scores("comment", predictions, references)
    table["exact"] = exact_match(predictions, references)
    return table


def print_table(rows: dict[str, dict[str, float]]) -> None:
    print(f"{'comment generation (test)':<28}{'bleu4':>8}{'bleu4 -stop':>13}{'exact %':>9}")
    for name, row in rows.items():
        print(
            f"{name:<28}{row['bleu4']:>8.2f}{row['bleu4_no_stopwords']:>13.2f}{row['exact']:>9.1f}"
        )


def fit(out: Path, root: Path, tokenizer: Path, overrides: list[str]) -> ReviewCLI:
    config = CONFIGS / "demo.yaml"
    backbone = yaml.safe_load(config.read_text())["model"]["backbone_config"]
    backbone["vocab_size"] = VOCAB
    cli = ReviewCLI(
        args=[
            "--config", str(config),
            "--data.root", str(root),
            "--model.tokenizer", str(tokenizer),
            "--model.backbone_config", json.dumps(backbone),
            "--trainer.default_root_dir", str(out / "runs"),
            *overrides,
        ],
        run=False,
    )  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def decode_test(cli: ReviewCLI, root: Path, out: Path) -> Path:
    """Greedy decoding of the test split with the exported adapter, as validation would
    (``model.max_new_tokens``: 24 in demo.yaml, the longest reference is 18 BPE tokens)."""
    hp = cli.model.hparams
    return generate.main(
        [
            "--pretrained", hp.backbone,
            "--backbone-config", json.dumps(dict(hp.backbone_config)),
            "--init-seed", str(hp.init_seed),
            "--tokenizer", hp.tokenizer,
            "--adapter", str(cli.model.exported_adapter),
            "--task", "comment",
            "--input", str(root / "Comment_Generation" / "msg-test.jsonl"),
            "--output", str(out / "predictions.jsonl"),
            "--max-length", str(cli.datamodule.hparams.max_length + hp.max_new_tokens),
            "--max-new-tokens", str(hp.max_new_tokens),
            "--batch-size", "48",
        ]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args, overrides = p.parse_known_args(argv)
    torch.set_num_threads(1)  # tiny matrices: a 2nd thread only adds sync (badly when shared)
    out = Path(args.out or tempfile.mkdtemp(prefix="nlp-demo-"))
    start, clock = time.time(), Clock()
    root = write_release(out / "CodeReviewer", sizes=SIZES, context=CONTEXT)
    tokenizer = build_tokenizer(root, out / "tokenizer")
    clock.lap("data + tokenizer")
    cli = fit(out, root, tokenizer, overrides)
    clock.lap("fit")
    predictions = decode_test(cli, root, out)
    clock.lap("decode test")
    lora = evaluate.main(["--task", "comment", "--predictions", str(predictions)])
    rows = [json.loads(line) for line in Path(predictions).read_text().splitlines()]
    lora["exact"] = exact_match([r["prediction"] for r in rows], [r["reference"] for r in rows])
    table = {"LoRA tiny LLaMA": lora}
    table.update(baselines(root))
    print_table(table)
    print(f"example: {rows[0]['prediction']!r}\n  reference: {rows[0]['reference']!r}")
    print(f"phases (wall / CPU s): {clock}")
    print(f"nlp demo finished in {time.time() - start:.0f} s; outputs in {out}")
    return table


if __name__ == "__main__":
    main()
