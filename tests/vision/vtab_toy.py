"""A tiny VTAB-1k-format task on disk and a tiny ViT, shared by the vision tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vision.data import write_vtab_task

SPLIT_SIZES = {"train800": 24, "val200": 8, "train800val200": 32, "test": 20}
TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 4}
IMAGE_SIZE = 32


def toy_images(count: int, classes: int, *, seed: int, size: int = 12) -> list:
    """Images whose class shows as a bright row band and a colour cast, under noise;
    sizes vary as in VTAB-1k (stored at their original size, resized when read)."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(count):
        label = i % classes
        side = size + (i % 3)
        pixels = rng.integers(0, 60, (side, side, 3)).astype(np.uint8)
        pixels[:, :, label % 3] += 100
        band = (label * side) // classes
        pixels[band : band + 2] = 250
        items.append((Image.fromarray(pixels), label))
    return items


def make_task(
    root: Path, name: str = "toy", classes: int = 4, sizes: dict[str, int] | None = None
) -> Path:
    """Write ``<root>/<name>`` with the four VTAB-1k lists (different images in each)."""
    sizes = sizes or SPLIT_SIZES
    splits = {
        split: toy_images(count, classes, seed=seed)
        for seed, (split, count) in enumerate(sizes.items())
    }
    return write_vtab_task(root / name, splits)
