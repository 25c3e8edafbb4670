"""NIH ChestX-ray14 and CheXpert data modules on generated folders in the real layouts."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medical.data import (
    CXRDataModule,
    DatasetError,
    Record,
    check_no_patient_leak,
    read_chexpert,
    read_csv_rows,
    read_image,
    read_nih,
)
from medical.synthetic import NIH_HEADER, write_chexpert, write_dicom, write_nih


@pytest.fixture(scope="module")
def nih(tmp_path_factory) -> Path:
    return write_nih(tmp_path_factory.mktemp("nih"), patients=20, test_patients=5)


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory) -> Path:
    return write_chexpert(tmp_path_factory.mktemp("chexpert"), patients=20, valid_patients=5)


def test_nih_header_with_brackets_and_trailing_comma(nih):
    table = nih / "Data_Entry_2017_v2020.csv"
    assert table.read_text().splitlines()[0] == NIH_HEADER
    rows = read_csv_rows(table, ["Image Index", "Finding Labels", "Patient ID"])
    assert len(rows) == 40
    number, row = rows[0]
    assert number == 2 and row["OriginalImage[Width"] == "2500" and "" not in row


def test_nih_labels_lists_and_images(nih):
    splits = read_nih(nih)
    assert len(splits["train_val"]) == 30 and len(splits["test"]) == 10
    table = {r["Image Index"]: r for _, r in read_csv_rows(nih / "Data_Entry_2017_v2020.csv", [])}
    record = splits["train_val"][0]
    names = table[record.path.name]["Finding Labels"].split("|")
    from medical.data import NIH_FINDINGS

    expected = [float(f in names) for f in NIH_FINDINGS]
    assert list(record.labels) == expected
    assert record.path.is_file() and record.path.parent.name == "images"


def test_nih_2017_file_name_is_found(tmp_path):
    root = write_nih(tmp_path, patients=6, test_patients=2, csv_name="Data_Entry_2017.csv")
    assert len(read_nih(root)["test"]) == 4


def test_validation_is_split_by_patient(nih):
    data = CXRDataModule(str(nih), "nih", image_size=16, val_fraction=0.2)
    data.setup()
    patients = {k: {r.patient for r in v} for k, v in data.splits.items()}
    assert patients["train"].isdisjoint(patients["val"])
    assert patients["train"].isdisjoint(patients["test"]) and patients["val"].isdisjoint(
        patients["test"]
    )
    assert len(patients["val"]) == 3 and len(patients["train"]) == 12
    again = CXRDataModule(str(nih), "nih", image_size=16, val_fraction=0.2)
    again.setup()
    assert [r.path for r in again.splits["val"]] == [r.path for r in data.splits["val"]]


def test_label_fraction_keeps_whole_patients(nih):
    data = CXRDataModule(str(nih), "nih", image_size=16, val_fraction=0.2, label_fraction=0.25)
    data.setup()
    train = data.splits["train"]
    assert len({r.patient for r in train}) == 3 and len(train) == 6
    with pytest.raises(DatasetError, match="label_fraction"):
        CXRDataModule(str(nih), "nih", label_fraction=0.0).setup()


def test_patient_leak_is_an_error(nih, tmp_path):
    root = tmp_path / "leak"
    shutil.copytree(nih, root)
    first_test = (root / "test_list.txt").read_text().split()[0]
    with (root / "train_val_list.txt").open("a") as handle:
        handle.write(first_test + "\n")
    with pytest.raises(DatasetError, match="both train_val and test"):
        read_nih(root)


def test_nih_unknown_finding_names_the_row(nih, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(nih, root)
    table = root / "Data_Entry_2017_v2020.csv"
    lines = table.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "Pleural Thickening", 1)
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"Data_Entry_2017_v2020.csv:4.*Pleural Thickening"):
        read_nih(root)


def test_missing_column_is_named(nih, tmp_path):
    root = tmp_path / "cols"
    shutil.copytree(nih, root)
    table = root / "Data_Entry_2017_v2020.csv"
    text = table.read_text().replace("Patient ID", "PatientID", 1)
    table.write_text(text)
    with pytest.raises(
        DatasetError, match=r"Data_Entry_2017_v2020.csv:1 misses column\(s\) \['Patient ID'\]"
    ):
        read_nih(root)


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


@pytest.mark.parametrize(
    ("policy", "value", "kept"), [("ones", 1.0, 1.0), ("zeros", 0.0, 1.0), ("ignore", 0.0, 0.0)]
)
def test_chexpert_uncertainty_policies(chexpert, policy, value, kept):
    folder = chexpert / "CheXpert-v1.0-small"
    rows = _rows(folder / "train.csv")
    column = rows[0].index("Edema")
    line = next(i for i, r in enumerate(rows[1:], start=1) if r[column] == "-1.0")
    data = CXRDataModule(
        str(chexpert), "chexpert", uncertainty=policy, image_size=16, val_fraction=0.0
    )
    records = read_chexpert(chexpert, data.findings, policy)["train_val"]
    record = records[line - 1]
    assert record.source == f"train.csv:{line + 1}"
    k = data.findings.index("Edema")
    dataset = __import__("medical.data", fromlist=["CXRDataset"]).CXRDataset([record], 16)
    _, labels, mask, _ = dataset[0]
    assert labels[k].item() == value and mask[k].item() == kept


def test_chexpert_blank_is_negative_and_path_rewritten(chexpert):
    findings = ["Cardiomegaly", "Edema"]
    records = read_chexpert(chexpert, findings, "ones")
    folder = chexpert / "CheXpert-v1.0-small"
    rows = _rows(folder / "train.csv")
    for record, row in zip(records["train_val"], rows[1:], strict=True):
        assert record.path == folder / row[0].removeprefix("CheXpert-v1.0-small/")
        assert record.path.is_file()
        for f, v in zip(findings, record.labels, strict=True):
            cell = row[rows[0].index(f)]
            assert v == {"": 0.0, "0.0": 0.0, "1.0": 1.0, "-1.0": 1.0}[cell]


def test_chexpert_default_findings_and_frontal_only(chexpert):
    data = CXRDataModule(str(chexpert), "chexpert", image_size=16, val_fraction=0.2)
    assert data.findings == [
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Pleural Effusion",
    ]
    data.setup()
    frontal = CXRDataModule(
        str(chexpert), "chexpert", image_size=16, val_fraction=0.2, frontal_only=True
    )
    frontal.setup()
    laterals = sum(not r.frontal for v in data.splits.values() for r in v)
    assert laterals > 0
    assert (
        sum(len(v) for v in frontal.splits.values())
        == sum(len(v) for v in data.splits.values()) - laterals
    )
    assert all(r.frontal for v in frontal.splits.values() for r in v)


def test_chexpert_bad_label_names_file_and_row(chexpert, tmp_path):
    root = tmp_path / "cx"
    shutil.copytree(chexpert, root)
    path = root / "CheXpert-v1.0-small" / "valid.csv"
    rows = _rows(path)
    rows[2][rows[0].index("Edema")] = "2.0"
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(DatasetError, match=r"valid.csv:3: column 'Edema' holds '2.0'"):
        read_chexpert(root, ["Edema"], "ones")


def test_png_batch_is_three_channel_normalised(nih):
    data = CXRDataModule(str(nih), "nih", image_size=24, batch_size=4)
    images, labels, mask, index = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 24, 24) and labels.shape == (4, 14)
    gray = images[:, 0] * 0.229 + 0.485
    assert torch.allclose(gray, images[:, 2] * 0.225 + 0.406, atol=1e-5)
    assert gray.min() >= -1e-5 and gray.max() <= 1 + 1e-5 and mask.eq(1).all()


def test_corrupt_image_names_file_and_row(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    record = Record(bad, "7", (0.0,), "Data_Entry_2017.csv:9")
    with pytest.raises(DatasetError, match=r"Data_Entry_2017.csv:9: broken.png cannot be decoded"):
        read_image(record, 16)


def test_dicom_input_is_read_rows_first(tmp_path):
    pixels = np.zeros((20, 20), np.uint16)
    pixels[:, 10:] = 1000
    pixels[:4, :] = 500  # a top band tells rows from columns
    write_dicom(tmp_path / "x.dcm", pixels)
    image = read_image(Record(tmp_path / "x.dcm", "1", (0.0,), "list:1"), 20)
    gray = image[0] * 0.229 + 0.485
    assert gray[6:, :8].max() < 0.1 and gray[6:, 12:].min() > 0.9
    assert gray[:3, :8].min() > 0.4 and gray[:3, :8].max() < 0.6


def test_write_dicom_refuses_arrays_it_cannot_store(tmp_path):
    with pytest.raises(ValueError, match=r"got shape \(2, 4, 4\) of uint8"):
        write_dicom(tmp_path / "x.dcm", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"got shape \(4, 4\) of float32"):
        write_dicom(tmp_path / "x.dcm", np.zeros((4, 4), np.float32))
    assert not (tmp_path / "x.dcm").exists()


def test_dicom_and_png_folders_give_the_same_batches(tmp_path):
    """The same generated CheXpert pixels stored as DICOM and as PNG load identically
    through the data module (MONAI's PydicomReader vs PILReader)."""
    batches = {}
    for fmt in ("dcm", "png"):
        root = write_chexpert(tmp_path / fmt, patients=6, valid_patients=2, image_format=fmt)
        first = root / "CheXpert-v1.0-small" / "valid.csv"
        assert f".{fmt}," in first.read_text().splitlines()[1]
        data = CXRDataModule(str(root), "chexpert", image_size=24, val_fraction=0.2, batch_size=4)
        batches[fmt] = next(iter(data.test_dataloader()))
    for dicom, png in zip(batches["dcm"], batches["png"], strict=True):
        assert torch.equal(dicom, png)
    assert batches["dcm"][0].shape == (4, 3, 24, 24) and batches["dcm"][0].std() > 0.1


def test_dicom_without_pydicom_says_what_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name == "pydicom":
            raise ModuleNotFoundError("No module named 'pydicom'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    (tmp_path / "x.dcm").write_bytes(b"DICM")
    with pytest.raises(DatasetError, match="pip install pydicom"):
        read_image(Record(tmp_path / "x.dcm", "1", (0.0,), "list:1"), 16)


def test_leak_check_names_the_file_not_the_patient():
    a = Record(Path("a/1.png"), "PID-4711", (0.0,), "x.csv:2")
    b = Record(Path("b/2.png"), "PID-4711", (0.0,), "y.csv:5")
    with pytest.raises(
        DatasetError, match=r"1 patient\(s\) are in both train and test.*2.png \(y.csv:5\)"
    ) as caught:
        check_no_patient_leak({"train": [a], "test": [b]})
    assert "PID-4711" not in str(caught.value)  # file names only, no patient identifier
