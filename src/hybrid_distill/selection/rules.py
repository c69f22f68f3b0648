"""Pure selection logic: budgets, rankings, the rule-based selectors, stability and racing.

Nothing here trains or loads a model; every function works on plain ints and floats.

Conventions used throughout:

* layers are 0-based ints;
* an *importance score* is "higher = more important" (GA-S2 uses ``-held-out KL``);
* a *loss* (racing) is "lower = more important";
* ties are broken deterministically by the lower layer index;
* a NaN score ranks after every real score;
* returned layer sets are sorted lists of ints; rankings are lists, most important first.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Literal

from ..errors import HybridDistillError

__all__ = [
    "BudgetError",
    "EarlyStopRule",
    "adjacency_index",
    "average_rank",
    "budget_label",
    "distance_regularized_ranking",
    "distance_regularized_select",
    "early_stop_index",
    "expected_adjacency",
    "jaccard",
    "racing_survivors",
    "ranking_from_scores",
    "ranking_with_eliminations",
    "resolve_budget",
    "resolve_budgets",
    "rolling_jaccard_stats",
    "scores_from_ranking",
    "smart_select",
    "top_k",
    "uniform_layers",
]

_ROUNDING_SLACK = 1e-9  # so that e.g. 0.35 * 10 (= 3.4999999999999996) still rounds half up to 4


# ----------------------------------------------------------------------------------------------
# Budgets
# ----------------------------------------------------------------------------------------------


class BudgetError(HybridDistillError, ValueError):
    """A softmax-layer budget that cannot be turned into a valid K for the model."""


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # also numpy.bool_


def _parse_budget(budget: Any) -> int | float:
    """An int count or a float ratio (strings parsed: "5" -> 5, "0.25" / "25%" -> 0.25)."""
    if _is_bool(budget):
        raise BudgetError(f"budget {budget!r} is a bool, not a layer count or ratio")
    if isinstance(budget, numbers.Integral):
        return int(budget)
    if isinstance(budget, numbers.Real):
        return float(budget)
    if isinstance(budget, str):
        text = budget.strip()
        try:
            if text.endswith("%"):
                return float(text[:-1].strip()) / 100.0
            try:
                return int(text)
            except ValueError:
                return float(text)
        except ValueError:
            pass
    raise BudgetError(f"cannot read budget {budget!r} as a layer count, ratio or percentage")


def resolve_budget(budget: float | str, num_layers: int) -> int:
    """Number of softmax layers K for ``budget``: an int count, a float ratio in (0, 1), or a string
    ("5", "0.25", "25%"). Ratios round half up, ``floor(r * L + 0.5)`` (12.5% of 36 -> 5).

    Raises BudgetError unless ``1 <= K <= num_layers - 1`` (a hybrid keeps at least one layer of each kind).
    """
    if _is_bool(num_layers) or not isinstance(num_layers, numbers.Integral) or num_layers < 2:
        raise BudgetError(f"a hybrid needs a model with at least 2 layers, got num_layers={num_layers!r}")
    num_layers = int(num_layers)
    lo = 0.5 / num_layers
    valid = (
        f"valid for a {num_layers}-layer model: K = 1..{num_layers - 1} softmax layers, i.e. an int count "
        f"1..{num_layers - 1}, a ratio from {lo:.4g} to below {1 - lo:.4g} (e.g. 0.25) or a percentage string (e.g. '25%')"
    )
    try:
        value = _parse_budget(budget)
    except BudgetError as exc:
        raise BudgetError(f"{exc}; {valid}") from None
    if isinstance(value, int):
        k = value
        if not 1 <= k <= num_layers - 1:
            raise BudgetError(f"budget {budget!r} asks for K={k} softmax layers; {valid}")
        return k
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise BudgetError(f"budget {budget!r} is neither an int count nor a ratio in (0, 1); {valid}")
    k = math.floor(value * num_layers + 0.5 + _ROUNDING_SLACK)
    if not 1 <= k <= num_layers - 1:
        raise BudgetError(f"budget {budget!r} rounds to K={k} softmax layers; {valid}")
    return k


def resolve_budgets(budgets: Iterable[float | str] | float | str, num_layers: int) -> list[int]:
    """``resolve_budget`` for each budget; duplicates (e.g. 0.25 and "25%") are dropped, first order kept."""
    if isinstance(budgets, (str, numbers.Number)):
        budgets = [budgets]
    ks: list[int] = []
    for budget in budgets:
        k = resolve_budget(budget, num_layers)
        if k not in ks:
            ks.append(k)
    if not ks:
        raise BudgetError("no budget given: pass at least one count (e.g. 5) or ratio (e.g. 0.25)")
    return ks


def budget_label(budget: float | str) -> str:
    """Stable report label: ``"25%"`` for 0.25 / "0.25" / "25%", ``"12.5%"`` for 0.125, ``"K=5"`` for 5 / "5"."""
    value = _parse_budget(budget)
    if isinstance(value, int):
        return f"K={value}"
    if not math.isfinite(value):
        raise BudgetError(f"budget {budget!r} is not a finite ratio")
    return f"{round(value * 100.0, 2):g}%"


# ----------------------------------------------------------------------------------------------
# Rankings
# ----------------------------------------------------------------------------------------------


def _score_key(layer: int, score: float) -> tuple[bool, float, int]:
    nan = math.isnan(score)
    return (nan, 0.0 if nan else -score, layer)


def ranking_from_scores(scores: Mapping[int, float]) -> list[int]:
    """Layers by importance, most important first; NaN scores last; ties -> lower layer first."""
    return [layer for layer, _ in sorted(((int(l), float(s)) for l, s in scores.items()), key=lambda x: _score_key(*x))]


def top_k(ranking: Sequence[int], k: int) -> list[int]:
    """The first ``k`` layers of ``ranking``, sorted by index."""
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"ranking has repeated layers: {list(ranking)}")
    if not 0 <= k <= len(ranking):
        raise ValueError(f"k={k} is outside 0..{len(ranking)} for a ranking of {len(ranking)} layers")
    return sorted(int(x) for x in ranking[:k])


def scores_from_ranking(ranking: Sequence[int]) -> dict[int, float]:
    """Rank scores ``n - position`` (higher = more important) that reproduce ``ranking``."""
    n = len(ranking)
    return {int(layer): float(n - pos) for pos, layer in enumerate(ranking)}


def average_rank(rankings: Sequence[Sequence[int]]) -> list[int]:
    """AVG-S1/AVG-S2: order layers by their mean position over ``rankings`` (each a permutation of the
    same layers); ties keep the first ranking's order."""
    if not rankings:
        raise ValueError("average_rank needs at least one ranking")
    first = [int(x) for x in rankings[0]]
    layers = set(first)
    if len(layers) != len(first):
        raise ValueError(f"ranking 0 repeats layers: {first}")
    total = {layer: 0 for layer in first}
    for i, ranking in enumerate(rankings):
        ranking = [int(x) for x in ranking]
        if len(ranking) != len(first) or set(ranking) != layers:
            raise ValueError(f"ranking {i} is not a permutation of ranking 0's layers {sorted(layers)}: {ranking}")
        for pos, layer in enumerate(ranking):
            total[layer] += pos
    first_pos = {layer: pos for pos, layer in enumerate(first)}
    return sorted(first, key=lambda layer: (total[layer], first_pos[layer]))  # sum = mean * count


def ranking_with_eliminations(
    survivor_scores: Mapping[int, float],
    eliminated: Mapping[int, tuple[int, float]],
) -> list[int]:
    """Full ranking after racing: survivors by final score, then eliminated candidates by elimination
    round (later = better) and, within a round, by the score they had when dropped.

    ``eliminated`` maps layer -> (round it was dropped in, its last importance score).
    """
    overlap = set(survivor_scores) & set(eliminated)
    if overlap:
        raise ValueError(f"layers {sorted(overlap)} are both survivors and eliminated")
    dropped = sorted(
        ((int(layer), int(rnd), float(score)) for layer, (rnd, score) in eliminated.items()),
        key=lambda x: (-x[1],) + _score_key(x[0], x[2]),
    )
    return ranking_from_scores(survivor_scores) + [layer for layer, _, _ in dropped]


# ----------------------------------------------------------------------------------------------
# Rule-based selectors
# ----------------------------------------------------------------------------------------------


def uniform_layers(num_layers: int, k: int, anchor: Literal["center", "end"] = "center") -> list[int]:
    """K layers evenly spread over depth: cut the L layers into K equal blocks of L/K and take one
    layer per block.

    ``anchor="center"`` (default) takes each block's centre, ``floor((i + 0.5) * L / K)`` for
    i = 0..K-1 (L=36, K=9 -> 2, 6, ..., 34); ``anchor="end"`` takes each block's last layer,
    ``floor((i + 1) * L / K) - 1`` (L=28, K=7 -> 3, 7, ..., 27, the paper repository's Uniform sets).
    Consecutive layers are floor(L/K) or ceil(L/K) apart, so the K layers are distinct for 1 <= K <= L.
    """
    if not 1 <= k <= num_layers:
        raise ValueError(f"uniform_layers needs 1 <= k <= num_layers, got k={k}, num_layers={num_layers}")
    if anchor == "center":
        return [((2 * i + 1) * num_layers) // (2 * k) for i in range(k)]
    if anchor == "end":
        return [((i + 1) * num_layers) // k - 1 for i in range(k)]
    raise ValueError(f"anchor must be 'center' or 'end', got {anchor!r}")


def random_layer_sets(num_layers: int, k: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` random K-sets (the null distribution of layer sets): set ``r`` depends only on
    ``(seed, num_layers, k, r)``, so adding budgets or sets keeps the earlier ones."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"random_layer_sets needs 1 <= k <= num_layers, got k={k}, num_layers={num_layers}")
    out = []
    for r in range(count):
        digest = hashlib.sha256(repr(("random-layer-set", int(seed), int(num_layers), int(k), r)).encode()).digest()
        out.append(sorted(random.Random(int.from_bytes(digest[:8], "big")).sample(range(num_layers), k)))
    return out


def _greedy_distance_order(scores: Mapping[int, float], lam: float, sigma: float, count: int) -> list[int]:
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    remaining = {int(l): float(s) for l, s in scores.items()}
    if not 0 <= count <= len(remaining):
        raise ValueError(f"k={count} is outside 0..{len(remaining)} for {len(remaining)} scored layers")
    penalty = {layer: 0.0 for layer in remaining}  # sum_{j in S} exp(-|l - j| / sigma)
    order: list[int] = []
    for _ in range(count):
        pick = min(remaining, key=lambda l: _score_key(l, remaining[l] - lam * penalty[l]))
        order.append(pick)
        del remaining[pick]
        for layer in remaining:
            penalty[layer] += math.exp(-abs(layer - pick) / sigma)
    return order


def distance_regularized_select(scores: Mapping[int, float], k: int, lam: float, sigma: float) -> list[int]:
    """Appendix E: greedily add argmax over unselected l of ``I(l) - lam * sum_{j in S} exp(-|l - j| / sigma)``
    until K layers are chosen (sorted result). ``lam=0`` is plain top-K."""
    return sorted(_greedy_distance_order(scores, lam, sigma, k))


def distance_regularized_ranking(scores: Mapping[int, float], lam: float, sigma: float) -> list[int]:
    """The full greedy pick order of ``distance_regularized_select`` (its first K are the K-layer set)."""
    return _greedy_distance_order(scores, lam, sigma, len(scores))


def _comparable_scores(scores: Mapping[int, float], num_layers: int) -> list[float]:
    """A finite score per layer; NaN or missing layers get a value below any sum of real scores."""
    values = {int(l): float(s) for l, s in scores.items()}
    bad = sorted(l for l in values if not 0 <= l < num_layers)
    if bad:
        raise ValueError(f"scores name layers {bad} outside 0..{num_layers - 1}")
    finite = [s for s in values.values() if math.isfinite(s)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    floor = lo - (hi - lo + 1.0) * (num_layers + 1)
    out = []
    for layer in range(num_layers):
        s = values.get(layer, math.nan)
        out.append(s if math.isfinite(s) else (floor if s != math.inf else hi + 1.0))
    return out


def _best_lattice(score: list[float], start: int, end: int, k: int) -> tuple[float, list[int]]:
    """Best-scoring K layers from ``start`` to ``end`` (both kept) whose K-1 gaps are g or g+1,
    g = (end - start) // (k - 1); ties -> lexicographically smallest layer list."""
    steps = k - 1
    g = (end - start) // steps
    # best[i][p]: best total of layers i..k-1 given layer i sits at p (only positions that can reach
    # ``end`` are stored); step[i][p]: the next layer on that best path (p + g preferred on ties).
    best: list[dict[int, float]] = [{} for _ in range(k)]
    step: list[dict[int, int]] = [{} for _ in range(k)]
    best[steps][end] = score[end]
    for i in range(steps - 1, -1, -1):
        for p in range(start + i * g, end - (steps - i) * g + 1):
            options = [q for q in (p + g, p + g + 1) if q in best[i + 1]]
            if options:
                q = max(options, key=lambda q: (best[i + 1][q], -q))
                best[i][p] = score[p] + best[i + 1][q]
                step[i][p] = q
    path = [start]
    for i in range(steps):
        path.append(step[i][path[-1]])
    return best[0][start], path


def smart_select(
    scores: Mapping[int, float],
    num_layers: int,
    k: int,
    terminal_quantile: float = 0.5,
    terminal_window: int | None = None,
) -> list[int]:
    """SMART (Zebra-Llama, Yang et al. 2025): sensitivity-aware, terminal-preserving, near-uniform.

    ``scores`` are one-swap KL sensitivities (higher = restoring that layer helps more). Version
    implemented: the *near-uniform lattice* reading. The set is K layers ``a = p_0 < ... < p_{K-1} = b``
    whose K-1 consecutive gaps are all g or g+1 (``g = (b - a) // (K - 1)``), with

    * terminal preservation: ``a`` lies in the first and ``b`` in the last ``terminal_window`` layers
      (default ``ceil(L / K)``, one uniform block); the very first / last layer is *forced* in when its
      score is in the top ``terminal_quantile`` fraction of all L scores;
    * among all such near-uniform candidates, the one with the largest total sensitivity is returned
      (exact dynamic programme; ties -> lexicographically smallest set). K = 1 returns the best layer.

    Why this version: the Zebra-Llama text available here only describes the sensitivity score, but
    every published SMART set has exactly this shape - the 9 sets in the KL-guided paper's own
    configs (github.com/fla-org/hybrid-distillation, ``configs/*_smart``: e.g. Llama-3.2-3B K=7
    [0,5,10,14,18,22,26], Qwen2.5-3B K=9 [3,7,...,35]) and the 3 released Zebra-Llama sets
    (AMD-AGI/AMD-Hybrid-Models: [0,5,10,14], [0,5,10,16,21,26], [0,4,8,...,25,30]): an anchor in each
    terminal block, gaps differing by at most 1. A "best layer per depth bin" fill can place two
    layers next to each other and would not reproduce them. Missing or NaN scores count as least
    sensitive.
    """
    if _is_bool(k) or not 1 <= k <= num_layers - 1:
        raise ValueError(f"smart_select needs 1 <= k <= num_layers - 1, got k={k}, num_layers={num_layers}")
    if not 0.0 <= terminal_quantile <= 1.0:
        raise ValueError(f"terminal_quantile must be in [0, 1], got {terminal_quantile}")
    window = math.ceil(num_layers / k) if terminal_window is None else int(terminal_window)
    if not 1 <= window <= num_layers:
        raise ValueError(f"terminal_window must be in 1..{num_layers}, got {terminal_window}")
    score = _comparable_scores(scores, num_layers)
    if k == 1:
        return [max(range(num_layers), key=lambda l: (score[l], -l))]
    ranking = ranking_from_scores(dict(enumerate(score)))
    top = set(ranking[: math.floor(terminal_quantile * num_layers + _ROUNDING_SLACK)])
    starts = [0] if 0 in top else list(range(window))
    ends = [num_layers - 1] if num_layers - 1 in top else list(range(num_layers - window, num_layers))
    best: tuple[float, list[int]] | None = None
    for a in starts:
        for b in ends:
            if b - a < k - 1:  # gaps must be >= 1
                continue
            total, path = _best_lattice(score, a, b, k)
            if best is None or total > best[0] or (total == best[0] and path < best[1]):
                best = (total, path)
    assert best is not None  # (0, L-1) is always admissible since K <= L - 1
    return best[1]


# ----------------------------------------------------------------------------------------------
# Set statistics
# ----------------------------------------------------------------------------------------------


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|A & B| / |A | B| (1.0 for two empty sets)."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


def adjacency_index(layers: Iterable[int]) -> int:
    """Appendix D's A_K: number of selected i whose neighbour i+1 is also selected."""
    s = set(layers)
    return sum(1 for i in s if i + 1 in s)


def expected_adjacency(k: int, num_layers: int) -> float:
    """Random-subset baseline for the adjacency index, K(K-1)/L."""
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    return k * (k - 1) / num_layers


# ----------------------------------------------------------------------------------------------
# Noise floor: candidates that restore no layer, trained on the candidates' schedule
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseFloor:
    """One snapshot's noise floor. ``null_mean`` / ``null_std``: mean and sample standard deviation of the null
    candidates' held-out KL (std None with fewer than 2); ``delta``: each layer's KL minus ``null_mean``
    (negative = restoring the layer lowers the KL); ``spread``: standard deviation of the layers' KLs;
    ``snr``: ``spread / null_std`` (None without a null std, inf for a zero one)."""

    null_mean: float
    null_std: float | None
    delta: dict[int, float]
    spread: float
    snr: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"null_mean": self.null_mean, "null_std": self.null_std, "delta": {str(k): v for k, v in self.delta.items()},
                "spread": self.spread, "snr": self.snr}


def _std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def noise_floor(layer_kls: Mapping[int, float], null_kls: Sequence[float]) -> NoiseFloor:
    """The `NoiseFloor` of one snapshot from the layer candidates' KLs and the null candidates' KLs."""
    if not null_kls:
        raise ValueError("noise_floor needs at least one null candidate's KL")
    mean = sum(null_kls) / len(null_kls)
    std = _std(list(null_kls))
    spread = _std(list(layer_kls.values())) or 0.0
    snr = None if std is None else (spread / std if std > 0 else math.inf)
    return NoiseFloor(mean, std, {int(k): float(v) - mean for k, v in layer_kls.items()}, spread, snr)


def boundary_resolved(layer_kls: Mapping[int, float], k: int, null_std: float | None, sigmas: float = 2.0) -> bool | None:
    """Whether the top-K set (lowest KLs) is separated from the rest by more than ``sigmas`` null standard
    deviations: the gap between the K-th and the (K+1)-th lowest KL exceeds ``sigmas * null_std``. None
    without a null std or with K >= the number of layers (no layer outside the set)."""
    if null_std is None or k >= len(layer_kls):
        return None
    ordered = sorted(float(v) for v in layer_kls.values())
    return ordered[k] - ordered[k - 1] > sigmas * null_std


def mean_and_spread(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation or None for one value) — a candidate's score over seeds."""
    return sum(values) / len(values), _std(list(values))


# ----------------------------------------------------------------------------------------------
# Early stopping (Appendix B, rolling-Jaccard rule)
# ----------------------------------------------------------------------------------------------


def _mean_pairwise_jaccard(sets: Sequence[frozenset[int]]) -> float:
    pairs = list(combinations(sets, 2))
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 1.0


def rolling_jaccard_stats(sets: Sequence[Sequence[int]], window: int = 10) -> list[dict[str, Any]]:
    """Per snapshot t, stats of the window of the last ``window`` top-K sets ending at t.

    Keys: ``index`` (t), ``full`` (a whole window exists), ``jaccard_mean`` (mean pairwise Jaccard
    over the window; None until ``full``), ``backbone`` / ``union`` (sorted intersection / union of the
    sets in the window - partial while not ``full``), ``changed`` (S_t != S_{t-1}; False at t=0).
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    frozen = [frozenset(int(x) for x in s) for s in sets]
    stats = []
    for t, current in enumerate(frozen):
        win = frozen[max(0, t - window + 1) : t + 1]
        full = len(win) == window
        stats.append({
            "index": t,
            "full": full,
            "jaccard_mean": _mean_pairwise_jaccard(win) if full else None,
            "backbone": sorted(frozenset.intersection(*win)),
            "union": sorted(frozenset.union(*win)),
            "changed": t > 0 and current != frozen[t - 1],
        })
    return stats


@dataclass(frozen=True)
class EarlyStopRule:
    """Stop at the first snapshot whose full window of the last ``window`` top-K sets has
    (1) mean pairwise Jaccard >= ``min_jaccard``, (2) |backbone| >= K - ``backbone_slack`` and
    (3) |union| <= K + ``union_slack`` (paper: 10, 0.90, 1, 1)."""

    window: int = 10
    min_jaccard: float = 0.9
    backbone_slack: int = 1
    union_slack: int = 1

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"EarlyStopRule.window must be >= 1, got {self.window}")
        if not 0.0 <= self.min_jaccard <= 1.0:
            raise ValueError(f"EarlyStopRule.min_jaccard must be in [0, 1], got {self.min_jaccard}")
        if self.backbone_slack < 0 or self.union_slack < 0:
            raise ValueError("EarlyStopRule slacks must be >= 0")

    def conditions(self, stat: Mapping[str, Any], k: int) -> dict[str, bool]:
        """Which of the three conditions hold for one ``rolling_jaccard_stats`` entry."""
        full = bool(stat["full"])
        return {
            "jaccard": full and stat["jaccard_mean"] >= self.min_jaccard,
            "backbone": full and len(stat["backbone"]) >= k - self.backbone_slack,
            "union": full and len(stat["union"]) <= k + self.union_slack,
        }

    def first_stop(self, sets: Sequence[Sequence[int]], k: int) -> int | None:
        """0-based index into ``sets`` of the first snapshot where all conditions hold, else None."""
        for stat in rolling_jaccard_stats(sets, self.window):
            if all(self.conditions(stat, k).values()):
                return stat["index"]
        return None


def early_stop_index(
    sets: Sequence[Sequence[int]], k: int, window: int = 10, min_jaccard: float = 0.90
) -> int | None:
    """``EarlyStopRule(window, min_jaccard).first_stop(sets, k)``."""
    return EarlyStopRule(window=window, min_jaccard=min_jaccard).first_stop(sets, k)


# ----------------------------------------------------------------------------------------------
# Racing (successive halving over one-swap candidates)
# ----------------------------------------------------------------------------------------------


def racing_survivors(
    losses: Mapping[int, float],
    k: int,
    keep_fraction: float = 0.5,
    min_keep: int | None = None,
    margin: float = 0.0,
) -> set[int]:
    """Candidates that keep training after a racing round.

    ``losses`` are the current held-out KLs of the candidates still alive (lower = more important;
    NaN = worst). Keeps the best ``max(ceil(keep_fraction * n), min_keep)`` (``min_keep`` defaults to
    K + 2; never fewer than K + 1 nor more than n), plus every candidate within ``margin`` of the
    K-th best loss: ``loss <= kth + margin * |kth|`` (= kth * (1 + margin) for positive KLs).
    Dropped candidates keep their last score and rank after all survivors
    (see ``ranking_with_eliminations``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    ordered = sorted(((int(l), float(v)) for l, v in losses.items()), key=lambda x: _score_key(x[0], -x[1]))
    n = len(ordered)
    min_keep = k + 2 if min_keep is None else int(min_keep)
    count = min(n, max(math.ceil(keep_fraction * n), min_keep, k + 1))
    keep = {layer for layer, _ in ordered[:count]}
    if n >= k:
        kth = ordered[k - 1][1]
        if not math.isnan(kth):
            limit = kth + margin * abs(kth)
            keep |= {layer for layer, loss in ordered if loss <= limit}
    return keep
