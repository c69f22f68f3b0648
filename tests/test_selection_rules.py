"""Pure selection logic: budgets, rankings, selectors, early stopping, racing, plots."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from hybrid_distill.selection import plots
from hybrid_distill.selection.rules import (
    BudgetError,
    EarlyStopRule,
    adjacency_index,
    average_rank,
    budget_label,
    distance_regularized_ranking,
    distance_regularized_select,
    early_stop_index,
    expected_adjacency,
    jaccard,
    racing_survivors,
    ranking_from_scores,
    ranking_with_eliminations,
    resolve_budget,
    resolve_budgets,
    rolling_jaccard_stats,
    scores_from_ranking,
    smart_select,
    top_k,
    uniform_layers,
)

# ----------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget, num_layers, k",
    [
        (0.125, 36, 5),  # 4.5 rounds half up (paper: 12.5% of Qwen2.5-3B = 5 layers)
        (0.25, 36, 9),
        (1 / 3, 36, 12),
        (0.33, 36, 12),
        (0.5, 36, 18),
        (0.25, 4, 1),
        (0.35, 10, 4),  # 3.4999999999999996 in floating point, still half-up
        (0.125, 28, 4),  # 3.5 -> 4
        ("25%", 36, 9),
        (" 12.5 % ", 36, 5),
        ("0.25", 36, 9),
        ("5", 36, 5),
        (5, 36, 5),
        (1, 2, 1),
        (35, 36, 35),
        (np.int64(7), 28, 7),
        (np.float64(0.25), 28, 7),
    ],
)
def test_resolve_budget(budget, num_layers, k):
    assert resolve_budget(budget, num_layers) == k
    assert type(resolve_budget(budget, num_layers)) is int


@pytest.mark.parametrize("budget", [0, 1.0, 4, -1, -0.25, 0.01, True, np.bool_(True), "abc", "", None, math.nan, math.inf, "100%", "5.0"])
def test_resolve_budget_errors_name_budget_layers_and_range(budget):
    with pytest.raises(BudgetError) as info:
        resolve_budget(budget, 4)
    message = str(info.value)
    assert repr(budget) in message
    assert "4-layer" in message and "1..3" in message
    assert isinstance(info.value, ValueError)


def test_resolve_budget_needs_two_layers():
    with pytest.raises(BudgetError, match="at least 2 layers"):
        resolve_budget(1, 1)


def test_resolve_budgets_dedupes_in_order():
    assert resolve_budgets([0.25, "25%", 9, 5, 0.125, "5"], 36) == [9, 5]
    assert resolve_budgets("25%", 36) == [9]
    with pytest.raises(BudgetError):
        resolve_budgets([], 36)
    with pytest.raises(BudgetError, match="0.9"):
        resolve_budgets([0.25, 0.9999], 36)


def test_budget_label_is_stable():
    assert budget_label(0.25) == budget_label("25%") == budget_label("0.25") == "25%"
    assert budget_label(0.125) == "12.5%"
    assert budget_label(1 / 3) == "33.33%"
    assert budget_label(5) == budget_label("5") == budget_label(np.int64(5)) == "K=5"
    with pytest.raises(BudgetError):
        budget_label("abc")


# ----------------------------------------------------------------------------------------------
# Rankings
# ----------------------------------------------------------------------------------------------


def test_ranking_tie_break_and_nan_last():
    scores = {3: 1.0, 1: 1.0, 2: 2.0, 0: math.nan, 4: -math.inf, 5: 1.0}
    assert ranking_from_scores(scores) == [2, 1, 3, 5, 4, 0]
    assert top_k(ranking_from_scores(scores), 3) == [1, 2, 3]
    assert top_k([5, 0, 3], 0) == []
    with pytest.raises(ValueError):
        top_k([1, 2], 3)
    with pytest.raises(ValueError):
        top_k([1, 1, 2], 1)


def test_scores_from_ranking_round_trips():
    ranking = [4, 0, 3, 1, 2]
    assert ranking_from_scores(scores_from_ranking(ranking)) == ranking


def test_average_rank_hand_made():
    # position sums: 0 -> 0+1+2 = 3, 1 -> 1+0+0 = 1, 2 -> 2+3+1 = 6, 3 -> 3+2+3 = 8
    assert average_rank([[0, 1, 2, 3], [1, 0, 3, 2], [1, 2, 0, 3]]) == [1, 0, 2, 3]
    # 2 and 0 tie (mean position 0.5): the first ranking's order wins
    assert average_rank([[2, 0, 1], [0, 2, 1]]) == [2, 0, 1]
    assert average_rank([[0, 2, 1], [2, 0, 1]]) == [0, 2, 1]
    assert average_rank([[5, 7, 6]]) == [5, 7, 6]


@pytest.mark.parametrize("rankings", [[], [[0, 1, 2], [0, 1]], [[0, 1, 2], [0, 1, 3]], [[0, 1, 1], [0, 1, 1]]])
def test_average_rank_rejects_non_permutations(rankings):
    with pytest.raises(ValueError):
        average_rank(rankings)


def test_ranking_with_eliminations():
    survivors = {3: -1.0, 5: -0.5}
    eliminated = {1: (1, -0.1), 2: (2, -5.0), 4: (2, -3.0), 6: (2, -3.0)}
    # survivors by score, then round 2 (later = better) by score (tie -> lower layer), then round 1
    assert ranking_with_eliminations(survivors, eliminated) == [5, 3, 4, 6, 2, 1]
    with pytest.raises(ValueError):
        ranking_with_eliminations({1: 0.0}, {1: (1, 0.0)})


# ----------------------------------------------------------------------------------------------
# Uniform
# ----------------------------------------------------------------------------------------------


def test_uniform_layers_known_values():
    assert uniform_layers(36, 9) == [2, 6, 10, 14, 18, 22, 26, 30, 34]
    assert uniform_layers(36, 5) == [3, 10, 18, 25, 32]  # floor((i + 0.5) * 7.2)
    assert uniform_layers(28, 7, anchor="end") == [3, 7, 11, 15, 19, 23, 27]  # paper repo's Uniform set
    assert uniform_layers(4, 1) == [2]


def test_uniform_layers_spacing_for_all_budgets():
    for num_layers in range(2, 65):
        for k in range(1, num_layers):
            for anchor in ("center", "end"):
                layers = uniform_layers(num_layers, k, anchor=anchor)
                assert len(layers) == len(set(layers)) == k
                assert layers == sorted(layers)
                assert 0 <= layers[0] and layers[-1] < num_layers
                gaps = [b - a for a, b in itertools.pairwise(layers)]
                if gaps:
                    assert max(gaps) - min(gaps) <= 1
                    assert set(gaps) <= {num_layers // k, math.ceil(num_layers / k)}
            assert uniform_layers(num_layers, k) == [math.floor((i + 0.5) * num_layers / k) for i in range(k)]
    with pytest.raises(ValueError):
        uniform_layers(8, 0)
    with pytest.raises(ValueError):
        uniform_layers(8, 2, anchor="middle")


# ----------------------------------------------------------------------------------------------
# Distance-regularized (Appendix E)
# ----------------------------------------------------------------------------------------------


def test_distance_penalty_hand_computed():
    scores = {0: 0.0, 1: 10.0, 2: 9.5, 3: 1.0, 4: 0.0, 5: 9.0}
    # Step 1 (S empty): layer 1 (10.0). Step 2 with lam=2, sigma=1:
    #   layer 2: 9.5 - 2*exp(-1) = 8.7642;  layer 5: 9.0 - 2*exp(-4) = 8.9634  -> layer 5 wins.
    assert distance_regularized_select(scores, 2, lam=2.0, sigma=1.0) == [1, 5]
    # lam=1: layer 2: 9.5 - exp(-1) = 9.1321 > layer 5: 9.0 - exp(-4) = 8.9817 -> plain top-2.
    assert distance_regularized_select(scores, 2, lam=1.0, sigma=1.0) == [1, 2]
    # sigma=0.2 shrinks the penalty on layer 2 to 2*exp(-5) = 0.0135 -> 9.4865 > layer 5.
    assert distance_regularized_select(scores, 2, lam=2.0, sigma=0.2) == [1, 2]
    # Step 3 (lam=2, sigma=1, S={1,5}): layer 2: 9.5 - 2*(e^-1 + e^-3) = 8.6646; layer 3: 1 - 2*(e^-2 + e^-2) < 0
    assert distance_regularized_ranking(scores, 2.0, 1.0)[:3] == [1, 5, 2]


def test_distance_lambda_zero_is_top_k():
    rng = random.Random(1)
    for _ in range(20):
        scores = {l: rng.choice([rng.random(), 0.5]) for l in range(12)}
        ranking = ranking_from_scores(scores)
        assert distance_regularized_ranking(scores, 0.0, 1.0) == ranking
        for k in range(13):
            assert distance_regularized_select(scores, k, 0.0, 2.0) == top_k(ranking, k)
        order = distance_regularized_ranking(scores, 0.05, 1.0)
        assert sorted(order) == list(range(12))
        assert all(distance_regularized_select(scores, k, 0.05, 1.0) == sorted(order[:k]) for k in range(13))


def test_distance_rejects_bad_parameters():
    with pytest.raises(ValueError):
        distance_regularized_select({0: 1.0, 1: 0.0}, 1, lam=-1.0, sigma=1.0)
    with pytest.raises(ValueError):
        distance_regularized_select({0: 1.0, 1: 0.0}, 1, lam=1.0, sigma=0.0)
    with pytest.raises(ValueError):
        distance_regularized_select({0: 1.0, 1: 0.0}, 3, lam=1.0, sigma=1.0)


# ----------------------------------------------------------------------------------------------
# SMART
# ----------------------------------------------------------------------------------------------


def _smart_brute_force(score, num_layers, k, quantile):
    window = math.ceil(num_layers / k)
    top = set(ranking_from_scores(dict(enumerate(score)))[: math.floor(quantile * num_layers)])
    best = None
    for combo in itertools.combinations(range(num_layers), k):
        gaps = [b - a for a, b in itertools.pairwise(combo)]
        if max(gaps) - min(gaps) > 1 or combo[0] >= window or combo[-1] < num_layers - window:
            continue
        if (0 in top and combo[0] != 0) or (num_layers - 1 in top and combo[-1] != num_layers - 1):
            continue
        total = sum(score[i] for i in combo)
        if best is None or total > best[0] or (total == best[0] and list(combo) < best[1]):
            best = (total, list(combo))
    return best[1]


def test_smart_is_the_best_near_uniform_terminal_set():
    rng = random.Random(0)
    for _ in range(150):
        num_layers = rng.randint(3, 10)
        k = rng.randint(2, num_layers - 1)
        quantile = rng.choice([0.0, 0.25, 0.5, 1.0])
        score = [float(rng.randint(0, 4)) for _ in range(num_layers)]
        got = smart_select(dict(enumerate(score)), num_layers, k, terminal_quantile=quantile)
        assert got == _smart_brute_force(score, num_layers, k, quantile)


def test_smart_structure_on_realistic_depths():
    rng = random.Random(3)
    for num_layers, k in [(36, 5), (36, 9), (36, 12), (36, 18), (28, 4), (28, 7), (28, 9), (28, 14), (28, 27)]:
        scores = {l: rng.random() for l in range(num_layers)}
        layers = smart_select(scores, num_layers, k)
        window = math.ceil(num_layers / k)
        gaps = [b - a for a, b in itertools.pairwise(layers)]
        assert len(set(layers)) == k and layers == sorted(layers)
        assert max(gaps) - min(gaps) <= 1  # near-uniform: at most one layer of slack between gaps
        assert layers[0] < window and layers[-1] >= num_layers - window  # one pick per terminal block
        top_half = set(ranking_from_scores(scores)[: num_layers // 2])
        if 0 in top_half:
            assert layers[0] == 0
        if num_layers - 1 in top_half:
            assert layers[-1] == num_layers - 1


def test_smart_terminal_preservation():
    num_layers, k = 12, 4
    scores = {l: 0.0 for l in range(num_layers)}
    scores.update({0: 5.0, 11: 5.0, 4: 1.0, 8: 1.0})
    assert smart_select(scores, num_layers, k) == [0, 4, 8, 11]
    # A low-scoring first layer is not forced in; the anchor moves to the best of the first block.
    scores.update({0: -5.0, 2: 3.0, 5: 1.0})
    assert smart_select(scores, num_layers, k)[0] == 2
    assert smart_select(scores, num_layers, k) == [2, 5, 8, 11]
    # terminal_quantile=1 always keeps both ends; 0 never forces them.
    assert smart_select(scores, num_layers, k, terminal_quantile=1.0)[::3] == [0, 11]
    assert smart_select(scores, num_layers, k, terminal_quantile=0.0) == [2, 5, 8, 11]


def test_smart_reproduces_published_shapes():
    # Qwen2.5-3B-like: layer 0 insensitive, every 4th layer from 3 sensitive -> the repo's [3, 7, ..., 35]
    scores = {l: (1.0 if l % 4 == 3 else 0.0) for l in range(36)}
    scores[0] = -1.0
    assert smart_select(scores, 36, 9) == list(range(3, 36, 4))
    # Llama-3.2-3B-like: last layer insensitive, layer 26 sensitive -> [0, 5, 10, 14, 18, 22, 26]
    scores = {l: 0.0 for l in range(28)}
    scores.update({0: 5.0, 26: 5.0, 27: -5.0, 5: 1.0, 10: 1.0})
    assert smart_select(scores, 28, 7) == [0, 5, 10, 14, 18, 22, 26]


def test_smart_edge_cases():
    scores = {0: 0.1, 1: 0.9, 2: math.nan, 3: 0.2}
    assert smart_select(scores, 4, 1) == [1]
    assert smart_select({0: 1.0, 1: 2.0, 3: 0.5}, 4, 3) in ([0, 1, 3], [0, 2, 3], [1, 2, 3], [0, 1, 2])  # layer 2 missing
    assert 2 not in smart_select({0: 1.0, 1: 2.0, 2: math.nan, 3: 0.5, 4: 0.0}, 5, 3, terminal_quantile=0.0)
    for bad in ({"k": 0}, {"k": 4}, {"k": 2, "terminal_quantile": 1.5}, {"k": 2, "terminal_window": 0}):
        with pytest.raises(ValueError):
            smart_select(scores, 4, **bad)
    with pytest.raises(ValueError):
        smart_select({9: 1.0}, 4, 2)


# ----------------------------------------------------------------------------------------------
# Set statistics
# ----------------------------------------------------------------------------------------------


def test_jaccard_and_adjacency():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert jaccard([], []) == 1.0
    assert jaccard([1], []) == 0.0
    assert adjacency_index([3, 4, 5, 9, 10, 20]) == 3  # (3,4), (4,5), (9,10)
    assert adjacency_index([0, 2, 4]) == 0
    assert adjacency_index([]) == 0
    # the paper's random baselines for L=36 (Appendix D: 2.0, 3.68, 8.49)
    assert expected_adjacency(9, 36) == 2.0
    assert expected_adjacency(12, 36) == pytest.approx(3.667, abs=0.02)
    assert expected_adjacency(18, 36) == pytest.approx(8.5)


# ----------------------------------------------------------------------------------------------
# Early stopping
# ----------------------------------------------------------------------------------------------

BASE = list(range(8))  # K=9: an 8-layer backbone plus one contested slot


def _slot(x):
    return BASE + [x]


def _missing(a):
    return [l for l in range(10) if l != a]


def _assert_stops_at(sets, k, expected, blocked_by):
    rule = EarlyStopRule()
    stats = rolling_jaccard_stats(sets, window=rule.window)
    assert rule.first_stop(sets, k) == expected == early_stop_index(sets, k)
    assert all(rule.conditions(stats[expected], k).values())
    before = rule.conditions(stats[expected - 1], k)
    assert [name for name, ok in before.items() if not ok] == [blocked_by]


def test_early_stop_blocked_only_by_jaccard():
    # t=9 window: 4 x 8, 6 x 9 -> 24 pairs at J=0.8 of 45 -> mean 0.893 < 0.9; backbone 8, union 10 ok.
    # t=10 window: 3 x 8, 7 x 9 -> 21 pairs -> mean 0.907.
    sets = [_slot(8)] * 4 + [_slot(9)] * 7
    _assert_stops_at(sets, 9, 10, "jaccard")


def test_early_stop_blocked_only_by_union():
    # t=9 window: slots {9, 8 x 8, 10} -> union 11 > K+1 (mean J 0.924, backbone 8 ok); t=10 drops slot 9.
    sets = [_slot(9)] + [_slot(8)] * 8 + [_slot(10), _slot(8)]
    _assert_stops_at(sets, 9, 10, "union")


def test_early_stop_blocked_only_by_backbone():
    # sets = {0..9} minus one layer. t=9 window misses 1, 0 (x8), 2 -> backbone 7 < K-1 while union 10 and
    # mean J 0.924 are fine; t=10 drops the set missing 1 -> backbone 8.
    sets = [_missing(1)] + [_missing(0)] * 8 + [_missing(2), _missing(0)]
    _assert_stops_at(sets, 9, 10, "backbone")


def test_early_stop_needs_a_full_window():
    sets = [_slot(8)] * 15
    assert early_stop_index(sets, 9) == 9
    assert early_stop_index(sets[:9], 9) is None
    assert early_stop_index(sets, 9, window=3) == 2
    alternating = [_slot(8), _slot(9)] * 20  # mean J 0.889 forever
    assert early_stop_index(alternating, 9) is None
    assert early_stop_index(alternating, 9, min_jaccard=0.85) == 9
    # backbone 8 at t=9 is enough with the paper's slack of 1; with no slack the window must agree fully
    slack = [_missing(1)] + [_missing(0)] * 10
    assert EarlyStopRule().first_stop(slack, 9) == 9
    assert EarlyStopRule(backbone_slack=0).first_stop(slack, 9) == 10


def test_rolling_jaccard_stats_fields():
    sets = [[0, 1], [0, 2], [0, 2], [1, 2]]
    stats = rolling_jaccard_stats(sets, window=3)
    assert [s["jaccard_mean"] for s in stats[:2]] == [None, None]
    assert [s["full"] for s in stats] == [False, False, True, True]
    assert stats[2]["jaccard_mean"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)
    assert stats[2]["backbone"] == [0] and stats[2]["union"] == [0, 1, 2]
    assert stats[3]["backbone"] == [2]
    assert [s["changed"] for s in stats] == [False, True, False, True]
    assert [s["index"] for s in stats] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        rolling_jaccard_stats(sets, window=0)
    with pytest.raises(ValueError):
        EarlyStopRule(min_jaccard=1.5)


# ----------------------------------------------------------------------------------------------
# Racing
# ----------------------------------------------------------------------------------------------


def test_racing_keeps_fraction_and_at_least_k_plus_one():
    losses = {l: float(l) for l in range(10)}  # lower = better
    assert racing_survivors(losses, 3) == {0, 1, 2, 3, 4}  # ceil(0.5 * 10) = 5 = K + 2
    assert racing_survivors(losses, 3, keep_fraction=0.1) == {0, 1, 2, 3, 4}  # min_keep defaults to K + 2
    assert racing_survivors(losses, 3, keep_fraction=0.1, min_keep=1) == {0, 1, 2, 3}  # never below K + 1
    assert racing_survivors(losses, 2, keep_fraction=0.7) == set(range(7))
    assert racing_survivors({0: 1.0, 1: 2.0, 2: 3.0}, 3) == {0, 1, 2}  # never more than n
    assert racing_survivors({}, 3) == set()
    shuffled = {7: 0.3, 2: 0.1, 9: 0.2, 4: 0.9, 1: 0.5}
    assert racing_survivors(shuffled, 1, keep_fraction=0.2, min_keep=0) == {2, 9}


def test_racing_margin_band():
    losses = {0: 1.0, 1: 2.0, 2: 3.0, 3: 3.05, 4: 3.2, 5: 3.29, 6: 3.31, 7: 5.0}
    assert racing_survivors(losses, 3, keep_fraction=0.1, min_keep=4) == {0, 1, 2, 3}
    # K-th best = 3.0; margin 0.1 keeps loss <= 3.3 -> adds 4 and 5, not 6
    assert racing_survivors(losses, 3, keep_fraction=0.1, min_keep=4, margin=0.1) == {0, 1, 2, 3, 4, 5}
    # negative losses (importance kept as -KL): the band still widens, kth + margin * |kth|
    neg = {l: -v for l, v in {0: 9.0, 1: 8.0, 2: 3.0, 3: 2.9, 4: 2.75, 5: 2.6}.items()}
    assert racing_survivors(neg, 3, keep_fraction=0.1, min_keep=4, margin=0.1) == {0, 1, 2, 3, 4}
    # NaN losses rank last and are never inside the band
    assert racing_survivors({0: 1.0, 1: math.nan, 2: 2.0, 3: 1.5}, 1, keep_fraction=0.1, min_keep=2, margin=10.0) == {0, 2, 3}


def test_racing_rejects_bad_parameters():
    for kwargs in ({"k": 0}, {"k": 2, "keep_fraction": 0.0}, {"k": 2, "keep_fraction": 1.5}, {"k": 2, "margin": -0.1}):
        with pytest.raises(ValueError):
            racing_survivors({0: 1.0}, **kwargs)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------


def _assert_png(path):
    assert path.exists() and path.stat().st_size > 500
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    from hybrid_distill.fileio import DEFAULT_FILE_MODE

    assert path.stat().st_mode & 0o777 == DEFAULT_FILE_MODE  # not mkstemp's 0600


def test_plots_write_png_files(tmp_path):
    scores = {l: -float((l * 7) % 5) for l in range(12)}
    scores[3] = math.nan
    _assert_png(plots.plot_importance(scores, tmp_path / "a" / "importance.png", selected=[0, 5, 7], title="GA-S2"))
    sets = {"12.5%": [4, 9], "25%": [1, 4, 9], "K=6": [0, 1, 4, 5, 9, 11]}
    _assert_png(plots.plot_selected_layers(sets, 12, tmp_path / "selected.png"))
    seq = [[0, 1, 2]] * 3 + [[0, 1, 3]] * 9
    stats = rolling_jaccard_stats(seq, window=4)
    stop = early_stop_index(seq, 3, window=4)
    tokens = [1000 * (i + 1) for i in range(len(seq))]
    _assert_png(plots.plot_stability(stats, 3, tmp_path / "stability.png", stop_index=stop, tokens=tokens))
    _assert_png(plots.plot_stability(stats, 3, tmp_path / "stability_plain.png"))
    kls = {l: [1.0 / (t + 1) + 0.01 * l for t in range(6 if l < 4 else 2)] for l in range(8)}
    out = plots.plot_score_trajectories(kls, tmp_path / "kl.png", tokens=tokens)
    _assert_png(out)
    before = out.stat().st_mtime_ns
    assert plots.plot_score_trajectories(kls, out) == out  # overwrite in place
    _assert_png(out)
    assert out.stat().st_mtime_ns >= before
    with pytest.raises(ValueError):
        plots.plot_stability(stats, 3, tmp_path / "bad.png", tokens=[1, 2])
