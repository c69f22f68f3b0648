"""Every path of a run folder, in one place.

``TrainLayout``: one distillation run (a stage, a candidate's stage, a final hybrid)::

    step.json            settings key, upstream run ids, state, result (`hybrid_distill.artifacts.Step`)
    metrics.jsonl        one line per log step ("kind": "train") and per held-out evaluation ("kind": "eval")
    checkpoints/step_N/  model.pt, optimizer.pt (tensors, loaded weights-only), state.json, rng_rank<r>.json
    final/               the trained student as a Hugging Face checkpoint

``SelectionLayout``: a selection folder (shared by selectors; candidates are reused)::

    base/stage1, base/stage2       the all-linear student, when none is given
    candidates/<family>/<name>/    one candidate (family: ga-stage1, null-stage1, gr, ...): step.json, stage1/,
                                   stage2/ (TrainLayouts), stage1_eval.json, initial_eval.json
    <selector>/selection.json      scores, rankings, sets per budget (+ plots)

``RunLayout``: a pipeline run (``hybrid-distill run``)::

    pipeline.json        stages done, with wall time and tokens, and the config used
    stage1/ stage2/      the all-linear student (TrainLayouts)
    selection/           a SelectionLayout
    final/<set>/         final-hybrid Stage-2 runs (TrainLayouts), one per distinct layer set
    models/<set>/        the final hybrids as Hugging Face checkpoints with a model card
    exports/<set>/       the final hybrids exported for serving engines (run config ``export``)
    eval/<model>/        results.json + summary.md per evaluated model
    superseded/          outputs of earlier settings, set aside (never deleted)
    report.md, report.html, report/ (its figures)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .artifacts import STEP_FILE, SUPERSEDED_DIR


@dataclass(frozen=True)
class TrainLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def step_file(self) -> Path:
        return self.root / STEP_FILE

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:08d}"

    @property
    def final(self) -> Path:
        return self.root / "final"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


@dataclass(frozen=True)
class CandidateLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def stage1(self) -> TrainLayout:
        return TrainLayout(self.root / "stage1")

    @property
    def stage2(self) -> TrainLayout:
        return TrainLayout(self.root / "stage2")

    @property
    def s1_eval(self) -> Path:
        """The Stage-1 alignment loss (the GA-S1 / GR-S1 score)."""
        return self.root / "stage1_eval.json"

    @property
    def initial_eval(self) -> Path:
        """The held-out KL before Stage 2."""
        return self.root / "initial_eval.json"


@dataclass(frozen=True)
class SelectionLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def base(self, stage: int) -> TrainLayout:
        return TrainLayout(self.root / "base" / f"stage{stage}")

    def candidate(self, kind: str, name: str) -> CandidateLayout:
        return CandidateLayout(self.candidates / kind / name)

    @property
    def candidates(self) -> Path:
        """The folder of every candidate: ``candidates/<family>/<name>``."""
        return self.root / "candidates"

    def selector(self, name: str) -> Path:
        return self.root / name

    def selection_file(self, selector: str) -> Path:
        return self.selector(selector) / "selection.json"

    def scores(self, selector: str) -> Path:
        """A bypass or task selector's per-layer scores (``scores/<selector>/step.json``), reused by a rerun."""
        return self.root / "scores" / selector

    @property
    def slurm_logs(self) -> Path:
        return self.root / "slurm-logs"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def state(self) -> Path:
        return self.root / "pipeline.json"

    def stage(self, name: str) -> TrainLayout:
        """``stage1`` or ``stage2``: the all-linear student's runs."""
        return TrainLayout(self.root / name)

    @property
    def selection(self) -> SelectionLayout:
        return SelectionLayout(self.root / "selection")

    def final_run(self, name: str) -> TrainLayout:
        return TrainLayout(self.root / "final" / name)

    @property
    def final_runs(self) -> Path:
        return self.root / "final"

    def model(self, name: str) -> Path:
        return self.root / "models" / name

    def export(self, name: str) -> Path:
        return self.root / "exports" / name

    def eval(self, name: str) -> Path:
        return self.evals / name

    @property
    def evals(self) -> Path:
        return self.root / "eval"

    @property
    def superseded(self) -> Path:
        return self.root / SUPERSEDED_DIR

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def report_assets(self) -> Path:
        return self.root / "report"


__all__ = ["CandidateLayout", "RunLayout", "SelectionLayout", "TrainLayout"]
