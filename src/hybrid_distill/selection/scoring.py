"""Train the candidates of one family in rounds, and turn their held-out KLs into scores.

A *family* is the candidates scored under one early-stopping rule: the one-swap candidates of one kind (``ga``:
a layer restored into the all-linear student; ``gr``: a layer linearised in the teacher), their repeats under
other data-order seeds, and for ``ga`` the null candidates (no layer restored) that measure the noise floor.

Without early stopping or racing every candidate trains its whole budget in one job. With them, candidates
train in rounds of ``round_snapshots`` held-out snapshots; after each round

* early stopping looks, for each budget K on its own, for the first snapshot where the paper's rule holds on
  the top-K sets (window of the last ``early_stop_window`` sets: mean Jaccard >= ``early_stop_min_jaccard``,
  backbone >= K-1, union <= K+1); a budget takes its set at that snapshot, and training stops once every
  budget has stopped;
* racing drops the candidates that can no longer make the top K.

Each job answers with the candidate's snapshots up to where it paused, so a restarted selection replays its
rounds from the candidates' files (and `replay` replays a finished full-budget run with other rules).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import rules
from .config import SelectionConfig
from .registry import SELECTORS
from .result import CandidateScoring

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One candidate of a family: a layer's candidate (``layer``) under ``seed``, or a null candidate
    (``layer`` None, ``replicate`` its index)."""

    layer: int | None
    seed: int
    replicate: int = 0

    @property
    def is_null(self) -> bool:
        return self.layer is None


@dataclass
class FamilyScores:
    """What training a family produced: the layer candidates' and null candidates' `CandidateScoring`."""

    layers: CandidateScoring
    null: CandidateScoring | None = None
    members: dict[Member, dict[str, Any]] = field(default_factory=dict)  # each member's last job result


def candidate_families(config: SelectionConfig, num_layers: int) -> dict[str, tuple[str | None, list[Member]]]:
    """The candidate families a selector trains: ``{kind: (start, members)}``."""
    seeds_for = set(config.candidate_seed_layers if config.candidate_seed_layers is not None else range(num_layers))
    out = {}
    for kind in SELECTORS[config.base_selector].kinds:
        members = [Member(layer, config.seed) for layer in range(num_layers)]
        members += [Member(layer, seed) for seed in config.candidate_seeds for layer in sorted(seeds_for)
                    if seed != config.seed]
        if kind == "ga":
            members += [Member(None, config.seed + 1 + r, r) for r in range(config.null_candidates)]
        out[kind] = (config.candidate_start if kind == "ga" else "teacher", members)
    return out


def importance(kind: str, kl: float) -> float:
    """Higher = keep softmax: a GA layer whose restoring lowers the KL most; a GR layer whose removal raises it most."""
    return -kl if kind == "ga" else kl


def snapshot_sets(kind: str, kls: dict[int, list[float]], k: int, count: int) -> list[list[int]]:
    """Top-K set at each of the first ``count`` snapshots; layers eliminated earlier (fewer snapshots) rank after
    every layer still measured there (later eliminations first)."""
    sets = []
    for j in range(count):
        measured = {layer: importance(kind, v[j]) for layer, v in kls.items() if j < len(v)}
        dropped = {layer: (len(v), importance(kind, v[-1])) for layer, v in kls.items() if 0 < len(v) <= j}
        sets.append(rules.top_k(rules.ranking_with_eliminations(measured, dropped), k))
    return sets


def _mean_curve(curves: Sequence[list[float]]) -> list[float]:
    """Snapshot-wise mean over seeds, as far as every seed has reached."""
    count = min(len(c) for c in curves)
    return [sum(c[j] for c in curves) / len(curves) for j in range(count)]


def score_family(kind: str, start: str | None, members: Sequence[Member], config: SelectionConfig,
                 make_job: Callable[[Member, int | None], dict[str, Any]], run_job: Callable, executor,
                 ks: Sequence[int], total_tokens: int) -> FamilyScores:
    """Train ``members`` (in rounds when stopping early or racing) through ``executor.map(run_job, jobs)``.

    ``make_job(member, until_tokens)`` builds the JSON-able job of one member for a round (``until_tokens`` None:
    the whole budget). Returns the family's scores with the stop snapshot of every budget."""
    interval = config.snapshot_interval()
    staged = config.early_stop or config.racing
    round_tokens = interval * config.round_snapshots
    rule = rules.EarlyStopRule(window=config.early_stop_window, min_jaccard=config.early_stop_min_jaccard)
    layers = sorted({m.layer for m in members if m.layer is not None})
    alive = set(layers)
    results: dict[Member, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    eliminated: dict[int, int] = {}
    stop_by_budget: dict[int, int | None] = {k: None for k in ks}
    rnd = 0
    t0 = time.perf_counter()
    while alive:
        rnd += 1
        until = rnd * round_tokens if staged and rnd * round_tokens < total_tokens else None
        todo = [m for m in members if m.is_null or m.layer in alive]
        outcomes = executor.map(run_job, [make_job(m, until) for m in todo])
        for member, out in zip(todo, outcomes):
            if out.ok:
                results[member] = out.value
                continue
            results.pop(member, None)  # failed in a later round: no partial score
            if member.is_null:
                failures[-1 - member.replicate] = out.error
            else:
                failures[member.layer] = out.error
                alive.discard(member.layer)
        if until is None:
            break
        kls = _layer_curves(results, alive, members)
        count = min((len(v) for layer, v in kls.items() if layer in alive), default=0)
        if config.early_stop and count:
            for k in ks:
                if stop_by_budget[k] is None:
                    stop_by_budget[k] = rule.first_stop(snapshot_sets(kind, kls, k, count), k)
            if all(v is not None for v in stop_by_budget.values()):
                logger.info("%s candidates: every budget stopped (snapshots %s) after round %d", kind, stop_by_budget, rnd)
                break
        if config.racing and count:
            current = {layer: -importance(kind, kls[layer][count - 1]) for layer in alive}
            min_keep = config.racing_min_keep or max(ks) + 2
            keep = rules.racing_survivors(current, max(ks), config.racing_keep_fraction, min_keep, config.racing_margin)
            for layer in alive - keep:
                eliminated[layer] = rnd
            alive = set(keep)
    wall = time.perf_counter() - t0
    return _family_scores(kind, start, members, results, failures, eliminated, stop_by_budget, rnd, wall)


def _layer_curves(results: dict[Member, dict[str, Any]], alive: set[int] | None, members: Sequence[Member]
                  ) -> dict[int, list[float]]:
    """KL per snapshot of each layer, averaged over the seeds its candidates trained with."""
    curves: dict[int, list[list[float]]] = {}
    for m in members:
        if m.is_null or m not in results:
            continue
        curves.setdefault(m.layer, []).append([s["kl"] for s in results[m]["snapshots"]])
    return {layer: _mean_curve(c) for layer, c in curves.items()}


def _family_scores(kind, start, members, results, failures, eliminated, stop_by_budget, rounds, wall) -> FamilyScores:
    layer_members = [m for m in members if not m.is_null and m in results]
    null_members = [m for m in members if m.is_null and m in results]
    kls = _layer_curves(results, None, members)
    seed_kl: dict[int, dict[int, float]] = {}
    for m in layer_members:
        snaps = results[m]["snapshots"]
        if snaps:
            seed_kl.setdefault(m.layer, {})[m.seed] = snaps[-1]["kl"]
    first = {m.layer: results[m] for m in layer_members}  # one record per layer for per-layer values
    longest = max((results[m]["snapshots"] for m in layer_members), key=len, default=[])
    speeds = [r["tokens_per_s"] for r in results.values() if r.get("tokens_per_s")]
    layers = CandidateScoring(
        kind=kind, start=start, snapshot_tokens=[s["tokens"] for s in longest], kl=kls,
        kl_initial={layer: r["kl_initial"] for layer, r in first.items()},
        s1_loss={layer: r["s1_loss"] for layer, r in first.items() if r.get("s1_loss") is not None},
        seed_kl={layer: v for layer, v in seed_kl.items() if len(v) > 1},
        stop_by_budget=dict(stop_by_budget), eliminated=eliminated, failures={k: v for k, v in failures.items() if k >= 0},
        rounds=rounds, tokens_spent=sum(results[m]["tokens_trained"] for m in layer_members),
        reused=sum(bool(results[m].get("reused")) for m in layer_members), wall_time_s=wall,
        mean_tokens_per_s=sum(speeds) / len(speeds) if speeds else None)
    null = None
    if any(m.is_null for m in members):
        null = CandidateScoring(
            kind="null", start=start,
            snapshot_tokens=[s["tokens"] for s in max((results[m]["snapshots"] for m in null_members), key=len, default=[])],
            kl={m.replicate: [s["kl"] for s in results[m]["snapshots"]] for m in null_members},
            kl_initial={m.replicate: results[m]["kl_initial"] for m in null_members}, s1_loss={},
            failures={-1 - k: v for k, v in failures.items() if k < 0}, rounds=rounds,
            tokens_spent=sum(results[m]["tokens_trained"] for m in null_members),
            reused=sum(bool(results[m].get("reused")) for m in null_members))
    return FamilyScores(layers, null, dict(results))


def kl_at(scoring: CandidateScoring, layer: int, index: int | None) -> float:
    """A layer's KL at snapshot ``index`` (None or past its last snapshot: its last one; none at all: before
    Stage 2)."""
    curve = scoring.kl.get(layer) or []
    if not curve:
        return scoring.kl_initial[layer]
    return curve[min(index, len(curve) - 1)] if index is not None else curve[-1]


def score_tables(families: dict[str, FamilyScores], ks: Sequence[int]) -> dict[str, dict[int, dict[int, float]]]:
    """Importance tables ``{"ga-s2": {K: {layer: score}}, "ga-s1": ..., "gr-s2": ...}``: Stage-2 scores at each
    budget's stop snapshot, Stage-1 scores (the alignment loss, the same for every budget)."""
    tables: dict[str, dict[int, dict[int, float]]] = {}
    for kind, fam in families.items():
        sc = fam.layers
        measured = sorted(set(sc.kl) | set(sc.kl_initial))
        tables[f"{kind}-s2"] = {k: {layer: importance(kind, kl_at(sc, layer, sc.stop_by_budget.get(k)))
                                    for layer in measured} for k in ks}
        s1 = {layer: importance(kind, v) for layer, v in sc.s1_loss.items()}
        tables[f"{kind}-s1"] = {k: dict(s1) for k in ks}
    return tables


def noise_floors(fam: FamilyScores) -> list[rules.NoiseFloor]:
    """The noise floor at every snapshot that every layer and null candidate reached."""
    if fam.null is None or not fam.null.kl:
        return []
    count = min([len(v) for v in fam.layers.kl.values()] + [len(v) for v in fam.null.kl.values()], default=0)
    return [rules.noise_floor({layer: v[j] for layer, v in fam.layers.kl.items()}, [v[j] for v in fam.null.kl.values()])
            for j in range(count)]


__all__ = [
    "FamilyScores",
    "candidate_families",
    "Member",
    "importance",
    "kl_at",
    "noise_floors",
    "score_family",
    "score_tables",
    "snapshot_sets",
]
