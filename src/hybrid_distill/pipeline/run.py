"""``hybrid-distill run CONFIG``: teacher -> all-linear Stage 1 -> Stage 2 -> layer selection -> final hybrids ->
evaluation -> report, in one run folder (`RunLayout`).

Every output folder is a `Step` (``hybrid_distill.artifacts``): made under a settings key from the run ids of the
steps before it. A re-run skips what is done under the same settings (``pipeline.json`` lists the stages done),
resumes what was interrupted (distillation from its last checkpoint, selection from its finished candidates,
evaluation model by model), and moves what was made under other settings to ``superseded/`` before redoing it —
never deleted, never reused by mistake. Evaluations made under other settings are evaluated again in place.

Under a time limit (``run(time_limit=...)``, `budget`) each unit of work starts only when it is estimated to fit
before the deadline, training stops at the deadline with a checkpoint, and the run then raises `TimeLimitReached`;
the final hybrids are then finished one at a time (trained, saved, exported, evaluated; after the all-linear
student's evaluation, which estimates theirs) so that every trained one is also evaluated. The limit is no setting: the steps made, their keys and results are those of a run without it.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..artifacts import FolderLock, Step, StepRecord, canonical, set_aside, settings_key
from ..checkpoint import CheckpointError, load_student, save_student
from ..config import ConfigError
from ..data.sources import DataSourceError
from ..distill import DistillResult, Trainer, read_progress
from ..distill.config import STAGE_SEQ_LEN
from ..errors import TimeLimitReached
from ..evaluation.suite import evaluate_model, evaluation_seconds, load_model
from ..export import export_student
from ..fileio import atomic_write_json, atomic_write_text, read_json
from ..layout import RunLayout
from ..selection import SelectionUnit, run_selection
from ..surgery import build_student, load_teacher, load_tokenizer, mixers_from_softmax_layers, model_identity, teacher_num_layers
from .budget import Measured, TimeBudget, Unit, measured_in
from .config import RunConfig
from .models import base_students, eval_models, final_sets, require_weights, saved_model_identity
from .report import write_report

logger = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "selection", "final", "export", "eval", "report")
# eval fields of the efficiency suite: part of an evaluation's settings only when it measures efficiency
EFFICIENCY_EVAL_KEYS = ("efficiency_lengths", "efficiency_batches", "decode_steps", "compile_decode", "prefill_rows",
                        "efficiency_dtype")


class PipelineState:
    """``pipeline.json``: the stages done, each with the key of its settings, its run id, the run ids of the stages
    it was made from, and what it cost. A stage is done only while the stages before it still hold those run ids (a
    stage run again makes every later one stale)."""

    def __init__(self, layout: RunLayout):
        self.path = layout.state
        self.data = read_json(self.path) or {"stages": {}}

    def upstream(self, stage: str) -> dict[str, str | None]:
        return {s: (self.data["stages"].get(s) or {}).get("run_id") for s in STAGES[: STAGES.index(stage)]}

    def done(self, stage: str, key: str) -> dict | None:
        entry = self.data["stages"].get(stage)
        if not entry or entry.get("key") != key or entry.get("upstream") != self.upstream(stage):
            return None
        return entry

    def record(self, stage: str, key: str, run_id: str, **info: Any) -> None:
        self.data["stages"][stage] = {"key": key, "run_id": run_id, "upstream": self.upstream(stage), **info}
        atomic_write_json(self.path, self.data)


def _run_info(result: DistillResult) -> dict[str, Any]:
    return {"tokens": result.tokens, "compute_time_s": result.wall_time_s, "final": result.final_model_dir,
            "final_loss": result.final_loss, "eval": {result.eval_metric: result.eval_value} if result.eval_metric else {}}


class Pipeline:
    """The stages of one run; `run` executes (or skips) them in order."""

    def __init__(self, config: RunConfig, run_dir: str | Path | None = None, progress: bool = True):
        self.config = config
        self.run_dir = Path(run_dir or config.run_dir)
        self.layout = RunLayout(self.run_dir)
        self.progress = progress
        self.teacher_spec = config.teacher_spec
        self._teacher = None
        self._tokenizer = None
        self.budget: TimeBudget | None = None  # while `run` runs under a time limit
        self.run_stages: tuple[str, ...] = STAGES  # the stages `run` is running

    # -- shared resources --------------------------------------------------------------------
    @property
    def teacher(self):
        # distill() casts the frozen teacher to bf16 in place (on CUDA): reload it, so that every student is
        # built from, and every evaluation made with, the checkpoint's fp32 weights, resumed run or not.
        if self._teacher is None or next(self._teacher.parameters()).dtype != torch.float32:
            self._teacher = None
            self._teacher = load_teacher(self.teacher_spec, dtype=torch.float32)
        return self._teacher

    @functools.cached_property
    def teacher_identity(self) -> dict[str, str]:
        """`model_identity` of the teacher (its weights read once per pipeline, not at every key)."""
        return model_identity(self.teacher_spec)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.teacher_spec, self.config.tokenizer, self.teacher.config.vocab_size)
        return self._tokenizer

    @functools.cached_property
    def num_layers(self) -> int:
        return teacher_num_layers(self.teacher_spec)

    def _trainer(self, student, cfg, out: Path, identity: dict[str, Any], upstream: dict[str, str | None]) -> Trainer:
        """The trainer of ``student`` into ``out`` under ``identity`` from ``upstream`` steps; a run there made under
        other settings is set aside to ``superseded/`` when it runs."""
        data = self.config.data.load(self.tokenizer, cfg.seq_len, seed=self.config.seed,
                                     require_sequences=cfg.global_batch_size)
        return Trainer(student, self.teacher, data, cfg, out, tokenizer=self.tokenizer, identity=identity,
                       upstream=upstream, on_stale="set_aside", superseded=self.layout.superseded)

    def _distill(self, student, cfg, out: Path, identity: dict[str, Any], upstream: dict[str, str | None],
                 unit: str, kind: str) -> DistillResult:
        """Train ``student`` to the end (`_trainer`) as the unit of work ``unit`` (its tokens of training ``kind``):
        resumed from its last checkpoint, or, when finished under the same settings, its stored result with the final
        weights loaded into ``student``."""
        trainer = self._trainer(student, cfg, out, identity, upstream)
        if self.budget is not None:
            self.before(Unit(unit, {kind: self.tokens_left(trainer)}))
        return self._train(trainer, unit)

    def _train(self, trainer: Trainer, unit: str) -> DistillResult:
        """``trainer`` run to the end, or `TimeLimitReached` when it stopped at the time limit's deadline."""
        progress = trainer.run(deadline=self.deadline)
        if not progress.done:
            raise TimeLimitReached(unit, during=True)
        return progress.result

    @staticmethod
    def tokens_left(trainer: Trainer) -> int:
        """Tokens ``trainer`` still has to train: none when finished, else from its newest checkpoint on."""
        if trainer.finished_result() is not None:
            return 0
        try:
            progress = read_progress(trainer.layout.root)
        except CheckpointError:  # a damaged checkpoint: the trainer falls back to an earlier one, or starts over
            progress = None
        return max(0, trainer.config.total_tokens - (progress.tokens if progress is not None else 0))

    # -- time limit ---------------------------------------------------------------------------
    @property
    def deadline(self) -> float | None:
        """The time limit's deadline (a ``time.time()``) while `run` runs under one."""
        return self.budget.deadline if self.budget is not None else None

    def before(self, unit: Unit) -> None:
        """Under a time limit: stop the run (`TimeLimitReached`) unless ``unit`` is estimated to fit in the time
        left (`TimeBudget.check`, from what this run folder has measured)."""
        if self.budget is not None:
            self.budget.check(unit, self.measured())

    def measured(self) -> Measured:
        """What this run folder has measured (`measured_in`): evaluations only under the current settings."""
        return measured_in(self.layout, self.config.linear,
                           {**self.eval_settings(), "teacher_model": self.teacher_identity})

    def before_selection_unit(self, unit: SelectionUnit) -> None:
        """`before` a candidate family or a bypass / task scoring of `run_selection`."""
        if unit.source == "candidates":
            self.before(Unit(unit.name, {"candidate-stage1": unit.stage1_tokens, "candidate-stage2": unit.stage2_tokens}))
        else:
            self.before(Unit(unit.name, others=(f"scoring-{unit.source}",)))

    def _upstream(self, *stages: str) -> dict[str, str | None]:
        """The run ids of ``stages`` as ``pipeline.json`` records them."""
        recorded = PipelineState(self.layout).data["stages"]
        return {s: (recorded.get(s) or {}).get("run_id") for s in stages}

    def stage_config(self, config):
        """A stage's DistillConfig as the pipeline trains it: at its data sequence length, with this run's progress bars."""
        return config.replace(seq_len=config.data_seq_len, progress=self.progress)

    # -- stages -------------------------------------------------------------------------------
    def stage1(self) -> dict:
        torch.manual_seed(self.config.seed)
        student = build_student(self.teacher, [self.config.linear] * self.num_layers, self.config.mixer_options).float()
        return _run_info(self._distill(student, self.stage_config(self.config.stage1), self.layout.stage("stage1").root,
                                       {"pipeline": self.stage_key("stage1")}, {}, "stage1", "stage1"))

    def stage2(self) -> dict:
        if self.config.stage2 is None:
            return {"tokens": 0, "final": str(self.layout.stage("stage1").final), "skipped": True}
        student = load_student(self.layout.stage("stage1").final).float()
        return _run_info(self._distill(student, self.stage_config(self.config.stage2), self.layout.stage("stage2").root,
                                       {"pipeline": self.stage_key("stage2")}, self._upstream("stage1"), "stage2",
                                       "stage2"))

    def base_dirs(self) -> tuple[str, str]:
        stage1, base = base_students(self.config, self.layout)
        return str(stage1), str(base)

    def selection_step(self) -> Step:
        """The selection folder's step. Its candidates start from the all-linear students and train under the
        candidates' settings: new students (teacher, data, Stage 1/2) or candidate settings make them stale; budgets,
        selectors, early stopping and racing do not (their candidates are reused)."""
        sel = self.config.selection
        candidates = {k: getattr(sel, k) for k in ("probe", "mixer_options", "stage1", "stage2", "candidate_start",
                                                   "snapshot_every_tokens", "snapshot_batches", "null_candidates",
                                                   "candidate_seeds", "candidate_seed_layers", "seed")}
        return Step(self.layout.selection.root, {"teacher": self.teacher_identity, "data": self.config.data.identity(),
                                                 "candidates": candidates},
                    self._upstream("stage1", "stage2"), what="selection folder")

    def selection(self) -> dict:
        stage1, base = self.base_dirs()
        step = self.selection_step()
        step.begin(on_stale="set_aside", superseded=self.layout.superseded)
        out: dict[str, Any] = {"selectors": {}}
        by_kind: dict[str, int] = {}
        for selector in self.config.selectors:
            sel = run_selection(self.config.selection_config(selector), self.teacher_spec, self.layout.selection.root,
                                data=self.config.data, base_student=base, stage1_student=stage1,
                                tokenizer=self.config.tokenizer, progress=self.progress,
                                deadline=self.deadline,
                                before_unit=self.before_selection_unit if self.budget is not None else None)
            out["selectors"][selector] = {label: b.sets if len(b.sets) > 1 else b.layers for label, b in sel.budgets.items()}
            for kind, spent in ((sel.tokens or {}).get("by_kind") or {}).items():
                by_kind[kind] = max(by_kind.get(kind, 0), spent)  # candidates are shared between selectors
        out["tokens"] = sum(by_kind.values())
        out["tokens_by_kind"] = by_kind
        out["run_id"] = step.record().run_id
        return out

    def final_sets(self) -> dict[str, dict]:
        return final_sets(self.config, self.layout)

    def final(self) -> dict:
        stage1, _ = self.base_dirs()
        cfg = self.stage_config(self.config.final.stage2)
        init_from = load_student(stage1).float() if self.config.final.reuse_stage1_mixers else None
        out: dict[str, Any] = {"models": {}, "tokens": 0, "compute_time_s": 0.0}
        # A final hybrid depends on the all-linear students, the final settings and its layers, not on which
        # selector chose it: sets added later (final.extra_sets, another selector) leave the others as they are.
        settings = {"pipeline": self.stage_key("stage2"),
                    "final": {k: v for k, v in self.config.final.to_dict().items() if k != "extra_sets"}}
        upstream = self._upstream("stage1", "stage2")
        planned = self.final_sets()
        self.set_aside_unplanned(planned)
        if self.budget is not None and "eval" in self.run_stages:  # the closest measure of a hybrid's evaluation
            self.evaluate_in_time(f"all-{self.config.linear}")
        for name, item in planned.items():
            mixers = mixers_from_softmax_layers(self.num_layers, item["layers"], self.config.linear)
            torch.manual_seed(self.config.seed)
            student = build_student(self.teacher, mixers, self.config.mixer_options, init_from=init_from).float()
            run = self.layout.final_run(name)
            trainer = self._trainer(student, cfg, run.root, {**settings, "layers": item["layers"]}, upstream)
            # a finished run already saved as models/<name> is reused from its record: its weights are not loaded
            # (a packed run folder may have left them out)
            result = trainer.finished_result()
            saved = result is not None and self.model_step(name, StepRecord.read(run.root).run_id).finished() is not None
            if self.budget is not None:
                self.before(self.hybrid_unit(name, 0 if saved else self.tokens_left(trainer), saved))
            if not saved:
                result = self._train(trainer, f"final hybrid {name}")
            res = _run_info(result)
            self.save_model(name, item, res, student, StepRecord.read(run.root).run_id)
            if self.budget is not None:  # finished one at a time: its weights need not outlive this command
                if "export" in self.run_stages and self.config.export.format is not None:
                    self.export_model(name)
                if "eval" in self.run_stages:
                    self.evaluate(name)
            out["models"][name] = {**item, "path": str(self.layout.model(name)), "tokens": res["tokens"],
                                   "eval": res["eval"], "compute_time_s": res["compute_time_s"]}
            out["tokens"] += res["tokens"]
            out["compute_time_s"] += res["compute_time_s"]
        return out

    def hybrid_unit(self, name: str, tokens: int, saved: bool) -> Unit:
        """Final hybrid ``name`` as a unit of work: its ``tokens`` of training left, and its evaluation when the run
        evaluates and it is not evaluated (``saved``: ``models/<name>`` is saved from its finished training)."""
        evaluate = "eval" in self.run_stages and not (saved and self.eval_step(name).finished() is not None)
        return Unit(f"final hybrid {name}", {"final": tokens}, ("eval-hybrid",) if evaluate else ())

    def save_model(self, name: str, item: dict, res: dict, student, run_id: str) -> None:
        """``models/<name>``: the final hybrid as a Hugging Face checkpoint with its model card, a step made from
        the training run ``run_id`` (a copy from an earlier training of this set is set aside first)."""
        folder = self.layout.model(name)
        step = self.model_step(name, run_id)
        card = self.model_card(name, item, res)
        if step.finished_or_cleared(self.layout.superseded) is not None:
            if (folder / "README.md").read_text() != card:
                atomic_write_text(folder / "README.md", card)  # e.g. a selector added later chose this set too
            return
        save_student(student, folder, tokenizer=self.tokenizer, model_card=card,
                     dtype=self.config.final.stage2.saved_weights_dtype)
        # the identity its evaluation is keyed by, recorded so that the key holds without the weights on disk
        step.publish({"model": name, "identity": model_identity(str(folder))})

    def model_step(self, name: str, run_id: str) -> Step:
        """``models/<name>``'s step: the final hybrid saved from the training run ``run_id``."""
        return Step(self.layout.model(name), {"model": name}, {"final": run_id}, what="saved model")

    def export(self) -> dict:
        """``exports/<set>``: every final hybrid in the run config's ``export.format`` (none when it is null)."""
        if self.config.export.format is None:
            return {"format": None, "models": {}}
        return {"format": self.config.export.format,
                "models": {name: self.export_model(name) for name in self.final_sets()}}

    def export_model(self, name: str) -> dict:
        """Export ``models/<name>`` (a step made from that saved model) unless done under the same settings."""
        source = self.layout.model(name)
        step = Step(self.layout.export(name), {"export": self.config.export.to_dict()},
                    {"model": StepRecord.read(source).run_id}, what="export")
        done = step.finished()
        if done is not None:
            return dict(done.result)
        require_weights(self.layout, name, f"the export {step.folder}")  # before a stale export is set aside
        step.finished_or_cleared(self.layout.superseded)
        ex = self.config.export
        result = export_student(source, step.folder, format=ex.format, approximate=ex.approximate, dtype=ex.dtype)
        logger.info("%s", result.summary())
        info = {"path": str(step.folder), "exact": result.exact, "dtype": result.dtype,
                "max_logit_error": result.max_logit_error, "max_logit": result.max_logit,
                "approximations": [b.describe() for b in result.approximations]}
        step.publish(info)
        return info

    def set_aside_unplanned(self, planned) -> None:
        """Move final hybrids the current settings no longer plan (another selection, budgets or extra sets), with
        their saved copies and evaluations, to ``superseded/``: they would pass for this run's models."""
        runs = self.layout.final_runs
        for entry in sorted(runs.iterdir()) if runs.is_dir() else []:
            if entry.is_dir() and entry.name not in planned:
                for path in (entry, self.layout.model(entry.name), self.layout.export(entry.name),
                             self.layout.eval(entry.name)):
                    if path.exists():
                        set_aside(path, self.layout.superseded, f"{path} is no longer planned by the run's settings")

    def model_card(self, name: str, item: dict, res: dict) -> str:
        chosen = "\n".join(f"| {c['selector']} | {c['budget']} | {c['k']} | {c.get('probe') or '–'} |" for c in item["chosen_by"])
        stages = read_json(self.layout.state) or {"stages": {}}
        tokens = {s: (stages["stages"].get(s) or {}).get("tokens") for s in ("stage1", "stage2", "selection")}
        return (
            f"---\nlibrary_name: transformers\ntags: [hybrid-attention, linear-attention, distillation, hybrid-distill]\n---\n\n"
            f"# {name}\n\nHybrid student distilled from `{self.config.teacher}` with hybrid-distill {__version__}.\n\n"
            f"- softmax layers ({len(item['layers'])} of {self.num_layers}, 0-based): `{item['layers']}`; "
            f"the others are `{self.config.linear}`\n"
            f"- final Stage-2 tokens: {res['tokens']:,}; all-linear Stage 1 / Stage 2 tokens: {tokens['stage1']} / "
            f"{tokens['stage2']}; selection tokens: {tokens['selection']}\n"
            f"- held-out {', '.join(f'{k} = {v:.4g}' for k, v in res['eval'].items() if v is not None) or 'metrics: n/a'}\n\n"
            f"| selector | budget | K | probe |\n|---|---|---|---|\n{chosen}\n\n"
            "Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (or with "
            "`hybrid_distill` installed, without remote code); `hybrid-distill export` writes it as a stock "
            "Hugging Face model that serving engines load (docs/serving.md).\n"
        )

    def eval_models(self) -> dict[str, str]:
        return eval_models(self.config, self.layout)

    def eval(self) -> dict:
        out: dict[str, Any] = {"models": {}, "eval_time_s": {}}
        for name in self.eval_models():
            dest = self.evaluate_in_time(name)
            out["models"][name] = str(dest)
            out["eval_time_s"][name] = evaluation_seconds(read_json(dest / "results.json") or {})
        out["compute_time_s"] = sum(out["eval_time_s"].values())
        return out

    def evaluate_in_time(self, name: str) -> Path:
        """`evaluate` ``name``; under a time limit, an evaluation not done yet only when it fits (`before`)."""
        if self.budget is not None and self.eval_step(name).finished() is None:
            self.before(Unit(f"the evaluation of {name}", others=(self.eval_kind(name),)))
        return self.evaluate(name)

    def eval_kind(self, name: str) -> str:
        """The kind of evaluation ``name``'s is, for its time estimate (`budget.SECONDS_LIKE`)."""
        return {"teacher": "eval-teacher", f"all-{self.config.linear}": "eval-linear"}.get(name, "eval-hybrid")

    def eval_settings(self) -> dict[str, Any]:
        """Everything in the config that decides what an evaluation measures (defaults filled in)."""
        ev = self.config.eval.to_dict()
        if "efficiency" not in self.config.eval.suite:  # runs without it keep their recorded settings
            for key in EFFICIENCY_EVAL_KEYS:
                ev.pop(key)
        # the run's own data, so perplexity and KL are measured on the text distillation held out
        return {**ev, "data": self.config.data.identity()}

    def eval_spec(self, name: str) -> str:
        """The model `evaluate` loads for ``name`` (the teacher and the all-linear student also before selection)."""
        if name == "teacher":
            return self.teacher_spec
        if name == f"all-{self.config.linear}":
            return self.base_dirs()[1]
        return self.eval_models()[name]

    def eval_step(self, name: str) -> Step:
        """``eval/<name>``'s step: the evaluation settings and the weights measured (a model trained again under the
        same name must not keep its old results)."""
        spec = self.eval_spec(name)
        model = saved_model_identity(self.layout, name) if self.is_final_hybrid(name, spec) else model_identity(spec)
        return Step(self.layout.eval(name), {**self.eval_settings(), "model": model,
                                             "teacher_model": self.teacher_identity}, what="evaluation")

    def is_final_hybrid(self, name: str, spec: str) -> bool:
        """Whether the evaluated model ``name`` (loaded from ``spec``) is a final hybrid saved in ``models/``."""
        return Path(spec) == self.layout.model(name)

    def evaluate(self, name: str) -> Path:
        """Evaluate one of `eval_models` (the teacher and the all-linear student also before selection) into
        ``eval/<name>/``. A model evaluated under the same settings is not evaluated again; results under other
        settings are replaced."""
        step = self.eval_step(name)
        dest = step.folder
        if step.finished() is not None:
            return dest
        spec = self.eval_spec(name)
        if self.is_final_hybrid(name, spec):
            require_weights(self.layout, name, f"the evaluation {dest}")
        step.begin(on_stale="replace")  # results of other settings (or of an interrupted evaluation's) are redone
        device = "cuda" if torch.cuda.is_available() else "cpu"
        teacher = self.teacher.to(device).eval()
        model = teacher if name == "teacher" else load_model(spec, device=device)
        results = evaluate_model(model, self.tokenizer, dest, self.config.eval, teacher=None if name == "teacher" else teacher,
                                 corpus=self.config.data, model_name=name, progress=self.progress)
        step.publish({"suites": results["suites"]})
        return dest

    def report(self) -> dict:
        if self.budget is not None:
            self.before(Unit("the report", others=("report",)))
        return {"files": [str(p) for p in write_report(self.run_dir, self.config)]}

    # -- driver -------------------------------------------------------------------------------
    def stage_key(self, stage: str) -> str:
        """Hash of what a stage's outputs depend on: the teacher's weights, the data, and the config sections of
        this stage and every stage before it."""
        c = self.config
        # the teacher's weights too: a local teacher overwritten in place must not keep its students
        parts: dict[str, Any] = {"teacher": self.teacher_identity, "data": c.data.identity(),
                                 "student": c.student.to_dict(), "seed": c.seed, "stage1": c.stage1.to_dict()}
        sections = {"stage2": c.stage2.to_dict() if c.stage2 is not None else None, "selection": c.selection.to_dict(),
                    "final": c.final.to_dict(), "export": c.export.to_dict(), "eval": c.eval.to_dict(),
                    "report": c.report.to_dict()}
        for name, value in sections.items():  # a stage depends on its own section and those before it
            if STAGES.index(stage) >= STAGES.index(name):
                parts[name] = value
        return settings_key(canonical(parts))

    def data_seq_lens(self, stages) -> dict[str, int]:
        """The sequence lengths the training stages among ``stages`` load data at, by config section."""
        lens: dict[str, int] = {}
        if "stage1" in stages:
            lens["stage1"] = self.config.stage1.data_seq_len
        if "stage2" in stages and self.config.stage2 is not None:
            lens["stage2"] = self.config.stage2.data_seq_len
        if "selection" in stages and any(self.config.selection_config(s).base_selector != "uniform"
                                         for s in self.config.selectors):
            candidate1 = self.config.selection.stage_config(1)
            lens["selection.stage1"] = candidate1.data_seq_len if candidate1 is not None else STAGE_SEQ_LEN[1]
            lens["selection.stage2"] = self.config.selection.stage_config(2).data_seq_len
        if "final" in stages:
            lens["final.stage2"] = self.config.final.stage2.data_seq_len
        return lens

    def check_recall_mix(self, stages) -> None:
        """Refuse, before any training, sequence lengths too short for the data's recall documents (a stage would
        otherwise fail only when it starts, after the earlier stages' work)."""
        mix = self.config.data.recall_mix()
        if mix is None:
            return
        for section, seq_len in self.data_seq_lens(stages).items():
            try:
                mix.check_fits(self.tokenizer, seq_len)
            except DataSourceError as err:
                raise ConfigError(f"{section}.seq_len {seq_len} with data.recall_fraction: {err}") from None

    def run(self, stages: tuple[str, ...] = STAGES, time_limit: float | None = None) -> dict:
        """Run (or skip, when done under the same settings) each stage; returns ``pipeline.json``'s content. One
        process runs a run folder at a time (`hybrid_distill.artifacts.FolderLock`).

        ``time_limit``: seconds from now the run may take. A unit of work starts only when it is estimated to fit
        (`budget`); when the next one does not, or training reaches the deadline (it checkpoints), the run stops
        with `TimeLimitReached`, everything finished recorded. Running it again, with or without a limit, continues
        where it stopped."""
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ConfigError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}" if unknown
                              else f"no stages given; choose from {','.join(STAGES)}")
        budget = TimeBudget(time_limit) if time_limit is not None else None
        with FolderLock(self.run_dir):
            self.budget, self.run_stages = budget, tuple(stages)
            try:
                return self._run(stages)
            finally:
                self.budget, self.run_stages = None, STAGES

    def _run(self, stages: tuple[str, ...]) -> dict:
        state = PipelineState(self.layout)
        state.data["config"] = self.config.to_dict()
        self.check_recall_mix([s for s in stages if not state.done(s, self.stage_key(s))])
        for stage in sorted(set(stages), key=STAGES.index):
            key = self.stage_key(stage)
            if state.done(stage, key):
                logger.info("stage %s: done already, skipping", stage)
                continue
            stale = [s for s in STAGES[: STAGES.index(stage)] if not state.done(s, self.stage_key(s))]
            if stale:
                raise ConfigError(
                    f"stage {stage} needs {', '.join(stale)} done under the current settings first (not run yet, or "
                    f"run under other settings); run --stages {','.join([*stale, stage])}, or all stages"
                )
            logger.info("stage %s: running", stage)
            t0 = time.perf_counter()
            info = getattr(self, stage)()
            run_id = info.pop("run_id", None) or self._folder_run_id(stage) or settings_key([key, time.time()])
            state.record(stage, key, run_id, wall_time_s=time.perf_counter() - t0, **info)
            state = PipelineState(self.layout)  # re-read: a stage may have written it (model cards read it)
        return state.data

    def _folder_run_id(self, stage: str) -> str | None:
        """The run id of a stage made in one folder (its step record), so later stages name the work itself."""
        folder = {"stage1": self.layout.stage("stage1").root, "stage2": self.layout.stage("stage2").root}.get(stage)
        record = StepRecord.read(folder) if folder is not None else None
        return record.run_id if record is not None else None


def run_pipeline(config: RunConfig | str | Path, run_dir: str | Path | None = None, progress: bool = True,
                 stages: tuple[str, ...] = STAGES, time_limit: float | None = None) -> dict:
    """Run the whole pipeline (Python API of ``hybrid-distill run``); see the module docstring. ``time_limit``:
    seconds it may take (`Pipeline.run`); raises `TimeLimitReached` when it stops at it."""
    if not isinstance(config, RunConfig):
        config = RunConfig.from_file(config)
    return Pipeline(config, run_dir, progress).run(stages, time_limit)


__all__ = ["STAGES", "Pipeline", "PipelineState", "run_pipeline"]
