"""Medical VQA data in the public layouts: VQA-RAD, SLAKE, PathVQA, plus image captions.

* VQA-RAD (Lau et al., 2018): ``VQA_RAD Dataset Public.json`` and ``VQA_RAD Image Folder/``.
  No split files: test is ``phrase_type`` in {test_freeform, test_para}, train {freeform,
  para}. Training questions that also appear in test for the same image are dropped (a
  leak public loaders keep). Numeric answers are cast to text.
* SLAKE (Liu et al., 2021): ``Slake1.0/{train,validate,test}.json`` and ``Slake1.0/imgs/``;
  English questions kept by default (``q_lang``).
* PathVQA (He et al., 2020): ``images/{train,val,test}/`` and ``qas/{split}/{split}_qa.pkl``.
  The pickles are read with an unpickler that refuses every class (plain lists, dicts and
  strings only, ``medical.pathvqa_pickle``); ``python -m medical.pathvqa_pickle --root ROOT``
  converts them once to JSON beside them, which is then read instead.
* captions: ``captions.json`` ([{"image", "caption"}], e.g. ROCO) for PeFoMed's stage-1
  caption pre-alignment.

An item is ``{"image", "question", "answer", "answer_type", "task", "index"}``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .data import DatasetError
from .pathvqa_pickle import read_plain_pickle

VQA_DATASETS = ("vqa-rad", "slake", "path-vqa", "captions")
VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"
VQA_RAD_TRAIN = ("freeform", "para")
VQA_RAD_TEST = ("test_freeform", "test_para")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class QA:
    """One question (or caption) about one image."""

    image: Path
    question: str
    answer: str
    answer_type: str  # "CLOSED" / "OPEN" ("CAPTION" for stage 1)
    source: str
    task: str = "vqa"


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DatasetError(f"{path} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from None


def _field(entry: dict, key: str, source: str) -> Any:
    if key not in entry:
        raise DatasetError(f"{source}: missing field {key!r}; fields are {sorted(entry)}.")
    return entry[key]


def _answer_type(value: Any, answer: str) -> str:
    kind = str(value).strip().upper()
    if kind in ("CLOSED", "OPEN"):
        return kind
    return "CLOSED" if answer.lower() in ("yes", "no") else "OPEN"


# --- VQA-RAD -----------------------------------------------------------------------------


def read_vqa_rad(root: Path) -> dict[str, list[QA]]:
    """``{"train_val", "test"}`` by ``phrase_type``; test questions removed from train."""
    path = root / VQA_RAD_JSON
    entries = _load_json(path)
    splits: dict[str, list[QA]] = {"train_val": [], "test": []}
    for i, entry in enumerate(entries):
        source = f"{path.name}[{i}]"
        phrase = str(_field(entry, "phrase_type", source)).strip()
        if phrase not in VQA_RAD_TRAIN + VQA_RAD_TEST:
            raise DatasetError(
                f"{source}: phrase_type {phrase!r} is not one of {VQA_RAD_TRAIN + VQA_RAD_TEST}."
            )
        answer = str(_field(entry, "answer", source)).strip()
        qa = QA(
            image=root / VQA_RAD_IMAGES / str(_field(entry, "image_name", source)),
            question=str(_field(entry, "question", source)).strip(),
            answer=answer,
            answer_type=_answer_type(entry.get("answer_type"), answer),
            source=source,
        )
        splits["test" if phrase in VQA_RAD_TEST else "train_val"].append(qa)
    held = {(q.image.name, q.question.lower()) for q in splits["test"]}
    splits["train_val"] = [
        q for q in splits["train_val"] if (q.image.name, q.question.lower()) not in held
    ]
    return splits


# --- SLAKE -------------------------------------------------------------------------------


def read_slake(root: Path, language: str = "en") -> dict[str, list[QA]]:
    """``{"train", "val", "test"}`` from SLAKE's three JSON files."""
    base = root / "Slake1.0" if (root / "Slake1.0").is_dir() else root
    splits = {}
    for split, name in (("train", "train"), ("val", "validate"), ("test", "test")):
        path = base / f"{name}.json"
        items = []
        for i, entry in enumerate(_load_json(path)):
            source = f"{path.name}[{i}]"
            if language and str(entry.get("q_lang", "en")) != language:
                continue
            answer = str(_field(entry, "answer", source)).strip()
            items.append(
                QA(
                    base / "imgs" / str(_field(entry, "img_name", source)),
                    str(_field(entry, "question", source)).strip(),
                    answer,
                    _answer_type(entry.get("answer_type"), answer),
                    source,
                )
            )
        splits[split] = items
    return splits


# --- PathVQA -----------------------------------------------------------------------------


def pathvqa_questions(root: Path, split: str) -> list[dict]:
    """``qas/{split}/{split}_qa.json`` if converted, else the pickle, restricted."""
    folder = root / "qas" / split
    for name in (f"{split}_qa.json", f"{split}_qa.pkl"):
        path = folder / name
        if path.is_file():
            entries = _load_json(path) if path.suffix == ".json" else read_plain_pickle(path)
            _check_questions(path, entries)
            return entries
    raise DatasetError(f"no {split}_qa.json or {split}_qa.pkl in {folder} (PathVQA layout).")


def _check_questions(path: Path, entries: Any) -> None:
    """PathVQA's question file is a list of dicts (image, question, answer)."""
    if isinstance(entries, list):
        bad = next((k for k, e in enumerate(entries) if not isinstance(e, dict)), None)
        if bad is None:
            return
        found = f"entry {bad} is a {type(entries[bad]).__name__}"
    else:
        found = f"it holds a {type(entries).__name__}"
    raise DatasetError(
        f"{path}: expected a list of question dicts (image, question, answer), but {found}; "
        "replace it with PathVQA's original question file."
    )


def read_pathvqa(root: Path) -> dict[str, list[QA]]:
    base = root / "pvqa" if (root / "pvqa").is_dir() else root
    splits = {}
    for split, name in (("train", "train"), ("val", "val"), ("test", "test")):
        items = []
        for i, entry in enumerate(pathvqa_questions(base, name)):
            source = f"{name}_qa[{i}]"
            answer = str(_field(entry, "answer", source)).strip()
            image = str(_field(entry, "image", source))
            items.append(
                QA(
                    base / "images" / name / f"{image}.jpg",
                    str(_field(entry, "question", source)).strip(),
                    answer,
                    _answer_type(entry.get("answer_type"), answer),
                    source,
                )
            )
        splits[split] = items
    return splits


# --- captions (stage 1) ------------------------------------------------------------------


def read_captions(root: Path) -> dict[str, list[QA]]:
    path = root / "captions.json"
    items = []
    for i, entry in enumerate(_load_json(path)):
        source = f"{path.name}[{i}]"
        items.append(
            QA(
                root / str(_field(entry, "image", source)),
                "",
                str(_field(entry, "caption", source)),
                "CAPTION",
                source,
                task="caption",
            )
        )
    return {"train_val": items, "test": items[: max(1, len(items) // 5)]}


# --- dataset and module ------------------------------------------------------------------


def split_by_image(items: list[QA], val_fraction: float, seed: int) -> tuple[list[QA], list[QA]]:
    """(train, val) with every question about one image on the same side."""
    images = sorted({q.image.name for q in items})
    random.Random(seed).shuffle(images)
    held = set(images[: max(1, round(len(images) * val_fraction))]) if val_fraction > 0 else set()
    return [q for q in items if q.image.name not in held], [
        q for q in items if q.image.name in held
    ]


def read_image_rgb(qa: QA, size: int) -> torch.Tensor:
    """(3, size, size) CLIP-normalised image, or an error naming the file and question."""
    if not qa.image.is_file():
        raise DatasetError(f"{qa.source}: image {qa.image} does not exist.")
    try:
        with Image.open(qa.image) as img:
            pixels = np.asarray(
                img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32
            )
    except Exception as err:
        raise DatasetError(
            f"{qa.source}: {qa.image.name} cannot be decoded ({type(err).__name__})."
        ) from None
    image = torch.from_numpy(pixels / 255.0).permute(2, 0, 1)
    return (image - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


class VQADataset(Dataset):
    def __init__(self, items: list[QA], image_size: int) -> None:
        self.items, self.image_size = items, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        qa = self.items[index]
        return {
            "image": read_image_rgb(qa, self.image_size),
            "question": qa.question,
            "answer": qa.answer,
            "answer_type": qa.answer_type,
            "task": qa.task,
            "index": index,
        }


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: [b[k] for b in batch] for k in batch[0]}
    out["image"] = torch.stack(out["image"])
    out["index"] = torch.tensor(out["index"])
    return out


class VQADataModule(lightning.LightningDataModule):
    """VQA-RAD, SLAKE, PathVQA or captions.

    Args:
        root: the dataset folder.
        dataset: "vqa-rad", "slake", "path-vqa" or "captions" (stage 1).
        language: SLAKE ``q_lang`` kept ("en"; "" keeps all).
        val_fraction: images held out of train for validation where no split exists.
        image_size: side of the images (PeFoMed: 448).
        batch_size, eval_batch_size, num_workers, seed: loading settings.
        limit_eval: score at most this many validation / test questions (0: all).
    """

    def __init__(
        self,
        root: str = "data/vqa",
        dataset: str = "vqa-rad",
        language: str = "en",
        val_fraction: float = 0.1,
        image_size: int = 448,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        limit_eval: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in VQA_DATASETS:
            raise DatasetError(f"dataset must be one of {VQA_DATASETS}, got {dataset!r}.")
        self.save_hyperparameters()
        self.splits: dict[str, list[QA]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        hp, root = self.hparams, Path(self.hparams.root)
        if hp.dataset == "slake":
            splits = read_slake(root, hp.language)
        elif hp.dataset == "path-vqa":
            splits = read_pathvqa(root)
        else:
            raw = read_vqa_rad(root) if hp.dataset == "vqa-rad" else read_captions(root)
            train, val = split_by_image(raw["train_val"], hp.val_fraction, hp.seed)
            splits = {"train": train, "val": val, "test": raw["test"]}
        if hp.limit_eval:
            splits = {k: v if k == "train" else v[: hp.limit_eval] for k, v in splits.items()}
        self.splits = splits

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        hp = self.hparams
        return DataLoader(
            VQADataset(self.splits[split], hp.image_size),
            collate_fn=collate,
            shuffle=train,
            batch_size=hp.batch_size if train else hp.eval_batch_size or hp.batch_size,
            num_workers=hp.num_workers,
            generator=torch.Generator().manual_seed(hp.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
