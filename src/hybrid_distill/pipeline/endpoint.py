"""A reproduction's decisive comparison at one softmax budget (docs/reproduction.md): the primary selector's final
hybrid against the best baseline and against Uniform, paired over recall samples and distillation seeds; each
selector's standing among the random sets; and whether final held-out KL tracks recall.

Input: one run folder per distillation seed (the same run config with another ``seed``); in each, a selector's
hybrid at the budget is the one its selection chose there. Recall is the per-sample score on the chosen tasks and
lengths (`hybrid_distill.evaluation.stats.sample_scores`), so that every model is compared on the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..evaluation.compare import flat_metrics
from ..evaluation.stats import (
    PairedDifference,
    StatsError,
    mean_score,
    paired_difference,
    percentile_among,
    sample_scores,
    spearman,
)
from ..fileio import read_json
from ..layout import RunLayout
from ..selection.rules import budget_label
from .report import selector_budget_table

# The pre-registered comparison (docs/reproduction.md): GA-S2 against the best of these at K = 4.
DEFAULT_BASELINES = ("gr-s2", "avg-s2", "act-mse", "lm-ppl", "smart", "ar", "kv", "uniform")


@dataclass
class SelectorOutcome:
    """One selector's final hybrid(s) at the budget, over the seeds."""

    selector: str
    layers: list[list[int]]  # per seed
    recall: float  # mean over seeds of the mean sample score
    kl: float | None  # mean over seeds of the evaluation's held-out KL
    random_percentile: float | None = None  # share of random sets whose recall it beats (ties half)


@dataclass
class EndpointResult:
    budget: str
    tasks: list[str]
    lengths: list[int]
    seeds: int
    primary: str
    outcomes: dict[str, SelectorOutcome]
    random_recall: list[float]  # each random set's recall (mean over seeds)
    best_baseline: str | None
    versus_best: PairedDifference | None
    versus_uniform: PairedDifference | None
    spearman_kl_recall: float | None
    hybrids_correlated: int
    missing: dict[str, str] = field(default_factory=dict)  # selector -> why it has no outcome

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("outcomes", "versus_best", "versus_uniform")}
        out["outcomes"] = {k: v.__dict__ for k, v in self.outcomes.items()}
        out["versus_best"] = self.versus_best.to_dict() if self.versus_best else None
        out["versus_uniform"] = self.versus_uniform.to_dict() if self.versus_uniform else None
        return out

    def markdown(self) -> str:
        lines = [f"Budget {self.budget}; recall over {', '.join(self.tasks)} at {', '.join(map(str, self.lengths))} "
                 f"tokens; {self.seeds} distillation seed(s).", "",
                 "| selector | recall | held-out KL | beats random sets | softmax layers (per seed) |",
                 "|---|---:|---:|---:|---|"]
        for name, o in sorted(self.outcomes.items(), key=lambda kv: -kv[1].recall):
            kl = f"{o.kl:.4f}" if o.kl is not None else "–"
            pct = f"{o.random_percentile:.0f}%" if o.random_percentile is not None else "–"
            lines.append(f"| {name} | {o.recall:.3f} | {kl} | {pct} | {'; '.join(f'`{s}`' for s in o.layers)} |")
        if self.random_recall:
            lines.append(f"| random ({len(self.random_recall)} sets) | {min(self.random_recall):.3f} – "
                         f"{max(self.random_recall):.3f} | | | |")
        lines.append("")
        for label, d in ((f"{self.primary} − best baseline ({self.best_baseline})", self.versus_best),
                         (f"{self.primary} − uniform", self.versus_uniform)):
            if d is not None:
                lines.append(f"- **{label}**: {d.mean:+.3f}, {100 * d.level:.0f}% CI [{d.low:+.3f}, {d.high:+.3f}] "
                             f"over {d.samples} samples × {d.seeds} seed(s): {d.verdict}")
        if self.spearman_kl_recall is not None:
            lines.append(f"- Spearman(held-out KL, recall) over {self.hybrids_correlated} final hybrids: "
                         f"{self.spearman_kl_recall:+.2f}")
        for name, why in self.missing.items():
            lines.append(f"- {name}: no outcome ({why})")
        return "\n".join(lines) + "\n"


def _scores(run_dir: Path, model: str, tasks, lengths) -> tuple[dict, float | None] | None:
    results = read_json(RunLayout(run_dir).eval(model) / "results.json")
    if not results:
        return None
    return sample_scores(results, tasks, lengths), flat_metrics(results).get("quality/kl")


def endpoint(run_dirs: Sequence[str | Path], budget: str, tasks: Sequence[str], lengths: Sequence[int], *,
             primary: str = "ga-s2", baselines: Sequence[str] = DEFAULT_BASELINES, resamples: int = 10_000,
             seed: int = 0) -> EndpointResult:
    """The comparison at ``budget`` over ``run_dirs`` (one per distillation seed, paired by position across
    selectors). ``budget`` as a config gives it (4, "4", 0.25, "25%") or as selections label it ("K=4", "25%")."""
    budget = budget if str(budget).startswith("K=") else budget_label(budget)
    runs = [Path(d) for d in run_dirs]
    if not runs:
        raise StatsError("no run folders given")
    selectors = [primary, *[b for b in baselines if b != primary], "random"]
    per_run = [selector_budget_table(r, selectors, "quality/kl") for r in runs]
    scores: dict[str, list[dict]] = {}
    kls: dict[str, list[float | None]] = {}
    layers: dict[str, list[list[int]]] = {}
    random_sets: list[list[dict]] = []  # [set index][seed]
    missing: dict[str, str] = {}
    points: dict[tuple[str, str], tuple[float, float]] = {}  # (run, model) -> (KL, recall) of each final hybrid
    for run, table in zip(runs, per_run, strict=True):
        for selector in selectors:
            cell = table["rows"].get(selector, {}).get(budget)
            if cell is None:
                missing.setdefault(selector, table["degenerate"].get(selector)
                                   or f"no set at budget {budget} in {run}")
                continue
            got = [_scores(run, m, tasks, lengths) for m in cell["models"]]
            if any(g is None for g in got):
                missing.setdefault(selector, f"not evaluated in {run}")
                continue
            for model, (sc, kl) in zip(cell["models"], got, strict=True):
                if sc and kl is not None:
                    points[(str(run), model)] = (kl, mean_score([sc]))  # a set two selectors chose counts once
            if selector == "random":
                for i, (sc, _) in enumerate(got):
                    while len(random_sets) <= i:
                        random_sets.append([])
                    random_sets[i].append(sc)
                continue
            scores.setdefault(selector, []).append(got[0][0])
            kls.setdefault(selector, []).append(got[0][1])
            layers.setdefault(selector, []).append(cell["layers"])
    complete = {s for s, v in scores.items() if len(v) == len(runs) and s not in missing}
    for s in list(scores):
        if s not in complete:
            missing.setdefault(s, "not evaluated in every run")
    random_recall = [mean_score(sets) for sets in random_sets if len(sets) == len(runs)]
    outcomes = {}
    for s in sorted(complete):
        known = [k for k in kls[s] if k is not None]
        recall = mean_score(scores[s])
        outcomes[s] = SelectorOutcome(s, layers[s], recall, sum(known) / len(known) if known else None,
                                      percentile_among(recall, random_recall) if random_recall else None)
    candidates = [b for b in baselines if b in outcomes and b != primary]
    best = max(candidates, key=lambda b: outcomes[b].recall, default=None)
    versus_best = versus_uniform = None
    if primary in outcomes:
        if best is not None:
            versus_best = paired_difference(scores[primary], scores[best], resamples=resamples, seed=seed)
        if "uniform" in outcomes:
            versus_uniform = paired_difference(scores[primary], scores["uniform"], resamples=resamples, seed=seed)
    xy = list(points.values())
    rho = spearman([p[0] for p in xy], [p[1] for p in xy]) if len(xy) >= 3 else None
    return EndpointResult(budget=budget, tasks=list(tasks), lengths=[int(n) for n in lengths], seeds=len(runs),
                          primary=primary, outcomes=outcomes, random_recall=random_recall, best_baseline=best,
                          versus_best=versus_best, versus_uniform=versus_uniform, spearman_kl_recall=rho,
                          hybrids_correlated=len(points), missing=missing)


__all__ = ["DEFAULT_BASELINES", "EndpointResult", "SelectorOutcome", "endpoint"]
