"""Run AST methods over ESC-50 folds and write the table the study reports: accuracy as the
mean and standard deviation over folds (Cappellazzo et al., 2024, "Parameter-Efficient
Transfer Learning of Audio Spectrogram Transformers").

    python -m audio.sweep --root /data/ESC-50 --configs configs/audio/lora.yaml \\
        configs/audio/prefix_tuning.yaml --folds 1,2,3,4,5 --out runs/audio_sweep \\
        --model.pretrained MIT/ast-finetuned-audioset-10-10-0.4593   # any further CLI arguments

For every config x fold it runs ``fit`` then ``test`` through ``python -m audio.train``'s CLI
(in this process, one after the other) under ``<out>/<method>/fold<k>`` with
``--data.fold k``, skipping runs whose metrics file already holds a test accuracy, so an
interrupted sweep resumes. Then it writes:

* ``<out>/folds.csv``: one row per (method, fold): test accuracy (%) and trainable
  parameters without the head;
* ``<out>/summary.csv``: one row per method: the mean and sample standard deviation of the
  test accuracy over its folds, the number of folds and the trainable parameters;
* ``<out>/accuracy_vs_params.png``: mean accuracy (std as error bars) against trainable
  parameters, one point per method.

The fold is ESC-50's test fold (``--data.protocol`` decides the training and validation
folds); for a dataset without folds pass ``--folds 1``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.domain import finished_metrics, plot_accuracy_vs_params, write_sweep_csv

from .data import ESC50_FOLDS
from .metrics import mean_std, read_metrics
from .train import fit_and_test

FOLD_COLUMNS = ("method", "fold", "test_acc", "params_M", "trainable_without_head")
SUMMARY_COLUMNS = ("method", "folds", "mean_acc", "std_acc", "params_M")
CSV_FOLDS, CSV_SUMMARY, PNG = "folds.csv", "summary.csv", "accuracy_vs_params.png"


def parse_folds(text: str) -> list[int]:
    """``"all"`` or a comma list of ESC-50 folds (``"1,3"``), checked."""
    if text.strip().lower() == "all":
        return list(ESC50_FOLDS)
    try:
        folds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"--folds takes 'all' or a comma list such as 1,2,3, got {text!r}."
        ) from None
    bad = [f for f in folds if f not in ESC50_FOLDS]
    if not folds or bad or len(set(folds)) != len(folds):
        raise ValueError(
            f"--folds must name distinct ESC-50 folds among 1..5 (e.g. 1,2,3), got {text!r}."
        )
    return folds


def run_dir(out: Path, config: Path, fold: int) -> Path:
    return out / config.stem / f"fold{fold}"


def run_one(config: Path, fold: int, root: Path, out: Path, extra: Sequence[str]) -> dict:
    """fit + test ``config`` on ``fold`` (or reuse a finished run); returns its metrics."""
    folder = run_dir(out, config, fold)
    if (done := finished_metrics(folder)) is not None:
        print(f"[sweep] {config.stem} / fold {fold}: done before, test acc {done['test_acc']:.4f}")
        return done
    print(f"[sweep] {config.stem} / fold {fold}: training")
    cli, _ = fit_and_test(config, root, folder, "--data.fold", str(fold), *extra)
    record = read_metrics(cli.trainer.log_dir)
    del cli
    gc.collect()  # one run's model and loaders before the next
    return record


def fold_rows(results: dict[str, dict[int, dict]]) -> list[dict[str, Any]]:
    """``{method: {fold: metrics}}`` -> one row per (method, fold)."""
    rows = []
    for method, runs in results.items():
        for fold, record in runs.items():
            params = record["params"]["trainable_without_head"]
            rows.append(
                {
                    "method": method,
                    "fold": fold,
                    "test_acc": 100.0 * record["test_acc"],
                    "params_M": params / 1e6,
                    "trainable_without_head": params,
                }
            )
    return rows


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: mean and sample std of the fold accuracies, folds run, parameters."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        mean, std = mean_std([r["test_acc"] for r in mine])
        params = sum(r["params_M"] for r in mine) / len(mine)
        out.append(
            {
                "method": method,
                "folds": len(mine),
                "mean_acc": mean,
                "std_acc": std,
                "params_M": params,
            }
        )
    return out


def sweep(
    configs: Sequence[Path], folds: Sequence[int], root: Path, out: Path, extra: Sequence[str]
) -> tuple[Path, Path, Path]:
    """Run every config on every fold; write and return (folds CSV, summary CSV, PNG)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {
        config.stem: {fold: run_one(config, fold, root, out, extra) for fold in folds}
        for config in configs
    }
    rows = fold_rows(results)
    summary = summary_rows(rows)
    paths = out / CSV_FOLDS, out / CSV_SUMMARY, out / PNG
    write_sweep_csv(paths[0], FOLD_COLUMNS, rows)
    write_sweep_csv(paths[1], SUMMARY_COLUMNS, summary)
    points = [(r["method"], r["params_M"], r["mean_acc"], r["std_acc"]) for r in summary]
    plot_accuracy_vs_params(
        paths[2],
        points,
        "test accuracy (%), mean and std over folds",
        "AST: accuracy vs trainable parameters",
    )
    for row in summary:
        print(
            f"[sweep] {row['method']}: {row['mean_acc']:.2f} +- {row['std_acc']:.2f}% over "
            f"{row['folds']} fold(s) at {row['params_M']:.4f} M"
        )
    print(f"[sweep] wrote {paths[0]}, {paths[1]} and {paths[2]}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run AST methods over ESC-50 folds; unknown arguments go to every run's CLI."
    )
    parser.add_argument("--root", type=Path, required=True, help="the ESC-50 folder")
    parser.add_argument("--configs", type=Path, nargs="+", required=True, help="method YAMLs")
    parser.add_argument("--folds", default="all", help="'all' or a comma list such as 1,2,3")
    parser.add_argument("--out", type=Path, default=Path("runs/audio_sweep"))
    args, extra = parser.parse_known_args(argv)
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        parser.error(f"config file(s) not found: {missing}")
    if len({c.stem for c in args.configs}) != len(args.configs):
        parser.error("configs are named by their file stem: give configs with distinct names.")
    try:
        folds = parse_folds(args.folds)
    except ValueError as err:
        parser.error(str(err))
    sweep(args.configs, folds, args.root, args.out, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
