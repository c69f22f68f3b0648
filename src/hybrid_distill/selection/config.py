"""`SelectionConfig`: which selector runs, for which budgets, how candidates train and run.

Validation happens at creation (before any compute); errors name the field
(``SelectionConfig.<field>``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..distill.config import ConfigError, DistillConfig

# Selectors whose scores come from one-swap candidates trained from the all-linear student (greedy
# addition, "ga") or from the teacher (greedy removal, "gr").
LEARNED_SELECTORS = ("ga-s2", "ga-s1", "gr-s2", "gr-s1", "avg-s2", "avg-s1", "smart", "ga-s2-dist")
# Selectors that bypass one teacher layer at a time and measure the damage.
BYPASS_SELECTORS = ("act-mse", "lm-ppl", "kv", "ar", "ar-mh", "vt", "cwe")
# Selectors that need no scoring.
RULE_SELECTORS = ("uniform", "given")
SELECTORS = LEARNED_SELECTORS + BYPASS_SELECTORS + RULE_SELECTORS
EXECUTORS = ("inline", "local", "ray", "slurm")

# Candidate runs are short: Stage 1 is skipped by default (candidates start from the shared Stage-1
# mixers, as the paper's code does) and Stage 2 gets a fraction of the full Stage-2 budget.
CANDIDATE_STAGE2_DEFAULTS: dict[str, Any] = {"target_tokens": 100_000_000}
# A candidate starts a fresh AdamW on an already distilled student: without warm-up its first steps are
# full-size sign-like updates that raise the held-out KL (GPU reproduction, docs/reproduction.md: 15 of 16
# 12-step candidates at lr 5e-4 ended above their step-0 KL; on the CPU default run a 3-step warm-up removed
# the jump for all 6 layers, a 1-step one did nothing). Default warm-up: 10% of the budget, at least 3 steps
# when that is at most 30% of it.
CANDIDATE_WARMUP_FRACTION = 0.1
CANDIDATE_WARMUP_MIN_STEPS = 3


def candidate_kinds(selector: str) -> tuple[str, ...]:
    """Which candidate families a learned selector needs: "ga" (one layer softmax), "gr" (one layer linear)."""
    if selector.startswith("avg"):
        return ("ga", "gr")
    if selector.startswith("gr"):
        return ("gr",)
    return ("ga",)


@dataclass
class SelectionConfig:
    """Settings of one layer-selection run."""

    selector: str = "ga-s2"
    budgets: list[Any] = field(default_factory=lambda: [0.25])  # counts (int >= 1) or ratios (0 < r < 1)
    probe: str = "gdn"  # linear mixer used while scoring (paper §5.2); may differ from the final student's
    mixer_options: dict[str, Any] | None = None

    # Candidate training (learned selectors): DistillConfig fields for each candidate's short stages.
    stage1: dict[str, Any] | None = None  # None: no candidate Stage 1 (Stage-1 loss is only evaluated)
    stage2: dict[str, Any] = field(default_factory=dict)
    snapshot_every_tokens: int | None = None  # held-out KL snapshot interval; None: 1/10 of the Stage-2 budget

    # Early stopping (paper App. B) and racing (successive halving).
    early_stop: bool = False
    early_stop_window: int = 10
    early_stop_min_jaccard: float = 0.90
    racing: bool = False
    racing_keep_fraction: float = 0.5
    racing_margin: float = 0.0
    racing_min_keep: int | None = None  # None: largest budget + 2
    round_snapshots: int = 5  # snapshots per round when stopping early or racing

    # Execution.
    executor: str = "inline"
    workers: int | None = None  # local: processes (default: one per visible GPU, else 1)
    executor_options: dict[str, Any] = field(default_factory=dict)  # ray.remote / submitit parameters
    retries: int = 1

    # Selector-specific.
    layers: list[int] | None = None  # "given": the softmax layers (e.g. a published PostNAS list)
    distance_lambda: float = 0.025  # "ga-s2-dist" (App. E)
    distance_sigma: float = 1.0
    smart_terminal_quantile: float = 0.5
    task_length: int = 512  # task-guided selectors: prompt length in tokens
    task_samples: int = 32
    bypass_batches: int = 8  # act-mse / lm-ppl: held-out batches
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def _fail(self, name: str, message: str):
        raise ConfigError(f"SelectionConfig.{name} {message}, got {getattr(self, name)!r}")

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field."""
        from ..modeling.configuration_hybrid import LINEAR_MIXERS

        if self.selector not in SELECTORS:
            self._fail("selector", f"must be one of {list(SELECTORS)}")
        if self.selector != "given" and (not isinstance(self.budgets, (list, tuple)) or not self.budgets):
            self._fail("budgets", "must be a non-empty list of counts (>= 1) or ratios (0 < r < 1)")
        if self.probe not in LINEAR_MIXERS:
            self._fail("probe", f"must be one of {list(LINEAR_MIXERS)}")
        if self.selector == "given":
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                self._fail("layers", "must list the softmax layers (0-based ints) for selector 'given' (command line: --layers 3,14,20)")
        for name in ("stage1", "stage2"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, dict):
                    self._fail(name, "must be a mapping of DistillConfig fields")
                self.stage_config(int(name[-1]))  # raises ConfigError naming the DistillConfig field
        self._positive_int("snapshot_every_tokens", optional=True)
        self._positive_int("early_stop_window")
        if self.early_stop_window < 2:
            self._fail("early_stop_window", "must be >= 2")
        if not 0.0 < self.early_stop_min_jaccard <= 1.0:
            self._fail("early_stop_min_jaccard", "must be in (0, 1]")
        if not 0.0 < self.racing_keep_fraction <= 1.0:
            self._fail("racing_keep_fraction", "must be in (0, 1]")
        if not (isinstance(self.racing_margin, (int, float)) and math.isfinite(self.racing_margin) and self.racing_margin >= 0):
            self._fail("racing_margin", "must be a finite number >= 0")
        self._positive_int("racing_min_keep", optional=True)
        self._positive_int("round_snapshots")
        if self.executor not in EXECUTORS:
            self._fail("executor", f"must be one of {list(EXECUTORS)}")
        self._positive_int("workers", optional=True)
        if not isinstance(self.retries, int) or self.retries < 0:
            self._fail("retries", "must be an integer >= 0")
        if not (self.distance_lambda >= 0 and self.distance_sigma > 0):
            self._fail("distance_lambda" if self.distance_lambda < 0 else "distance_sigma", "must be >= 0 / > 0")
        if not 0.0 <= self.smart_terminal_quantile <= 1.0:
            self._fail("smart_terminal_quantile", "must be in [0, 1]")
        for name in ("task_length", "task_samples", "bypass_batches", "batch_size"):
            self._positive_int(name)

    def _positive_int(self, name: str, optional: bool = False):
        value = getattr(self, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            self._fail(name, "must be a positive integer")

    # -- derived ----------------------------------------------------------------------------------
    def stage_config(self, stage: int) -> DistillConfig | None:
        """The `DistillConfig` of each candidate's Stage ``stage`` (1 or 2); None when skipped."""
        overrides = self.stage1 if stage == 1 else {**CANDIDATE_STAGE2_DEFAULTS, **self.stage2}
        if overrides is None:
            return None
        fields = {"progress": False, "save_final_model": True, "seed": self.seed, **overrides, "stage": stage}
        try:
            cfg = DistillConfig.from_dict(fields)
        except ConfigError as err:
            raise ConfigError(f"SelectionConfig.stage{stage}: {err}") from err
        if stage == 2 and "warmup_tokens" not in overrides:
            target, step = cfg.target_tokens, cfg.global_batch_size * (cfg.seq_len or 4096)  # seq_len None: from the data
            cfg = cfg.replace(warmup_tokens=max(int(target * CANDIDATE_WARMUP_FRACTION),
                                                min(CANDIDATE_WARMUP_MIN_STEPS * step, int(0.3 * target))))
        return cfg

    def snapshot_interval(self) -> int:
        """Tokens between held-out KL snapshots of the candidates."""
        if self.snapshot_every_tokens is not None:
            return self.snapshot_every_tokens
        return max(1, self.stage_config(2).target_tokens // 10)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SelectionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown SelectionConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes) -> SelectionConfig:
        return dataclasses.replace(self, **changes)
