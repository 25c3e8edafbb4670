"""``python -m audio.sweep``: methods x ESC-50 folds on a tiny generated folder, per-fold and
summary CSVs that agree with the runs' metrics files, a PNG that decodes, and resuming."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
from audio_toy import TINY_AST, make_esc50
from PIL import Image

from audio import sweep as audio_sweep
from audio.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("single_thread")
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "audio"
TINY_RUN = [
    "--model.pretrained",
    "null",
    "--model.ast_config",
    json.dumps(TINY_AST),
    "--data.max_length",
    "100",
    "--data.batch_size",
    "6",
    "--data.num_workers",
    "0",
    "--trainer.max_epochs",
    "1",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.accelerator",
    "cpu",
    "--trainer.precision",
    "32-true",
    "--trainer.logger",
    "false",
]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_two_methods_two_folds(tmp_path, capsys):
    root = make_esc50(tmp_path / "ESC-50", classes=2, per_fold=1)
    out = tmp_path / "sweep"
    configs = [str(CONFIGS / "prefix_tuning.yaml"), str(CONFIGS / "bitfit.yaml")]
    argv = ["--root", str(root), "--configs", *configs, "--folds", "1,3", "--out", str(out)]
    assert audio_sweep.main([*argv, *TINY_RUN]) == 0

    folds = read_csv(out / "folds.csv")
    assert [(r["method"], r["fold"]) for r in folds] == [
        ("prefix_tuning", "1"),
        ("prefix_tuning", "3"),
        ("bitfit", "1"),
        ("bitfit", "3"),
    ]
    for row in folds:  # each row is its run's metrics file
        record = read_metrics(out / row["method"] / f"fold{row['fold']}")
        assert float(row["test_acc"]) == pytest.approx(100 * record["test_acc"], abs=1e-4)
        assert int(row["trainable_without_head"]) == record["params"]["trainable_without_head"]
        assert record["folds"]["test"] == [int(row["fold"])]
    # tiny AST (32 wide, 2 layers): 24 prefix keys + values per layer; every encoder bias
    params = {r["method"]: int(r["trainable_without_head"]) for r in folds}
    assert params == {
        "prefix_tuning": 2 * 2 * 24 * 32,
        "bitfit": 32 + 2 * (2 * 32 + 4 * 32 + 64 + 32) + 32,
    }

    summary = read_csv(out / "summary.csv")
    assert [r["method"] for r in summary] == ["prefix_tuning", "bitfit"]
    for row in summary:
        accs = [float(r["test_acc"]) for r in folds if r["method"] == row["method"]]
        assert int(row["folds"]) == 2
        assert float(row["mean_acc"]) == pytest.approx(statistics.fmean(accs), abs=1e-3)
        assert float(row["std_acc"]) == pytest.approx(statistics.stdev(accs), abs=1e-3)

    with Image.open(out / "accuracy_vs_params.png") as image:
        image.load()  # decodes the whole file
        assert image.size == (720, 480) and image.getextrema() != ((255, 255),) * 4

    # a second call finds every run finished and trains nothing
    capsys.readouterr()
    assert audio_sweep.main([*argv, *TINY_RUN]) == 0
    printed = capsys.readouterr().out
    assert printed.count("done before") == 4 and "training" not in printed


def test_sweep_fold_argument_errors():
    assert audio_sweep.parse_folds("all") == [1, 2, 3, 4, 5]
    assert audio_sweep.parse_folds("2, 5") == [2, 5]
    for bad in ("0", "1,1", "one", ""):
        with pytest.raises(ValueError, match="folds"):
            audio_sweep.parse_folds(bad)
