"""Sample image grids with and without adapters, mixing several styles with weights.

    python -m diffusion.sample --pretrained /weights/sd15 --adapter runs/style_a/adapter:0.7 \\
        --adapter styles/b.safetensors:0.5 --prompts prompts.txt --num-images 4 --seed 0

For each prompt (one per line; class indices for a DiT) writes ``<out>/<nn>_<prompt>.png``:
the top row without adapters, the bottom row with them, same seed. An adapter is an
omnipeft adapter folder (``core.save_adapter``, what training exports) or a LoRA file in
diffusers / kohya / LyCORIS keys. Weights scale each LoRA-family update (``w * s B A``),
so a mix is the weighted sum of the adapters' updates.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import torch.nn as nn

import core
from core.checkpoint import load_adapter
from core.errors import ConfigError
from core.targeting import adapted_modules

from .export import load_lora
from .module import DiffusionModule
from .sampling import SCHEDULERS, save_grid


def parse_spec(spec: str) -> tuple[Path, float]:
    """``path[:weight]`` -> (path, weight); the weight defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep and re.fullmatch(r"-?\d+(\.\d*)?|-?\.\d+", tail):
        return Path(head), float(tail)
    return Path(spec), 1.0


def scale_adapter(model: nn.Module, name: str, weight: float) -> None:
    """Multiply adapter ``name``'s update by ``weight`` (LoRA family: its ``scale``)."""
    if weight == 1.0:
        return
    for path, wrapper in adapted_modules(model):
        if name not in wrapper.adapters:
            continue
        adapter = wrapper.adapters[name]
        if not isinstance(getattr(adapter, "scale", None), float):
            raise ConfigError(
                f"{path}: adapter {name!r} ({type(adapter).__name__}) has no update scale, so "
                "it cannot be weighted; give it weight 1 or mix LoRA-family adapters."
            )
        adapter.scale *= weight


def load_mix(model: nn.Module, specs: list[str]) -> list[str]:
    """Load every ``path[:weight]`` spec as its own adapter, weighted; all run together."""
    names: list[str] = []
    for i, spec in enumerate(specs):
        path, weight = parse_spec(spec)
        if not path.exists():
            raise ConfigError(f"adapter {path} does not exist.")
        name = f"style{i}"
        lora_file = (
            path.suffix == ".safetensors" or (path / "pytorch_lora_weights.safetensors").is_file()
        )
        if lora_file:
            added = load_lora(model, path, name=name)
        else:
            load_adapter(model, path, name=name)
            added = [name]
        for n in added:
            scale_adapter(model, n, weight)
        names += added
    core.set_active(model, names)
    return names


def read_prompts(path: str | Path) -> list[str]:
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ConfigError(f"{path} holds no prompts (one per line).")
    return prompts


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "prompt"


def sample_grids(
    module: DiffusionModule,
    prompts: list[str],
    out: str | Path,
    *,
    specs: list[str],
    num_images: int = 4,
    seed: int = 0,
    steps: int = 30,
    guidance: float = 7.5,
    scheduler: str = "ddim",
) -> list[Path]:
    """One PNG per prompt: a row without adapters above a row with the mix of ``specs``."""
    model = module.model
    names = load_mix(model, specs) if specs else []
    written = []
    for i, prompt in enumerate(prompts):
        cond = [int(prompt) if module.parts.kind == "dit" else prompt] * num_images
        opts = {"steps": steps, "guidance": guidance, "seed": seed, "scheduler": scheduler}
        core.set_active(model, [])
        rows = module.generate(cond, **opts)
        if names:
            core.set_active(model, names)
            rows += module.generate(cond, **opts)
        path = Path(out) / f"{i:02d}_{slug(prompt)}.png"
        written.append(save_grid(rows, path, rows=2 if names else 1))
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusion.sample", description=__doc__.split("\n")[0]
    )
    p.add_argument("--pretrained", required=True, help="diffusers pipeline folder or hub id")
    p.add_argument("--adapter", action="append", default=[], help="path[:weight], repeatable")
    p.add_argument("--prompts", required=True, help="text file, one prompt (or class id) per line")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    p.add_argument("--out", default="samples")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> list[Path]:
    args = build_parser().parse_args(argv)
    module = DiffusionModule(tuning="full", pretrained=args.pretrained).to(args.device)
    module.requires_grad_(False)
    paths = sample_grids(
        module,
        read_prompts(args.prompts),
        args.out,
        specs=args.adapter,
        num_images=args.num_images,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
    )
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
