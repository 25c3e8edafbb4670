"""Generated Med-VQA folders in the VQA-RAD, SLAKE and PathVQA layouts, and captions.

Images show a bright disc under noise, on the left or right, at the height of one of four
"organs"; questions ask about the side (closed, yes/no, and open) and the organ name (open),
so every answer is in the image and a tiny model can learn them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from .pathvqa_pickle import write_plain_pickle
from .vqa_data import VQA_RAD_IMAGES, VQA_RAD_JSON

ORGANS = ("lung", "liver", "brain", "kidney")


def _image(rng: np.random.Generator, side: str, size: int, organ: int = 0) -> Image.Image:
    """Noise with a bright disc: left or right half by ``side``, and the row band of the
    ``organ`` (one of four from top to bottom), so both open answers show in the image."""
    pixels = rng.normal(60, 15, (size, size, 3))
    cx = size // 4 if side == "left" else 3 * size // 4
    cy = (organ % len(ORGANS) + 0.5) * size / len(ORGANS)
    yy, xx = np.mgrid[:size, :size]
    pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 7) ** 2] += 150
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _questions(k: int, side: str) -> list[tuple[str, str, str]]:
    organ = ORGANS[k % len(ORGANS)]
    return [
        (f"is the lesion on the {side} side?", "yes", "CLOSED"),
        (f"is the lesion on the {'right' if side == 'left' else 'left'} side?", "no", "CLOSED"),
        ("which side is the lesion on?", side, "OPEN"),
        ("which organ is shown?", organ, "OPEN"),
    ]


def write_vqa_rad(
    root: str | Path, images: int = 12, test_images: int = 4, size: int = 32, seed: int = 0
) -> Path:
    """``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/`` (one numeric answer, and
    one test question duplicated in train: the leak the loader must drop)."""
    root = Path(root)
    (root / VQA_RAD_IMAGES).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for k in range(images):
        side = "left" if k % 2 else "right"
        name = f"synpic{1000 + k}.jpg"
        _image(rng, side, size, k).save(root / VQA_RAD_IMAGES / name)
        test = k >= images - test_images
        for j, (q, a, kind) in enumerate(_questions(k, side)):
            phrase = ("test_" if test else "") + ("para" if j % 2 else "freeform")
            entries.append(
                {
                    "qid": len(entries),
                    "image_name": name,
                    "image_organ": "CHEST",
                    "answer": a,
                    "answer_type": kind,
                    "question_type": "POS",
                    "question": q,
                    "phrase_type": phrase,
                }
            )
    entries.append(
        {
            "qid": len(entries),
            "image_name": "synpic1000.jpg",
            "answer": 2,
            "answer_type": "OPEN",
            "question": "how many discs are seen?",
            "phrase_type": "freeform",
        }
    )
    leak = next(e for e in entries if e["phrase_type"].startswith("test_"))
    entries.append({**leak, "qid": len(entries), "phrase_type": "freeform"})
    (root / VQA_RAD_JSON).write_text(json.dumps(entries, indent=1))
    return root


def write_slake(root: str | Path, images: int = 6, size: int = 32, seed: int = 0) -> Path:
    base = Path(root) / "Slake1.0"
    rng = np.random.default_rng(seed)
    for split in ("train", "validate", "test"):
        entries = []
        for k in range(images):
            side = "left" if k % 2 else "right"
            name = f"xmlab{split}{k}/source.jpg"
            (base / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
            _image(rng, side, size, k).save(base / "imgs" / name)
            for q, a, kind in _questions(k, side):
                entries.append(
                    {
                        "img_id": k,
                        "img_name": name,
                        "question": q,
                        "answer": a,
                        "answer_type": kind,
                        "q_lang": "en",
                        "content_type": "Position",
                    }
                )
            entries.append(
                {
                    "img_id": k,
                    "img_name": name,
                    "question": "病灶在哪里?",
                    "answer": "左",
                    "answer_type": "OPEN",
                    "q_lang": "zh",
                }
            )
        (base / f"{split}.json").write_text(json.dumps(entries, ensure_ascii=False))
    return Path(root)


def write_pathvqa(root: str | Path, images: int = 6, size: int = 32, seed: int = 0) -> Path:
    base = Path(root) / "pvqa"
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        (base / "images" / split).mkdir(parents=True, exist_ok=True)
        (base / "qas" / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for k in range(images):
            side = "left" if k % 2 else "right"
            _image(rng, side, size, k).save(base / "images" / split / f"{split}_{k:04d}.jpg")
            entries += [
                {"image": f"{split}_{k:04d}", "question": q, "answer": a}
                for q, a, _ in _questions(k, side)
            ]
        write_plain_pickle(entries, base / "qas" / split / f"{split}_qa.pkl")
    return Path(root)


def write_captions(root: str | Path, images: int = 12, size: int = 32, seed: int = 0) -> Path:
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    for k in range(images):
        side = "left" if k % 2 else "right"
        _image(rng, side, size, k).save(root / "images" / f"roco_{k}.jpg")
        entries.append(
            {"image": f"images/roco_{k}.jpg", "caption": f"a {ORGANS[k % 4]} lesion on the {side}"}
        )
    (root / "captions.json").write_text(json.dumps(entries))
    return root


def vocabulary_texts() -> list[str]:
    """Every word the generated data and the prompt templates use (for the tiny tokenizer)."""
    from .vqa import TEMPLATES

    texts = list(TEMPLATES.values()) + list(ORGANS) + ["how many discs are seen 2 a lesion on the"]
    texts += [
        q + " " + a
        for k in range(4)
        for side in ("left", "right")
        for q, a, _ in _questions(k, side)
    ]
    return texts
