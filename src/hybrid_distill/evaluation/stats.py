"""Statistics for comparing hybrids on the same recall samples: paired bootstrap intervals, rank correlation,
standing among random layer sets.

Two models evaluated by `hybrid_distill.evaluation.suite` on the same fixed samples (task, length, sample index)
are compared sample by sample: the difference of their scores on each sample, averaged over the distillation seeds
(paired by position: seed i of one model with seed i of the other). `paired_difference` reports the mean of those
differences with a percentile bootstrap interval that resamples samples within each (task, length) cell, so every
cell keeps its weight, and -- with more than one seed -- resamples the seeds too (two levels), so the interval also
carries the run-to-run variation of distillation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import HybridDistillError

SampleKey = tuple[str, int, int]  # (task, length, sample index)


class StatsError(HybridDistillError, ValueError):
    """Results that cannot be compared as asked (no shared samples, unequal seed counts)."""


def sample_scores(results: Mapping[str, Any], tasks: Iterable[str] | None = None,
                  lengths: Iterable[int] | None = None) -> dict[SampleKey, float]:
    """``{(task, length, index): score}`` of an evaluation's recall predictions (``results.json`` as a dict),
    restricted to ``tasks`` and ``lengths`` when given."""
    predictions = ((results.get("recall") or {}).get("predictions")) or []
    keep_tasks = None if tasks is None else set(tasks)
    keep_lengths = None if lengths is None else {int(n) for n in lengths}
    out: dict[SampleKey, float] = {}
    for p in predictions:
        key = (str(p["task"]), int(p["length"]), int(p["index"]))
        if (keep_tasks is None or key[0] in keep_tasks) and (keep_lengths is None or key[1] in keep_lengths):
            out[key] = float(p["score"])
    return out


@dataclass
class PairedDifference:
    """Mean over shared samples of (model a - model b), averaged over paired seeds, with a bootstrap interval."""

    mean: float
    low: float
    high: float
    level: float
    samples: int
    seeds: int
    per_seed: list[float] = field(default_factory=list)  # the mean difference of each seed pair
    cells: dict[str, float] = field(default_factory=dict)  # "task@length" -> mean difference

    @property
    def verdict(self) -> str:
        """"a > b" when the interval lies above 0, "a < b" below 0, "undecided" otherwise."""
        return "a > b" if self.low > 0 else "a < b" if self.high < 0 else "undecided"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def paired_difference(a: Sequence[Mapping[SampleKey, float]], b: Sequence[Mapping[SampleKey, float]], *,
                      level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """Model a minus model b on the samples every run of both scored. ``a`` and ``b``: one `sample_scores` mapping
    per distillation seed, paired by position."""
    if not a or len(a) != len(b):
        raise StatsError(f"paired seeds needed: {len(a)} run(s) of model a, {len(b)} of model b")
    if not 0 < level < 1:
        raise StatsError(f"level must be in (0, 1), got {level}")
    keys = sorted(set.intersection(*(set(run) for run in [*a, *b])))
    if not keys:
        raise StatsError("the runs share no sample (task, length, index); were they evaluated on the same samples?")
    diffs = np.array([[ra[k] - rb[k] for k in keys] for ra, rb in zip(a, b, strict=True)])  # [seeds, samples]
    cell_of = [f"{task}@{length}" for task, length, _ in keys]
    cells = {c: [i for i, name in enumerate(cell_of) if name == c] for c in dict.fromkeys(cell_of)}
    rng = np.random.default_rng(seed)
    n_seeds = diffs.shape[0]
    stats = np.empty(resamples)
    for r in range(resamples):
        seeds = rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=int)
        picked = np.concatenate([rng.choice(idx, size=len(idx), replace=True) for idx in cells.values()])
        stats[r] = diffs[np.ix_(seeds, picked)].mean()
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return PairedDifference(
        mean=float(diffs.mean()), low=float(low), high=float(high), level=level, samples=len(keys), seeds=n_seeds,
        per_seed=[float(d.mean()) for d in diffs],
        cells={c: float(diffs[:, idx].mean()) for c, idx in cells.items()},
    )


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation of paired values (ties share their mean rank); nan when either is constant."""
    from scipy.stats import spearmanr  # optional: hybrid-distill[analysis]

    if len(x) != len(y) or len(x) < 2:
        raise StatsError(f"spearman needs two paired sequences of at least 2 values, got {len(x)} and {len(y)}")
    return float(spearmanr(x, y).statistic)


def percentile_among(value: float, null: Sequence[float], higher_is_better: bool = True) -> float:
    """Share (0-100) of the null values (e.g. random layer sets' recall) that ``value`` beats; ties count half."""
    if not null:
        raise StatsError("no null values to compare with")
    better = sum(1.0 if (v < value if higher_is_better else v > value) else 0.5 if v == value else 0.0 for v in null)
    return 100.0 * better / len(null)


def mean_score(runs: Sequence[Mapping[SampleKey, float]]) -> float:
    """Mean score over the samples every run scored, averaged over the runs."""
    keys = set.intersection(*(set(r) for r in runs)) if runs else set()
    if not keys:
        return math.nan
    return float(np.mean([[r[k] for k in sorted(keys)] for r in runs]))


__all__ = [
    "PairedDifference",
    "SampleKey",
    "StatsError",
    "mean_score",
    "paired_difference",
    "percentile_among",
    "sample_scores",
    "spearman",
]
