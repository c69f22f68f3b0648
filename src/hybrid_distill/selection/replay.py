"""What early stopping or racing would have cost and chosen, replayed from a full-budget selection.

Candidates train independently, so a candidate paused at P Stage-2 tokens has exactly the held-out
KL snapshots of the full run up to P. `replay_selection` feeds those truncated records through the
live round logic (`score_candidates`, the same code a run with ``early_stop``/``racing`` executes)
and reports the stop point, eliminations, tokens spent and layer sets, next to the full run's. One
full run therefore measures the selection cost with and without early stopping/racing, for any rule
settings, without training a candidate twice::

    from hybrid_distill.selection.replay import replay_selection
    replay_selection("runs/x/selection/ga-s2", early_stop=True, early_stop_window=5)["saved_fraction"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import rules
from .candidates import CandidateJob, snapshots_until, stage2_tokens_per_step
from .config import SelectionConfig
from .executors import JobOutcome
from .registry import LEARNED_SELECTORS, candidate_kinds
from .runner import _learned_scores, learned_sets, load_selection, score_candidates


class _ReplayExecutor:
    """Answers each candidate job with the full run's record cut where a live round paused at the
    job's pause point stops (`snapshots_until`, the rule restarted live selections use too)."""

    def __init__(self, records: dict[tuple[str, int], dict[str, Any]], total: int, s1_tokens: int,
                 tokens_per_step: int):
        self.records, self.total, self.s1_tokens, self.tokens_per_step = records, total, s1_tokens, tokens_per_step

    def map(self, fn, jobs: list[dict[str, Any]]) -> list[JobOutcome]:
        return [self._outcome(job) for job in jobs]

    def _outcome(self, job: dict[str, Any]) -> JobOutcome:
        record = self.records.get((job["kind"], job["layer"]))
        if record is None:
            return JobOutcome(error=f"candidate {job['kind']}-{job['layer']} failed in the full run")
        snapshots, trained = snapshots_until(record["snapshots"], job["pause_at_tokens"], self.tokens_per_step, self.total)
        return JobOutcome(value={**record, "snapshots": snapshots, "done": trained >= self.total,
                                 "tokens_trained": self.s1_tokens + trained, "stage2_tokens": trained})

    def close(self) -> None:
        pass


def _records(selection: dict[str, Any], kind: str) -> dict[tuple[str, int], dict[str, Any]]:
    snaps = selection["snapshots"][kind]
    s1 = selection["score_tables"].get(f"{kind}-s1", {})
    sign = -1.0 if kind == "ga" else 1.0  # score tables hold importances: GA -loss, GR +loss
    out = {}
    for layer, kls in snaps["kl"].items():
        tokens = snaps["tokens"][: len(kls)]
        out[(kind, int(layer))] = {
            "kind": kind, "layer": int(layer), "kl_initial": snaps["kl_initial"][layer],
            "s1_loss": sign * s1[layer] if layer in s1 else None,
            "snapshots": [{"tokens": t, "kl": v} for t, v in zip(tokens, kls)],
        }
    return out


def replay_selection(selection: dict[str, Any] | str | Path, early_stop: bool = True, racing: bool = False,
                     **changes: Any) -> dict[str, Any]:
    """Replay a learned selector's full-budget ``selection.json`` (dict or path) with early stopping
    and/or racing; ``changes`` override other `SelectionConfig` fields (``early_stop_window``,
    ``early_stop_min_jaccard``, ``round_snapshots``, ``racing_keep_fraction``, ...).

    Returns the settings replayed, ``tokens_spent`` vs ``full_tokens`` (and ``saved_fraction``), the
    stop snapshot and its tokens per candidate kind, eliminations, and per budget the replayed layers,
    the full run's layers and their Jaccard.
    """
    sel = selection if isinstance(selection, dict) else load_selection(selection)
    if sel["selector"] not in LEARNED_SELECTORS:
        raise ValueError(f"selector {sel['selector']!r} trains no candidates; only {list(LEARNED_SELECTORS)} can be replayed")
    if sel["early_stop"]["enabled"] or sel["racing"]["enabled"]:
        raise ValueError("replay needs a full-budget selection (run with early_stop and racing off)")
    config = SelectionConfig.from_dict({**sel["config"], "early_stop": early_stop, "racing": racing, **changes})
    total, s1_tokens = sel["tokens"]["per_candidate_stage2"], sel["tokens"]["per_candidate_stage1"]
    ks = sorted({e["k"] for e in sel["budgets"].values()})
    records: dict[tuple[str, int], dict[str, Any]] = {}
    for kind in candidate_kinds(sel["selector"]):
        records.update(_records(sel, kind))
    tokens_per_step = stage2_tokens_per_step(SelectionConfig.from_dict(sel["config"]).stage_config(2))
    executor = _ReplayExecutor(records, total, s1_tokens, tokens_per_step)

    def make_job(kind: str, layer: int, pause: int | None) -> CandidateJob:
        return CandidateJob(kind=kind, layer=layer, run_dir="", teacher=sel["teacher"], base_student="", mixers=[],
                            data={}, stage1=None, stage2={}, pause_at_tokens=pause)

    layers = range(sel["num_layers"])
    scorings = {kind: score_candidates(kind, config, make_job, layers, ks, executor, total)
                for kind in candidate_kinds(sel["selector"])}
    scores, ranking, _ = _learned_scores(config.selector, scorings)
    ranking, sets = learned_sets(config, scores, ranking, sel["num_layers"], ks)
    full_sets = {e["k"]: e["layers"] for e in sel["budgets"].values()}
    spent = sum(sc["tokens_spent"] for sc in scorings.values())
    full = sel["tokens"]["spent"]
    return {
        "selector": sel["selector"],
        "early_stop": early_stop,
        "racing": racing,
        "settings": {k: getattr(config, k) for k in ("early_stop_window", "early_stop_min_jaccard", "round_snapshots",
                                                      "racing_keep_fraction", "racing_margin", "racing_min_keep")},
        "tokens_spent": spent,
        "full_tokens": full,
        "saved_fraction": 1 - spent / full if full else 0.0,
        "stop_snapshot": {kind: sc["stop_index"] for kind, sc in scorings.items()},
        "stop_tokens": {kind: (sc["snapshot_tokens"][sc["stop_index"]] if sc["stop_index"] is not None else None)
                        for kind, sc in scorings.items()},
        "eliminated_round": {kind: {str(k): v for k, v in sc["eliminated"].items()} for kind, sc in scorings.items()},
        "ranking": ranking,
        "budgets": {str(k): {"layers": sets[k], "full_layers": full_sets[k], "jaccard": rules.jaccard(sets[k], full_sets[k])}
                    for k in ks},
    }
