"""Captioned image folders on disk, in the conventions fine-tuning users already have.

Captions, picked by ``captions`` ("auto" tries them in this order):

* ``metadata.jsonl``: one JSON object per line with ``file_name`` (relative to the folder)
  and ``text``, as diffusers' ImageFolder / ``train_text_to_image.py`` read it;
* ``txt``: a sidecar caption per image, ``cat.png`` + ``cat.txt`` (the kohya convention);
* ``instance``: one ``instance_prompt`` for every image (DreamBooth);
* ``class_folders``: ``<root>/<class name>/*.png``, a class label per folder (class-
  conditional DiT; the caption is the class name).

Images are resized to cover the target size and center-cropped (or randomly cropped), or
grouped into aspect-ratio buckets (``bucketing``, as NovelAI / kohya do) so a batch shares
one size. ``caption_dropout`` replaces captions with "" for classifier-free guidance.
With ``class_root`` / ``class_prompt`` each instance image is paired with a class image
for DreamBooth prior preservation. Missing, unreadable or uncaptioned files raise
``DataError`` naming the file (and the metadata line).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import functional as TF

from core.errors import OmniPeftError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SOURCES = ("auto", "metadata", "txt", "instance", "class_folders")
METADATA = "metadata.jsonl"


class DataError(OmniPeftError):
    """A dataset folder, caption or image is missing or malformed."""


@dataclass(frozen=True)
class Record:
    """One training image: its file, its caption and (class folders) its label."""

    path: Path
    caption: str
    label: int = -1


# --- reading the folder ------------------------------------------------------------------


def image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def read_metadata(root: Path) -> list[Record]:
    """``metadata.jsonl`` records; a bad line, missing file or empty text names file:line."""
    meta = root / METADATA
    records = []
    for lineno, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{meta}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}); one object per line.") from None
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise DataError(
                f"{where}: each line needs 'file_name' and 'text' (diffusers ImageFolder "
                f"convention), got {line.strip()[:80]!r}."
            )
        path = root / str(row["file_name"])
        if not path.is_file():
            raise DataError(f"{where}: image {path} does not exist.")
        text = str(row["text"]).strip()
        if not text:
            raise DataError(f"{where}: empty caption for {path}; write a caption or drop it.")
        records.append(Record(path, text))
    if not records:
        raise DataError(f"{meta} lists no images.")
    return records


def read_sidecars(root: Path) -> list[Record]:
    """One ``<image stem>.txt`` caption per image (kohya)."""
    records = []
    for path in image_files(root):
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(
                f"{path} has no caption file {txt.name}; every image needs a sidecar .txt "
                "(or use metadata.jsonl, or --data.instance_prompt for one prompt)."
            )
        text = txt.read_text(encoding="utf-8").strip()
        if not text:
            raise DataError(f"{txt}: empty caption for {path.name}.")
        records.append(Record(path, text))
    return records


def read_class_folders(root: Path) -> tuple[list[Record], list[str]]:
    """``<root>/<class>/*.png``: labels by sorted folder name; captions are the names."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    records = [
        Record(path, name, label)
        for label, name in enumerate(classes)
        for path in image_files(root / name)
    ]
    return records, classes


def read_records(
    root: str | Path, captions: str = "auto", instance_prompt: str | None = None
) -> tuple[list[Record], list[str]]:
    """The folder's records and class names (empty unless ``class_folders``)."""
    root = Path(root)
    if captions not in CAPTION_SOURCES:
        raise DataError(f"captions must be one of {CAPTION_SOURCES}, got {captions!r}.")
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist.")
    if captions == "auto":
        captions = _detect(root, instance_prompt)
    if captions == "metadata":
        records, classes = read_metadata(root), []
    elif captions == "txt":
        records, classes = read_sidecars(root), []
    elif captions == "instance":
        if not instance_prompt or not instance_prompt.strip():
            raise DataError("captions='instance' needs a non-empty --data.instance_prompt.")
        records, classes = [Record(p, instance_prompt.strip()) for p in image_files(root)], []
    else:
        records, classes = read_class_folders(root)
    if not records:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in {root}.")
    return records, classes


def _detect(root: Path, instance_prompt: str | None) -> str:
    if (root / METADATA).is_file():
        return "metadata"
    if instance_prompt:
        return "instance"
    if any(p.with_suffix(".txt").is_file() for p in image_files(root)):
        return "txt"
    if any(p.is_dir() for p in root.iterdir()) and not image_files(root):
        return "class_folders"
    raise DataError(
        f"{root}: no captions found. Add a {METADATA} (file_name, text), a .txt per image, "
        "class sub-folders, or pass --data.instance_prompt."
    )


def load_image(path: Path) -> Image.Image:
    """The image as RGB; an unreadable file raises ``DataError`` naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


# --- sizes: center crop or aspect-ratio buckets ------------------------------------------


def make_buckets(resolution: int, step: int = 64, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, area at most resolution^2, aspect
    ratio within [1/max_ratio, max_ratio] (NovelAI aspect-ratio bucketing)."""
    buckets = set()
    area = resolution * resolution
    width = step
    while width <= resolution * max_ratio:
        height = min(int(area // width) // step * step, int(resolution * max_ratio))
        if height >= step and 1 / max_ratio <= width / height <= max_ratio:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's (ties: the larger)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def to_tensor(img: Image.Image, size: tuple[int, int], random_crop: bool, flip: bool):
    """Resize to cover (width, height), crop to it, map to [-1, 1]: (3, height, width)."""
    width, height = size
    scale = max(width / img.width, height / img.height)
    resized = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(resized, Image.Resampling.BICUBIC)
    if random_crop:
        left = random.randint(0, resized[0] - width)
        top = random.randint(0, resized[1] - height)
    else:
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    img = img.crop((left, top, left + width, top + height))
    if flip and random.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return TF.to_tensor(img) * 2.0 - 1.0


# --- datasets ----------------------------------------------------------------------------


class CaptionedImages(Dataset):
    """Records -> {"pixel_values", "caption", "label", "index"} (or cached "latents")."""

    def __init__(
        self,
        records: list[Record],
        resolution: int,
        *,
        buckets: list[tuple[int, int]] | None = None,
        caption_dropout: float = 0.0,
        random_crop: bool = False,
        flip: bool = False,
    ) -> None:
        if not 0.0 <= caption_dropout <= 1.0:
            raise DataError(f"caption_dropout must lie in [0, 1], got {caption_dropout}.")
        self.records, self.resolution, self.buckets = records, resolution, buckets
        self.caption_dropout, self.random_crop, self.flip = caption_dropout, random_crop, flip
        self.sizes = [self._size(r) for r in records]
        self.latents: torch.Tensor | None = None  # set by ``use_latents``

    def _size(self, record: Record) -> tuple[int, int]:
        if self.buckets is None:
            return (self.resolution, self.resolution)
        try:
            with Image.open(record.path) as img:
                size = img.size
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read image {record.path}: {err}") from None
        return nearest_bucket(size, self.buckets)

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, index: int) -> str:
        if self.caption_dropout and random.random() < self.caption_dropout:
            return ""
        return self.records[index].caption

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        item = {"caption": self.caption(index), "label": record.label, "index": index}
        if self.latents is not None:
            item["latents"] = self.latents[index]
            return item
        img = load_image(record.path)
        item["pixel_values"] = to_tensor(img, self.sizes[index], self.random_crop, self.flip)
        return item

    def use_latents(self, latents: torch.Tensor) -> None:
        """Serve pre-encoded latents (one per record, in order) instead of pixels."""
        if len(latents) != len(self.records):
            raise DataError(f"latent cache has {len(latents)} rows for {len(self)} images.")
        self.latents = latents

    def fingerprint(self) -> str:
        """A hash of files (path, size, mtime), captions' images and target sizes."""
        digest = hashlib.sha256()
        for record, size in zip(self.records, self.sizes, strict=True):
            stat = record.path.stat()
            digest.update(f"{record.path}|{stat.st_size}|{stat.st_mtime_ns}|{size}\n".encode())
        return digest.hexdigest()[:16]


class WithPrior(Dataset):
    """Pairs each instance item with a class image (DreamBooth prior preservation)."""

    def __init__(self, instance: CaptionedImages, prior: CaptionedImages) -> None:
        self.instance, self.prior = instance, prior

    def __len__(self) -> int:
        return len(self.instance)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.instance[index]
        j = index % len(self.prior)
        record = self.prior.records[j]
        size = self.instance.sizes[index]
        item["prior_pixel_values"] = to_tensor(load_image(record.path), size, False, False)
        item["prior_caption"] = record.caption
        return item


class BucketBatchSampler(Sampler[list[int]]):
    """Batches whose images share one bucket size; shuffled per epoch from ``seed``."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, shuffle: bool, seed: int):
        self.sizes, self.batch_size, self.shuffle, self.seed = sizes, batch_size, shuffle, seed
        self.epoch = 0

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.sizes):
            groups.setdefault(size, []).append(i)
        out = []
        for key in sorted(groups):
            idx = groups[key]
            if self.shuffle:
                rng.shuffle(idx)
            out += [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self.batches())


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors, keep captions as a list; prior images follow the instance images."""
    batch: dict[str, Any] = {
        "caption": [it["caption"] for it in items],
        "label": torch.tensor([it["label"] for it in items]),
        "index": torch.tensor([it["index"] for it in items]),
    }
    key = "latents" if "latents" in items[0] else "pixel_values"
    batch[key] = torch.stack([it[key] for it in items])
    if "prior_pixel_values" in items[0]:
        batch["prior_pixel_values"] = torch.stack([it["prior_pixel_values"] for it in items])
        batch["prior_caption"] = [it["prior_caption"] for it in items]
    return batch


# --- the data module ---------------------------------------------------------------------


class DiffusionDataModule(lightning.LightningDataModule):
    """A captioned (or class-labelled) image folder for fine-tuning a diffusion model.

    Args:
        root: the image folder.
        captions: "auto", "metadata", "txt", "instance" or "class_folders" (module doc).
        instance_prompt: the caption of every image (captions="instance").
        resolution: training side (center crop), or the bucket area's side.
        bucketing: aspect-ratio buckets instead of square crops.
        bucket_step: bucket sides are multiples of this (64 for SD; 8 for tiny models).
        caption_dropout: probability of an empty caption (classifier-free guidance).
        random_crop / flip: augmentations (off by default: styles are position-sensitive).
        class_root / class_prompt: DreamBooth prior preservation images and their prompt.
        val_prompts: prompts of the per-epoch validation grid.
        cache_latents: encode images with the VAE once, cache under ``cache_dir`` (the
            model does it at fit start and then drops the VAE from training memory).
        cache_dir: latent cache folder (default ``<root>/.latent_cache``).
        batch_size / num_workers / seed: loader settings (seed: bucket shuffling).
    """

    def __init__(
        self,
        root: str,
        captions: str = "auto",
        instance_prompt: str | None = None,
        resolution: int = 512,
        bucketing: bool = False,
        bucket_step: int = 64,
        caption_dropout: float = 0.0,
        random_crop: bool = False,
        flip: bool = False,
        class_root: str | None = None,
        class_prompt: str | None = None,
        val_prompts: list[str] | None = None,
        cache_latents: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        records, self.classes = read_records(root, captions, instance_prompt)
        buckets = make_buckets(resolution, bucket_step) if bucketing else None
        self.train_set = CaptionedImages(
            records,
            resolution,
            buckets=buckets,
            caption_dropout=caption_dropout,
            random_crop=random_crop,
            flip=flip,
        )
        self.prior_set = None
        if class_root is not None:
            if bucketing and cache_latents:
                raise DataError("prior preservation with cached latents is not supported.")
            prior, _ = read_records(class_root, "instance", class_prompt)
            self.prior_set = CaptionedImages(prior, resolution)
        self.val_prompts = list(val_prompts or [records[0].caption])

    @property
    def num_classes(self) -> int:
        """Classes of a class-folder dataset (0 for captioned data)."""
        return len(self.classes)

    def cache_path(self, vae_tag: str) -> Path:
        folder = Path(self.hparams.cache_dir or Path(self.hparams.root) / ".latent_cache")
        return folder / f"latents-{self.train_set.fingerprint()}-{vae_tag}.pt"

    def cache_latents(self, encode, vae_tag: str) -> Path:
        """Encode every training image once with ``encode`` (pixels -> latent distribution
        parameters) and serve them from then on; reuses the file on later runs."""
        path = self.cache_path(vae_tag)
        if path.is_file():
            latents = torch.load(path, weights_only=True)
        else:
            dataset = self.train_set
            rows = []
            for i, record in enumerate(dataset.records):
                pixels = to_tensor(load_image(record.path), dataset.sizes[i], False, False)
                rows.append(encode(pixels[None])[0].cpu())
            latents = torch.stack(rows) if len({r.shape for r in rows}) == 1 else rows
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(latents, path)
        self.train_set.use_latents(latents)
        return path

    def train_dataset(self) -> Dataset:
        if self.prior_set is None:
            return self.train_set
        return WithPrior(self.train_set, self.prior_set)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        common = {"num_workers": hp.num_workers, "collate_fn": collate}
        if hp.bucketing:
            sampler = BucketBatchSampler(self.train_set.sizes, hp.batch_size, True, hp.seed)
            return DataLoader(self.train_dataset(), batch_sampler=sampler, **common)
        return DataLoader(
            self.train_dataset(), batch_size=hp.batch_size, shuffle=True, drop_last=False, **common
        )

    def val_dataloader(self) -> DataLoader:
        """A fixed (no dropout, no augmentation) pass over the training images."""
        hp = self.hparams
        ds = CaptionedImages(
            self.train_set.records,
            hp.resolution,
            buckets=self.train_set.buckets,
        )
        ds.latents = self.train_set.latents
        if hp.bucketing:
            sampler = BucketBatchSampler(ds.sizes, hp.batch_size, False, hp.seed)
            return DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
        return DataLoader(ds, batch_size=hp.batch_size, collate_fn=collate)

    test_dataloader = val_dataloader


__all__ = [
    "CAPTION_SOURCES",
    "BucketBatchSampler",
    "CaptionedImages",
    "DataError",
    "DiffusionDataModule",
    "Record",
    "collate",
    "load_image",
    "make_buckets",
    "nearest_bucket",
    "read_records",
]
