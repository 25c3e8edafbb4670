"""Metrics the medical PEFT papers report.

* Chest X-ray: per-finding AUROC and their mean (MONAI's ``compute_roc_auc``), over the
  labels the uncertainty policy kept (masked ones left out per finding), with percentile
  bootstrap 95% confidence intervals (resampling images, Efron & Tibshirani, 1993).
* Med-VQA (as PeFoMed, He et al., 2024, and the VQA-RAD / SLAKE papers count): closed-ended
  accuracy (exact match after normalisation), open-ended recall and token F1, BLEU
  (torchmetrics' ``BLEUScore``), each per answer type and overall.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

# --- AUROC -------------------------------------------------------------------------------


def finding_auroc(
    scores: np.ndarray, labels: np.ndarray, mask: np.ndarray | None = None
) -> list[float]:
    """AUROC of every column over its unmasked rows (NaN where one class is absent)."""
    from monai.metrics import compute_roc_auc

    mask = np.ones_like(labels) if mask is None else mask
    out = []
    for k in range(labels.shape[1]):
        keep = mask[:, k] > 0
        y = labels[keep, k]
        if y.size == 0 or y.min() == y.max():
            out.append(float("nan"))
            continue
        out.append(
            float(
                compute_roc_auc(
                    torch.as_tensor(scores[keep, k], dtype=torch.float64), torch.as_tensor(y)
                )
            )
        )
    return out


def mean_auroc(per_finding: Sequence[float]) -> float:
    """Mean over the findings whose AUROC is defined."""
    values = [v for v in per_finding if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def bootstrap_auroc(
    scores: np.ndarray,
    labels: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-finding and mean AUROC with percentile bootstrap intervals over images.

    Returns ``{"auroc": [...], "low": [...], "high": [...], "mean": m, "mean_low": l,
    "mean_high": h, "samples": n}``; a resample where a finding has one class only is skipped
    for that finding.
    """
    mask = np.ones_like(labels) if mask is None else mask
    rng = np.random.default_rng(seed)
    n = labels.shape[0]
    draws = np.full((samples, labels.shape[1]), np.nan)
    for b in range(samples):
        rows = rng.integers(0, n, n)
        draws[b] = _fast_auroc(scores[rows], labels[rows], mask[rows])
    alpha = (1 - level) / 2
    point = finding_auroc(scores, labels, mask)
    means = np.nanmean(np.where(np.isnan(draws).all(axis=1, keepdims=True), 0, draws), axis=1)
    with np.errstate(all="ignore"):
        low = [_quantile(draws[:, k], alpha) for k in range(labels.shape[1])]
        high = [_quantile(draws[:, k], 1 - alpha) for k in range(labels.shape[1])]
    return {
        "auroc": point,
        "low": low,
        "high": high,
        "mean": mean_auroc(point),
        "mean_low": _quantile(means, alpha),
        "mean_high": _quantile(means, 1 - alpha),
        "samples": samples,
        "level": level,
    }


def _quantile(values: np.ndarray, q: float) -> float:
    values = values[~np.isnan(values)]
    return float(np.quantile(values, q)) if values.size else float("nan")


def _fast_auroc(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC per column (ties counted half), the same value as MONAI's and
    scikit-learn's, vectorised for the thousands of bootstrap resamples."""
    from scipy.stats import rankdata

    out = np.full(labels.shape[1], np.nan)
    for k in range(labels.shape[1]):
        keep = mask[:, k] > 0
        y, s = labels[keep, k], scores[keep, k]
        pos = int(y.sum())
        neg = y.size - pos
        if pos == 0 or neg == 0:
            continue
        ranks = rankdata(s)
        out[k] = (ranks[y > 0].sum() - pos * (pos + 1) / 2) / (pos * neg)
    return out


def auroc_table(report: dict[str, Any], findings: Sequence[str]) -> list[dict[str, Any]]:
    """Rows ``{finding, auroc, ci_low, ci_high}`` and a final "mean" row."""
    rows = [
        {"finding": f, "auroc": a, "ci_low": lo, "ci_high": hi}
        for f, a, lo, hi in zip(
            findings, report["auroc"], report["low"], report["high"], strict=True
        )
    ]
    rows.append(
        {
            "finding": "mean",
            "auroc": report["mean"],
            "ci_low": report["mean_low"],
            "ci_high": report["mean_high"],
        }
    )
    return rows


# --- Med-VQA -----------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: Any) -> str:
    """Lower case, no punctuation or articles, single spaces; numbers become text."""
    text = str(text).lower().strip()
    text = text.translate(str.maketrans("", "", string.punctuation))
    words = [w for w in text.split() if w not in _ARTICLES]
    return re.sub(r"\s+", " ", " ".join(words)).strip()


def token_scores(prediction: str, answer: str) -> tuple[float, float]:
    """(recall, F1) of the answer's tokens in the prediction (bag of words)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not gold:
        return float(not pred), float(not pred)
    common = sum((Counter(pred) & Counter(gold)).values())
    recall = common / len(gold)
    precision = common / len(pred) if pred else 0.0
    f1 = 2 * precision * recall / (precision + recall) if common else 0.0
    return recall, f1


def vqa_scores(
    predictions: Sequence[str], answers: Sequence[str], answer_types: Sequence[str]
) -> dict[str, float]:
    """Closed accuracy, open recall / F1, BLEU (per type and overall) and overall accuracy."""
    from torchmetrics.text import BLEUScore

    groups: dict[str, list[int]] = {"closed": [], "open": []}
    for i, kind in enumerate(answer_types):
        groups["closed" if str(kind).upper() == "CLOSED" else "open"].append(i)
    exact = [
        float(normalize_answer(p) == normalize_answer(a))
        for p, a in zip(predictions, answers, strict=True)
    ]
    tokens = [token_scores(p, a) for p, a in zip(predictions, answers, strict=True)]
    out: dict[str, float] = {"accuracy": float(np.mean(exact)) if exact else float("nan")}
    for name, rows in (*groups.items(), ("overall", list(range(len(exact))))):
        if not rows:
            continue
        out[f"{name}_accuracy"] = float(np.mean([exact[i] for i in rows]))
        out[f"{name}_recall"] = float(np.mean([tokens[i][0] for i in rows]))
        out[f"{name}_f1"] = float(np.mean([tokens[i][1] for i in rows]))
        bleu = BLEUScore(n_gram=1, smooth=True)
        out[f"{name}_bleu1"] = float(
            bleu(
                [normalize_answer(predictions[i]) for i in rows],
                [[normalize_answer(answers[i])] for i in rows],
            )
        )
        out[f"{name}_count"] = float(len(rows))
    return out


__all__ = [
    "auroc_table",
    "bootstrap_auroc",
    "finding_auroc",
    "mean_auroc",
    "normalize_answer",
    "token_scores",
    "vqa_scores",
]
