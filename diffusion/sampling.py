"""Sampling with classifier-free guidance, text- or class-conditioned, and image grids.

One loop serves Stable Diffusion (prompts -> text embeddings) and DiT (class labels):

    eps = eps_u + w (eps_c - eps_u)         (Ho & Salimans, 2022, classifier-free guidance)

with any diffusers scheduler (``SCHEDULERS`` names the usual ones). Noise comes from a
seeded ``torch.Generator`` on the CPU, so a seed gives the same images on every device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def make_scheduler(name: str, base: Any) -> Any:
    """A sampling scheduler of type ``name`` from the training scheduler's config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}.")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base.config)


@torch.no_grad()
def denoise(
    predict: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
    cond: Any,
    uncond: Any,
    shape: tuple[int, ...],
    scheduler: Any,
    *,
    steps: int,
    guidance: float,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Latents from noise; ``predict(x, t, cond)`` returns the noise (or v) prediction."""
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, dtype)
    latents = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        if guidance != 1.0 and uncond is not None:
            both = predict(torch.cat([x, x]), t, _cat(uncond, cond))
            eps_u, eps_c = both.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = predict(x, t, cond)
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
    return latents


def _cat(a: Any, b: Any) -> Any:
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if isinstance(a, tuple):
        return tuple(_cat(x, y) for x, y in zip(a, b, strict=True))
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(n, 3, h, w) in [-1, 1] -> PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def grid(images: list[Image.Image], rows: int = 1) -> Image.Image:
    """Images tiled ``rows`` high (row-major)."""
    cols = max(1, -(-len(images) // rows))
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        out.paste(img, ((i % cols) * w, (i // cols) * h))
    return out


def save_grid(images: list[Image.Image], path: str | Path, rows: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, rows).save(path)
    return path


__all__ = ["SCHEDULERS", "denoise", "grid", "make_scheduler", "save_grid", "to_images"]
