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
import csv
import gc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.domain import finished_metrics

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


def write_csv(path: Path, header: list[str], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(k, v) for k, v in row.items()})


def _format(column: str, value: Any) -> Any:
    if not isinstance(value, float):
        return value
    return f"{value:.6f}" if column == "params_M" else f"{value:.4f}"  # M to one parameter


def headline(row: dict[str, Any]) -> float:
    """The number a VTAB-1k table ranks by: the mean of group means when all three groups
    are present, else the mean over the tasks run."""
    has_all = all(g in row for g in GROUPS)
    return row["mean_of_groups"] if has_all else row["mean"]


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Accuracy vs trainable parameters (log scale, linear near 0), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for row in rows:
        x, y = row["params_M"], headline(row)
        ax.scatter([x], [y], s=40)
        ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("trainable parameters without the head (M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("VTAB-1k: accuracy vs trainable parameters")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    write_csv(csv_path, header, rows)
    plot(png_path, rows)
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
