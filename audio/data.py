"""Audio classification data on disk, in the layouts users already have.

* ESC-50 (Piczak, 2015): ``meta/esc50.csv`` (``filename,fold,target,category,esc10,
  src_file,take``) and ``audio/{fold}-{clip}-{take}-{target}.wav`` (5 s, 44.1 kHz mono).
  Protocols: ``"loo"`` trains on the four other folds and validates/tests on ``fold`` (the
  usual 5-fold cross-validation); ``"rotate"`` is Cappellazzo et al.'s (2024) split: test on
  ``fold``, validate on the next fold (5 wraps to 1), train on the other three. ``esc10``
  keeps the ESC-10 subset (its 10 targets renumbered 0..9 in target order).
* Speech Commands v2 (Warden, 2018): one folder per word; ``validation_list.txt`` and
  ``testing_list.txt`` hold relative paths, every other clip trains; ``_background_noise_``
  is never a class. ``task="35"``: the 35 words. ``task="12"``: the ten commands, ``_unknown_``
  (every other word) and ``_silence_`` (1 s windows cut from the background noise files).
* ``folder``: ``<root>/<train|val|test>/<class>/*.wav``; ``csv``: ``<root>/<train|val|test>.csv``
  with ``path,label`` columns (paths relative to root, labels as class names).

Every clip is read with soundfile, averaged to mono, resampled to 16 kHz with torchaudio and
turned into AST features (``audio.features``); bad data raises ``DatasetError`` naming the
file (and line).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.domain import EpochShuffle
from core.errors import OmniPeftError

from .features import MAX_LENGTH, SAMPLE_RATE, ast_features, resample

ESC50_COLUMNS = ("filename", "fold", "target", "category", "esc10", "src_file", "take")
ESC50_FOLDS = (1, 2, 3, 4, 5)
PROTOCOLS = ("loo", "rotate")
COMMANDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
UNKNOWN, SILENCE, NOISE_DIR = "_unknown_", "_silence_", "_background_noise_"
DATASETS = ("esc50", "speechcommands", "folder", "csv")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class DatasetError(OmniPeftError, ValueError):
    """A dataset folder, metadata file, line or audio file is missing or malformed."""


@dataclass(frozen=True)
class Sample:
    """One clip (or a window of one: ``start``/``frames`` in source samples) and its label."""

    path: Path
    label: int
    source: str  # where the sample was listed, for error messages
    start: int = 0
    frames: int = -1


# --- ESC-50 --------------------------------------------------------------------------------


def read_esc50(root: Path) -> list[dict[str, str]]:
    """Rows of ``<root>/meta/esc50.csv``, checked (columns, fold 1..5, integer target)."""
    meta = root / "meta" / "esc50.csv"
    if not meta.is_file():
        raise DatasetError(
            f"{meta} does not exist: an ESC-50 folder holds meta/esc50.csv and audio/*.wav "
            "(git clone https://github.com/karolpiczak/ESC-50); check --data.root."
        )
    with meta.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ESC50_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{meta}:1: missing column(s) {missing}; expected {','.join(ESC50_COLUMNS)}."
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row["fold"].isdigit() or int(row["fold"]) not in ESC50_FOLDS:
                raise DatasetError(f"{meta}:{line}: fold {row['fold']!r} is not one of 1..5.")
            if not row["target"].isdigit():
                raise DatasetError(f"{meta}:{line}: target {row['target']!r} is not an int.")
            rows.append({**row, "line": str(line)})
    return rows


def esc50_folds(fold: int, protocol: str) -> dict[str, tuple[int, ...]]:
    """The folds each stage reads: ``loo`` or the study's ``rotate`` (3 / 1 / 1)."""
    if fold not in ESC50_FOLDS:
        raise DatasetError(f"ESC-50 fold must be one of 1..5, got {fold!r}.")
    if protocol == "loo":
        rest = tuple(f for f in ESC50_FOLDS if f != fold)
        return {"train": rest, "val": (fold,), "test": (fold,)}
    val = fold % 5 + 1
    rest = tuple(f for f in ESC50_FOLDS if f not in (fold, val))
    return {"train": rest, "val": (val,), "test": (fold,)}


def esc50_splits(
    root: Path, fold: int, protocol: str, esc10: bool
) -> tuple[dict[str, list[Sample]], list[str]]:
    """ESC-50 samples per stage and the class names (indexed by label)."""
    rows = read_esc50(root)
    if esc10:
        rows = [r for r in rows if r["esc10"].strip().lower() == "true"]
    names = {int(r["target"]): r["category"] for r in rows}
    order = sorted(names)
    label_of = {t: i for i, t in enumerate(order)}
    meta = root / "meta" / "esc50.csv"
    splits = {}
    for stage, folds in esc50_folds(fold, protocol).items():
        splits[stage] = [
            Sample(
                root / "audio" / r["filename"], label_of[int(r["target"])], f"{meta}:{r['line']}"
            )
            for r in rows
            if int(r["fold"]) in folds
        ]
    return splits, [names[t] for t in order]


# --- Speech Commands -----------------------------------------------------------------------


def read_path_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(
            f"{path} does not exist: a Speech Commands folder holds validation_list.txt and "
            "testing_list.txt beside the word folders; check --data.root."
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def speech_commands_splits(
    root: Path, task: str, silence_fraction: float = 0.1, seed: int = 0
) -> tuple[dict[str, list[Sample]], list[str]]:
    """Speech Commands v2 per stage: the list files decide validation and test, the rest
    trains; ``task`` "35" (every word) or "12" (commands + _unknown_ + _silence_)."""
    if task not in ("35", "12"):
        raise DatasetError(f"Speech Commands task must be '35' or '12', got {task!r}.")
    words = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != NOISE_DIR)
    if not words:
        raise DatasetError(f"{root} has no word folders; is it a Speech Commands v2 folder?")
    listed = {
        "val": read_path_list(root / "validation_list.txt"),
        "test": read_path_list(root / "testing_list.txt"),
    }
    stage_of = {p: s for s, paths in listed.items() for p in paths}
    names = sorted(words) if task == "35" else [*COMMANDS, UNKNOWN, SILENCE]
    index = {n: i for i, n in enumerate(names)}
    splits: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for word in words:
        label = index.get(word, index.get(UNKNOWN))
        for clip in sorted((root / word).glob("*.wav")):
            relative = f"{word}/{clip.name}"
            splits[stage_of.get(relative, "train")].append(Sample(clip, label, str(clip)))
    for stage, paths in listed.items():
        for number, relative in enumerate(paths, start=1):
            if not (root / relative).is_file():
                where = root / ("validation_list.txt" if stage == "val" else "testing_list.txt")
                raise DatasetError(f"{where}:{number}: {relative} does not exist under {root}.")
    if task == "12":
        for stage, samples in splits.items():
            count = int(round(silence_fraction * len(samples)))
            samples.extend(
                silence_windows(
                    root, count, index[SILENCE], seed + ("train", "val", "test").index(stage)
                )
            )
    return splits, names


def silence_windows(root: Path, count: int, label: int, seed: int) -> list[Sample]:
    """``count`` one-second windows at seeded offsets in the background-noise files."""
    import soundfile

    files = sorted((root / NOISE_DIR).glob("*.wav"))
    if count and not files:
        raise DatasetError(f"task '12' cuts _silence_ from {root / NOISE_DIR}/*.wav: none found.")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        path = files[i % len(files)]
        info = soundfile.info(str(path))
        frames = info.samplerate  # one second at the file's rate
        start = int(rng.integers(0, max(1, info.frames - frames + 1)))
        out.append(Sample(path, label, f"{path} window {i}", start=start, frames=frames))
    return out


# --- generic layouts -----------------------------------------------------------------------

STAGE_FOLDERS = {"train": "train", "val": "val", "test": "test"}


def folder_splits(root: Path) -> tuple[dict[str, list[Sample]], list[str]]:
    """``<root>/<stage>/<class>/<clip>``; class names are the train folder's subfolders."""
    train = root / "train"
    if not train.is_dir():
        raise DatasetError(
            f"{train} does not exist: the folder layout is <root>/train|val|test/<class>/*.wav."
        )
    names = sorted(p.name for p in train.iterdir() if p.is_dir())
    splits = {}
    for stage, folder in STAGE_FOLDERS.items():
        samples = []
        for label, name in enumerate(names):
            for clip in sorted((root / folder / name).glob("*")):
                if clip.suffix.lower() in AUDIO_SUFFIXES:
                    samples.append(Sample(clip, label, str(clip)))
        splits[stage] = samples
    return splits, names


def csv_splits(root: Path) -> tuple[dict[str, list[Sample]], list[str]]:
    """``<root>/<stage>.csv`` with columns ``path,label``; classes are the train labels."""
    rows: dict[str, list[tuple[str, str, str]]] = {}
    for stage in STAGE_FOLDERS:
        path = root / f"{stage}.csv"
        if not path.is_file():
            raise DatasetError(
                f"{path} does not exist: the csv layout is <root>/train|val|test.csv."
            )
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not {"path", "label"} <= set(reader.fieldnames or []):
                raise DatasetError(
                    f"{path}:1: expected columns 'path,label', got {reader.fieldnames}."
                )
            rows[stage] = [(r["path"], r["label"], f"{path}:{n}") for n, r in enumerate(reader, 2)]
    names = sorted({label for _, label, _ in rows["train"]})
    index = {n: i for i, n in enumerate(names)}
    splits = {}
    for stage, items in rows.items():
        for _, label, where in items:
            if label not in index:
                raise DatasetError(f"{where}: label {label!r} does not occur in train.csv.")
        splits[stage] = [Sample(root / p, index[lab], where) for p, lab, where in items]
    return splits, names


# --- few-shot ------------------------------------------------------------------------------


def few_shot(samples: Sequence[Sample], k: int, num_classes: int, seed: int = 0) -> list[Sample]:
    """k samples per class drawn with ``seed`` (the study's few-shot setting)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in range(num_classes):
        pool = [s for s in samples if s.label == label]
        if len(pool) < k:
            raise DatasetError(
                f"few-shot k={k}: class {label} has only {len(pool)} training clips."
            )
        chosen.extend(pool[i] for i in sorted(rng.choice(len(pool), k, replace=False)))
    return chosen


# --- reading clips -------------------------------------------------------------------------


def load_waveform(sample: Sample) -> torch.Tensor:
    """The clip (or window) as a mono 16 kHz float tensor; clear errors for bad files."""
    import soundfile

    if not sample.path.is_file():
        raise DatasetError(f"{sample.source}: audio file {sample.path} does not exist.")
    try:
        data, rate = soundfile.read(
            str(sample.path),
            start=sample.start,
            frames=sample.frames,
            dtype="float32",
            always_2d=True,
        )
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise DatasetError(f"{sample.source}: cannot read {sample.path}: {err}") from None
    return resample(torch.from_numpy(data.mean(axis=1)), rate)


class AudioDataset(Dataset):
    """Items ``(features (max_length, 128), label, index)``; SpecAugment when ``train``."""

    def __init__(
        self, samples: Sequence[Sample], max_length: int, freq_mask: int = 0, time_mask: int = 0
    ) -> None:
        self.samples = list(samples)
        self.max_length, self.freq_mask, self.time_mask = max_length, freq_mask, time_mask
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.samples[index]
        generator = None
        if self.freq_mask or self.time_mask:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            generator = torch.Generator().manual_seed(seed * 1_000_003 + index + 7919 * self.epoch)
        features = ast_features(
            load_waveform(sample),
            self.max_length,
            freq_mask=self.freq_mask,
            time_mask=self.time_mask,
            generator=generator,
        )
        return features, sample.label, index


# --- the data module -----------------------------------------------------------------------


class AudioDataModule(lightning.LightningDataModule):
    """ESC-50, Speech Commands v2, or a folder / CSV layout, as AST features.

    Args:
        root: the dataset folder.
        dataset: "esc50", "speechcommands", "folder" or "csv".
        fold: ESC-50 test fold (1..5).
        protocol: ESC-50 "loo" (4 train folds, test fold validates) or "rotate" (the study's
            3 train / 1 validation / 1 test).
        esc10: ESC-10 subset of ESC-50.
        task: Speech Commands "35" or "12".
        max_length: frames per clip (default: 500 for ESC-50, 100 for Speech Commands, 1024
            otherwise, AST's AudioSet length).
        freq_mask, time_mask: SpecAugment maximal widths on training clips (0: off).
        few_shot: k training clips per class (None: all), drawn with ``seed``.
        batch_size, eval_batch_size, num_workers: loaders.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "esc50",
        fold: int = 1,
        protocol: str = "loo",
        esc10: bool = False,
        task: str = "35",
        max_length: int | None = None,
        freq_mask: int = 0,
        time_mask: int = 0,
        few_shot: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DatasetError(f"dataset must be one of {DATASETS}, got {dataset!r}.")
        if protocol not in PROTOCOLS:
            raise DatasetError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}.")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist; check --data.root.")
        self.dataset, self.fold, self.protocol, self.esc10, self.task = (
            dataset,
            fold,
            protocol,
            esc10,
            task,
        )
        self.max_length = max_length or MAX_LENGTH.get(dataset, 1024)
        self.freq_mask, self.time_mask = freq_mask, time_mask
        self.k, self.seed = few_shot, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers = num_workers
        self._splits: dict[str, list[Sample]] | None = None
        self.class_names: list[str] = []
        self.datasets: dict[str, AudioDataset] = {}

    def splits(self) -> dict[str, list[Sample]]:
        """Samples per stage ("train", "val", "test"), few-shot applied to train."""
        if self._splits is None:
            if self.dataset == "esc50":
                splits, names = esc50_splits(self.root, self.fold, self.protocol, self.esc10)
            elif self.dataset == "speechcommands":
                splits, names = speech_commands_splits(self.root, self.task, seed=self.seed)
            elif self.dataset == "folder":
                splits, names = folder_splits(self.root)
            else:
                splits, names = csv_splits(self.root)
            if self.k is not None:
                splits["train"] = few_shot(splits["train"], self.k, len(names), self.seed)
            self._splits, self.class_names = splits, names
        return self._splits

    @property
    def num_classes(self) -> int:
        self.splits()
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        for name, samples in self.splits().items():
            if name not in self.datasets:
                train = name == "train"
                self.datasets[name] = AudioDataset(
                    samples,
                    self.max_length,
                    freq_mask=self.freq_mask if train else 0,
                    time_mask=self.time_mask if train else 0,
                )

    def _loader(self, stage: str, batch_size: int, sampler=None) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[stage],
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        dataset = self.datasets["train"]
        trainer = getattr(self, "trainer", None)
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        if trainer is not None:
            dataset.epoch = trainer.current_epoch
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = EpochShuffle(dataset, seed=seed, num_replicas=replicas, rank=rank)
        return self._loader("train", self.batch_size, sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def describe(self) -> dict[str, object]:
        """What the run read (recorded in the metrics file)."""
        out: dict[str, object] = {"dataset": self.dataset, "root": str(self.root)}
        if self.dataset == "esc50":
            out.update(
                fold=self.fold,
                protocol=self.protocol,
                esc10=self.esc10,
                folds=esc50_folds(self.fold, self.protocol),
            )
        if self.dataset == "speechcommands":
            out["task"] = self.task
        out["sizes"] = {k: len(v) for k, v in self.splits().items()}
        out["few_shot"] = self.k
        return out


def with_label(sample: Sample, label: int) -> Sample:
    return replace(sample, label=label)


__all__ = [
    "COMMANDS",
    "DATASETS",
    "ESC50_COLUMNS",
    "PROTOCOLS",
    "SAMPLE_RATE",
    "AudioDataModule",
    "AudioDataset",
    "DatasetError",
    "Sample",
    "csv_splits",
    "esc50_folds",
    "esc50_splits",
    "few_shot",
    "folder_splits",
    "load_waveform",
    "read_esc50",
    "speech_commands_splits",
]
