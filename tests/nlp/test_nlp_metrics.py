import json
import math
import os
from pathlib import Path

import pytest

from nlp import evaluate
from nlp.metrics import (
    MetricError,
    bleu_tokens,
    check_metrics,
    exact_match,
    load_stopwords,
    mean_pass_at_k,
    necessity_scores,
    pass_at_k,
    review_bleu,
    review_scores,
    wordpunct_tokenize,
)
from nlp.sandbox import check_completion, check_unit_tests, run_program


def test_wordpunct_tokenize_splits_words_and_punctuation_runs():
    assert wordpunct_tokenize("Use `==`, not is!") == ["Use", "`==`,", "not", "is", "!"]


def test_bleu_tokens_drop_stop_words_before_lowering_and_split_punctuation():
    words = load_stopwords()
    assert {"the", "is", "should"} <= words and "==" not in words and "value" not in words
    # "The" survives (the list is lower-case, matched before lower-casing); "`==`," -> 4 chars
    text = "The value is `==`, fine"
    assert bleu_tokens(text, words) == ["the", "value", "`", "=", "=", "`", ",", "fine"]
    assert bleu_tokens(text) == ["the", "value", "is", "`", "=", "=", "`", ",", "fine"]


# (prediction, reference) pairs whose candidate is at least as long as the reference and
# has >= 4 tokens, with and without stop words: there the benchmark's brevity penalty is 1
# like nltk's and sacrebleu's, so the three must agree exactly.
PAIRS = [
    ("Please use == here, not is. It compares identity", "Use == to compare values, not is."),
    ("This returns None now; please return the computed value instead of dropping it",
     "This returns None now; the value should be returned."),
    ("Off by one: the upper bound should be inclusive here, so use `<=` instead of `<`",
     "Off by one: this should be `<=`, the bound is inclusive."),
]  # fmt: skip


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("stop", [False, True])
def test_review_bleu_equals_nltk_method2_and_sacrebleu_add_one(pair, stop):
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from sacrebleu.metrics import BLEU

    words = load_stopwords() if stop else None
    hyp, ref = (bleu_tokens(text, words) for text in pair)
    assert len(hyp) >= len(ref) and len(hyp) >= 4  # the regime where all three coincide
    nltk_score = sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method2)
    sacre = BLEU(tokenize="none", smooth_method="add-k", smooth_value=1, effective_order=False)
    sacre_score = sacre.sentence_score(" ".join(hyp), [" ".join(ref)]).score / 100
    ours = review_bleu([pair[0]], [pair[1]], words) / 100
    assert 0 < ours < 1
    assert ours == pytest.approx(nltk_score, rel=1e-9)
    assert ours == pytest.approx(sacre_score, rel=1e-9)


def test_review_bleu_is_the_corpus_mean_and_stop_words_change_it():
    preds, refs = [p for p, _ in PAIRS], [r for _, r in PAIRS]
    each = [review_bleu([p], [r]) for p, r in PAIRS]
    assert review_bleu(preds, refs) == pytest.approx(sum(each) / len(each))
    assert review_bleu(preds, refs, load_stopwords()) != pytest.approx(review_bleu(preds, refs))
    assert review_bleu([refs[0]], [refs[0]]) == pytest.approx(100.0)


def test_short_candidates_take_the_benchmarks_brevity_penalty():
    from sacrebleu.metrics import BLEU

    sacre = BLEU(tokenize="none", smooth_method="add-k", smooth_value=1, effective_order=False)
    # shorter than the reference: sacrebleu's n-gram part, the benchmark's (r+1)/(t+1) penalty
    pred, ref = "use is not here", "use == to compare values, not is here"
    hyp, gold = bleu_tokens(pred), bleu_tokens(ref)
    t, r = len(hyp), len(gold)
    lib = sacre.sentence_score(" ".join(hyp), [" ".join(gold)])
    expected = lib.score / 100 / lib.bp * math.exp(1 - (r + 1) / (t + 1))
    assert t < r and review_bleu([pred], [ref]) / 100 == pytest.approx(expected, rel=1e-9)
    # fewer than 4 tokens: add-one makes the empty orders 1/1, as sacrebleu's add-k does
    lib = sacre.sentence_score("fix this", ["fix this"])
    assert review_bleu(["fix this"], ["fix this"]) == pytest.approx(lib.score) == 100.0
    # an empty prediction: the benchmark's exp(-r); no unigram match at all: 0
    assert review_bleu([""], [ref]) / 100 == pytest.approx(math.exp(-r))
    assert review_bleu(["zzz qqq"], [ref]) == 0.0


def test_codebleu_without_its_package_names_it(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "codebleu", None)  # as if not installed
    with pytest.raises(MetricError, match="pip install codebleu"):
        review_scores("refine", ["x = 1"], ["x = 1"], extra=["codebleu"])
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"prediction": "x = 1", "reference": "x = 1"}) + "\n")
    with pytest.raises(MetricError, match="'codebleu' package"):
        evaluate.main(["--task", "refine", "--predictions", str(preds), "--metrics", "codebleu"])
    with pytest.raises(MetricError, match="unknown metric 'rouge'"):
        check_metrics(["rouge"])


def test_review_scores_rows_per_task():
    pred, ref = PAIRS[0]
    assert set(review_scores("comment", [pred], [ref])) == {"bleu4", "bleu4_no_stopwords"}
    refine = review_scores("refine", ["x  = 1", pred], ["x = 1", ref])
    assert set(refine) == {"bleu4", "exact_match"} and refine["exact_match"] == 50.0


def test_exact_match_normalises_whitespace():
    assert exact_match(["x =  1\n", "y"], ["x = 1", "z"]) == 50.0


def test_necessity_precision_recall_f1():
    scores = necessity_scores(["yes", "Yes.", "no", "no", "maybe"], [1, 0, 1, 0, 1])
    assert scores["precision"] == pytest.approx(50.0)
    assert scores["recall"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(40.0)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 4, 2), (7, 7, 7)]
)
def test_pass_at_k_equals_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_mean_pass_at_k_skips_k_larger_than_samples():
    table = mean_pass_at_k([[True, False], [False, False]], ks=(1, 2, 5))
    assert table == {"pass@1": pytest.approx(25.0), "pass@2": pytest.approx(50.0)}


def test_sandbox_kills_infinite_loop():
    result = run_program("while True:\n    pass\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed


def test_sandbox_blocks_writes_outside_its_folder(tmp_path):
    target = tmp_path / "escape.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')")
    assert result.status == "failed" and "outside the sandbox" in result.output
    assert not target.exists()
    inside = run_program("open('ok.txt', 'w').write('x'); print(open('ok.txt').read())")
    assert inside.passed and inside.output.strip() == "x"


def test_sandbox_blocks_network_and_subprocesses():
    assert "not allowed" in run_program("import socket; socket.socket()").output
    assert "not allowed" in run_program("import os; os.system('true')").output


def test_completion_and_generated_unit_tests_are_executed():
    prompt, test = "def add(a, b):\n", "def check(f):\n    assert f(2, 3) == 5\n"
    assert check_completion(prompt, "    return a + b\n", test, "add").passed
    assert not check_completion(prompt, "    return a - b\n", test, "add").passed
    reference = "def add(a, b):\n    return a + b\n"
    assert check_unit_tests(reference, "assert add(1, 1) == 2").passed
    assert not check_unit_tests(reference, "assert add(1, 1) == 3").passed
    assert not Path(os.getcwd(), "ok.txt").exists()
