"""The metrics of the three code-review tasks (LLaMA-Reviewer, CodeReviewer) and pass@k.

* Review necessity: precision, recall and F1 of the "needs review" (yes) class
  (torchmetrics).
* Comment generation and refinement: smoothed sentence BLEU-4 averaged over the corpus,
  x 100, on ``nltk.wordpunct_tokenize`` tokens, with stop words removed and kept
  (CodeReviewer's evaluator). Computed by nltk's ``sentence_bleu`` with
  ``SmoothingFunction().method2`` (Lin & Och, 2004: add one to the counts of n > 1) when
  nltk is installed; otherwise by torchmetrics' ``bleu_score(smooth=True)`` (the same
  add-one smoothing for n > 1, but a sentence without any matching n-gram of some order
  scores 0 there, where Lin & Och gives a small positive value).
* Refinement: exact match after whitespace normalisation.
* Code generation: the unbiased pass@k of Chen et al., 2021 ("Evaluating Large Language
  Models Trained on Code"), 1 - C(n-c, k) / C(n, k).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import torch

YES, NO = "yes", "no"
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")  # nltk.WordPunctTokenizer's pattern


def has_nltk() -> bool:
    try:
        import nltk  # noqa: F401
    except ImportError:
        return False
    return True


def wordpunct_tokenize(text: str) -> list[str]:
    """``nltk.wordpunct_tokenize`` (nltk when installed; its regex otherwise)."""
    if has_nltk():
        import nltk

        return nltk.wordpunct_tokenize(text)
    return _WORDPUNCT.findall(text)


def load_stopwords(path: str | None = None) -> frozenset[str]:
    """Stop words, one per line from ``path`` (CodeReviewer ships its list as
    ``evaluator/stopwords.txt``), else nltk's English list (needs nltk and its corpus)."""
    if path:
        with open(path, encoding="utf-8") as handle:
            return frozenset(w.strip() for w in handle if w.strip())
    try:
        from nltk.corpus import stopwords

        return frozenset(stopwords.words("english"))
    except (ImportError, LookupError) as err:
        raise RuntimeError(
            "BLEU without stop words needs a stop-word list: pass stopwords=<file, one word "
            f"per line> (CodeReviewer's evaluator/stopwords.txt) or install nltk ({err})."
        ) from None


def _tokens(text: str, stopwords: frozenset[str] | None) -> list[str]:
    tokens = wordpunct_tokenize(text)
    return [t for t in tokens if t not in stopwords] if stopwords else tokens


def sentence_bleu4(prediction: list[str], reference: list[str]) -> float:
    """Smoothed BLEU-4 of one tokenised pair, in [0, 1] (see the module docstring)."""
    if not prediction or not reference:
        return 0.0
    if has_nltk():
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

        method2 = SmoothingFunction().method2
        return float(sentence_bleu([reference], prediction, smoothing_function=method2))
    from torchmetrics.functional.text import bleu_score

    return float(bleu_score([" ".join(prediction)], [[" ".join(reference)]], smooth=True))


def review_bleu(
    predictions: Sequence[str], references: Sequence[str], stopwords: frozenset[str] | None = None
) -> float:
    """Corpus mean of smoothed sentence BLEU-4, x 100; ``stopwords`` removed when given."""
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    scores = [
        sentence_bleu4(_tokens(p, stopwords), _tokens(r, stopwords))
        for p, r in zip(predictions, references, strict=True)
    ]
    return 100.0 * float(np.mean(scores))


def normalise_whitespace(code: str) -> str:
    return " ".join(code.split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share (x 100) of predictions equal to their reference up to whitespace."""
    _same_length(predictions, references)
    hits = [
        normalise_whitespace(p) == normalise_whitespace(r) for p, r in zip(predictions, references)
    ]
    return 100.0 * float(np.mean(hits)) if hits else 0.0


def parse_yes_no(text: str) -> int:
    """1 for an answer starting with "yes", else 0 (anything unparsable counts as "no")."""
    words = wordpunct_tokenize(text.strip().lower())
    return int(bool(words) and words[0] == YES)


def necessity_scores(predictions: Sequence[str], labels: Sequence[int]) -> dict[str, float]:
    """Precision, recall, F1 (x 100) of the "needs review" class, and accuracy."""
    from torchmetrics.functional.classification import (
        binary_accuracy,
        binary_f1_score,
        binary_precision,
        binary_recall,
    )

    _same_length(predictions, labels)
    pred = torch.tensor([parse_yes_no(p) for p in predictions])
    target = torch.tensor([int(y) for y in labels])
    return {
        name: 100.0 * float(fn(pred, target))
        for name, fn in (
            ("precision", binary_precision),
            ("recall", binary_recall),
            ("f1", binary_f1_score),
            ("accuracy", binary_accuracy),
        )
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k), as the
    numerically stable product 1 - prod_{i=n-c+1}^{n} (1 - k / i)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(results: Iterable[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """pass@k (x 100) averaged over problems, for each k no larger than every sample count."""
    results = [list(r) for r in results]
    table = {}
    for k in ks:
        if results and all(len(r) >= k for r in results):
            table[f"pass@{k}"] = 100.0 * float(
                np.mean([pass_at_k(len(r), sum(r), k) for r in results])
            )
    return table


def review_scores(
    task: str,
    predictions: Sequence[str],
    references: Sequence[str],
    stopwords: frozenset[str] | None = None,
) -> dict[str, float]:
    """The paper's table row for ``task`` (necessity: references are "yes"/"no" or 0/1)."""
    if task == "necessity":
        labels = [r if isinstance(r, int) else parse_yes_no(str(r)) for r in references]
        return necessity_scores(predictions, labels)
    scores = {"bleu4": review_bleu(predictions, references)}
    if task == "comment" and stopwords:
        scores["bleu4_no_stopwords"] = review_bleu(predictions, references, stopwords)
    if task == "refine":
        scores["exact_match"] = exact_match(predictions, references)
    return scores


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references; they must pair up.")
