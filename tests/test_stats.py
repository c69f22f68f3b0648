"""Paired bootstrap intervals, rank correlation and null percentiles of evaluation.stats, against known answers."""

import numpy as np
import pytest

from hybrid_distill.evaluation.stats import (
    StatsError,
    mean_score,
    paired_difference,
    percentile_among,
    sample_scores,
    spearman,
)


def _scores(values: dict[tuple[str, int], list[float]]) -> dict:
    return {(task, length, i): v for (task, length), vs in values.items() for i, v in enumerate(vs)}


def test_sample_scores_reads_predictions_and_filters():
    results = {"recall": {"predictions": [
        {"task": "kv", "length": 1024, "index": 0, "score": 1.0},
        {"task": "kv", "length": 2048, "index": 0, "score": 0.0},
        {"task": "vt", "length": 1024, "index": 3, "score": 0.4},
    ]}}
    assert sample_scores(results) == {("kv", 1024, 0): 1.0, ("kv", 2048, 0): 0.0, ("vt", 1024, 3): 0.4}
    assert sample_scores(results, tasks=["kv"], lengths=[1024]) == {("kv", 1024, 0): 1.0}
    assert sample_scores({}) == {}


def test_constant_differences_give_a_point_interval_and_a_verdict():
    a = _scores({("kv", 1024): [1.0] * 8, ("vt", 1024): [0.5] * 8})
    b = _scores({("kv", 1024): [0.75] * 8, ("vt", 1024): [0.25] * 8})
    d = paired_difference([a], [b], resamples=200)
    assert d.mean == d.low == d.high == pytest.approx(0.25) and d.verdict == "a > b"
    assert d.samples == 16 and d.seeds == 1 and d.cells == {"kv@1024": 0.25, "vt@1024": 0.25}
    same = paired_difference([a], [a], resamples=200)
    assert same.mean == same.low == same.high == 0.0 and same.verdict == "undecided"
    assert paired_difference([b], [a], resamples=200).verdict == "a < b"


def test_resampling_keeps_each_cells_weight():
    # cell kv always differs by 1 (10 samples), cell vt never (30 samples): stratified resampling cannot move the mean
    a = _scores({("kv", 1024): [1.0] * 10, ("vt", 1024): [0.0] * 30})
    b = _scores({("kv", 1024): [0.0] * 10, ("vt", 1024): [0.0] * 30})
    d = paired_difference([a], [b], resamples=500)
    assert d.low == d.high == d.mean == pytest.approx(0.25)


def test_two_seeds_carry_the_run_to_run_variation():
    base = _scores({("kv", 1024): [0.5] * 20})
    better = _scores({("kv", 1024): [0.7] * 20})
    d = paired_difference([better, base], [base, base], resamples=2000)  # seed 0: +0.2, seed 1: 0
    assert d.mean == pytest.approx(0.1) and d.per_seed == pytest.approx([0.2, 0.0])
    assert d.low == pytest.approx(0.0) and d.high == pytest.approx(0.2)  # resampled seeds: 0, 0.1 or 0.2
    assert d.verdict == "undecided"


def test_interval_covers_a_zero_difference_about_as_often_as_its_level():
    rng = np.random.default_rng(1)
    covered = 0
    trials = 120
    for t in range(trials):
        a = {("kv", 1024, i): float(rng.random() < 0.6) for i in range(64)}
        b = {("kv", 1024, i): float(rng.random() < 0.6) for i in range(64)}
        d = paired_difference([a], [b], resamples=400, seed=t)
        covered += d.low <= 0.0 <= d.high
    assert 0.88 <= covered / trials <= 0.99


def test_only_shared_samples_are_compared_and_bad_pairings_are_refused():
    a = {("kv", 1024, 0): 1.0, ("kv", 1024, 1): 1.0}
    b = {("kv", 1024, 1): 0.0, ("kv", 1024, 2): 0.0}
    assert paired_difference([a], [b], resamples=50).samples == 1
    with pytest.raises(StatsError, match="paired seeds"):
        paired_difference([a, a], [b])
    with pytest.raises(StatsError, match="share no sample"):
        paired_difference([{("kv", 1024, 0): 1.0}], [{("vt", 1024, 0): 1.0}])
    assert mean_score([a, {("kv", 1024, 1): 0.0}]) == 0.5


def test_spearman_and_null_percentiles():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)  # ties share their mean rank
    with pytest.raises(StatsError):
        spearman([1], [2])
    assert percentile_among(0.5, [0.1, 0.2, 0.5, 0.9]) == pytest.approx(62.5)
    assert percentile_among(0.1, [0.2, 0.3], higher_is_better=False) == 100.0  # a lower KL than every random set
