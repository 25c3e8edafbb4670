"""VTAB-1k data module on a generated task folder: lists, protocols, transforms, errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from vtab_toy import IMAGE_SIZE, SPLIT_SIZES, make_task

from vision.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LIST_NAMES,
    PROTOCOLS,
    VTAB_TASKS,
    DatasetError,
    VTABDataModule,
    iter_tasks,
    read_list,
)
from vision.metrics import ExactAccuracy, vtab_summary

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def root(tmp_path):
    make_task(tmp_path)
    return tmp_path


def data(root, task="toy", **kw) -> VTABDataModule:
    opts = dict(image_size=IMAGE_SIZE, batch_size=8, num_workers=0)
    return VTABDataModule(root, task, **{**opts, **kw})


def list_labels(path) -> list[int]:
    return [int(line.split(" ")[1]) for line in path.read_text().splitlines() if line]


# --- lists and protocols -----------------------------------------------------------------


def test_final_protocol_trains_on_train800val200_and_never_reads_val200(root):
    dm = data(root, protocol="final")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["train"]) == SPLIT_SIZES["train800val200"] == 32
    assert len(dm.datasets["val"]) == SPLIT_SIZES["test"] == 20  # per-epoch scores: test list
    assert len(dm.datasets["test"]) == 20
    assert dm.describe() == {"train": "train800val200.txt", "val": "test.txt", "test": "test.txt"}
    assert "val200" not in PROTOCOLS["final"].values()
    for stage, split in (("train", "train800val200"), ("val", "test"), ("test", "test")):
        samples = dm.datasets[stage].samples
        assert [s.label for s in samples] == list_labels(root / "toy" / f"{split}.txt")
        assert all(f"/images/{split}/" in str(s.path) for s in samples)


def test_tune_protocol_trains_on_train800_and_scores_val200_only(root):
    dm = data(root, protocol="tune")
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.datasets["train"]) == 24
    assert len(dm.datasets["val"]) == len(dm.datasets["test"]) == 8
    assert dm.describe() == {"train": "train800.txt", "val": "val200.txt", "test": "val200.txt"}
    with pytest.raises(DatasetError, match="protocol must be one of"):
        data(root, protocol="test")


def test_list_lines_give_paths_labels_and_restart_numbering_per_split(root):
    samples = read_list(root / "toy" / "val200.txt")
    assert [s.path.name for s in samples[:2]] == ["000000.jpg", "000001.jpg"]
    assert [s.label for s in samples] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert samples[2].source.endswith("val200.txt:3")
    first_test = read_list(root / "toy" / "test.txt")[0]
    assert first_test.path == root / "toy" / "images" / "test" / "000000.jpg"


def test_class_counts_come_from_the_vtab_table_the_labels_or_the_argument(tmp_path):
    make_task(tmp_path, name="dtd")
    make_task(tmp_path, name="my_task", classes=3)
    assert data(tmp_path, "dtd").num_classes == 47
    assert data(tmp_path, "my_task").num_classes == 3  # highest label + 1
    assert data(tmp_path, "my_task", num_classes=7).num_classes == 7
    assert len(VTAB_TASKS) == 19
    sizes = {g: sum(1 for grp, _ in VTAB_TASKS.values() if grp == g) for g in ("natural",)}
    assert sizes == {"natural": 7}
    assert VTAB_TASKS["sun397"] == ("natural", 397)
    assert VTAB_TASKS["smallnorb_ele"] == ("structured", 9)


# --- items and loaders -------------------------------------------------------------------


def test_items_are_resized_imagenet_normalised_tensors_with_their_index(root):
    dm = data(root, protocol="final")
    dm.setup("test")
    image, label, index = dm.datasets["test"][4]
    source = root / "toy" / "images" / "test" / "000004.jpg"
    with Image.open(source) as raw:
        assert raw.size == (13, 13)  # stored at original size
        resized = TF.resize(raw.convert("RGB"), [IMAGE_SIZE, IMAGE_SIZE], InterpolationMode.BICUBIC)
    want = TF.normalize(TF.to_tensor(resized), IMAGENET_MEAN, IMAGENET_STD)
    assert image.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and image.dtype == torch.float32
    assert torch.equal(image, want)
    assert (label, index) == (0, 4)


def test_eval_loader_keeps_list_order_and_train_shuffle_depends_on_seed_and_epoch(root):
    dm = data(root, protocol="final")
    images, labels, index = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert index.tolist() == list(range(8))
    assert labels.tolist() == list_labels(root / "toy" / "test.txt")[:8]

    sampler = dm.train_dataloader().sampler
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert sorted(orders[0]) == list(range(32))
    assert orders[0] == orders[2] != orders[1]  # a function of (seed, epoch) alone


# --- clear errors ------------------------------------------------------------------------


def test_missing_task_folder_names_the_folders_that_exist(root):
    with pytest.raises(DatasetError, match=r"toy_missing does not exist.*\['toy'\]"):
        data(root, "toy_missing")


def test_missing_list_file_is_named(root):
    (root / "toy" / "test.txt").unlink()
    dm = data(root, protocol="final")
    with pytest.raises(DatasetError, match=r"list file .*toy/test\.txt does not exist"):
        dm.setup("test")


def test_missing_image_names_the_list_line_and_the_image(root):
    (root / "toy" / "images" / "test" / "000003.jpg").unlink()
    dm = data(root, protocol="final")
    with pytest.raises(DatasetError, match=r"test\.txt:4: image .*000003\.jpg does not exist"):
        dm.setup("test")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("images/test/000001.jpg", "malformed line"),
        ("images/test/000001.jpg 1 2", "malformed line"),
        ("images/test/000001.jpg\t1", "malformed line"),
        ("images/test/000001.jpg one", "label 'one' is not a non-negative integer"),
        ("images/test/000001.jpg -1", "label '-1' is not a non-negative integer"),
        ("images/test/000001.jpg 4", "label 4 is outside the 4 classes"),
    ],
)
def test_malformed_lines_and_labels_name_the_file_and_line(root, line, message):
    path = root / "toy" / "test.txt"
    lines = path.read_text().splitlines()
    lines[1] = line
    path.write_text("\n".join(lines) + "\n")
    dm = data(root, protocol="final", num_classes=4)
    with pytest.raises(DatasetError, match=rf"test\.txt:2: .*{message}"):
        dm.setup("test")


def test_unreadable_image_is_named(root):
    (root / "toy" / "images" / "test" / "000000.jpg").write_bytes(b"not an image")
    dm = data(root, protocol="final")
    dm.setup("test")
    with pytest.raises(DatasetError, match=r"test\.txt:1: cannot read image"):
        dm.datasets["test"][0]


# --- task lists and the table's averages --------------------------------------------------


def test_task_selection_by_group_name_or_list():
    assert len(list(iter_tasks("all"))) == 19
    assert list(iter_tasks("specialized")) == [
        "patch_camelyon",
        "eurosat",
        "resisc45",
        "diabetic_retinopathy",
    ]
    assert len(list(iter_tasks("structured"))) == 8
    assert list(iter_tasks("cifar, dtd,my_task")) == ["cifar", "dtd", "my_task"]


def test_vtab_summary_averages_groups_and_tasks():
    acc = {"cifar": 70.0, "dtd": 60.0, "eurosat": 90.0, "kitti": 80.0, "my_task": 10.0}
    summary = vtab_summary(acc)
    assert summary["natural"] == 65.0
    assert summary["specialized"] == 90.0
    assert summary["structured"] == 80.0
    assert summary["mean_of_groups"] == pytest.approx((65 + 90 + 80) / 3)
    assert summary["mean"] == pytest.approx(310 / 5)


def test_exact_accuracy_counts_each_sample_once_and_supports_top_k():
    metric = ExactAccuracy()
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 0.0, 1.0]])
    labels = torch.tensor([0, 2, 2, 1])
    metric.update(logits, labels, torch.tensor([0, 1, 2, 3]))
    # DDP's sampler pads the list by repeating samples: the repeats must not count twice.
    metric.update(logits[:2], labels[:2], torch.tensor([0, 1]))
    assert metric.compute().item() == pytest.approx(2 / 4)
    assert metric.count() == 4
    top2 = ExactAccuracy(top_k=2)
    top2.update(logits, labels, torch.arange(4))
    assert top2.compute().item() == pytest.approx(3 / 4)


def test_demo_writes_real_digit_scans_as_vtab_tasks_with_the_real_split_sizes(tmp_path):
    from vision.demo import write_digits_tasks

    full, source = write_digits_tasks(tmp_path)
    sizes = {name: len(read_list(full / f"{name}.txt")) for name in LIST_NAMES}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000, "test": 797}
    train = read_list(full / "train800val200.txt")
    assert [s.label for s in train[:800]] == [s.label for s in read_list(full / "train800.txt")]
    assert {s.label for s in train} == set(range(10))
    with Image.open(train[0].path) as image:
        assert image.size == (8, 8)  # stored at the original size
    source_train = read_list(source / "train800val200.txt")
    assert {s.label for s in source_train} == set(range(5))
    assert len(source_train) == sum(s.label < 5 for s in train)
    dm = data(tmp_path, "digits", protocol="final")
    assert dm.num_classes == 10 and data(tmp_path, "digits_0to4").num_classes == 5
