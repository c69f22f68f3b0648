"""``hybrid-distill run --time-limit``: the estimate of a unit of work from what a run measured, the decision to
start it or stop before it, a pipeline stopped during a unit's training (checkpointed, resumed), and the command
line's flag and exit code. (tests/test_run_state.py runs a pipeline across sessions under a time limit;
tests/test_trainer_resume.py the trainer's deadline.)"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hybrid_distill.artifacts import StepRecord
from hybrid_distill.cli import main
from hybrid_distill.config import ConfigError
from hybrid_distill.distill import latest_checkpoint
from hybrid_distill.errors import TIME_LIMIT_EXIT_CODE, TimeLimitReached
from hybrid_distill.pipeline import Pipeline, RunConfig
from hybrid_distill.pipeline.budget import (
    SAFETY_FACTOR,
    Estimate,
    Measured,
    TimeBudget,
    Unit,
    estimate,
    time_limit_seconds,
)
from hybrid_distill.selection import candidates

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_pipeline import _config  # noqa: E402

sys.path.pop(0)

MEASURED = Measured(
    training={"stage1": [(1000, 2.0), (3000, 2.0)], "stage2": [(2000, 8.0)], "final": [(100, 1.0)]},
    seconds={"eval-linear": [10.0], "eval-hybrid": [4.0, 6.0], "eval-teacher": [30.0]},
)


def test_training_is_estimated_from_the_seconds_per_token_of_the_closest_measured_kind():
    assert estimate(Unit("s1", {"stage1": 500}), MEASURED) == Estimate(500 * 4.0 / 4000, 1)  # both Stage-1 runs pooled
    assert estimate(Unit("s2", {"stage2": 100}), MEASURED).seconds == pytest.approx(100 * 8.0 / 2000)
    assert estimate(Unit("hybrid", {"final": 100}), MEASURED).seconds == pytest.approx(1.0)
    # candidates train like Stage 2: without candidates measured, the all-linear Stage 2 is the closest
    assert estimate(Unit("family", {"candidate-stage2": 1000}), MEASURED).seconds == pytest.approx(4.0)
    assert estimate(Unit("family", {"candidate-stage1": 1000}), MEASURED).seconds == pytest.approx(1.0)
    only_final = Measured(training={"final": [(100, 1.0)]})
    assert estimate(Unit("s2", {"stage2": 50}), only_final) == Estimate(0.5, 1)
    # zero tokens (finished) cost nothing; runs without tokens or time are no measurement
    assert estimate(Unit("s1", {"stage1": 0}), Measured()) == Estimate(0.0, 0)
    assert estimate(Unit("s1", {"stage1": 10}), Measured(training={"stage1": [(0, 3.0), (5, 0.0)]})) == \
        Estimate(0.0, 0, ("stage1",))


def test_other_work_is_estimated_from_the_mean_time_of_the_closest_measured_kind():
    assert estimate(Unit("e", others=("eval-hybrid",)), MEASURED).seconds == pytest.approx(5.0)
    assert estimate(Unit("e", others=("eval-linear",)), MEASURED).seconds == pytest.approx(10.0)
    # a hybrid's evaluation, none measured yet: the all-linear student's; then the teacher's
    assert estimate(Unit("e", others=("eval-hybrid",)), Measured(seconds={"eval-linear": [7.0]})) == Estimate(7.0, 1)
    assert estimate(Unit("e", others=("eval-hybrid",)), Measured(seconds={"eval-teacher": [9.0]})) == Estimate(9.0, 1)
    # a final hybrid: training and evaluation, each from its own measurements
    unit = Unit("hybrid", {"final": 300}, ("eval-hybrid",))
    assert estimate(unit, MEASURED) == Estimate(pytest.approx(3.0 + 5.0), 2)
    assert estimate(unit, Measured(training={"final": [(100, 1.0)]})) == Estimate(3.0, 1, ("eval-hybrid",))


def test_nothing_measured_leaves_a_unit_unestimated():
    unit = Unit("hybrid", {"final": 300}, ("eval-hybrid", "report"))
    assert estimate(unit, Measured()) == Estimate(0.0, 0, ("final", "eval-hybrid", "report"))
    assert estimate(Unit("scoring", others=("scoring-task",)), Measured(seconds={"scoring-bypass": [3.0]})).parts == 0


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_unit_starts_only_when_its_estimate_times_the_safety_factor_fits(caplog):
    clock = Clock()
    limit = TimeBudget(100, clock)
    assert limit.deadline == 1100.0 and SAFETY_FACTOR == 1.25
    fits = Unit("a", {"stage1": 80 * 4000 // 4})  # 80 s: 100 s with the factor
    assert limit.check(fits, MEASURED).seconds == pytest.approx(80.0)
    clock.now += 0.5  # 99.5 s left
    with pytest.raises(TimeLimitReached) as stop:
        limit.check(fits, MEASURED)
    assert (stop.value.unit, stop.value.estimate_s, stop.value.left_s, stop.value.during) == ("a", 80.0, 99.5, False)
    assert str(stop.value) == ("time limit: stopped before a (estimated 80 s, 100 s left); run the same command again "
                               "to continue")
    # a unit that could not fit even in a command of its own says so
    with pytest.raises(TimeLimitReached, match=r"estimated 90 s.*more than the whole time limit \(100 s\)") as stop:
        limit.check(Unit("b", {"stage1": 90 * 1000}), MEASURED)
    assert stop.value.limit_s == 100
    # nothing measured: started (and said so) while time is left; a unit without work always starts
    with caplog.at_level(logging.INFO, logger="hybrid_distill.pipeline.budget"):
        assert limit.check(Unit("c", others=("report",)), MEASURED).parts == 0
    assert "c is not estimated" in caplog.text
    clock.now = 1100.0
    with pytest.raises(TimeLimitReached, match=r"stopped before c \(not estimated, 0 s left\)"):
        limit.check(Unit("c", others=("report",)), MEASURED)
    limit.check(Unit("done", {"stage1": 0}), MEASURED)
    # the stop travels from worker processes (pickled) as itself
    again = pickle.loads(pickle.dumps(stop.value))
    assert type(again) is TimeLimitReached and str(again) == str(stop.value)


@pytest.mark.parametrize("value", [0, -1, "abc", float("nan"), float("inf"), None, True])
def test_bad_time_limits_are_refused_naming_the_setting(value):
    with pytest.raises(ConfigError, match=r"time_limit must be a number of seconds > 0"):
        time_limit_seconds(value)
    assert time_limit_seconds("2.5") == 2.5


def _start_every_unit(monkeypatch):
    """Every unit starts (as one estimated wrong would): only the trainer's deadline stops the run."""
    monkeypatch.setattr(TimeBudget, "check", lambda self, unit, measured: Estimate(0.0))


def test_training_still_running_at_the_deadline_checkpoints_and_the_run_resumes_it(tmp_path, monkeypatch):
    cfg = RunConfig.from_dict(_config(tmp_path))
    run = Path(cfg.run_dir)
    _start_every_unit(monkeypatch)
    with pytest.raises(TimeLimitReached) as stop:
        Pipeline(cfg, progress=False).run(("stage1",), time_limit=1e-6)
    assert stop.value.during and stop.value.unit == "stage1"
    assert str(stop.value).startswith("time limit: stopped during stage1 (")
    assert latest_checkpoint(run / "stage1").name == "step_00000001"  # after its first step
    assert StepRecord.read(run / "stage1").state == "started" and not (run / "pipeline.json").exists()
    monkeypatch.undo()
    state = Pipeline(cfg, progress=False).run(("stage1",))
    assert StepRecord.read(run / "stage1").result["resumed_from_step"] == 1 and "stage1" in state["stages"]


def test_a_candidate_still_training_at_the_deadline_checkpoints_and_the_selection_resumes_it(tmp_path, monkeypatch):
    cfg = RunConfig.from_dict(_config(tmp_path))
    Pipeline(cfg, progress=False).run(("stage1", "stage2"))
    _start_every_unit(monkeypatch)
    # the candidates' own check at their start sees time left: the first one's training meets the deadline
    monkeypatch.setattr(candidates, "time", SimpleNamespace(time=lambda: 0.0, perf_counter=time.perf_counter))
    with pytest.raises(TimeLimitReached) as stop:
        Pipeline(cfg, progress=False).run(("selection",), time_limit=1e-6)
    assert stop.value.during and stop.value.unit == "candidate ga-layer00-seed0"
    stage2 = next((Path(cfg.run_dir) / "selection" / "candidates").glob("*/ga-layer00-seed0")) / "stage2"
    assert latest_checkpoint(stage2).name == "step_00000001" and StepRecord.read(stage2).state == "started"
    monkeypatch.undo()
    state = Pipeline(cfg, progress=False).run(("selection",))
    assert "selection" in state["stages"] and StepRecord.read(stage2).result["resumed_from_step"] == 1


def test_a_candidate_started_past_the_deadline_stops_before_any_work(tmp_path):
    job = candidates.CandidateJob(kind="ga", layer=1, start="stage2", seed=0, run_dir=str(tmp_path / "candidate"),
                                  teacher="tiny:llama-gqa", base_student=str(tmp_path / "none"), mixers=["gdn"] * 4,
                                  data={"source": "default"}, stage1=None, stage2={"target_tokens": 128},
                                  deadline=time.time() - 1)
    with pytest.raises(TimeLimitReached, match="stopped during candidate ga-layer01-seed0"):
        candidates.run_candidate(job)
    assert [p.name for p in (tmp_path / "candidate").iterdir()] == ["step.json"]  # its record only: no work started


def test_the_command_line_exits_75_with_one_line_naming_the_unit(tmp_path, monkeypatch, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path)))
    _start_every_unit(monkeypatch)
    assert main(["run", str(path), "--stages", "stage1", "--time-limit", "0.000001", "--no-progress"]) == 75
    assert TIME_LIMIT_EXIT_CODE == 75
    err = [line for line in capsys.readouterr().err.splitlines() if "time limit: stopped" in line]
    assert err == [("hybrid-distill run: time limit: stopped during stage1 (the time limit passed; its training "
                    "checkpointed where it was); run the same command again to continue")]
    assert main(["run", str(path), "--dry-run", "--time-limit", "5"]) == 0  # ignored
    for bad in ("0", "abc"):
        with pytest.raises(SystemExit) as exit_:
            main(["run", str(path), "--time-limit", bad])
        assert exit_.value.code == 2
        assert f"argument --time-limit: must be a number of seconds > 0, got '{bad}'" in capsys.readouterr().err
