import math
import os
from pathlib import Path

import pytest
from torchmetrics.functional.text import bleu_score

from nlp.metrics import (
    exact_match,
    mean_pass_at_k,
    necessity_scores,
    pass_at_k,
    review_bleu,
    wordpunct_tokenize,
)
from nlp.sandbox import check_completion, check_unit_tests, run_program


def test_wordpunct_tokenize_splits_words_and_punctuation_runs():
    assert wordpunct_tokenize("Use `==`, not is!") == ["Use", "`==`,", "not", "is", "!"]


def test_review_bleu_matches_library_on_fixed_strings():
    pred, ref = "Please use == here, not is.", "Use == to compare values, not is."
    expected = bleu_score(
        [" ".join(wordpunct_tokenize(pred))], [[" ".join(wordpunct_tokenize(ref))]], smooth=True
    )
    assert review_bleu([pred], [ref]) == pytest.approx(100 * float(expected))
    assert review_bleu([ref], [ref]) == pytest.approx(100.0)
    # stop words removed before scoring
    no_stop = review_bleu([pred], [ref], frozenset({"not", "is", "to"}))
    assert no_stop != pytest.approx(review_bleu([pred], [ref]))


def test_review_bleu_closed_form_of_add_one_smoothing():
    # 5 tokens vs reference of 5: matches 4/5, 2/4 (+1 -> 3/5), 1/3 (-> 2/4), 0/2 (-> 1/3)
    pred, ref = "a b c d x", "a b c e d"
    p = [4 / 5, 3 / 5, 2 / 4, 1 / 3]
    closed = math.exp(sum(math.log(x) for x in p) / 4)
    # torchmetrics scores 0 when an order has no match (see nlp.metrics); nltk gives `closed`
    got = review_bleu([pred], [ref]) / 100
    assert got == pytest.approx(closed) or got == 0.0


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
