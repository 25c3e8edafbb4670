"""The metrics of the three code-review tasks (LLaMA-Reviewer, CodeReviewer) and pass@k.

* Review necessity: precision, recall and F1 of the "needs review" (yes) class
  (torchmetrics).
* Comment generation and refinement: BLEU-4 as the CodeReviewer benchmark (Li et al.,
  2022, "Automating Code Review Activities by Large-Scale Pre-training") computes it in
  its evaluator (``smooth_bleu.bleu_fromstr``): each text is cut into
  ``nltk.wordpunct_tokenize`` tokens, stop words are dropped (for "BLEU without stop
  words"), the rest is lower-cased and every punctuation run split into single
  characters; each pair then gets the smoothed sentence BLEU-4 of Lin & Och (2004,
  "ORANGE"): modified n-gram precisions p_1 = c_1 / g_1 and p_n = (c_n + 1) / (g_n + 1)
  for n = 2..4 (c_n clipped matches, g_n = max(len - n + 1, 0) candidate n-grams), the
  geometric mean of the four, times the benchmark's brevity penalty
  exp(min(0, 1 - (r + 1) / (t + 1))) (t, r: candidate and reference lengths); the corpus
  figure is the mean x 100. The smoothing is nltk's ``SmoothingFunction().method2`` and
  sacrebleu's ``add-k`` with k = 1; where t >= r and t >= 4 (brevity penalty 1 in all
  three) the sentence score equals nltk's ``sentence_bleu`` with method2 and sacrebleu's
  ``sentence_bleu(smooth_method="add-k", smooth_value=1)`` (the tests check both).
  Stop words: by default scikit-learn's English list (318 words); the benchmark's figures
  use its evaluator's own ``stopwords.txt`` (592 entries), which a user who has the
  CodeReviewer release passes as ``--stopwords`` (the project ships no copy of it).
* Refinement: exact match after whitespace normalisation; CodeBLEU (Ren et al., 2020)
  optionally, through the ``codebleu`` package.
* Code generation: the unbiased pass@k of Chen et al., 2021 ("Evaluating Large Language
  Models Trained on Code"), 1 - C(n-c, k) / C(n, k).
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from core.errors import OmniPeftError

YES, NO = "yes", "no"
MAX_ORDER = 4
_WORDPUNCT = re.compile(r"\w+|[^\w\s]+")  # nltk.WordPunctTokenizer's pattern
_WORD_OR_CHAR = re.compile(r"\w+|[^\w\s]")  # words, and punctuation one char at a time
EXTRA_METRICS = ("codebleu",)


class MetricError(OmniPeftError, ValueError):
    """A metric that cannot be computed as asked (unknown name, missing package)."""


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


@lru_cache(maxsize=4)
def load_stopwords(path: str | None = None) -> frozenset[str]:
    """Stop words, one per line ('#' lines are comments) from ``path`` (e.g. the CodeReviewer
    evaluator's ``stopwords.txt``, to reproduce its figures), else scikit-learn's English
    list."""
    if path is None:
        return default_stopwords()
    source = Path(path)
    if not source.is_file():
        raise MetricError(f"stop-word file {source} does not exist; give one word per line.")
    with open(source, encoding="utf-8") as handle:
        words = (line.strip() for line in handle)
        return frozenset(w for w in words if w and not w.startswith("#"))


def default_stopwords() -> frozenset[str]:
    try:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    except ImportError as err:
        raise MetricError(
            "BLEU without stop words needs a stop-word list: pass --stopwords FILE (one word "
            "per line) or install scikit-learn (pip install 'omnipeft[nlp]')."
        ) from err
    return frozenset(ENGLISH_STOP_WORDS)


def bleu_tokens(text: str, stopwords: frozenset[str] | None = None) -> list[str]:
    """The benchmark's tokens: wordpunct, stop words dropped (case-sensitively, before
    lower-casing, as its evaluator does), lower-cased, punctuation runs split per char."""
    tokens = wordpunct_tokenize(text)
    if stopwords:
        tokens = [t for t in tokens if t not in stopwords]
    return _WORD_OR_CHAR.findall(" ".join(tokens).lower())


def ngram_matches(candidate: list[str], reference: list[str], n: int) -> tuple[int, int]:
    """(clipped matches c_n, candidate n-grams g_n) of Papineni et al. (2002)."""
    grams = Counter(tuple(candidate[i : i + n]) for i in range(len(candidate) - n + 1))
    ref = Counter(tuple(reference[i : i + n]) for i in range(len(reference) - n + 1))
    return sum(min(c, ref[g]) for g, c in grams.items()), max(len(candidate) - n + 1, 0)


def sentence_bleu4(candidate: list[str], reference: list[str]) -> float:
    """The benchmark's smoothed BLEU-4 of one tokenised pair, in [0, 1] (module docstring).

    A candidate without any unigram match scores 0 (the benchmark's log of a 1e-308 floor
    gives ~1e-77); an empty candidate scores exp(-r) as in the benchmark."""
    log_p = 0.0
    for n in range(1, MAX_ORDER + 1):
        correct, guessed = ngram_matches(candidate, reference, n)
        add = 1 if n > 1 else 0  # Lin & Och: add one to numerator and denominator for n > 1
        if n == 1 and guessed and not correct:
            return 0.0
        log_p += math.log(correct + add) - math.log(guessed + add) if guessed + add else 0.0
    t, r = len(candidate), len(reference)
    brevity = min(0.0, 1.0 - (r + 1) / (t + 1))
    return math.exp(log_p / MAX_ORDER + brevity)


def review_bleu(
    predictions: Sequence[str], references: Sequence[str], stopwords: frozenset[str] | None = None
) -> float:
    """Corpus mean of the benchmark's sentence BLEU-4, x 100; ``stopwords`` removed first."""
    _same_length(predictions, references)
    if not predictions:
        return 0.0
    scores = [
        sentence_bleu4(bleu_tokens(p, stopwords), bleu_tokens(r, stopwords))
        for p, r in zip(predictions, references, strict=True)
    ]
    return 100.0 * float(np.mean(scores))


def codebleu(predictions: Sequence[str], references: Sequence[str], lang: str) -> float:
    """CodeBLEU (Ren et al., 2020) x 100 through the maintained ``codebleu`` package."""
    try:
        from codebleu import calc_codebleu
    except ImportError:
        raise MetricError(
            "CodeBLEU needs the 'codebleu' package (and the tree-sitter grammar of the "
            f"language, e.g. tree-sitter-{lang}): pip install codebleu tree-sitter-{lang}, "
            "or drop codebleu from the metrics."
        ) from None
    _same_length(predictions, references)
    result = calc_codebleu(list(references), list(predictions), lang=lang)
    return 100.0 * float(result["codebleu"])


def check_metrics(names: Sequence[str]) -> None:
    """Fail early on an unknown extra metric or one whose package is missing."""
    for name in names:
        if name not in EXTRA_METRICS:
            raise MetricError(f"unknown metric {name!r}; extra metrics are {list(EXTRA_METRICS)}.")
    if "codebleu" in names and importlib.util.find_spec("codebleu") is None:
        codebleu([], [], "python")  # raises the message naming the package


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
    extra: Sequence[str] = (),
    lang: str = "python",
) -> dict[str, float]:
    """The paper's table row for ``task`` (necessity: references are "yes"/"no" or 0/1).

    Comment generation reports BLEU-4 with stop words kept and removed (``stopwords``,
    default scikit-learn's English list: ``load_stopwords``); refinement BLEU-4 with them
    kept and exact match; ``extra`` adds optional metrics ("codebleu", in ``lang``)."""
    check_metrics(extra)
    if task == "necessity":
        labels = [r if isinstance(r, int) else parse_yes_no(str(r)) for r in references]
        return necessity_scores(predictions, labels)
    scores = {"bleu4": review_bleu(predictions, references)}
    if task == "comment":
        words = stopwords if stopwords is not None else load_stopwords()
        scores["bleu4_no_stopwords"] = review_bleu(predictions, references, words)
    if task == "refine":
        scores["exact_match"] = exact_match(predictions, references)
    if "codebleu" in extra:
        scores["codebleu"] = codebleu(predictions, references, lang)
    return scores


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references; they must pair up.")
