"""Every selector, once: its name, the candidates it trains, where its scores come from, and how it turns
scores into softmax-layer sets.

Candidate kinds: ``ga`` (greedy addition: the all-linear student with one layer restored to the teacher's
softmax attention) and ``gr`` (greedy removal: the teacher with one layer linear). Score sources:

* ``s2`` / ``s1``: the candidates' held-out KL after Stage 2 / their Stage-1 alignment loss (importance =
  ``-KL`` for ``ga``, ``+KL`` for ``gr``: higher = keep softmax);
* ``bypass``: the teacher with one layer's attention output zeroed (activation MSE, perplexity);
* ``task``: the same bypass, scored by a recall task's accuracy drop;
* ``none``: a rule (uniform, random, given).

A selector's ``select`` receives a `SelectInputs` and returns a `Selected` per budget; it never trains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import rules

TASK_SELECTORS: dict[str, str] = {"kv": "kv_retrieval", "ar": "ar", "ar-mh": "ar_multihop", "vt": "vt", "cwe": "cwe"}


@dataclass
class SelectInputs:
    """What a selector sees: the settings, the model's layer count, the budgets, and the scores gathered for it.

    ``tables[name][k]``: importance score per layer of score table ``name`` (``"ga-s2"``, ``"gr-s1"``, ...) as
    measured for budget K (candidates stopped early give each budget its own snapshot); ``scores``: the
    bypass or task scores (importance, higher = keep softmax); ``eliminated[kind]``: candidates racing dropped,
    by the round that dropped them."""

    config: Any  # SelectionConfig
    num_layers: int
    ks: list[int]
    tables: dict[str, dict[int, dict[int, float]]] = field(default_factory=dict)
    scores: dict[int, float] | None = None
    eliminated: dict[str, dict[int, int]] = field(default_factory=dict)

    def ranking(self, table: str, k: int) -> list[int]:
        """Layers of score table ``table`` at budget K, most important first (Stage-2 tables: the candidates racing
        dropped last, since their KL stopped improving when they stopped training)."""
        scores = self.tables[table][k]
        dropped = self.eliminated.get(table.split("-")[0], {}) if table.endswith("-s2") else {}
        survivors = {layer: v for layer, v in scores.items() if layer not in dropped}
        return rules.ranking_with_eliminations(
            survivors, {layer: (rnd, scores[layer]) for layer, rnd in dropped.items() if layer in scores})


@dataclass
class Selected:
    """One budget's outcome: the importance scores and ranking it came from (None for rules) and its layer
    sets (one; several for ``random``)."""

    sets: list[list[int]]
    scores: dict[int, float] | None = None
    ranking: list[int] | None = None


@dataclass(frozen=True)
class Selector:
    name: str
    kinds: tuple[str, ...]  # candidate kinds it trains
    source: str  # "s2", "s1", "bypass", "task" or "none"
    select: Callable[[SelectInputs, int], Selected]
    description: str


def _table(name: str) -> Callable[[SelectInputs, int], Selected]:
    def select(inputs: SelectInputs, k: int) -> Selected:
        ranking = inputs.ranking(name, k)
        return Selected([rules.top_k(ranking, k)], inputs.tables[name][k], ranking)

    return select


def _average(metric: str) -> Callable[[SelectInputs, int], Selected]:
    def select(inputs: SelectInputs, k: int) -> Selected:
        ga, gr = inputs.ranking(f"ga-{metric}", k), inputs.ranking(f"gr-{metric}", k)
        common = set(ga) & set(gr)
        ranking = rules.average_rank([[x for x in ga if x in common], [x for x in gr if x in common]])
        return Selected([rules.top_k(ranking, k)], rules.scores_from_ranking(ranking), ranking)

    return select


def _smart(inputs: SelectInputs, k: int) -> Selected:
    scores = inputs.tables["ga-s2"][k]
    cfg = inputs.config
    return Selected([rules.smart_select(scores, inputs.num_layers, k, terminal_quantile=cfg.smart_terminal_quantile)],
                    scores, None)


def _distance(inputs: SelectInputs, k: int) -> Selected:
    scores, cfg = inputs.tables["ga-s2"][k], inputs.config
    ranking = rules.distance_regularized_ranking(scores, cfg.distance_lambda, cfg.distance_sigma)
    return Selected([rules.distance_regularized_select(scores, k, cfg.distance_lambda, cfg.distance_sigma)],
                    scores, ranking)


def _bypass(inputs: SelectInputs, k: int) -> Selected:
    ranking = rules.ranking_from_scores(inputs.scores or {})
    return Selected([rules.top_k(ranking, k)], inputs.scores, ranking)


def _uniform(inputs: SelectInputs, k: int) -> Selected:
    return Selected([rules.uniform_layers(inputs.num_layers, k, anchor=inputs.config.uniform_anchor)])


def _random(inputs: SelectInputs, k: int) -> Selected:
    return Selected(rules.random_layer_sets(inputs.num_layers, k, inputs.config.random_sets, inputs.config.seed))


def _given(inputs: SelectInputs, k: int) -> Selected:
    return Selected([sorted(set(inputs.config.layers))])


def _registry() -> dict[str, Selector]:
    entries = [
        Selector("ga-s2", ("ga",), "s2", _table("ga-s2"), "greedy addition, held-out KL after Stage 2 (the paper's method)"),
        Selector("ga-s1", ("ga",), "s1", _table("ga-s1"), "greedy addition, Stage-1 alignment loss"),
        Selector("gr-s2", ("gr",), "s2", _table("gr-s2"), "greedy removal, held-out KL after Stage 2"),
        Selector("gr-s1", ("gr",), "s1", _table("gr-s1"), "greedy removal, Stage-1 alignment loss"),
        Selector("avg-s2", ("ga", "gr"), "s2", _average("s2"), "average rank of GA-S2 and GR-S2"),
        Selector("avg-s1", ("ga", "gr"), "s1", _average("s1"), "average rank of GA-S1 and GR-S1"),
        Selector("smart", ("ga",), "s2", _smart, "SMART: GA-S2 scores with terminal-layer retention"),
        Selector("ga-s2-dist", ("ga",), "s2", _distance, "GA-S2 with the distance regulariser (appendix E)"),
        Selector("act-mse", (), "bypass", _bypass, "teacher with one layer bypassed: final hidden-state MSE"),
        Selector("lm-ppl", (), "bypass", _bypass, "teacher with one layer bypassed: held-out perplexity"),
        *(Selector(name, (), "task", _bypass, f"teacher with one layer bypassed: {task} accuracy drop")
          for name, task in TASK_SELECTORS.items()),
        Selector("uniform", (), "none", _uniform, "evenly spaced over depth (anchor: block end or centre)"),
        Selector("random", (), "none", _random, "seeded random K-sets (the null distribution of sets)"),
        Selector("given", (), "none", _given, "the softmax layers listed in the config"),
    ]
    return {s.name: s for s in entries}


SELECTORS: Mapping[str, Selector] = _registry()
LEARNED_SELECTORS = tuple(name for name, s in SELECTORS.items() if s.kinds)
BYPASS_SELECTORS = tuple(name for name, s in SELECTORS.items() if s.source in ("bypass", "task"))
RULE_SELECTORS = tuple(name for name, s in SELECTORS.items() if s.source == "none")


def candidate_kinds(selector: str) -> tuple[str, ...]:
    """The candidate kinds a selector trains ("ga", "gr"; none for bypass and rule selectors)."""
    return SELECTORS[selector].kinds


__all__ = [
    "BYPASS_SELECTORS",
    "LEARNED_SELECTORS",
    "RULE_SELECTORS",
    "SELECTORS",
    "TASK_SELECTORS",
    "SelectInputs",
    "Selected",
    "Selector",
    "candidate_kinds",
]
