"""The vision demo: real images in VTAB-1k format, a small ViT, LoRA, on CPU in minutes.

    python -m vision.demo [--out DIR] [extra LightningCLI arguments for stage 2]

1. Writes scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) as a
   VTAB-1k task folder, ``digits``: the four list files and ``images/<split>/000000.png``,
   with the real split sizes (train800 / val200 / train800val200) and the other 797 scans
   as the test list; and a source task ``digits_0to4`` with the same lists restricted to
   digits 0-4.
2. Stage 1 (``configs/vision/demo_pretrain.yaml``): "pretrains" a small ViT from random
   init by full fine-tuning on the source task, since no weights can be downloaded.
3. Stage 2 (``configs/vision/demo.yaml``): loads that export as ``--model.checkpoint`` and
   trains LoRA (plus a new 10-way head) on all ten digits, scoring the test list each epoch.
4. Tests, prints the test accuracy and the parameter report, reloads the exported adapter
   into a freshly built model and checks that its outputs are identical.

Both stages run through the same LightningCLI path as ``python -m vision.train fit``.
Exits non-zero if the reloaded adapter does not reproduce the trained model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import core
from core.lightning import TRAINED_FILE

from .data import write_vtab_task
from .module import VisionClassifier
from .train import fit_and_test

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "vision"
TASK, SOURCE_TASK, SOURCE_CLASSES = "digits", "digits_0to4", 5


def write_digits_tasks(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """scikit-learn's digits as VTAB-1k task folders ``root/digits`` (all ten classes) and
    ``root/digits_0to4`` (the same lists, digits 0-4 only)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(int)
    order = np.random.default_rng(seed).permutation(len(pixels))
    train, val, test = order[:800], order[800:1000], order[1000:]
    lists = {
        "train800": train,
        "val200": val,
        "train800val200": np.concatenate([train, val]),
        "test": test,
    }

    def items(indices, classes: int):
        return [
            (Image.fromarray(pixels[i], mode="L"), labels[i])
            for i in indices
            if labels[i] < classes
        ]

    full = write_vtab_task(
        Path(root) / TASK, {k: items(v, 10) for k, v in lists.items()}, image_format="png"
    )
    source = write_vtab_task(
        Path(root) / SOURCE_TASK,
        {k: items(v, SOURCE_CLASSES) for k, v in lists.items()},
        image_format="png",
    )
    return full, source


def run_stage(config: Path, root: Path, task: str, out: Path, *extra: str):
    """fit then test one config through the training CLI; returns (cli, test metrics)."""
    cli, (result,) = fit_and_test(config, root, task, out, *extra)
    return cli, result


def reload_matches(module: VisionClassifier, adapter: Path, images: torch.Tensor) -> float:
    """Build the model afresh, load the exported adapter, return max |difference| of logits."""
    # LightningCLI records private keys (e.g. "_instantiator") beside the arguments.
    hparams = {
        k: v for k, v in module.hparams.items() if not k.startswith("_") and k != "init_adapter"
    }
    fresh = VisionClassifier(**hparams, init_adapter=str(adapter)).eval()
    module.eval()
    with torch.no_grad():
        return (fresh(images) - module(images)).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    args, extra = parser.parse_known_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="omnipeft-vision-demo-"))
    start = time.perf_counter()
    # The demo's matrices are tiny: intra-op threads only add synchronisation (on 2 busy
    # cores, 2 threads cost 5x the CPU time of 1). The DataLoader worker uses the other core.
    torch.set_num_threads(1)

    root = out / "data"
    full, source = write_digits_tasks(root)
    print(f"wrote VTAB-format tasks of real digit scans: {full} and {source}")

    print("\nstage 1: pretrain a small ViT from random init on digits 0-4 (full fine-tuning)")
    pre, pre_result = run_stage(CONFIGS / "demo_pretrain.yaml", root, SOURCE_TASK, out / "pretrain")
    weights = pre.model.exported_adapter / TRAINED_FILE
    print(f"source accuracy (digits 0-4): {100 * pre_result['test_acc']:.2f}%; weights {weights}")

    print("\nstage 2: LoRA on the pretrained ViT, all ten digits")
    cli, result = run_stage(
        CONFIGS / "demo.yaml", root, TASK, out / "lora", "--model.checkpoint", str(weights), *extra
    )
    module = cli.model
    counts = module.parameter_counts()
    print("\nparameter report")
    print(core.param_report(module.model))
    print(
        f"\ntest accuracy on the {len(cli.datamodule.datasets['test'])} held-out digits: "
        f"{100 * result['test_acc']:.2f}%  ({counts['trainable_without_head']:,} LoRA "
        f"parameters + {counts['head']:,} head parameters trained, "
        f"{counts['total'] - counts['trainable']:,} frozen)"
    )
    images = torch.stack([cli.datamodule.datasets["test"][i][0] for i in range(64)])
    diff = reload_matches(module, module.exported_adapter, images)
    print(f"adapter saved to {module.exported_adapter}; reloaded into a fresh model: ", end="")
    print(f"max |logit difference| = {diff:.3g}")
    print(f"metrics: {Path(cli.trainer.log_dir) / 'metrics.json'}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    if diff != 0.0:
        print("FAILED: the reloaded adapter does not reproduce the trained model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
