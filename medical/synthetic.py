"""Generated chest X-ray folders in the real NIH ChestX-ray14 and CheXpert layouts.

No patient data can ship with the project and none can be downloaded, so tests, the demo
and the notebook write folders that copy the real files byte for byte in structure: the
NIH header with its brackets and trailing comma, the ``images_001`` ... folders, the list
files; CheXpert's ``CheXpert-v1.0-small`` tree, ``Path`` prefixes, blank / -1.0 cells.
Each finding shows as a bright disc at its own place in a noisy gray image, so a model
can learn the labels and AUROC moves away from 0.5.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .data import CHEXPERT_OBSERVATIONS, NIH_FINDINGS

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]


def finding_image(
    positives: list[int], count: int, rng: np.random.Generator, size: int
) -> np.ndarray:
    """A gray image with a bright disc at the place of each positive finding."""
    pixels = rng.normal(70, 20, (size, size))
    yy, xx = np.mgrid[:size, :size]
    grid = int(np.ceil(np.sqrt(count)))
    step = size / grid
    for k in positives:
        cy, cx = (k // grid + 0.5) * step, (k % grid + 0.5) * step
        pixels[(yy - cy) ** 2 + (xx - cx) ** 2 <= (step * 0.4) ** 2] += 120
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_nih(
    root: str | Path,
    patients: int = 24,
    images_per_patient: int = 2,
    test_patients: int = 8,
    size: int = 32,
    seed: int = 0,
    csv_name: str = "Data_Entry_2017_v2020.csv",
) -> Path:
    """Write a ChestX-ray14-format folder; returns its root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    lines, train_val, test = [NIH_HEADER], [], []
    for patient in range(1, patients + 1):
        for follow_up in range(images_per_patient):
            name = f"{patient:08d}_{follow_up:03d}.png"
            positives = sorted(set(np.flatnonzero(rng.random(len(NIH_FINDINGS)) < 0.3).tolist()))
            labels = "|".join(NIH_FINDINGS[k] for k in positives) or "No Finding"
            folder = root / f"images_{1 + (patient % 3):03d}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(finding_image(positives, len(NIH_FINDINGS), rng, size)).save(
                folder / name
            )
            age, sex = int(rng.integers(20, 90)), "MF"[patient % 2]
            lines.append(
                f"{name},{labels},{follow_up},{patient},{age},{sex},PA,2500,2048,0.143,0.143,"
            )
            (test if patient > patients - test_patients else train_val).append(name)
    (root / csv_name).write_text("\n".join(lines) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    return root


def _chexpert_cell(rng: np.random.Generator) -> str:
    return str(rng.choice(["1.0", "0.0", "-1.0", "", ""], p=[0.3, 0.25, 0.15, 0.15, 0.15]))


def write_chexpert(
    root: str | Path,
    patients: int = 24,
    valid_patients: int = 8,
    size: int = 32,
    seed: int = 0,
    folder: str = "CheXpert-v1.0-small",
    lateral_every: int = 3,
    image_format: str = "jpg",
) -> Path:
    """Write ``<root>/CheXpert-v1.0-small/{train,valid}.csv`` and the image tree; returns root.

    ``image_format`` "jpg" as CheXpert ships; "png" or "dcm" (DICOM, e.g. images exported
    from a PACS) write the same pixels losslessly under the same ``Path`` with that suffix.
    """
    if image_format not in ("jpg", "png", "dcm"):
        raise ValueError(f"image_format must be jpg, png or dcm, got {image_format!r}.")
    root = Path(root)
    base = root / folder
    rng = np.random.default_rng(seed)
    rows: dict[str, list[list[str]]] = {"train": [], "valid": []}
    for patient in range(1, patients + 1):
        split = "valid" if patient > patients - valid_patients else "train"
        for view in (1, 2):
            cells = [
                _chexpert_cell(rng) if split == "train" else str(rng.choice(["1.0", "0.0"]))
                for _ in CHEXPERT_OBSERVATIONS
            ]
            lateral = view == 2 and patient % lateral_every == 0
            kind = "lateral" if lateral else "frontal"
            relative = f"{split}/patient{patient:05d}/study1/view{view}_{kind}.{image_format}"
            positives = [k for k, c in enumerate(cells) if c in ("1.0", "-1.0")]
            image = finding_image(positives, len(CHEXPERT_OBSERVATIONS), rng, size)
            (base / relative).parent.mkdir(parents=True, exist_ok=True)
            if image_format == "dcm":
                write_dicom(base / relative, image)
            else:
                Image.fromarray(image).save(base / relative, quality=95)
            rows[split].append(
                [
                    f"{folder}/{relative}",
                    "Female" if patient % 2 else "Male",
                    str(40 + patient),
                    "Lateral" if lateral else "Frontal",
                    "" if lateral else "AP",
                    *cells,
                ]
            )
    import csv

    for split, body in rows.items():
        with (base / f"{split}.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([CHEXPERT_HEADER, *body])
    return root


def write_dicom(path: str | Path, pixels: np.ndarray) -> Path:
    """A minimal single-frame MONOCHROME2 DICOM file of ``pixels`` (uint8 or uint16, rows
    first), readable by pydicom and MONAI's PydicomReader."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"write_dicom takes a 2-D uint8 or uint16 array (rows, columns), got shape "
            f"{pixels.shape} of {pixels.dtype}; convert with .astype(np.uint8) or index one frame."
        )
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    bits = pixels.dtype.itemsize * 8
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


__all__ = [
    "CHEXPERT_HEADER",
    "NIH_HEADER",
    "finding_image",
    "write_chexpert",
    "write_dicom",
    "write_nih",
]
