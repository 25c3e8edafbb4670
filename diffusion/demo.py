"""The diffusion demo: a tiny Stable Diffusion, a generated captioned folder, LoRA and SODA.

    python -m diffusion.demo [--out DIR] [--steps N]

1. Writes a tiny randomly initialised SD pipeline in diffusers format (UNet, VAE, CLIP text
   encoder, tokenizer, scheduler; no weights can be downloaded) and a folder of generated
   captioned images (coloured shapes, ``metadata.jsonl``).
2. Fine-tunes LoRA and then SODA for a few steps each through the LightningCLI
   (``configs/diffusion/demo.yaml``), checking the denoising loss on a fixed batch and noise
   goes down and that the base UNet is untouched; SODA's rotation factors are trained by
   Stiefel Adam (``core.optim``) and checked orthogonal.
3. Writes a sample grid (without / with the LoRA), exports the LoRA in diffusers and kohya
   keys, re-imports both into a fresh model and checks the UNet outputs are equal.

Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from core.optim import stiefel_parameters

from . import export
from .models import write_tiny_pipeline
from .sample import sample_grids
from .train import DiffusionCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "diffusion"
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square")
SODA = {  # the factors trained by Stiefel Adam, as configs/diffusion/soda.yaml
    "class_path": "core.SODA",
    "init_args": {
        "targets": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
        "kron_factors": 2,
        "orthogonal": "stiefel",
    },
}


def write_shapes(root: str | Path, size: int = 32, per_kind: int = 1, seed: int = 0) -> Path:
    """Coloured shapes on white with ``metadata.jsonl`` captions ("a red circle", ...)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for k in range(per_kind):
                img = Image.new("RGB", (size, size), (250, 250, 250))
                draw = ImageDraw.Draw(img)
                r = size // 4 + int(torch.randint(0, size // 8 + 1, (1,), generator=gen))
                c = size // 2
                box = (c - r, c - r, c + r, c + r)
                (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=rgb)
                name = f"{colour}_{shape}_{k}.png"
                img.save(root / name)
                rows.append({"file_name": name, "text": f"a {colour} {shape}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def fixed_loss(module, batch: dict, seed: int = 0) -> float:
    """The denoising loss on ``batch`` with fixed noise and timesteps (eval mode)."""
    was = module.training
    module.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loss = float(module.compute_loss(batch)[0])
    module.train(was)
    return loss


def base_bytes(module) -> dict[str, bytes]:
    """The frozen UNet tensors' bytes (to prove training left them alone)."""
    return {
        k: v.detach().cpu().numpy().tobytes()
        for k, v in module.model.unet.state_dict().items()
        if ".adapters." not in k
    }


def rotation_error(module) -> float:
    """The largest ||Q^T Q - I||_F over SODA's rotation factors (Stiefel parameters)."""
    errors = [0.0]
    for factor in stiefel_parameters(module.model).values():
        q = factor.detach().double()
        errors.append(float(torch.linalg.matrix_norm(q.T @ q - torch.eye(len(q)).double())))
    return max(errors)


def train(method: dict | None, data: Path, pipeline: Path, out: Path, steps: int):
    args = [
        "--config",
        str(CONFIGS / "demo.yaml"),
        "--data.root",
        str(data),
        "--model.pretrained",
        str(pipeline),
        "--trainer.default_root_dir",
        str(out),
        "--trainer.max_steps",
        str(steps),
    ]
    if method is not None:
        args += ["--model.method", json.dumps(method)]
    cli = DiffusionCLI(args=args, run=False)
    batch = next(iter(cli.datamodule.val_dataloader()))
    before, frozen = fixed_loss(cli.model, batch), base_bytes(cli.model)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = fixed_loss(cli.model, batch)
    untouched = base_bytes(cli.model) == frozen
    return cli, before, after, untouched


def run(out: Path, steps: int) -> bool:
    # One thread: the tiny model's ops are far too small to split, and on a shared 2-core
    # machine a second OpenMP thread mostly spins waiting for the first.
    torch.set_num_threads(1)
    start = time.time()
    pipeline = write_tiny_pipeline(out / "pipeline")
    data = write_shapes(out / "data", size=16)  # 8 x 8 latents, the tiny UNet's sample size
    ok = True
    results = {}
    for label, method in (("lora", None), ("soda", SODA)):
        cli, before, after, untouched = train(method, data, pipeline, out / label, steps)
        results[label] = cli
        print(
            f"{label}: fixed-batch loss {before:.4f} -> {after:.4f}; base UNet untouched: {untouched}"
        )
        ok &= after < before and untouched
    error = rotation_error(results["soda"].model)
    print(f"soda: rotation factors after Stiefel Adam, max ||Q^T Q - I|| = {error:.1e}")
    ok &= error < 1e-5
    lora = results["lora"].model
    adapter = lora.exported_adapter
    prompts = ["a red circle", "a blue square"]
    grids = sample_grids(
        lora.__class__(tuning="full", pretrained=str(pipeline)),
        prompts,
        out / "samples",
        specs=[str(adapter)],
        num_images=2,
        steps=8,
        guidance=3.0,
    )
    print("sample grids:", *map(str, grids))
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([400])
    h = lora.encode_text(["a red circle"])[0]
    ours = lora.model.unet(x, t, encoder_hidden_states=h).sample
    for fmt in export.FORMATS:
        file = export.save_lora(lora.model, out / f"lora_{fmt}.safetensors", fmt)
        fresh = lora.__class__(tuning="full", pretrained=str(pipeline))
        export.load_lora(fresh.model, file)
        diff = (fresh.model.unet(x, t, encoder_hidden_states=h).sample - ours).abs().max().item()
        print(
            f"exported {file.name} ({file.stat().st_size / 1e3:.1f} kB), re-imported: max diff {diff:.2e}"
        )
        ok &= diff < 1e-5
    print(f"done in {time.time() - start:.0f} s: {'OK' if ok else 'FAILED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion.demo")
    parser.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.out:
        return 0 if run(Path(args.out), args.steps) else 1
    with tempfile.TemporaryDirectory() as tmp:
        return 0 if run(Path(tmp), args.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
