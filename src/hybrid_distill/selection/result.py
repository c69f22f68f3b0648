"""`SelectionResult`: what one selector chose, and the evidence, as written to ``selection.json``.

The JSON keeps plain types (layer keys as strings); `SelectionResult.from_dict` reads it back typed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json, read_json
from . import rules


def _int_keys(d: dict | None) -> dict[int, Any] | None:
    return None if d is None else {int(k): v for k, v in d.items()}


def _str_keys(d: dict | None) -> dict[str, Any] | None:
    return None if d is None else {str(k): v for k, v in sorted(d.items())}


@dataclass
class BudgetSet:
    """The softmax layers chosen for one budget.

    ``sets``: every set chosen for it (one; ``random`` draws several); ``layers`` is the first. Learned selectors
    stopped early take each budget from its own snapshot (``stop_snapshot``). With null candidates,
    ``resolved`` says whether the top-K set is separated from the next layer by more than the noise floor."""

    k: int
    layers: list[int]
    sets: list[list[int]]
    adjacency: int
    expected_adjacency: float
    stop_snapshot: int | None = None
    resolved: bool | None = None

    @classmethod
    def of(cls, k: int, sets: list[list[int]], num_layers: int, **extra: Any) -> BudgetSet:
        sets = [sorted(int(i) for i in s) for s in sets]
        return cls(k, sets[0], sets, rules.adjacency_index(sets[0]), rules.expected_adjacency(k, num_layers), **extra)


@dataclass
class CandidateScoring:
    """The candidates of one kind (``ga``, ``gr``, ``null``): held-out KL per layer and snapshot, and what they cost.

    ``kl[layer]``: KL at each snapshot (``snapshot_tokens``), averaged over seeds where candidates were repeated
    (``seed_kl[layer]``: the final KL per seed); ``stop_by_budget``: the snapshot where early stopping fired per
    budget K (None: did not fire)."""

    kind: str
    start: str | None
    snapshot_tokens: list[int]
    kl: dict[int, list[float]]
    kl_initial: dict[int, float]
    s1_loss: dict[int, float]
    seed_kl: dict[int, dict[int, float]] = field(default_factory=dict)
    stop_by_budget: dict[int, int | None] = field(default_factory=dict)
    eliminated: dict[int, int] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    rounds: int = 0
    tokens_spent: int = 0
    reused: int = 0
    wall_time_s: float = 0.0
    mean_tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "start": self.start, "tokens": self.snapshot_tokens,
            "kl": _str_keys(self.kl), "kl_initial": _str_keys(self.kl_initial), "s1_loss": _str_keys(self.s1_loss),
            "seed_kl": {str(k): _str_keys(v) for k, v in sorted(self.seed_kl.items())},
            "stop_by_budget": _str_keys(self.stop_by_budget), "eliminated": _str_keys(self.eliminated),
            "failures": _str_keys(self.failures), "rounds": self.rounds, "tokens_spent": self.tokens_spent,
            "reused": self.reused, "wall_time_s": self.wall_time_s, "mean_tokens_per_s": self.mean_tokens_per_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CandidateScoring:
        return cls(
            kind=d["kind"], start=d.get("start"), snapshot_tokens=list(d.get("tokens") or []),
            kl=_int_keys(d.get("kl")) or {}, kl_initial=_int_keys(d.get("kl_initial")) or {},
            s1_loss=_int_keys(d.get("s1_loss")) or {},
            seed_kl={int(k): _int_keys(v) for k, v in (d.get("seed_kl") or {}).items()},
            stop_by_budget=_int_keys(d.get("stop_by_budget")) or {}, eliminated=_int_keys(d.get("eliminated")) or {},
            failures=_int_keys(d.get("failures")) or {}, rounds=d.get("rounds", 0), tokens_spent=d.get("tokens_spent", 0),
            reused=d.get("reused", 0), wall_time_s=d.get("wall_time_s", 0.0), mean_tokens_per_s=d.get("mean_tokens_per_s"),
        )


@dataclass
class SelectionResult:
    """One selector's outcome (``selection.json``)."""

    selector: str
    teacher: str
    num_layers: int
    config: dict[str, Any]
    data: dict[str, Any]
    created: str
    budgets: dict[str, BudgetSet]
    source: str = "none"  # where the scores came from (registry: s2, s1, bypass, task, none)
    probe: str | None = None
    candidate_start: str | None = None
    scores: dict[int, float] | None = None
    ranking: list[int] | None = None
    # why the scores carry no information (a bypass task the teacher cannot do); then no budget has a set
    degenerate: str | None = None
    bypass: dict[str, Any] | None = None
    base_student: str | None = None
    stage1_student: str | None = None
    candidates: dict[str, CandidateScoring] = field(default_factory=dict)
    score_tables: dict[str, dict[int, float]] = field(default_factory=dict)
    noise_floor: list[dict[str, Any]] | None = None  # per snapshot (rules.NoiseFloor.to_dict)
    early_stop: dict[str, Any] | None = None
    tokens: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    wall_time_s: float = 0.0

    def set_for(self, budget: Any) -> list[int]:
        """The softmax layers chosen for ``budget`` (a count, ratio, or budget label)."""
        k = rules.resolve_budget(budget, self.num_layers)
        for entry in self.budgets.values():
            if entry.k == k:
                return list(entry.layers)
        raise KeyError(f"selection has no set for budget {budget!r} (K={k}); it has {list(self.budgets)}")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["budgets"] = {label: dataclasses.asdict(b) for label, b in self.budgets.items()}
        d["scores"] = _str_keys(self.scores)
        d["candidates"] = {kind: c.to_dict() for kind, c in self.candidates.items()}
        d["score_tables"] = {name: _str_keys(t) for name, t in self.score_tables.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SelectionResult:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in d.items() if k in known}
        fields["budgets"] = {label: BudgetSet(**{k: v for k, v in b.items() if k in BudgetSet.__dataclass_fields__})
                             for label, b in d["budgets"].items()}
        fields["scores"] = _int_keys(d.get("scores"))
        fields["candidates"] = {kind: CandidateScoring.from_dict(c) for kind, c in (d.get("candidates") or {}).items()}
        fields["score_tables"] = {name: _int_keys(t) for name, t in (d.get("score_tables") or {}).items()}
        return cls(**fields)

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SelectionResult:
        """A ``selection.json`` (or the folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "selection.json"
        data = read_json(path)
        if data is None:
            raise FileNotFoundError(f"no selection file at {path}")
        return cls.from_dict(data)


__all__ = ["BudgetSet", "CandidateScoring", "SelectionResult"]
