"""Time limits of ``hybrid-distill run --time-limit``: how long a unit of work is estimated to take, from what the
run folder has measured, and whether it fits in the time left.

A *unit* is work that is kept only once it is finished (a run folder carried between machines leaves unfinished
work out): Stage 1, Stage 2, one candidate family, one selector's bypass or task scoring, one final hybrid (trained,
saved, exported and evaluated), one other evaluation, the report. Before a unit starts, `TimeBudget.check` estimates
it and stops the run (`TimeLimitReached`) unless the estimate times `SAFETY_FACTOR` fits in the time left.

Estimates come from the run folder's own records, so they hold in a resumed or moved run (`measured_in`): training
from the tokens a unit trains times the seconds per token of comparable finished runs (`TRAINING_LIKE`, the
trainer's recorded compute time, held-out evaluations included), anything else from the mean time of comparable
finished work (`SECONDS_LIKE`, e.g. ``evaluation_seconds`` of earlier evaluations). They leave out loading models and
data and writing files; `SAFETY_FACTOR` covers that, and the trainer's hard deadline stops a unit estimated wrong.
A unit with nothing measured to estimate it from is started while time is left.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..artifacts import StaleStepError, StepRecord, canonical
from ..config import ConfigError
from ..errors import TimeLimitReached
from ..evaluation.suite import evaluation_seconds
from ..fileio import read_json
from ..layout import RunLayout, TrainLayout

logger = logging.getLogger(__name__)

# A unit starts only when its estimate times this fits in the time left.
SAFETY_FACTOR = 1.25

# The measured kinds of training a unit's kind takes its seconds per token from, the closest first: the all-linear
# student's Stage 1 and Stage 2, the candidates' Stage 1 and Stage 2, the final hybrids (they train like Stage 2).
TRAINING_LIKE: dict[str, tuple[str, ...]] = {
    "stage1": ("stage1", "candidate-stage1"),
    "stage2": ("stage2", "final", "candidate-stage2"),
    "candidate-stage1": ("candidate-stage1", "stage1"),
    "candidate-stage2": ("candidate-stage2", "stage2", "final"),
    "final": ("final", "stage2", "candidate-stage2"),
}
# The same for other work, estimated as the mean time of comparable finished work: evaluations (a hybrid's is
# close to the all-linear student's), bypass and task scoring, the report (never measured).
SECONDS_LIKE: dict[str, tuple[str, ...]] = {
    "eval-teacher": ("eval-teacher", "eval-hybrid", "eval-linear"),
    "eval-linear": ("eval-linear", "eval-hybrid", "eval-teacher"),
    "eval-hybrid": ("eval-hybrid", "eval-linear", "eval-teacher"),
    "scoring-bypass": ("scoring-bypass",),
    "scoring-task": ("scoring-task",),
    "report": (),
}


@dataclass(frozen=True)
class Measured:
    """What a run folder has measured: (tokens, seconds) of each finished training run, and the seconds of each
    other finished piece of work, by kind (`TRAINING_LIKE`, `SECONDS_LIKE`)."""

    training: Mapping[str, Sequence[tuple[int, float]]] = field(default_factory=dict)
    seconds: Mapping[str, Sequence[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """A unit of work: ``tokens`` to train by kind of training, and one piece of each kind in ``others``."""

    name: str
    tokens: Mapping[str, int] = field(default_factory=dict)
    others: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.others and not any(t > 0 for t in self.tokens.values())


@dataclass(frozen=True)
class Estimate:
    """Seconds of the parts of a unit that something measured estimates (``parts`` of them), and the parts nothing
    does (``unmeasured``)."""

    seconds: float
    parts: int = 0
    unmeasured: tuple[str, ...] = ()


def seconds_per_token(measured: Measured, kind: str) -> float | None:
    """Seconds a token of training of ``kind`` takes: total seconds over total tokens of the closest measured kind."""
    for like in TRAINING_LIKE[kind]:
        runs = [(t, s) for t, s in measured.training.get(like, ()) if t > 0 and s > 0]
        if runs:
            return sum(s for _, s in runs) / sum(t for t, _ in runs)
    return None


def mean_seconds(measured: Measured, kind: str) -> float | None:
    """Mean seconds of finished work of the closest measured kind to ``kind``."""
    for like in SECONDS_LIKE[kind]:
        times = [s for s in measured.seconds.get(like, ()) if s > 0]
        if times:
            return sum(times) / len(times)
    return None


def estimate(unit: Unit, measured: Measured) -> Estimate:
    """How long ``unit`` takes, by what ``measured`` holds: a pure function of the two."""
    parts = [(kind, seconds_per_token(measured, kind), tokens) for kind, tokens in unit.tokens.items() if tokens > 0]
    parts += [(kind, mean_seconds(measured, kind), 1) for kind in unit.others]
    known = [per * count for _, per, count in parts if per is not None]
    return Estimate(sum(known), len(known), tuple(kind for kind, per, _ in parts if per is None))


def time_limit_seconds(value: Any, name: str = "time_limit") -> float:
    """``value`` as a time limit in seconds; ConfigError naming ``name`` unless it is a finite number > 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds > 0):
        reason = f"must be a number of seconds > 0, got {value!r}"
        raise ConfigError(f"{name} {reason}", [name], reason)
    return seconds


class TimeBudget:
    """A time limit of ``seconds`` from now (``clock``: `time.time`; the deadline is a ``time.time()``, so that other
    processes, e.g. the candidates' workers, can compare against it)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.time):
        self.seconds = time_limit_seconds(seconds)
        self.clock = clock
        self.deadline = clock() + self.seconds

    def left(self) -> float:
        return self.deadline - self.clock()

    def check(self, unit: Unit, measured: Measured) -> Estimate:
        """Let ``unit`` start, or stop the run before it (`TimeLimitReached`): a unit with work starts when its
        estimate times `SAFETY_FACTOR` fits in the time left, or, with nothing measured to estimate it from, while
        any time is left; a unit without work always starts."""
        est, left = estimate(unit, measured), self.left()
        if unit.empty:
            return est
        if not est.parts:
            if left <= 0:
                raise TimeLimitReached(unit.name, None, left)
            logger.info("time limit: %s is not estimated (nothing measured to estimate it from); starting it, %.0f s "
                        "left", unit.name, left)
            return est
        if est.seconds * SAFETY_FACTOR > left:
            never = est.seconds * SAFETY_FACTOR > self.seconds
            raise TimeLimitReached(unit.name, est.seconds, left, limit_s=self.seconds if never else None)
        without = f" (without its {', '.join(est.unmeasured)}: nothing measured)" if est.unmeasured else ""
        logger.info("time limit: starting %s, estimated %.0f s%s, %.0f s left", unit.name, est.seconds, without, left)
        return est


def _finished(folder) -> StepRecord | None:
    try:
        record = StepRecord.read(folder)
    except StaleStepError:  # a damaged record measures nothing
        return None
    return record if record is not None and record.state == "done" else None


def _training(layout: TrainLayout) -> tuple[int, float] | None:
    """(tokens, compute seconds) of a finished training run, from its step record."""
    record = _finished(layout.root)
    result = (record.result or {}) if record is not None else {}
    if not result.get("tokens") or not result.get("wall_time_s"):
        return None
    return int(result["tokens"]), float(result["wall_time_s"])


def _subfolders(folder) -> list:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def measured_in(layout: RunLayout, linear: str, eval_settings: Mapping[str, Any] | None = None) -> Measured:
    """What the run folder ``layout`` has measured (`Measured`), from its records: its finished training runs
    (all-linear stages, candidates' stages, final hybrids), its finished evaluations (only those made under
    ``eval_settings``, when given: an evaluation's settings but the model), and its bypass and task selections.
    ``linear``: the run's linear mixer (names the all-linear student's evaluation)."""
    training: dict[str, list[tuple[int, float]]] = {}
    seconds: dict[str, list[float]] = {}
    wanted = canonical(dict(eval_settings)) if eval_settings is not None else None

    def add_run(kind: str, run: TrainLayout) -> None:
        measured = _training(run)
        if measured is not None:
            training.setdefault(kind, []).append(measured)

    for stage in ("stage1", "stage2"):
        add_run(stage, layout.stage(stage))
    for family in _subfolders(layout.selection.candidates):
        for candidate in _subfolders(family):
            cand = layout.selection.candidate(family.name, candidate.name)
            add_run("candidate-stage1", cand.stage1)
            add_run("candidate-stage2", cand.stage2)
    for run in _subfolders(layout.final_runs):
        add_run("final", layout.final_run(run.name))
    for folder in _subfolders(layout.evals):
        record = _finished(folder)
        if record is None:
            continue
        if wanted is not None and {k: v for k, v in record.settings.items() if k != "model"} != wanted:
            continue
        kind = {"teacher": "eval-teacher", f"all-{linear}": "eval-linear"}.get(folder.name, "eval-hybrid")
        seconds.setdefault(kind, []).append(evaluation_seconds(read_json(folder / "results.json") or {}))
    for folder in _subfolders(layout.selection.root):
        selection = read_json(layout.selection.selection_file(folder.name)) or {}
        if selection.get("source") in ("bypass", "task") and selection.get("wall_time_s"):
            seconds.setdefault(f"scoring-{selection['source']}", []).append(float(selection["wall_time_s"]))
    return Measured(training, seconds)


__all__ = ["SAFETY_FACTOR", "SECONDS_LIKE", "TRAINING_LIKE", "Estimate", "Measured", "TimeBudget", "Unit", "estimate",
           "mean_seconds", "measured_in", "seconds_per_token", "time_limit_seconds"]
