"""Run methods over VTAB-1k tasks and write the table PEFT papers print.

    python -m vision.sweep --root /data/vtab-1k --configs configs/vision/lora.yaml \\
        configs/vision/bitfit.yaml --tasks all --out runs/sweep \\
        --model.checkpoint /weights/ViT-B_16.safetensors      # any further CLI arguments

For every config x task it runs ``fit`` then ``test`` through the training CLI (in this
process, one after the other) under ``<out>/<method>/<task>``, skipping runs whose metrics
file already holds a test accuracy, so an interrupted sweep resumes. Then it writes:

* ``<out>/vtab.csv``: one row per method (named by its config file): the mean trainable
  parameters without the head (M), top-1 accuracy (%) per task, per group (Natural,
  Specialized, Structured), the mean over tasks and the mean of the group means;
* ``<out>/vtab.png``: accuracy against trainable parameters, one point per method.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.domain import finished_metrics, plot_accuracy_vs_params, write_sweep_csv

from .data import GROUPS, iter_tasks
from .metrics import read_metrics, vtab_summary
from .train import fit_and_test

SUMMARY_COLUMNS = (*GROUPS, "mean", "mean_of_groups")


def run_dir(out: Path, config: Path, task: str) -> Path:
    return out / config.stem / task


def run_one(config: Path, task: str, root: Path, out: Path, extra: Sequence[str]) -> dict:
    """fit + test ``config`` on ``task`` (or reuse a finished run); returns its metrics."""
    folder = run_dir(out, config, task)
    if (done := finished_metrics(folder)) is not None:
        print(f"[sweep] {config.stem} / {task}: done before, test acc {done['test_acc']:.4f}")
        return done
    print(f"[sweep] {config.stem} / {task}: training")
    cli, _ = fit_and_test(config, root, task, folder, *extra)
    record = read_metrics(cli.trainer.log_dir)
    del cli
    gc.collect()
    return record


def table(results: dict[str, dict[str, dict]]) -> tuple[list[str], list[dict[str, Any]]]:
    """``{method: {task: metrics}}`` -> (CSV header, one row per method)."""
    tasks = list(dict.fromkeys(t for runs in results.values() for t in runs))
    header = ["method", "params_M", *tasks, *SUMMARY_COLUMNS]
    rows = []
    for method, runs in results.items():
        accuracy = {t: 100.0 * r["test_acc"] for t, r in runs.items()}
        params = [r["params"]["trainable_without_head"] for r in runs.values()]
        row: dict[str, Any] = {"method": method, "params_M": sum(params) / len(params) / 1e6}
        row.update(accuracy)
        row.update(vtab_summary(accuracy))
        rows.append(row)
    return header, rows


def headline(row: dict[str, Any]) -> float:
    """The number a VTAB-1k table ranks by: the mean of group means when all three groups
    are present, else the mean over the tasks run."""
    has_all = all(g in row for g in GROUPS)
    return row["mean_of_groups"] if has_all else row["mean"]


def sweep(
    configs: Sequence[Path], tasks: Sequence[str], root: Path, out: Path, extra: Sequence[str]
) -> tuple[Path, Path]:
    """Run every config on every task; write and return (CSV path, PNG path)."""
    out.mkdir(parents=True, exist_ok=True)
    results = {
        config.stem: {task: run_one(config, task, root, out, extra) for task in tasks}
        for config in configs
    }
    header, rows = table(results)
    csv_path, png_path = out / "vtab.csv", out / "vtab.png"
    write_sweep_csv(csv_path, header, rows)
    points = [(r["method"], r["params_M"], headline(r), None) for r in rows]
    plot_accuracy_vs_params(
        png_path, points, "top-1 accuracy (%)", "VTAB-1k: accuracy vs trainable parameters"
    )
    for row in rows:
        print(f"[sweep] {row['method']}: {headline(row):.2f}% at {row['params_M']:.4f} M")
    print(f"[sweep] wrote {csv_path} and {png_path}")
    return csv_path, png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run methods over VTAB-1k tasks; unknown arguments go to every run's CLI."
    )
    parser.add_argument("--root", type=Path, required=True, help="folder of VTAB-1k tasks")
    parser.add_argument("--configs", type=Path, nargs="+", required=True, help="method YAMLs")
    parser.add_argument(
        "--tasks", default="all", help="'all', a group (natural, ...) or a comma list of tasks"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    args, extra = parser.parse_known_args(argv)
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        parser.error(f"config file(s) not found: {missing}")
    sweep(args.configs, list(iter_tasks(args.tasks)), args.root, args.out, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
