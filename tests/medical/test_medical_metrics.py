"""AUROC, its bootstrap interval and the Med-VQA scores against reference computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medical.metrics import (
    _fast_auroc,
    auroc_table,
    bootstrap_auroc,
    finding_auroc,
    normalize_answer,
    token_scores,
    vqa_scores,
)


@pytest.fixture
def scored():
    rng = np.random.default_rng(3)
    labels = (rng.random((60, 3)) < 0.4).astype(np.float32)
    scores = np.round(labels * 0.6 + rng.random((60, 3)), 1)  # rounding makes ties
    mask = (rng.random((60, 3)) > 0.2).astype(np.float32)
    return scores, labels, mask


def test_finding_auroc_matches_sklearn_with_mask(scored):
    scores, labels, mask = scored
    ours = finding_auroc(scores, labels, mask)
    for k in range(3):
        keep = mask[:, k] > 0
        assert ours[k] == pytest.approx(
            roc_auc_score(labels[keep, k], scores[keep, k]), abs=1e-6
        )  # MONAI: fp32
    assert np.allclose(_fast_auroc(scores, labels, mask), ours, atol=1e-6)


def test_one_class_column_is_nan():
    labels = np.array([[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    assert np.isnan(finding_auroc(np.random.rand(3, 2), labels)[0])


def test_bootstrap_interval_matches_sklearn_resampling(scored):
    scores, labels, mask = scored
    report = bootstrap_auroc(scores, labels, mask, samples=80, seed=5)
    rng = np.random.default_rng(5)
    draws = []
    for _ in range(80):
        rows = rng.integers(0, 60, 60)
        row = []
        for k in range(3):
            keep = mask[rows, k] > 0
            y, s = labels[rows][keep, k], scores[rows][keep, k]
            row.append(roc_auc_score(y, s) if 0 < y.sum() < y.size else np.nan)
        draws.append(row)
    draws = np.array(draws)
    for k in range(3):
        column = draws[:, k][~np.isnan(draws[:, k])]
        assert report["low"][k] == pytest.approx(np.quantile(column, 0.025), abs=1e-9)
        assert report["high"][k] == pytest.approx(np.quantile(column, 0.975), abs=1e-9)
        assert report["low"][k] <= report["auroc"][k] <= report["high"][k]
    assert report["mean_low"] == pytest.approx(
        np.quantile(np.nanmean(draws, axis=1), 0.025), abs=1e-9
    )
    assert report["mean"] == pytest.approx(np.mean(report["auroc"]))
    rows = auroc_table(report, ["a", "b", "c"])
    assert [r["finding"] for r in rows] == ["a", "b", "c", "mean"]


def test_vqa_scores_by_answer_type():
    predictions = ["Yes", "no", "the left lung", "liver", "2"]
    answers = ["yes", "yes", "left", "right kidney", 2]
    kinds = ["CLOSED", "CLOSED", "OPEN", "OPEN", "OPEN"]
    scores = vqa_scores(predictions, [str(a) for a in answers], kinds)
    assert scores["closed_accuracy"] == 0.5
    assert scores["open_accuracy"] == pytest.approx(1 / 3)
    # recall: left in "left lung" -> 1; "right kidney" vs "liver" -> 0; "2" -> 1
    assert scores["open_recall"] == pytest.approx(2 / 3)
    # F1: 2*0.5*1/1.5 = 2/3, 0, 1
    assert scores["open_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert scores["overall_accuracy"] == pytest.approx(2 / 5) == scores["accuracy"]
    assert scores["closed_bleu1"] == pytest.approx(0.5, abs=0.2)
    assert scores["overall_count"] == 5


def test_normalisation_and_token_scores():
    assert normalize_answer(" The Left, lung! ") == "left lung"
    assert normalize_answer(3) == "3"
    assert token_scores("left lung", "left") == (1.0, pytest.approx(2 / 3))
    assert token_scores("", "left") == (0.0, 0.0)
