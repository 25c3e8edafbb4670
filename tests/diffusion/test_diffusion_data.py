"""Captioned image folders: metadata.jsonl and kohya sidecars, instance prompts, class
folders, aspect-ratio buckets, caption dropout, prior images, clear errors on bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffusion.data import (
    BucketBatchSampler,
    CaptionedImages,
    DataError,
    DiffusionDataModule,
    collate,
    make_buckets,
    nearest_bucket,
    read_records,
)


def image(path: Path, size=(32, 32), colour=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def metadata(root: Path, rows: list[dict]) -> None:
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metadata_jsonl(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png")
    metadata(
        tmp_path, [{"file_name": "a.png", "text": "a cat"}, {"file_name": "b.png", "text": "a dog"}]
    )
    records, classes = read_records(tmp_path)
    assert [(r.path.name, r.caption) for r in records] == [("a.png", "a cat"), ("b.png", "a dog")]
    assert classes == []


def test_sidecar_txt_and_instance_prompt(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  ink drawing of a fox \n")
    records, _ = read_records(tmp_path)
    assert records[0].caption == "ink drawing of a fox"
    records, _ = read_records(tmp_path, "instance", "a photo of sks dog")
    assert records[0].caption == "a photo of sks dog"


def test_class_folders(tmp_path):
    image(tmp_path / "pizza" / "1.png")
    image(tmp_path / "apple" / "1.png")
    image(tmp_path / "apple" / "2.png")
    dm = DiffusionDataModule(str(tmp_path), resolution=16)
    assert dm.classes == ["apple", "pizza"] and dm.num_classes == 2
    assert sorted(r.label for r in dm.train_set.records) == [0, 0, 1]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"file_name": "missing.png", "text": "x"}], "metadata.jsonl:1: image"),
        ([{"file_name": "a.png", "text": "  "}], "metadata.jsonl:1: empty caption"),
        ([{"file_name": "a.png"}], "needs 'file_name' and 'text'"),
    ],
)
def test_metadata_errors_name_file_and_line(tmp_path, rows, message):
    image(tmp_path / "a.png")
    metadata(tmp_path, rows)
    with pytest.raises(DataError, match=message):
        read_records(tmp_path)


def test_sidecar_errors(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(DataError, match="a.txt: empty caption"):
        read_records(tmp_path, "txt")
    image(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("fine")
    with pytest.raises(DataError, match="b.png has no caption file b.txt"):
        read_records(tmp_path, "txt")


def test_unreadable_image_names_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    metadata(tmp_path, [{"file_name": "bad.png", "text": "x"}])
    records, _ = read_records(tmp_path)
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        CaptionedImages(records, 16)[0]


def test_center_crop_range_and_shape(tmp_path):
    image(tmp_path / "a.png", size=(40, 20))
    (tmp_path / "a.txt").write_text("x")
    item = CaptionedImages(read_records(tmp_path)[0], 16)[0]
    px = item["pixel_values"]
    assert px.shape == (3, 16, 16)
    assert px.min() >= -1 and px.max() <= 1
    assert torch.allclose(px[0], torch.full((16, 16), 200 / 255 * 2 - 1), atol=1e-2)


def test_buckets_group_by_aspect_ratio(tmp_path):
    buckets = make_buckets(32, step=8)
    assert all(w % 8 == 0 and h % 8 == 0 and w * h <= 32 * 32 for w, h in buckets)
    assert nearest_bucket((200, 100), buckets)[0] > nearest_bucket((200, 100), buckets)[1]
    for i, size in enumerate([(64, 32), (32, 64), (66, 32), (32, 30)]):
        image(tmp_path / f"{i}.png", size=size)
        (tmp_path / f"{i}.txt").write_text(f"img {i}")
    dm = DiffusionDataModule(
        str(tmp_path), resolution=32, bucketing=True, bucket_step=8, batch_size=2
    )
    sizes = dm.train_set.sizes
    assert sizes[0] == sizes[2] != sizes[1]  # the two wide images share a bucket
    assert sizes[0][0] > sizes[0][1] and sizes[1][0] < sizes[1][1]
    for batch in dm.train_dataloader():
        px = batch["pixel_values"]
        w, h = sizes[int(batch["index"][0])]
        assert px.shape[2:] == (h, w)
        assert all(sizes[int(i)] == (w, h) for i in batch["index"])
    sampler = BucketBatchSampler(sizes, 2, shuffle=True, seed=0)
    assert sorted(i for b in sampler.batches() for i in b) == [0, 1, 2, 3]


def test_caption_dropout(tmp_path):
    for i in range(8):
        image(tmp_path / f"{i}.png")
    records, _ = read_records(tmp_path, "instance", "sks style")
    assert all(
        CaptionedImages(records, 8, caption_dropout=1.0)[i]["caption"] == "" for i in range(8)
    )
    assert all(CaptionedImages(records, 8)[i]["caption"] == "sks style" for i in range(8))
    with pytest.raises(DataError, match="caption_dropout"):
        CaptionedImages(records, 8, caption_dropout=1.5)


def test_prior_preservation_batches(tmp_path):
    image(tmp_path / "inst" / "a.png")
    image(tmp_path / "inst" / "b.png")
    image(tmp_path / "cls" / "c.png", colour=(0, 0, 255))
    dm = DiffusionDataModule(
        str(tmp_path / "inst"),
        instance_prompt="sks dog",
        class_root=str(tmp_path / "cls"),
        class_prompt="a dog",
        resolution=8,
        batch_size=2,
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["prior_pixel_values"].shape == (2, 3, 8, 8)
    assert batch["prior_caption"] == ["a dog", "a dog"] and batch["caption"] == ["sks dog"] * 2


def test_no_captions_is_an_error(tmp_path):
    image(tmp_path / "a.png")
    with pytest.raises(DataError, match="no captions found"):
        read_records(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nope")


def test_collate_stacks_latents():
    items = [
        {"caption": "a", "label": -1, "index": i, "latents": torch.ones(8, 2, 2)} for i in range(2)
    ]
    assert collate(items)["latents"].shape == (2, 8, 2, 2)
