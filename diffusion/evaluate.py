"""Score a set of adapters: CLIP score, CLIP-I and FID against reference images.

    python -m diffusion.evaluate --pretrained /weights/sd15 --adapter base: \\
        --adapter runs/lora/adapter --adapter styles/b.safetensors --prompts prompts.txt \\
        --references /data/my_style --clip-arch ViT-B-32 --clip-weights /weights/clip.bin

For each adapter (``none`` scores the base model) generates ``--num-images`` images per
prompt with a fixed seed and prints one table row: CLIP score (text alignment), CLIP-I
(similarity to the reference folder's images) and FID (with ``--inception`` weights, or
skipped), as the DreamBooth and StyleInject papers report them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import core

from .data import IMAGE_EXTS, load_image
from .metrics import ClipScorer, fid
from .module import DiffusionModule
from .sample import load_mix, read_prompts


def generate_all(
    module: DiffusionModule, prompts: list[str], n: int, seed: int, steps: int, guidance: float
):
    images, texts = [], []
    for i, prompt in enumerate(prompts):
        images += module.generate([prompt] * n, steps=steps, guidance=guidance, seed=seed + i)
        texts += [prompt] * n
    return images, texts


def evaluate(
    module,
    specs,
    prompts,
    scorer,
    references,
    *,
    n=4,
    seed=0,
    steps=30,
    guidance=7.5,
    inception=None,
):
    """One dict of scores per adapter spec (``none``: the base model)."""
    rows = []
    base_names = []
    for spec in specs:
        core.set_active(module.model, [])
        names = [] if spec == "none" else load_mix(module.model, [spec])
        core.set_active(module.model, names)
        base_names += names
        images, texts = generate_all(module, prompts, n, seed, steps, guidance)
        row = {"adapter": spec, "clip_score": scorer.score(images, texts)}
        if references:
            row["clip_i"] = scorer.image_similarity(images, references)
            if inception:
                row["fid"] = fid(references, images, inception_path=inception)
        rows.append(row)
        for name in names:
            core.delete_adapter(module.model, name)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(
            " | ".join(
                f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m diffusion.evaluate")
    p.add_argument("--pretrained", required=True)
    p.add_argument("--adapter", action="append", default=["none"], help="path[:weight]; repeatable")
    p.add_argument("--prompts", required=True)
    p.add_argument("--references", default=None, help="folder of reference images (CLIP-I, FID)")
    p.add_argument("--clip-arch", default="ViT-B-32")
    p.add_argument("--clip-weights", default="openai", help="local open_clip checkpoint or tag")
    p.add_argument("--inception", default=None, help="local Inception weights for FID")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = DiffusionModule(tuning="full", pretrained=args.pretrained).to(device)
    module.requires_grad_(False)
    scorer = ClipScorer.load(args.clip_arch, args.clip_weights)
    refs = []
    if args.references:
        refs = [
            load_image(f)
            for f in sorted(Path(args.references).iterdir())
            if f.suffix.lower() in IMAGE_EXTS
        ]
    rows = evaluate(
        module,
        args.adapter,
        read_prompts(args.prompts),
        scorer,
        refs,
        n=args.num_images,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        inception=args.inception,
    )
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
