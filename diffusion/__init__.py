"""omnipeft diffusion domain: fine-tune Stable Diffusion and DiT with any core method.

* ``diffusion.data``: captioned image folders (metadata.jsonl, kohya .txt, instance prompt,
  class folders), center crop or aspect-ratio buckets, caption dropout, prior images.
* ``diffusion.models``: diffusers pipeline parts (SD 1.x/2.x, SDXL, DiT), tiny pipelines.
* ``diffusion.module``: ``DiffusionModule`` (epsilon / v loss, Min-SNR, prior
  preservation, latent cache, EMA, SODA's parameter groups, per-epoch sample grid).
* ``diffusion.export``: LoRA files in diffusers / kohya keys (LyCORIS LoHa/LoKr import),
  merged pipeline folders.
* ``diffusion.metrics``: FID (torchmetrics), CLIP score and CLIP-I (open_clip).
* ``python -m diffusion.train`` (LightningCLI), ``diffusion.sample``, ``diffusion.evaluate``,
  ``diffusion.demo``.
"""
