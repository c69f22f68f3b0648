"""Steps: a folder's work is reused only under the settings and upstream it was made with."""

from __future__ import annotations

import pytest

from hybrid_distill.artifacts import STEP_FILE, StaleStepError, Step


def _make(folder, settings, upstream=None, content="weights"):
    step = Step(folder, settings, upstream, what="model")
    step.begin()
    (folder / "model.bin").write_text(content)
    step.publish({"content": content})
    return step


def test_begin_refuses_other_settings_naming_each_change(tmp_path):
    _make(tmp_path / "m", {"lr": 1e-3, "steps": 10}, {"stage1": "abc"})
    with pytest.raises(StaleStepError, match=r"lr: 0.001 -> 0.002.*upstream stage1: 'abc' -> 'def'"):
        Step(tmp_path / "m", {"lr": 2e-3, "steps": 10}, {"stage1": "def"}, what="model").begin()


def test_finished_or_cleared_keeps_current_work(tmp_path):
    _make(tmp_path / "m", {"lr": 1e-3})
    rec = Step(tmp_path / "m", {"lr": 1e-3}, what="model").finished_or_cleared(tmp_path / "superseded")
    assert rec is not None and rec.result == {"content": "weights"}
    assert (tmp_path / "m/model.bin").read_text() == "weights" and not (tmp_path / "superseded").exists()


@pytest.mark.parametrize("case", ["other settings", "unfinished", "no record"])
def test_finished_or_cleared_sets_aside_what_is_not_current(tmp_path, case):
    folder = tmp_path / "m"
    if case == "other settings":
        _make(folder, {"lr": 1e-3})
    elif case == "unfinished":
        Step(folder, {"lr": 2e-3}, what="model").begin()
        (folder / "model.bin").write_text("half")
    else:
        folder.mkdir()
        (folder / "model.bin").write_text("by hand")
    step = Step(folder, {"lr": 2e-3}, what="model")
    assert step.finished_or_cleared(tmp_path / "superseded") is None
    assert not folder.exists()  # the caller writes it whole again
    moved = list((tmp_path / "superseded").iterdir())
    assert len(moved) == 1 and (moved[0] / "model.bin").is_file()  # set aside, never deleted
    folder.mkdir()
    (folder / "model.bin").write_text("new")
    step.publish({"content": "new"})
    assert step.finished() is not None and (folder / STEP_FILE).is_file()
