"""Chest X-ray data in the layouts users already have: NIH ChestX-ray14 and CheXpert.

* NIH ChestX-ray14 (Wang et al., 2017): ``Data_Entry_2017[_v2020].csv`` (brackets in the
  header and a trailing comma on every line), ``train_val_list.txt`` / ``test_list.txt``,
  PNGs under ``images_001`` ... ``images_012`` (optionally ``images_XXX/images/``). There is
  no official validation set: it is split off train_val by ``Patient ID``.
* CheXpert (Irvin et al., 2019): ``CheXpert-v1.0[-small]/{train,valid}.csv`` whose ``Path``
  column starts with the dataset folder name (rewritten to the user's root); 14
  observations holding 1.0, 0.0, -1.0 (uncertain) or blank; the U-Ones / U-Zeros / U-Ignore
  uncertainty policies of the paper (U-Ignore masks the label out of the loss).

Images are read with MONAI's readers (PIL for PNG/JPEG, pydicom for DICOM) and MONAI
transforms; grayscale is repeated to three channels for RGB backbones. An item is
``(image, labels, mask, index)``: ``mask`` is 0 where a label is ignored.
"""

from __future__ import annotations

import csv
import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.errors import OmniPeftError

NIH_FINDINGS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
NIH_CSVS = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "View Position")
CHEXPERT_OBSERVATIONS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
CHEXPERT_COMPETITION = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA")
CHEXPERT_FOLDERS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
POLICIES = ("ones", "zeros", "ignore")
DATASETS = ("nih", "chexpert")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(OmniPeftError, ValueError):
    """A chest X-ray folder, CSV row or image is missing or malformed."""


@dataclass(frozen=True)
class Record:
    """One image: its file, its patient, labels (NaN = ignored) and where it came from."""

    path: Path
    patient: str
    labels: tuple[float, ...]
    source: str  # "file:row" of the CSV line, for error messages
    frontal: bool = True


# --- CSV reading -------------------------------------------------------------------------


def read_csv_rows(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of ``path`` as (line number, {column: value}); empty trailing header cells (NIH's
    trailing comma) are dropped and the required columns are checked."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DatasetError(f"{path} is empty; expected a header row.") from None
        while header and not header[-1].strip():
            header = header[:-1]
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(
                f"{path}:1 misses column(s) {missing}; header is {header}. Give the original "
                "file (the column names must match exactly)."
            )
        rows = []
        for number, cells in enumerate(reader, start=2):
            if not any(c.strip() for c in cells):
                continue
            rows.append((number, dict(zip(header, cells, strict=False))))
    return rows


# --- NIH ChestX-ray14 --------------------------------------------------------------------


def nih_csv(root: Path) -> Path:
    """The NIH label file under ``root`` (the 2020 revision preferred)."""
    for name in NIH_CSVS:
        if (root / name).is_file():
            return root / name
    raise DatasetError(
        f"no NIH label file in {root}: expected one of {list(NIH_CSVS)} (ChestX-ray14 layout: "
        "the CSV, train_val_list.txt, test_list.txt and images_001 ... images_012)."
    )


def nih_image_index(root: Path) -> dict[str, Path]:
    """Image file name -> path over ``images_*/`` and ``images_*/images/``."""
    index: dict[str, Path] = {}
    for folder in sorted(root.glob("images*")):
        if folder.is_dir():
            for file in list(folder.glob("*.png")) + list(folder.glob("images/*.png")):
                index[file.name] = file
    if not index:
        raise DatasetError(f"no PNG found under {root}/images_*/ (the NIH image folders).")
    return index


def parse_nih_labels(text: str, source: str) -> tuple[float, ...]:
    """``"Effusion|Mass"`` -> 14 zeros and ones; ``"No Finding"`` -> all zeros."""
    names = [n.strip() for n in text.split("|") if n.strip()]
    if names == [NO_FINDING]:
        return (0.0,) * len(NIH_FINDINGS)
    unknown = [n for n in names if n not in NIH_FINDINGS]
    if unknown or not names:
        raise DatasetError(
            f"{source}: Finding Labels {text!r} has unknown finding(s) {unknown or [text]}; "
            f"expected '|'-separated names from {list(NIH_FINDINGS)} or {NO_FINDING!r}."
        )
    return tuple(float(f in names) for f in NIH_FINDINGS)


def read_nih(root: Path) -> dict[str, list[Record]]:
    """``{"train_val": [...], "test": [...]}`` from the official lists."""
    table = nih_csv(root)
    images = nih_image_index(root)
    by_name: dict[str, Record] = {}
    for number, row in read_csv_rows(table, NIH_COLUMNS):
        name, source = row["Image Index"].strip(), f"{table.name}:{number}"
        if name not in images:
            raise DatasetError(f"{source}: image {name} is in no images_*/ folder under {root}.")
        by_name[name] = Record(
            path=images[name],
            patient=row["Patient ID"].strip(),
            labels=parse_nih_labels(row["Finding Labels"], source),
            source=source,
            frontal=True,  # every ChestX-ray14 image is frontal (PA or AP)
        )
    splits = {
        split: _nih_list(root, f"{split}_list.txt", by_name) for split in ("train_val", "test")
    }
    check_no_patient_leak(splits)
    return splits


def _nih_list(root: Path, name: str, by_name: dict[str, Record]) -> list[Record]:
    path = root / name
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; ChestX-ray14 ships it beside the CSV.")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            if line.strip() not in by_name:
                raise DatasetError(f"{name}:{number}: {line.strip()} is not in the label CSV.")
            records.append(by_name[line.strip()])
    return records


# --- CheXpert ----------------------------------------------------------------------------


def chexpert_folder(root: Path) -> Path:
    """The folder holding train.csv: ``root`` itself or ``root/CheXpert-v1.0[-small]``."""
    for candidate in (root, *(root / name for name in CHEXPERT_FOLDERS)):
        if (candidate / "train.csv").is_file():
            return candidate
    raise DatasetError(
        f"no CheXpert train.csv in {root} or {root}/{{{','.join(CHEXPERT_FOLDERS)}}}; "
        "expected the CheXpert-v1.0[-small] folder with train.csv, valid.csv, train/, valid/."
    )


def chexpert_value(text: str, policy: str, source: str, column: str) -> float:
    """One observation cell under an uncertainty policy (NaN = ignored in the loss)."""
    text = text.strip()
    if text == "":
        return 0.0  # not mentioned in the report: negative, as the CheXpert baselines do
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (1.0, 0.0, -1.0):
        raise DatasetError(
            f"{source}: column {column!r} holds {text!r}; CheXpert labels are 1.0, 0.0, "
            "-1.0 (uncertain) or blank."
        )
    if value == -1.0:
        return {"ones": 1.0, "zeros": 0.0, "ignore": float("nan")}[policy]
    return value


def rewrite_path(text: str, folder: Path) -> Path:
    """``CheXpert-v1.0-small/train/patient1/...`` -> ``<folder>/train/patient1/...``."""
    parts = Path(text.strip()).parts
    if parts and parts[0] in CHEXPERT_FOLDERS:
        parts = parts[1:]
    return folder.joinpath(*parts)


def read_chexpert_csv(
    path: Path, folder: Path, findings: Sequence[str], policy: str
) -> list[Record]:
    """Records of ``train.csv`` / ``valid.csv``; ``Path`` rewritten under ``folder``."""
    records = []
    for number, row in read_csv_rows(path, (*CHEXPERT_COLUMNS, *findings)):
        source = f"{path.name}:{number}"
        image = rewrite_path(row["Path"], folder)
        patient = next((p for p in image.parts if p.startswith("patient")), None)
        if patient is None:
            raise DatasetError(f"{source}: Path {row['Path']!r} names no patientNNNNN folder.")
        labels = tuple(chexpert_value(row[f], policy, source, f) for f in findings)
        frontal = row["Frontal/Lateral"].strip() == "Frontal"
        records.append(Record(image, patient, labels, source, frontal))
    return records


def read_chexpert(root: Path, findings: Sequence[str], policy: str) -> dict[str, list[Record]]:
    """``{"train_val": train.csv, "test": valid.csv}`` (CheXpert's test set is not public,
    so the official validation set is the test split; validation comes from train)."""
    folder = chexpert_folder(root)
    if not (folder / "valid.csv").is_file():
        raise DatasetError(
            f"{folder}/valid.csv does not exist; CheXpert ships it beside train.csv."
        )
    splits = {
        "train_val": read_chexpert_csv(folder / "train.csv", folder, findings, policy),
        "test": read_chexpert_csv(folder / "valid.csv", folder, findings, policy),
    }
    check_no_patient_leak(splits)
    return splits


# --- splits ------------------------------------------------------------------------------


def check_no_patient_leak(splits: dict[str, list[Record]]) -> None:
    """Raise if one patient appears in two splits (naming the patient count and a file)."""
    names = list(splits)
    for i, first in enumerate(names):
        seen = {r.patient for r in splits[first]}
        for second in names[i + 1 :]:
            shared = [r for r in splits[second] if r.patient in seen]
            if shared:
                raise DatasetError(
                    f"{len({r.patient for r in shared})} patient(s) are in both {first} and "
                    f"{second}, e.g. the one of {shared[0].path.name} ({shared[0].source}); "
                    "splits must be disjoint by patient."
                )


def split_by_patient(
    records: Sequence[Record], val_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """(train, val): a seeded ``val_fraction`` of the patients goes to validation."""
    patients = sorted({r.patient for r in records})
    random.Random(seed).shuffle(patients)
    count = max(1, round(len(patients) * val_fraction)) if val_fraction > 0 else 0
    if count >= len(patients):
        raise DatasetError(
            f"val_fraction {val_fraction} leaves no training patient out of {len(patients)}."
        )
    held = set(patients[:count])
    return [r for r in records if r.patient not in held], [r for r in records if r.patient in held]


def label_fraction(records: Sequence[Record], fraction: float, seed: int) -> list[Record]:
    """A seeded ``fraction`` of the training patients (all their images): the 1% / 10% /
    100% data-efficient settings of the medical PEFT papers, without splitting a patient."""
    if not 0 < fraction <= 1:
        raise DatasetError(f"label_fraction must be in (0, 1], got {fraction}.")
    if fraction == 1:
        return list(records)
    patients = sorted({r.patient for r in records})
    random.Random(seed).shuffle(patients)
    kept = set(patients[: max(1, round(len(patients) * fraction))])
    return [r for r in records if r.patient in kept]


# --- images ------------------------------------------------------------------------------


def image_loader(path: Path):
    """MONAI's image loader for ``path``: PydicomReader for DICOM, else PILReader (rows
    first)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        try:
            import pydicom  # noqa: F401
        except ModuleNotFoundError:
            raise DatasetError(
                f"{path.name} is DICOM, which needs pydicom: pip install pydicom."
            ) from None
        return _loader_for("dicom")
    return _loader_for("pil")


@functools.cache
def _loader_for(kind: str):
    """One ``LoadImage`` per reader kind: building it registers every MONAI reader (and logs
    about optional decoders), which cost more than decoding a small PNG when done per image."""
    from monai import transforms as T
    from monai.data import PILReader, PydicomReader

    # rows first for both, so DICOM and PNG pixels line up
    reader = PydicomReader(swap_ij=False) if kind == "dicom" else PILReader(reverse_indexing=False)
    return T.LoadImage(image_only=True, reader=reader)


def _to_gray(image: torch.Tensor) -> torch.Tensor:
    image = torch.as_tensor(image, dtype=torch.float32)
    if image.ndim == 2:
        image = image[None]
    if image.ndim == 4:  # DICOM read with a trailing depth of 1
        image = image[..., 0]
    return image[:3].mean(dim=0, keepdim=True) if image.shape[0] > 1 else image


class CXRDataset(Dataset):
    """Records read lazily; an item is ``(image, labels, mask, index)``."""

    def __init__(self, records: Sequence[Record], image_size: int, augment: bool = False) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        image = read_image(record, self.image_size, self.augment)
        labels = torch.tensor(record.labels, dtype=torch.float32)
        mask = (~labels.isnan()).float()
        return image, labels.nan_to_num(0.0), mask, index

    def label_matrix(self) -> np.ndarray:
        return np.array([r.labels for r in self.records], dtype=np.float32)


def read_image(record: Record, image_size: int, augment: bool = False) -> torch.Tensor:
    """The image of ``record`` as a normalised (3, S, S) tensor, or an error naming it."""
    if not record.path.is_file():
        raise DatasetError(f"{record.source}: image file {record.path} does not exist.")
    load = image_loader(record.path)
    try:
        image = load(str(record.path))
    except Exception as err:
        raise DatasetError(
            f"{record.source}: {record.path.name} cannot be decoded ({type(err).__name__}); "
            "the file is corrupt or not an image."
        ) from None
    image = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    image = _to_gray(
        image.permute(2, 0, 1) if image.ndim == 3 and image.shape[-1] in (3, 4) else image
    )
    return _tensor_transform(image_size, augment)(image)


@functools.lru_cache(maxsize=8)
def _tensor_transform(image_size: int, augment: bool):
    from monai import transforms as T

    steps = [
        T.Resize((image_size, image_size), mode="bilinear", anti_aliasing=True),
        T.ScaleIntensity(minv=0.0, maxv=1.0),
    ]
    if augment:
        steps.append(T.RandAffine(prob=0.5, rotate_range=0.1, scale_range=0.05))
    steps += [
        T.RepeatChannel(3),
        T.NormalizeIntensity(subtrahend=IMAGENET_MEAN, divisor=IMAGENET_STD, channel_wise=True),
        T.ToTensor(track_meta=False),
    ]
    return T.Compose(steps)


# --- the data module ---------------------------------------------------------------------


class CXRDataModule(lightning.LightningDataModule):
    """NIH ChestX-ray14 or CheXpert as a multi-label classification data module.

    Args:
        root: the dataset folder (NIH: the one with Data_Entry_2017*.csv; CheXpert: the one
            holding or containing ``CheXpert-v1.0[-small]``).
        dataset: "nih" or "chexpert".
        findings: the label columns; default NIH's 14 findings, CheXpert's 5 competition
            findings (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion).
        uncertainty: CheXpert's -1.0 policy: "ones" (U-Ones), "zeros" (U-Zeros) or
            "ignore" (U-Ignore: masked out of the loss and the metrics).
        frontal_only: keep frontal views only (CheXpert has lateral views).
        label_fraction: fraction of training patients kept (1%, 10%, 100% settings).
        val_fraction: fraction of train_val patients held out for validation.
        image_size: side the images are resized to.
        augment: small random affine jitter on training images.
        batch_size, eval_batch_size, num_workers, seed: loading settings.
    """

    def __init__(
        self,
        root: str = "data/cxr",
        dataset: str = "nih",
        findings: list[str] | None = None,
        uncertainty: str = "ones",
        frontal_only: bool = False,
        label_fraction: float = 1.0,
        val_fraction: float = 0.1,
        image_size: int = 224,
        augment: bool = False,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DatasetError(f"dataset must be one of {DATASETS}, got {dataset!r}.")
        if uncertainty not in POLICIES:
            raise DatasetError(
                f"uncertainty must be one of {POLICIES} (U-Ones, U-Zeros, U-Ignore), "
                f"got {uncertainty!r}."
            )
        default = NIH_FINDINGS if dataset == "nih" else CHEXPERT_COMPETITION
        self.findings = list(findings or default)
        known = NIH_FINDINGS if dataset == "nih" else CHEXPERT_OBSERVATIONS
        unknown = [f for f in self.findings if f not in known]
        if unknown:
            raise DatasetError(
                f"findings {unknown} are not {dataset} labels; known: {list(known)}."
            )
        self.save_hyperparameters()
        self.save_hyperparameters({"findings": self.findings})  # resolved, as the model gets it
        self.splits: dict[str, list[Record]] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.findings)

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = self.read_splits()

    def read_splits(self) -> dict[str, list[Record]]:
        """train / val / test records after the policy, view filter, split and fraction."""
        hp, root = self.hparams, Path(self.hparams.root)
        if hp.dataset == "nih":
            raw = read_nih(root)
            columns = [NIH_FINDINGS.index(f) for f in self.findings]
            raw = {k: [_select(r, columns) for r in v] for k, v in raw.items()}
        else:
            raw = read_chexpert(root, self.findings, hp.uncertainty)
        if hp.frontal_only:
            raw = {k: [r for r in v if r.frontal] for k, v in raw.items()}
        train, val = split_by_patient(raw["train_val"], hp.val_fraction, hp.seed)
        splits = {"train": label_fraction(train, hp.label_fraction, hp.seed), "val": val}
        splits["test"] = raw["test"]
        check_no_patient_leak(splits)
        for name, records in splits.items():
            if not records:
                raise DatasetError(f"the {name} split of {root} is empty after filtering.")
        return splits

    def positive_fraction(self) -> list[float]:
        """Share of positives per finding in the training split (for pos_weight)."""
        self.setup()
        labels = CXRDataset(self.splits["train"], 1).label_matrix()
        return np.nan_to_num(np.nanmean(labels, axis=0), nan=0.0).tolist()

    def describe(self) -> dict[str, Any]:
        self.setup()
        return {
            "dataset": self.hparams.dataset,
            "findings": self.findings,
            "uncertainty": self.hparams.uncertainty,
            "label_fraction": self.hparams.label_fraction,
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "patients": {k: len({r.patient for r in v}) for k, v in self.splits.items()},
        }

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        hp = self.hparams
        data = CXRDataset(self.splits[split], hp.image_size, augment=train and hp.augment)
        return DataLoader(
            data,
            batch_size=hp.batch_size if train else hp.eval_batch_size or hp.batch_size,
            shuffle=train,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            generator=torch.Generator().manual_seed(hp.seed) if train else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def _select(record: Record, columns: Sequence[int]) -> Record:
    labels = tuple(record.labels[i] for i in columns)
    return Record(record.path, record.patient, labels, record.source, record.frontal)


__all__ = [
    "CHEXPERT_COMPETITION",
    "CHEXPERT_OBSERVATIONS",
    "CXRDataModule",
    "CXRDataset",
    "DatasetError",
    "NIH_FINDINGS",
    "Record",
    "check_no_patient_leak",
    "label_fraction",
    "read_chexpert",
    "read_nih",
    "split_by_patient",
]
