"""Each generation metric against a value computed by hand on a tiny case."""

import math

import pytest

from tunesmith.plugins.evaluators.generation import (
    bleu,
    classification_metrics,
    exact_match,
    looks_like_labels,
    match_label,
    normalize_answer,
    normalized_exact_match,
    percentile,
    rouge,
)


def test_exact_and_normalized_match():
    preds = ["Paris", " paris.", "The Eiffel Tower", "London"]
    refs = ["Paris", "Paris", "eiffel tower", "Paris"]
    # exact: only the first (whitespace is stripped, case and punctuation are not folded)
    assert exact_match(preds, refs) == pytest.approx(1 / 4)
    # normalised: lower case, no punctuation, no article -> first three match
    assert normalized_exact_match(preds, refs) == pytest.approx(3 / 4)
    assert normalize_answer("  The  Cat, sat!  ") == "cat sat"


def test_bleu_hand_computed():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # one word changed, same length (brevity penalty 1): clipped n-gram precisions
    # 1-gram 5/6, 2-gram 3/5, 3-gram 2/4, 4-gram 1/3
    expected = 100 * math.exp((math.log(5 / 6) + math.log(3 / 5) + math.log(2 / 4) + math.log(1 / 3)) / 4)
    assert bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(expected, rel=1e-6)


def test_bleu_brevity_penalty():
    # 4 of 6 reference words, all n-grams match: BLEU = exp(1 - 6/4) * 100
    assert bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(1 - 6 / 4), rel=1e-6)


def test_rouge_hand_computed():
    r = rouge(["the cat"], ["the cat sat"])
    # ROUGE-1: P = 2/2, R = 2/3 -> F = 0.8; ROUGE-2: P = 1/1, R = 1/2 -> F = 2/3; ROUGE-L: LCS 2 -> 0.8
    assert r["rouge1"] == pytest.approx(0.8)
    assert r["rouge2"] == pytest.approx(2 / 3)
    assert r["rougeL"] == pytest.approx(0.8)
    # mean over rows: second row identical -> 1.0
    r2 = rouge(["the cat", "a dog"], ["the cat sat", "a dog"])
    assert r2["rouge1"] == pytest.approx((0.8 + 1.0) / 2)


def test_percentile_linear():
    assert percentile(list(range(1, 21)), 95) == pytest.approx(19.05)
    assert percentile([10.0, 20.0], 50) == pytest.approx(15.0)


def test_classification_hand_computed():
    labels = ["pos", "neg"]
    refs = ["pos", "pos", "neg", "neg"]
    raw = ["pos", "neg", "Neg.", "The answer is neg"]
    preds = [match_label(p, labels) for p in raw]
    assert preds == ["pos", "neg", "neg", "neg"]
    m = classification_metrics(preds, refs, labels)
    # accuracy 3/4; pos: tp 1 fp 0 fn 1 -> F1 2/3; neg: tp 2 fp 1 fn 0 -> F1 4/5
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_unmatched_prediction_is_wrong_for_every_class():
    m = classification_metrics([None, "a"], ["a", "a"], ["a", "b"])
    # a: tp 1, fn 1 -> 2/3; b: nothing -> 0
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_match_label_prefers_first_mention():
    assert match_label("negative, not positive", ["positive", "negative"]) == "negative"
    assert match_label("no idea", ["positive", "negative"]) is None


def test_label_detection():
    assert looks_like_labels(["yes", "no", "yes", "no", "yes"])
    assert not looks_like_labels(["a long free text answer here", "another one", "x", "y"])
