"""Score a predictions file written by ``nlp.generate`` and print the metric table.

    python -m nlp.evaluate --task comment --predictions predictions.jsonl [--stopwords FILE]
    python -m nlp.evaluate --task refine --predictions predictions.jsonl --metrics codebleu
    python -m nlp.evaluate --task codegen --predictions samples.jsonl --k 1 10

Review tasks: the metrics of ``nlp.metrics.review_scores`` (``--metrics codebleu`` adds
CodeBLEU where the ``codebleu`` package is installed). Code generation: every
sample is executed against its tests in the sandbox (``nlp.sandbox``), pass@k reported.
``--unit-tests`` scores generated *tests* instead: they must run and pass on the
reference code (the record's ``canonical_solution``/``code``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .data import TASKS
from .metrics import EXTRA_METRICS, check_metrics, load_stopwords, mean_pass_at_k, review_scores
from .sandbox import check_completion, check_unit_tests


def read_predictions(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                row = json.loads(line)
                if "prediction" not in row:
                    raise ValueError(f"{path}:{number}: missing field 'prediction'.")
                rows.append(row)
    return rows


def execution_results(rows: list[dict], unit_tests: bool, timeout: float) -> list[list[bool]]:
    results = []
    for row in rows:
        samples = row["prediction"] if isinstance(row["prediction"], list) else [row["prediction"]]
        if unit_tests:
            code = row.get("canonical_solution") or row.get("code") or row["reference"]
            runs = [check_unit_tests(row.get("prompt", "") + code, s, timeout) for s in samples]
        else:
            runs = [
                check_completion(row["prompt"], s, row["test"], row.get("entry_point"), timeout)
                for s in samples
            ]
        results.append([r.passed for r in runs])
    return results


def score(task: str, rows: list[dict], **opts) -> dict[str, float]:
    if task == "codegen":
        results = execution_results(rows, opts.get("unit_tests", False), opts.get("timeout", 5.0))
        return mean_pass_at_k(results, opts.get("k", (1,)))
    predictions = [r["prediction"] for r in rows]
    references = [r["reference"] for r in rows]
    return review_scores(
        task,
        predictions,
        references,
        opts.get("stopwords"),
        extra=opts.get("metrics", ()),
        lang=opts.get("lang", "python"),
    )


def format_table(task: str, scores: dict[str, float]) -> str:
    lines = [f"{'task':<12}{'metric':<22}{'value':>8}"]
    lines += [f"{task:<12}{name:<22}{value:>8.2f}" for name, value in scores.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument(
        "--stopwords",
        help="stop-word file, one word per line, e.g. the CodeReviewer evaluator's "
        "stopwords.txt (default: scikit-learn's English list)",
    )
    p.add_argument("--metrics", nargs="+", default=[], help=f"extra metrics: {list(EXTRA_METRICS)}")
    p.add_argument("--lang", default="python", help="language of the code (CodeBLEU)")
    p.add_argument("--k", type=int, nargs="+", default=[1])
    p.add_argument("--unit-tests", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    args = p.parse_args(argv)
    check_metrics(args.metrics)  # before any work: a missing package fails at once
    stopwords = load_stopwords(args.stopwords) if args.stopwords else None
    scores = score(
        args.task,
        read_predictions(args.predictions),
        stopwords=stopwords,
        k=args.k,
        unit_tests=args.unit_tests,
        timeout=args.timeout,
        metrics=args.metrics,
        lang=args.lang,
    )
    print(format_table(args.task, scores))
    return scores


if __name__ == "__main__":
    main()
