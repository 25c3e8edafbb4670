"""VTAB-1k on disk: the list-file layout NOAH's export script writes and the VTAB-1k PEFT
papers (NOAH, V-PETL Bench, SPT, SSF, GLoRA) read.

    <root>/<task>/train800.txt  val200.txt  train800val200.txt  test.txt
    <root>/<task>/images/<split>/000000.jpg ...

Each list line is ``images/<split>/000000.jpg <label>``: a path relative to the task
folder, one space, a 0-based integer label. Images are stored at their original size and
resized here.

The protocol (Zhai et al., 2019, "A Large-scale Study of Representation Learning with the
Visual Task Adaptation Benchmark"): hyper-parameters are tuned by training on train800 and
scoring val200 (``protocol="tune"``, where the test list is never read); the reported
number comes from training on train800val200 and scoring the test list
(``protocol="final"``, where val200 is never read, neither for validation nor for model
selection: evaluating on val200 after training on it is a common leak in public copies).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from core.domain import EpochShuffle
from core.errors import OmniPeftError

# task folder -> (group, number of classes), as in the VTAB-1k tables.
VTAB_TASKS: dict[str, tuple[str, int]] = {
    "cifar": ("natural", 100),
    "caltech101": ("natural", 102),
    "dtd": ("natural", 47),
    "oxford_flowers102": ("natural", 102),
    "oxford_iiit_pet": ("natural", 37),
    "svhn": ("natural", 10),
    "sun397": ("natural", 397),
    "patch_camelyon": ("specialized", 2),
    "eurosat": ("specialized", 10),
    "resisc45": ("specialized", 45),
    "diabetic_retinopathy": ("specialized", 5),
    "clevr_count": ("structured", 8),
    "clevr_dist": ("structured", 6),
    "dmlab": ("structured", 6),
    "kitti": ("structured", 4),
    "dsprites_loc": ("structured", 16),
    "dsprites_ori": ("structured", 16),
    "smallnorb_azi": ("structured", 18),
    "smallnorb_ele": ("structured", 9),
}
GROUPS = ("natural", "specialized", "structured")
LIST_NAMES = ("train800", "val200", "train800val200", "test")

# Which list each stage reads under each protocol. In "tune", Lightning's test stage scores
# val200 again, so tuning never looks at the test list.
PROTOCOLS: dict[str, dict[str, str]] = {
    "tune": {"train": "train800", "val": "val200", "test": "val200"},
    "final": {"train": "train800val200", "val": "test", "test": "test"},
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetError(OmniPeftError, ValueError):
    """A dataset folder, list file, line or image is missing or malformed."""


def task_group(task: str) -> str | None:
    """The VTAB group of a task folder name ("natural", ...), or None for another name."""
    return VTAB_TASKS[task][0] if task in VTAB_TASKS else None


# --- list files --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One list line: the image, its label, and where it was read (for error messages)."""

    path: Path
    label: int
    source: str  # "<list file>:<line number>"


def read_list(list_file: Path) -> list[Sample]:
    """Parse one VTAB-1k list file; blank lines are skipped, anything else malformed is an
    error naming the file and line."""
    if not list_file.is_file():
        raise DatasetError(
            f"list file {list_file} does not exist. A VTAB-1k task folder holds "
            f"{', '.join(n + '.txt' for n in LIST_NAMES)} (as NOAH's export script writes them); "
            "check --data.root and --data.task."
        )
    samples = []
    for number, raw in enumerate(list_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if line:
            samples.append(_parse_line(line, list_file, number))
    if not samples:
        raise DatasetError(f"list file {list_file} has no samples; re-export the task.")
    return samples


def _parse_line(line: str, list_file: Path, number: int) -> Sample:
    where = f"{list_file}:{number}"
    parts = line.split(" ")
    if len(parts) != 2 or not parts[0]:
        raise DatasetError(
            f"{where}: malformed line {line!r}; expected '<relative image path> <label>' "
            "separated by one space, e.g. 'images/test/000000.jpg 3'."
        )
    path, label = parts
    if not label.isdigit():
        raise DatasetError(f"{where}: label {label!r} is not a non-negative integer in {line!r}.")
    return Sample(path=list_file.parent / path, label=int(label), source=where)


def check_samples(samples: Sequence[Sample], num_classes: int) -> None:
    """Every label below ``num_classes`` and every image file present, or a clear error."""
    for sample in samples:
        if sample.label >= num_classes:
            raise DatasetError(
                f"{sample.source}: label {sample.label} is outside the {num_classes} classes "
                f"(0..{num_classes - 1}); fix the list or pass the right --data.num_classes."
            )
        if not sample.path.is_file():
            raise DatasetError(
                f"{sample.source}: image {sample.path} does not exist; the task folder is "
                "incomplete (re-export it, or check that images/ sits beside the list files)."
            )


# --- dataset and transforms -----------------------------------------------------------------


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> transforms.Compose:
    """Resize to a square (bicubic, as NOAH and its successors), to tensor, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(
                (image_size, image_size), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


class VTABDataset(Dataset):
    """Samples of one list file; an item is ``(image, label, index)``. The index lets the
    accuracy metric count every sample exactly once across devices."""

    def __init__(self, samples: Sequence[Sample], transform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        try:
            with Image.open(sample.path) as image:
                rgb = image.convert("RGB")
        except OSError as err:
            raise DatasetError(f"{sample.source}: cannot read image {sample.path}: {err}") from None
        return self.transform(rgb), sample.label, index


# --- the data module -----------------------------------------------------------------------


def missing_task_message(root: Path, task: str) -> str:
    if root.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        where = f"; {root} holds {found[:25]}"
    else:
        where = f" ({root} is not a folder)"
    return (
        f"task folder {root / task} does not exist{where}. Pass --data.root <folder with the "
        "VTAB-1k task folders> --data.task <name>."
    )


class VTABDataModule(lightning.LightningDataModule):
    """One VTAB-1k task read from NOAH's list-file layout.

    Args:
        root: the folder holding the task folders (``<root>/<task>/train800.txt`` ...).
        task: a task folder name; the 19 VTAB-1k names carry their class counts, any other
            folder works with the count taken from its labels (or ``num_classes``).
        protocol: "final" (train on train800val200, validate and test on the test list:
            the number papers report) or "tune" (train on train800, validate and test on
            val200, for hyper-parameter search; the test list is not read).
        image_size: square side images are resized to (224 for ViT-B/16 at its native size).
        batch_size: per-device batch size (64 in the VTAB-1k papers).
        eval_batch_size: batch size of validation/test (default: ``batch_size``).
        num_workers: DataLoader worker processes.
        num_classes: overrides the class count (needed for an unknown folder only if its
            lists do not show the highest class).
        mean, std: normalisation (ImageNet's by default, as the VTAB-1k papers use).
    """

    def __init__(
        self,
        root: str | Path,
        task: str,
        protocol: str = "final",
        image_size: int = 224,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        num_classes: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if protocol not in PROTOCOLS:
            raise DatasetError(
                f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}: 'tune' trains on "
                "train800 and scores val200, 'final' trains on train800val200 and scores test."
            )
        for name, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DatasetError(f"{name} must be a positive int, got {value!r}.")
        self.root, self.task, self.protocol = Path(root), task, protocol
        self.folder = self.root / task
        if not self.folder.is_dir():
            raise DatasetError(missing_task_message(self.root, task))
        self.image_size, self.batch_size = image_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.transform = eval_transform(image_size, mean, std)
        self._num_classes = num_classes
        self.datasets: dict[str, VTABDataset] = {}

    # -- what the stages read ---------------------------------------------------------------

    def list_file(self, stage: str) -> Path:
        """The list file ``stage`` ("train", "val", "test") reads under this protocol."""
        return self.folder / f"{PROTOCOLS[self.protocol][stage]}.txt"

    @property
    def group(self) -> str | None:
        return task_group(self.task)

    @property
    def num_classes(self) -> int:
        """The class count: given, the VTAB-1k table's, or highest label + 1 over the lists."""
        if self._num_classes is None:
            if self.task in VTAB_TASKS:
                self._num_classes = VTAB_TASKS[self.task][1]
            else:
                lists = [self.folder / f"{n}.txt" for n in LIST_NAMES]
                present = [f for f in lists if f.is_file()] or [self.list_file("train")]
                self._num_classes = 1 + max(s.label for f in present for s in read_list(f))
        return self._num_classes

    def samples(self, stage: str) -> list[Sample]:
        """Checked samples of ``stage``'s list (labels in range, images present)."""
        samples = read_list(self.list_file(stage))
        check_samples(samples, self.num_classes)
        return samples

    def setup(self, stage: str | None = None) -> None:
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }.get(stage or "", ("train", "val", "test"))
        for name in wanted:
            if name not in self.datasets:
                self.datasets[name] = VTABDataset(self.samples(name), self.transform)

    # -- loaders ----------------------------------------------------------------------------

    def _dataset(self, stage: str) -> VTABDataset:
        if stage not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[stage])
        return self.datasets[stage]

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train")
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything
        sampler = EpochShuffle(dataset, seed=seed, num_replicas=replicas, rank=rank)
        return self._loader(dataset, self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), self.eval_batch_size)

    def describe(self) -> dict[str, str]:
        """Which list file each stage reads (recorded in the metrics file)."""
        return {stage: self.list_file(stage).name for stage in ("train", "val", "test")}


# --- writing a task folder (demo data, tests) ---------------------------------------------


def write_vtab_task(
    folder: str | Path,
    splits: dict[str, Sequence[tuple[Image.Image, int]]],
    *,
    image_format: str = "jpg",
) -> Path:
    """Write ``{list name: [(image, label), ...]}`` in the VTAB-1k layout under ``folder``:
    ``images/<list>/000000.<fmt>`` per image (numbering restarts per list) and
    ``<list>.txt`` with one ``images/<list>/000000.<fmt> <label>`` line each."""
    folder = Path(folder)
    options = {"quality": 95} if image_format in ("jpg", "jpeg") else {}
    for name, items in splits.items():
        image_dir = folder / "images" / name
        image_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (image, label) in enumerate(items):
            relative = f"images/{name}/{i:06d}.{image_format}"
            image.save(folder / relative, **options)
            lines.append(f"{relative} {int(label)}")
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder


def iter_tasks(names: str | Sequence[str]) -> Iterator[str]:
    """Expand "all", a group name ("natural", ...) or a comma list into task names."""
    items = names.split(",") if isinstance(names, str) else list(names)
    for item in (i.strip() for i in items):
        if item == "all":
            yield from VTAB_TASKS
        elif item in GROUPS:
            yield from (t for t, (g, _) in VTAB_TASKS.items() if g == item)
        elif item:
            yield item


__all__ = [
    "GROUPS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LIST_NAMES",
    "PROTOCOLS",
    "VTAB_TASKS",
    "DatasetError",
    "EpochShuffle",
    "Sample",
    "VTABDataModule",
    "VTABDataset",
    "check_samples",
    "eval_transform",
    "iter_tasks",
    "read_list",
    "task_group",
    "write_vtab_task",
]
