"""What early stopping or racing would have cost and chosen, replayed from a full-budget selection.

Candidates train independently, so a candidate paused at P Stage-2 tokens has exactly the held-out KL snapshots
of the full run up to P. `replay_selection` feeds those truncated records through the live round logic
(`scoring.score_family`, the same code a run with ``early_stop``/``racing`` executes) and reports the stop points,
eliminations, tokens spent and layer sets, next to the full run's. One full run therefore measures the selection
cost with and without early stopping or racing, for any rule settings, without training a candidate twice::

    from hybrid_distill.selection.replay import replay_selection
    replay_selection("runs/x/selection/ga-s2", early_stop=True, early_stop_window=5)["saved_fraction"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError
from . import rules
from .candidates import snapshots_until, stage2_tokens_per_step
from .config import SelectionConfig
from .executors import JobOutcome
from .registry import SELECTORS, SelectInputs
from .result import SelectionResult
from .scoring import Member, candidate_families, score_family, score_tables


class _ReplayExecutor:
    """Answers each candidate job with the full run's record cut where a live round paused at the job's pause point
    stops (`snapshots_until`, the rule restarted live selections use too)."""

    def __init__(self, sel: SelectionResult, total: int, s1_tokens: int, tokens_per_step: int):
        self.sel, self.total, self.s1_tokens, self.tokens_per_step = sel, total, s1_tokens, tokens_per_step

    def map(self, fn, jobs: list[dict[str, Any]]) -> list[JobOutcome]:
        return [self._outcome(job) for job in jobs]

    def _outcome(self, job: dict[str, Any]) -> JobOutcome:
        kind, member = job["kind"], job["member"]
        scoring = self.sel.candidates.get("null" if member.is_null else kind)
        key = member.replicate if member.is_null else member.layer
        if scoring is None or key not in scoring.kl:
            return JobOutcome(error=f"candidate {kind} {key} failed in the full run", kind="failed")
        curve = [{"tokens": t, "kl": v} for t, v in zip(scoring.snapshot_tokens, scoring.kl[key])]
        snapshots, trained = snapshots_until(curve, job["until_tokens"], self.tokens_per_step, self.total)
        return JobOutcome(value={"kl_initial": scoring.kl_initial[key], "s1_loss": scoring.s1_loss.get(key),
                                 "snapshots": snapshots, "done": trained >= self.total,
                                 "tokens_trained": self.s1_tokens + trained, "stage2_tokens": trained})

    def close(self) -> None:
        pass


def replay_selection(selection: SelectionResult | str | Path, early_stop: bool = True, racing: bool = False,
                     **changes: Any) -> dict[str, Any]:
    """Replay a learned selector's full-budget ``selection.json`` (a `SelectionResult` or a path) with early
    stopping and/or racing; ``changes`` override other `SelectionConfig` fields (``early_stop_window``,
    ``early_stop_min_jaccard``, ``round_snapshots``, ``racing_keep_fraction``, ...).

    Returns the settings replayed, ``tokens_spent`` vs ``full_tokens`` (and ``saved_fraction``), the stop snapshot
    and its tokens per budget, eliminations, and per budget the replayed layers, the full run's layers and their
    Jaccard."""
    sel = selection if isinstance(selection, SelectionResult) else SelectionResult.load(selection)
    full_config = SelectionConfig.from_dict(sel.config)
    selector = SELECTORS[full_config.base_selector]
    if not selector.kinds:
        raise ConfigError(f"selector {sel.selector!r} trains no candidates; only learned selectors can be replayed")
    if full_config.early_stop or full_config.racing:
        raise ConfigError("replay needs a full-budget selection (run with early_stop and racing off)")
    config = SelectionConfig.from_dict({**sel.config, "early_stop": early_stop, "racing": racing, **changes})
    total, s1_tokens = sel.tokens["per_candidate_stage2"], sel.tokens["per_candidate_stage1"]
    ks = sorted({rules.resolve_budget(b, sel.num_layers) for b in config.budgets})  # racing keeps enough for max(ks)
    executor = _ReplayExecutor(sel, total, s1_tokens, stage2_tokens_per_step(config.stage_config(2)))
    families = {}
    for kind, (start, members) in candidate_families(config, sel.num_layers).items():
        def make_job(member: Member, until: int | None, kind: str = kind) -> dict[str, Any]:
            return {"kind": kind, "member": member, "until_tokens": until}

        families[kind] = score_family(kind, start, members, config, make_job, None, executor, ks, total)
    inputs = SelectInputs(config, sel.num_layers, ks, score_tables(families, ks),
                          eliminated={kind: fam.layers.eliminated for kind, fam in families.items()})
    chosen = {k: selector.select(inputs, k) for k in ks}
    sets = {k: c.sets[0] for k, c in chosen.items()}
    full_sets = {b.k: b.layers for b in sel.budgets.values()}
    spent = sum(fam.layers.tokens_spent + (fam.null.tokens_spent if fam.null else 0) for fam in families.values())
    full = sel.tokens["spent"]
    main = families[selector.kinds[0]].layers
    return {
        "selector": sel.selector,
        "early_stop": early_stop,
        "racing": racing,
        "settings": {k: getattr(config, k) for k in ("early_stop_window", "early_stop_min_jaccard", "round_snapshots",
                                                      "racing_keep_fraction", "racing_margin", "racing_min_keep")},
        "tokens_spent": spent,
        "full_tokens": full,
        "saved_fraction": 1 - spent / full if full else 0.0,
        "stop_snapshot": {str(k): v for k, v in main.stop_by_budget.items()},
        "stop_tokens": {str(k): (main.snapshot_tokens[v] if v is not None else None)
                        for k, v in main.stop_by_budget.items()},
        "eliminated_round": {kind: {str(k): v for k, v in fam.layers.eliminated.items()} for kind, fam in families.items()},
        "ranking": chosen[max(ks)].ranking,
        "budgets": {str(k): {"layers": sets[k], "full_layers": full_sets.get(k),
                             "jaccard": rules.jaccard(sets[k], full_sets[k]) if k in full_sets else None} for k in ks},
    }


__all__ = ["replay_selection"]
