"""`SelectionConfig`: which selector runs, for which budgets, how candidates train and run.

Validation happens at creation (before any compute); errors name the field
(``SelectionConfig.<field>``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from ..config import (
    Config,
    ConfigError,
    Invalid,
    boolean,
    integer,
    list_of,
    mapping,
    one_of,
    optional,
    real,
    setting,
)
from ..distill.config import DistillConfig
from ..modeling.configuration_hybrid import LINEAR_MIXERS
from .registry import (
    SELECTORS,
    candidate_kinds,
)

EXECUTORS = ("inline", "local", "ray", "slurm")
# Default held-out snapshots per candidate budget: room for the early-stopping rule's window of 10 to fire well
# before the end.
SNAPSHOTS_PER_CANDIDATE = 40


def split_selector(name: str) -> tuple[str, str | None]:
    """``"ga-s2@stage2"`` -> ``("ga-s2", "stage2")``; a plain name -> ``(name, None)``."""
    base, _, start = str(name).partition("@")
    return base, (start or None)


def check_selector_name(value: Any) -> str:
    """A selector name, optionally with a greedy-addition start (``ga-s2@stage2``); Invalid otherwise."""
    base, start = split_selector(value)
    if base not in SELECTORS:
        raise Invalid(f"must be one of {list(SELECTORS)}")
    if start is not None:
        if start not in CANDIDATE_STARTS:
            raise Invalid(f"names an unknown candidate start {start!r}; choose from {list(CANDIDATE_STARTS)}")
        if "ga" not in candidate_kinds(base):
            raise Invalid(f"takes no candidate start: {base} trains no greedy-addition candidates")
    return str(value)

# Where a greedy-addition candidate starts (the layer is restored from the teacher in each):
#   stage1:    the all-linear student after Stage 1, then Stage 2 for the candidate budget (the authors' code:
#              GA-S2 re-runs only Stage 2 from a shared Stage-1 checkpoint, reference-code-notes.md);
#   stage2:    the all-linear student after Stage 2, then Stage 2;
#   stage2-s1: the all-linear student after Stage 2, then Stage 1 and Stage 2 (the paper's Algorithm 1 as written).
CANDIDATE_STARTS = ("stage1", "stage2", "stage2-s1")
# Candidate Stage 2 is short: a fraction of the full Stage-2 budget.
CANDIDATE_STAGE2_DEFAULTS: dict[str, Any] = {"target_tokens": 100_000_000}
# A candidate starts a fresh AdamW on an already distilled student: without warm-up its first steps are
# full-size sign-like updates that raise the held-out KL (GPU reproduction, docs/reproduction.md: 15 of 16
# 12-step candidates at lr 5e-4 ended above their step-0 KL; on the CPU default run a 3-step warm-up removed
# the jump for all 6 layers, a 1-step one did nothing). Default warm-up: 10% of the budget, at least 3 steps
# when that is at most 30% of it.
CANDIDATE_WARMUP_FRACTION = 0.1
CANDIDATE_WARMUP_MIN_STEPS = 3


def _stage_overrides(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Invalid("must be a mapping of DistillConfig fields")
    return dict(value)


def _budgets(value: Any) -> list[Any]:
    if not isinstance(value, (list, tuple)) or not value:
        raise Invalid("must be a non-empty list of counts (>= 1) or ratios (0 < r < 1)")
    return list(value)


def parse_budgets(text: str) -> list[Any]:
    """``"5,0.25,25%"`` -> ``[5, 0.25, "25%"]`` (counts, ratios, percentages)."""
    out: list[Any] = []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        if part.endswith("%"):
            out.append(part)
        else:
            try:
                out.append(float(part) if "." in part or "e" in part.lower() else int(part))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"expected comma-separated counts (5), ratios (0.25) or percentages (25%), got {text!r}") from None
    return out


@dataclass
class SelectionConfig(Config):
    """Settings of one layer-selection run."""

    selector: str = setting("ga-s2", check=check_selector_name, help="which layers keep softmax: a selector name, for greedy "
                            "addition optionally with its candidates' start, e.g. ga-s2@stage2")
    budgets: list[Any] = setting(default_factory=lambda: [0.25], check=_budgets, flag="--budget", parse=parse_budgets,
                                 help="softmax layers per budget: counts (5), ratios (0.25) or percentages (25%)")
    probe: str = setting("gdn", check=one_of(*LINEAR_MIXERS), help="linear mixer used while scoring (paper section 5.2)")
    mixer_options: dict[str, Any] | None = setting(None, flag=False, help="options of the probe mixer")

    # Candidate training (learned selectors): DistillConfig fields for each candidate's short stages.
    stage1: dict[str, Any] | None = setting(None, check=_stage_overrides, flag=False,
                                            help="candidate Stage 1 (None: none; its loss is only evaluated)")
    stage2: dict[str, Any] = setting(default_factory=dict, check=_stage_overrides, flag=False,
                                     help="candidate Stage 2 (DistillConfig fields over the candidate defaults)")
    candidate_start: str = setting("stage1", check=one_of(*CANDIDATE_STARTS),
                                   help="where a greedy-addition candidate starts: stage1 (the authors' code), stage2, "
                                   "or stage2-s1 (the paper's Algorithm 1: Stage 1 again, then Stage 2)")
    snapshot_every_tokens: int | None = setting(None, check=optional(integer(1)), flag="--snapshot-every",
                                                help="held-out KL snapshot interval (default: the candidate budget / "
                                                f"{40})")
    snapshot_batches: int | None = setting(None, check=optional(integer(1)),
                                           help="held-out batches per snapshot (default: as many as keep a snapshot "
                                           "under 10% of the compute between snapshots, at least one)")
    null_candidates: int = setting(3, check=integer(0),
                                   help="candidates that restore no layer, trained on the candidates' schedule with "
                                   "other data-order seeds: the noise floor of the layer scores")
    candidate_seeds: list[int] = setting(default_factory=list, check=list_of(integer(0), min_len=0, what="seeds"),
                                         help="more data-order seeds to train candidates with (scores are averaged)")
    candidate_seed_layers: list[int] | None = setting(None, check=optional(list_of(integer(0), what="0-based layers")),
                                                      help="layers whose candidates candidate_seeds repeats (default: all)")

    # Early stopping (paper App. B) and racing (successive halving).
    early_stop: bool = setting(False, check=boolean, help="stop scoring when the rolling-Jaccard rule fires")
    early_stop_window: int = setting(10, check=integer(2), help="snapshots the rule looks back over")
    early_stop_min_jaccard: float = setting(0.90, check=real(0.0, exclusive=True, maximum=1.0),
                                            help="mean pairwise Jaccard of the window's top-K sets needed to stop")
    racing: bool = setting(False, check=boolean, help="successive halving of candidates")
    racing_keep_fraction: float = setting(0.5, check=real(0.0, exclusive=True, maximum=1.0))
    racing_margin: float = setting(0.0, check=real(0.0))
    racing_min_keep: int | None = setting(None, check=optional(integer(1)), help="default: largest budget + 2")
    round_snapshots: int = setting(1, check=integer(1),
                                   help="snapshots per round when stopping early or racing (the rule is checked at "
                                   "every snapshot; a round is how far candidates train between checks)")

    # Execution.
    executor: str = setting("inline", check=one_of(*EXECUTORS), help="where candidates run")
    workers: int | None = setting(None, check=optional(integer(1)),
                                  help="local executor: processes (default: one per visible GPU, else 1)")
    executor_options: dict[str, Any] = setting(default_factory=dict, check=mapping, flag=False,
                                               help="ray.remote / submitit parameters")
    retries: int = setting(1, check=integer(0), help="retries of a failed candidate")

    # Selector-specific.
    layers: list[int] | None = setting(None, check=optional(list_of(integer(0), what="0-based layer indices")),
                                       help="selector 'given': the softmax layers, e.g. 3,14,20")
    distance_lambda: float = setting(0.025, check=real(0.0), help="ga-s2-dist (App. E)")
    distance_sigma: float = setting(1.0, check=real(0.0, exclusive=True), help="ga-s2-dist (App. E)")
    smart_terminal_quantile: float = setting(0.5, check=real(0.0, maximum=1.0))
    uniform_anchor: str = setting("end", check=one_of("end", "center"),
                                  help="uniform: each block's last layer (the authors' configs: 3, 7, 11, 15 of 16 at K=4) "
                                  "or its centre")
    random_sets: int = setting(3, check=integer(1), help="random: seeded K-sets per budget")
    task_length: int = setting(512, check=integer(1), help="task-guided selectors: prompt length in tokens")
    task_samples: int = setting(32, check=integer(1), help="task-guided selectors: samples")
    bypass_batches: int = setting(8, check=integer(1), help="act-mse / lm-ppl: held-out batches")
    batch_size: int = setting(8, check=integer(1), help="bypass selectors: batch size")
    seed: int = setting(0, check=integer(0))

    def validate(self) -> None:
        base, start = split_selector(self.selector)
        if start is not None and start != self.candidate_start:
            raise self.invalid("selector", f"names candidate start {start!r} while candidate_start is "
                                           f"{self.candidate_start!r}; use one of them")
        if self.candidate_start == "stage2-s1" and self.stage1 is None and "ga" in candidate_kinds(base):
            raise self.invalid("stage1", "must give the candidates' Stage 1 (e.g. {target_tokens: ...}) when "
                                         "candidate_start is stage2-s1")
        if base == "given" and not self.layers:
            raise self.invalid("layers", "must list the softmax layers (0-based ints) for selector 'given' "
                                         "(command line: --layers 3,14,20)")
        for stage in (1, 2):
            self.stage_config(stage)  # raises ConfigError naming the DistillConfig field

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
            raise err.relocated([*self._root(), f"stage{stage}"]) from None
        if stage == 2 and "warmup_tokens" not in overrides:
            target, step = cfg.target_tokens, cfg.global_batch_size * (cfg.seq_len or 4096)  # seq_len None: from the data
            cfg = cfg.replace(warmup_tokens=max(int(target * CANDIDATE_WARMUP_FRACTION),
                                                min(CANDIDATE_WARMUP_MIN_STEPS * step, int(0.3 * target))))
        return cfg

    def snapshot_interval(self) -> int:
        """Tokens between held-out KL snapshots of the candidates."""
        if self.snapshot_every_tokens is not None:
            return self.snapshot_every_tokens
        return max(1, self.stage_config(2).target_tokens // SNAPSHOTS_PER_CANDIDATE)

    def snapshot_schedule(self) -> tuple[int, int]:
        """(tokens between a candidate's held-out snapshots, held-out batches per snapshot). A candidate's
        trainer evaluates batches of ``eval_batch_size`` (default: its micro-batch) sequences of its ``seq_len``."""
        cfg = self.stage_config(2)
        batch = cfg.eval_batch_size or cfg.micro_batch(1)
        return self.snapshot_interval(), self.snapshot_eval_batches(batch * cfg.data_seq_len)

    def snapshot_eval_batches(self, batch_tokens: int) -> int:
        """Held-out batches of ``batch_tokens`` tokens per snapshot: ``snapshot_batches``, else as many as cost
        at most 10% of the compute between snapshots. A snapshot runs teacher and student forward (about 4N
        FLOPs a token for N parameters), training runs the teacher forward and the student forward and
        backward (about 8N), so 10% allows a fifth of the interval's tokens."""
        if self.snapshot_batches is not None:
            return self.snapshot_batches
        return max(1, self.snapshot_interval() // (5 * batch_tokens))

    @property
    def base_selector(self) -> str:
        """The registry name of ``selector`` (without an ``@start`` suffix)."""
        return split_selector(self.selector)[0]
