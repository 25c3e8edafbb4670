"""The audio demo: real synthetic speech in Speech Commands format, a small AST, an adapter.

    python -m audio.demo [--out DIR]

1. Synthesises eight spoken keywords with eSpeak NG (``espeakng-loader``) in 16 voices (four
   English accents x four voice variants), three rates and three pitches into a Speech
   Commands v2 folder; the list files hold out two voices for validation and two for test.
2. Stage 1: trains a small AST built from a config on the first half of the words (full
   fine-tuning, as no weights can be downloaded) and saves it in transformers format.
3. Stage 2: loads it as ``--model.pretrained`` and trains a parallel bottleneck adapter
   after the FFN (plus a new head) on the other half of the words; prints the test
   accuracy and the parameter report. Both stages go through ``python -m audio.train``'s CLI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

import core

from .speech import DEMO_VOICES, write_keyword_folder
from .train import fit_and_test

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "audio"
WORDS = ("yes", "no", "up", "down", "left", "right", "stop", "go")
HELD_OUT = 2  # voices for validation, and as many for test
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "patch_size": 16,
    "frequency_stride": 16,
    "time_stride": 10,
}


def subset(root: Path, words, out: Path) -> Path:
    """A Speech Commands folder holding only ``words`` (list files filtered)."""
    for word in words:
        shutil.copytree(root / word, out / word)
    for name in ("validation_list.txt", "testing_list.txt"):
        lines = [x for x in (root / name).read_text().split() if x.split("/")[0] in words]
        (out / name).write_text("\n".join(lines) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    args, extra = parser.parse_known_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="omnipeft-audio-demo-"))
    start = time.perf_counter()
    torch.set_num_threads(1)
    full = write_keyword_folder(out / "speech", WORDS, voices=DEMO_VOICES, held_out=HELD_OUT)
    source = subset(full, WORDS[:4], out / "source")
    target = subset(full, WORDS[4:], out / "target")
    print(f"synthesised {len(list(full.glob('*/*.wav')))} spoken keywords under {full}")
    common = [
        "--data.dataset",
        "speechcommands",
        "--data.num_workers",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
    ]
    print("\nstage 1: pretrain a small AST from a config on", WORDS[:4])
    pre, (r1,) = fit_and_test(
        CONFIGS / "demo_pretrain.yaml",
        source,
        out / "pretrain",
        "--model.ast_config",
        json.dumps(TINY),
        *common,
    )
    weights = out / "pretrained_ast"
    ast = pre.model.model
    from transformers import ASTModel

    base = ASTModel(ast.config)
    state = {
        k.replace("blocks.", "layers.").replace("norm.", "layernorm.", 1)
        if k.startswith("norm.")
        else k.replace("blocks.", "layers."): v
        for k, v in ast.state_dict().items()
        if not k.startswith("head.")
    }
    base.load_state_dict(state)  # strict: every tensor of the trained encoder
    base.save_pretrained(weights)
    print(f"source test accuracy: {100 * r1['test_acc']:.1f}%; saved {weights}")
    print("\nstage 2: parallel FFN adapter + new head on", WORDS[4:])
    cli, (r2,) = fit_and_test(
        CONFIGS / "demo.yaml",
        target,
        out / "adapter",
        "--model.pretrained",
        str(weights),
        *common,
        *extra,
    )
    print(core.param_report(cli.model.model))
    counts = cli.model.parameter_counts()
    print(
        f"\ntest accuracy on held-out voices: {100 * r2['test_acc']:.1f}% "
        f"({counts['trainable_without_head']:,} adapter + norm and {counts['head']:,} head "
        f"parameters trained of {counts['total']:,})"
    )
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
