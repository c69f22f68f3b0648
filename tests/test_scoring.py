"""Scoring rules on hand-written predictions."""

import math

import pytest

from hybrid_distill.evaluation import (
    aggregate,
    first_int_exact,
    mqar_accuracy,
    score_sample,
    string_match_all,
    string_match_part,
)
from hybrid_distill.evaluation.scoring import postprocess_prediction
from hybrid_distill.tasks import RecallSample


def test_string_match_all():
    refs = ["1234567", "7654321", "ABC-def"]
    assert string_match_all(" 1234567, 7654321 and abc-DEF.", refs) == 1.0
    assert string_match_all("1234567 and 7654321", refs) == pytest.approx(2 / 3)
    assert string_match_all("only 1234567", refs) == pytest.approx(1 / 3)
    assert string_match_all("", refs) == 0.0
    assert string_match_all(None, refs) == 0.0
    assert string_match_all("The answer is: 1234567 (I think) and more text 7654321 abc-def", refs) == 1.0
    assert string_match_all("123456", ["1234567"]) == 0.0  # a prefix is not a match
    assert string_match_all("HELLO-World", "hello-world") == 1.0  # a single string ref
    with pytest.raises(ValueError):
        string_match_all("x", [])


def test_postprocess_like_ruler():
    assert postprocess_prediction("  a\tb\x00c  \n") == "a\nb\nc"


def test_string_match_part():
    refs = ["Paris", "Lyon"]
    assert string_match_part("it is paris", refs) == 1.0
    assert string_match_part("LYON and Paris", refs) == 1.0
    assert string_match_part("Marseille", refs) == 0.0
    assert string_match_part("", refs) == 0.0


def test_first_int_exact():
    assert first_int_exact("7", ["7"]) == 1.0
    assert first_int_exact(" 7.", ["7"]) == 1.0
    assert first_int_exact("17", ["7"]) == 0.0  # the substring rule would say 1
    assert first_int_exact("7", ["17"]) == 0.0
    assert first_int_exact("The value is 42, not 7", ["42"]) == 1.0
    assert first_int_exact("The value is 41, not 42", ["42"]) == 0.0  # only the first integer counts
    assert first_int_exact("no number here", ["42"]) == 0.0
    assert first_int_exact("", ["42"]) == 0.0
    assert first_int_exact("007", ["7"]) == 1.0  # compared as integers
    assert first_int_exact("x=3141592!", ["3141592"]) == 1.0


def test_mqar_accuracy():
    refs = ["101", "202", "303", "404"]
    assert mqar_accuracy(" 101 202 303 404", refs) == 1.0
    assert mqar_accuracy("101, 202, 999, 404 and then 555", refs) == 0.75
    assert mqar_accuracy("202 101 303 404", refs) == 0.5  # order matters
    assert mqar_accuracy("101 202", refs) == 0.5  # missing answers are wrong
    assert mqar_accuracy("abc 101 def 202 ghi 303 jkl 404", refs) == 1.0  # keys in between are fine
    assert mqar_accuracy("", refs) == 0.0
    assert mqar_accuracy("1010 202 303 404", refs) == 0.75  # digits must match exactly


def _sample(task, length, metric, answers):
    return RecallSample(task, length, 0, "p", " a", answers, 8, metric, {})


def test_score_sample_dispatch():
    assert score_sample(_sample("niah", 512, "string_match_all", ["1234567"]), "1234567") == 1.0
    assert score_sample(_sample("kv", 512, "first_int_exact", ["7"]), "17") == 0.0
    assert score_sample(_sample("mqar", 512, "mqar_accuracy", ["1", "2"]), "1 3") == 0.5
    assert score_sample(_sample("qa", 512, "string_match_part", ["x", "y"]), "y") == 1.0
    with pytest.raises(KeyError):
        score_sample(_sample("t", 512, "nope", ["1"]), "1")


def test_aggregate():
    results = [
        (_sample("a", 512, "string_match_all", ["1"]), 1.0),
        (_sample("a", 512, "string_match_all", ["1"]), 0.0),
        (_sample("a", 1024, "string_match_all", ["1"]), 1.0),
        {"task": "b", "length": 512, "score": 0.25},
    ]
    agg = aggregate(results)
    assert agg["per_task_length"] == {"a": {512: 0.5, 1024: 1.0}, "b": {512: 0.25}}
    assert agg["per_task"] == {"a": 0.75, "b": 0.25}
    assert agg["per_length"] == {512: pytest.approx(0.375), 1024: 1.0}
    # b could not be built at 1024: it still weighs as much as a (the cell mean would be 0.583)
    assert agg["overall"] == pytest.approx((0.75 + 0.25) / 2)
    assert agg["overall_samples"] == pytest.approx(2.25 / 4)
    assert agg["counts"] == {"a": {512: 2, 1024: 1}, "b": {512: 1}}
    assert "ruler" not in agg
    assert math.isnan(aggregate([])["overall"])
    with_ruler = aggregate(results, ruler_tasks=("b", "c"))
    assert with_ruler["ruler"] == pytest.approx(0.25) and with_ruler["ruler_tasks"] == ["b"]
    assert math.isnan(aggregate(results, ruler_tasks=("c",))["ruler"])
