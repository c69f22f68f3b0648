"""``hybrid-distill run CONFIG``: teacher -> all-linear Stage 1 -> Stage 2 -> layer selection -> final
hybrids -> evaluation -> report, in one run directory.

Every stage writes its outputs under ``run_dir`` and records itself in ``run_dir/pipeline.json``;
a re-run skips finished stages (and finished parts of interrupted ones: distillation resumes from
its last checkpoint, selection reuses finished candidates, evaluation reuses finished models). A stage
whose settings (or an earlier stage's results) changed runs again, and outputs made under the old
settings are moved to ``superseded/`` first, so no stale run is resumed or reused::

    run_dir/
      pipeline.json          stages done, wall time and tokens per stage, the config used
      stage1/ stage2/        the all-linear student (Stage 1, Stage 2)
      selection/             candidates and <selector>/selection.json (+ plots)
      final/<name>/          final-hybrid Stage-2 runs, one per distinct layer set
      models/<name>/         final hybrids as Hugging Face checkpoints with a model card
      eval/<model>/          results.json + summary.md per evaluated model
      superseded/            outputs of earlier settings, set aside (never deleted)
      report.md, report.html
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..distill.config import STAGE_SEQ_LEN
from ..fileio import atomic_write_json, atomic_write_text, read_json
from ..layout import RunLayout
from ..surgery import model_identity, teacher_num_layers
from .config import RunConfig
from .models import base_students, eval_models, final_sets

# eval fields of the efficiency suite: recorded in an evaluation's settings only when it measures efficiency
EFFICIENCY_EVAL_KEYS = ("efficiency_lengths", "efficiency_batches", "decode_steps", "compile_decode", "prefill_rows",
                        "efficiency_dtype")

logger = logging.getLogger(__name__)

EVAL_SETTINGS_FILE = "settings.json"  # in eval/<model>/: the eval_settings its results were made with
STAGES = ("stage1", "stage2", "selection", "final", "eval", "report")


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PipelineState:
    """``pipeline.json``: which stages are done, under which settings and on which upstream results, and
    what they cost. Each record carries a run id; a stage is done only while the stages before it still
    hold the run ids it was made from (a stage run again makes every later one stale)."""

    def __init__(self, run_dir: Path):
        self.path = RunLayout(run_dir).state
        self.data = read_json(self.path) or {"stages": {}}

    def upstream(self, stage: str) -> dict[str, str | None]:
        previous = STAGES[: STAGES.index(stage)]
        return {s: (self.data["stages"].get(s) or {}).get("run_id") for s in previous}

    def done(self, stage: str, key: str) -> dict | None:
        entry = self.data["stages"].get(stage)
        if not entry or entry.get("key") != key:
            return None
        if "upstream" in entry and entry["upstream"] != self.upstream(stage):  # records of older versions lack it
            return None
        return entry

    def record(self, stage: str, key: str, **info) -> None:
        self.data["stages"][stage] = {"key": key, "run_id": uuid.uuid4().hex[:12], "upstream": self.upstream(stage),
                                      **info}
        atomic_write_json(self.path, self.data)


SUPERSEDED_DIR = "superseded"
KEY_FILE = ".pipeline-key.json"  # in a stage's output folder: the settings it is being made under


def set_aside(path: Path, run_dir: Path) -> Path:
    """Move ``path`` (made under other settings) to ``run_dir/superseded/``; returns where it went."""
    dest = run_dir / SUPERSEDED_DIR / f"{path.relative_to(run_dir).as_posix().replace('/', '--')}-{uuid.uuid4().hex[:8]}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    logger.warning("%s was made under other settings; moved to %s", path, dest)
    return dest


def claim_output_dir(path: Path, key: str, run_dir: Path) -> None:
    """Make ``path`` the output folder of work under ``key``: a folder made under another key (other
    teacher, data or settings, whose finished or half-finished runs the trainer would otherwise resume or
    reuse), or with no key at all, is moved to ``run_dir/superseded/`` first, never deleted."""
    recorded = read_json(path / KEY_FILE) if path.is_dir() else None
    if path.is_dir() and any(path.iterdir()) and (recorded or {}).get("key") != key:
        set_aside(path, run_dir)  # made under other settings, or by a version that did not record them
    path.mkdir(parents=True, exist_ok=True)
    if (recorded or {}).get("key") != key:
        atomic_write_json(path / KEY_FILE, {"key": key})


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

    # -- shared resources --------------------------------------------------------------------
    @property
    def teacher(self):
        import torch

        # distill() casts the frozen teacher to bf16 in place (on CUDA): reload it, so that every student is
        # built from, and every evaluation made with, the checkpoint's fp32 weights, resumed run or not.
        if self._teacher is None or next(self._teacher.parameters()).dtype != torch.float32:
            from ..surgery import load_teacher

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
            from ..surgery import load_tokenizer

            self._tokenizer = load_tokenizer(self.teacher_spec, self.config.tokenizer, self.teacher.config.vocab_size)
        return self._tokenizer

    @property
    def num_layers(self) -> int:
        return teacher_num_layers(self.teacher_spec)

    def _data(self, seq_len: int, require: int | None = None):

        return self.config.data.load(self.tokenizer, seq_len, seed=self.config.seed, require_sequences=require)

    def _distill(self, student, cfg, out: Path, key: str):
        """Train into ``out``; a run there made under another ``key`` is set aside to ``superseded/`` first."""
        from ..distill import distill

        return distill(student, self.teacher, self._data(cfg.seq_len, cfg.global_batch_size), cfg, out,
                       tokenizer=self.tokenizer, identity={"pipeline": key}, on_stale="set_aside",
                       superseded=self.run_dir / SUPERSEDED_DIR)

    @staticmethod
    def _info(result) -> dict:
        return {"tokens": result.tokens, "compute_time_s": result.wall_time_s, "final": result.final_model_dir,
                "final_loss": result.final_loss, "eval": {result.eval_metric: result.eval_value} if result.eval_metric else {}}

    # -- stages -------------------------------------------------------------------------------
    def stage1(self) -> dict:
        import torch

        from ..surgery import build_student

        cfg = self.stage_config(self.config.stage1)
        torch.manual_seed(self.config.seed)
        student = build_student(self.teacher, [self.config.linear] * self.num_layers, self.config.mixer_options).float()
        return self._info(self._distill(student, cfg, self.run_dir / "stage1", self.stage_key("stage1")))

    def stage2(self) -> dict:
        from ..checkpoint import load_student

        if self.config.stage2 is None:
            return {"tokens": 0, "final": str(self.run_dir / "stage1" / "final"), "skipped": True}
        cfg = self.stage_config(self.config.stage2)
        student = load_student(self.run_dir / "stage1" / "final").float()
        return self._info(self._distill(student, cfg, self.run_dir / "stage2", self.stage_key("stage2")))

    def base_dirs(self) -> tuple[str, str]:
        stage1, base = base_students(self.config, self.layout)
        return str(stage1), str(base)

    def selection(self) -> dict:
        from ..selection import run_selection

        stage1, base = self.base_dirs()
        # Candidates start from the all-linear students and train under the selection's candidate settings: other
        # students (teacher, data, Stage 1/2) or settings make them stale. Budgets, selectors, early stopping and
        # racing do not: their candidates are reused.
        candidates = {k: getattr(self.config.selection, k) for k in ("probe", "mixer_options", "stage1", "stage2",
                                                                     "snapshot_every_tokens", "seed")}
        claim_output_dir(self.run_dir / "selection", _key({"upstream": self.stage_key("stage2"), "candidates": candidates}),
                         self.run_dir)
        out: dict[str, Any] = {"selectors": {}}
        by_kind: dict[str, int] = {}
        for selector in self.config.selectors:
            sel = run_selection(self.config.selection_config(selector), self.teacher_spec, self.run_dir / "selection",
                                data=self.config.data, base_student=base, stage1_student=stage1,
                                tokenizer=self.config.tokenizer, progress=self.progress)
            out["selectors"][selector] = {label: e["layers"] for label, e in sel["budgets"].items()}
            for kind, spent in ((sel.get("tokens") or {}).get("by_kind") or {}).items():
                by_kind[kind] = max(by_kind.get(kind, 0), spent)  # candidates are shared between selectors
        out["tokens"] = sum(by_kind.values())
        out["tokens_by_kind"] = by_kind
        return out

    def final_sets(self) -> dict[str, dict]:
        return final_sets(self.config, self.layout)

    def final(self) -> dict:
        import torch

        from ..checkpoint import load_student, save_student
        from ..surgery import build_student, mixers_from_softmax_layers

        stage1, _ = self.base_dirs()
        cfg = self.stage_config(self.config.final.stage2)
        reuse = self.config.final.reuse_stage1_mixers
        init_from = load_student(stage1).float() if reuse else None
        out: dict[str, Any] = {"models": {}, "tokens": 0, "compute_time_s": 0.0}
        final_settings = {k: v for k, v in self.config.final.to_dict().items() if k != "extra_sets"}
        planned = self.final_sets()
        self.set_aside_unplanned(planned)
        for name, item in planned.items():
            model_dir = self.run_dir / "models" / name
            key = _key({"upstream": self.stage_key("stage2"), "final": final_settings, "layers": item["layers"]})
            mixers = mixers_from_softmax_layers(self.num_layers, item["layers"], self.config.linear)
            torch.manual_seed(self.config.seed)
            student = build_student(self.teacher, mixers, self.config.mixer_options, init_from=init_from).float()
            result = self._distill(student, cfg, self.run_dir / "final" / name, key)
            if not result.already_done and model_dir.exists():
                set_aside(model_dir, self.run_dir)  # saved from an earlier training run of this set
            res = self._info(result)
            card = self.model_card(name, item, res)
            if not (model_dir / "config.json").is_file():
                save_student(student, model_dir, tokenizer=self.tokenizer, model_card=card)
            elif (model_dir / "README.md").is_file() and (model_dir / "README.md").read_text() != card:
                atomic_write_text(model_dir / "README.md", card)  # e.g. a selector added later chose this set too
            out["models"][name] = {**item, "path": str(model_dir), "tokens": res["tokens"], "eval": res["eval"],
                                   "compute_time_s": res["compute_time_s"]}
            out["tokens"] += res["tokens"]
            out["compute_time_s"] += res["compute_time_s"]
        return out

    def set_aside_unplanned(self, planned) -> None:
        """Move final hybrids the current settings no longer plan (another selection, budgets or extra sets),
        with their saved copies and evaluations, to ``superseded/``: they would pass for this run's models."""
        final_dir = self.run_dir / "final"
        for entry in sorted(final_dir.iterdir()) if final_dir.is_dir() else []:
            if entry.is_dir() and entry.name not in planned:
                for path in (entry, self.run_dir / "models" / entry.name, self.run_dir / "eval" / entry.name):
                    if path.exists():
                        set_aside(path, self.run_dir)

    def model_card(self, name: str, item: dict, res: dict) -> str:
        from .. import __version__

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
            "`hybrid_distill` installed, without remote code).\n"
        )

    def eval_models(self) -> dict[str, str]:
        return eval_models(self.config, self.layout)

    def eval(self) -> dict:
        from ..evaluation.suite import evaluation_seconds

        out: dict[str, Any] = {"models": {}, "eval_time_s": {}}
        for name in self.eval_models():
            dest = self.evaluate(name)
            out["models"][name] = str(dest)
            out["eval_time_s"][name] = evaluation_seconds(read_json(dest / "results.json") or {})
        out["compute_time_s"] = sum(out["eval_time_s"].values())
        return out

    def eval_settings(self) -> dict[str, Any]:
        """Everything in the config that decides what an evaluation measures (defaults filled in)."""
        ev = self.config.eval.to_dict()
        if "efficiency" not in self.config.eval.suite:  # runs without it keep their recorded settings
            for key in EFFICIENCY_EVAL_KEYS:
                ev.pop(key)
        # the run's own data, so perplexity and KL are measured on the text distillation held out
        return {**ev, "data": self.config.data.identity()}

    def evaluate(self, name: str) -> Path:
        """Evaluate one of `eval_models` (the teacher and the all-linear student also before selection)
        into ``eval/<name>/``. A model with results under the same `eval_settings` is not evaluated again;
        results from other settings are replaced."""
        import torch

        from ..evaluation.suite import evaluate_model, load_model

        dest = self.run_dir / "eval" / name
        fixed = {"teacher": self.teacher_spec, f"all-{self.config.linear}": self.base_dirs()[1]}
        spec = fixed[name] if name in fixed else self.eval_models()[name]
        # which weights were measured: a model trained again under the same name must not keep old results
        settings = json.loads(json.dumps({**self.eval_settings(), "model": model_identity(spec),
                                          "teacher_model": self.teacher_identity}))
        # (results.json with suites still "partial" is what an interrupted evaluation left)
        if (dest / "results.json").is_file() and not (read_json(dest / "results.json") or {}).get("partial"):
            recorded = read_json(dest / EVAL_SETTINGS_FILE)
            if recorded is None or recorded == settings:  # None: results from before settings were recorded
                return dest
            logger.info("eval %s: settings changed since its results were written; evaluating again", name)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        teacher = self.teacher.to(device).eval()
        model = teacher if name == "teacher" else load_model(spec, device=device)
        evaluate_model(model, self.tokenizer, dest, self.config.eval, teacher=None if name == "teacher" else teacher,
                       corpus=self.config.data, model_name=name, progress=self.progress)
        atomic_write_json(dest / EVAL_SETTINGS_FILE, settings)
        del model
        return dest

    def report(self) -> dict:
        from .report import write_report

        paths = write_report(self.run_dir, self.config)
        return {"files": [str(p) for p in paths]}

    # -- driver -------------------------------------------------------------------------------
    def stage_key(self, stage: str) -> str:
        """Hash of what a stage's outputs depend on: the teacher's weights, the data, and the config sections of
        this stage and every stage before it."""
        c = self.config
        # the teacher's weights too: a local teacher overwritten in place must not keep its students
        parts: dict[str, Any] = {"teacher": self.teacher_identity, "data": c.data.identity(),
                                 "student": c.student.to_dict(), "seed": c.seed, "stage1": c.stage1.to_dict()}
        sections = {"stage2": c.stage2.to_dict() if c.stage2 is not None else None, "selection": c.selection.to_dict(),
                    "final": c.final.to_dict(), "eval": c.eval.to_dict(), "report": c.report.to_dict()}
        for name, value in sections.items():  # a stage depends on its own section and those before it
            if STAGES.index(stage) >= STAGES.index(name):
                parts[name] = value
        return _key(parts)

    def stage_config(self, config):
        """A stage's DistillConfig as the pipeline trains it: at its data sequence length, with this run's progress bars."""
        return config.replace(seq_len=config.data_seq_len, progress=self.progress)

    def data_seq_lens(self, stages) -> dict[str, int]:
        """The sequence lengths the training stages among ``stages`` load data at, by config section."""
        lens: dict[str, int] = {}
        if "stage1" in stages:
            lens["stage1"] = self.config.stage1.data_seq_len
        if "stage2" in stages and self.config.stage2 is not None:
            lens["stage2"] = self.config.stage2.data_seq_len
        if "selection" in stages and set(self.config.selectors) != {"uniform"}:
            candidate1 = self.config.selection.stage_config(1)
            lens["selection.stage1"] = candidate1.data_seq_len if candidate1 is not None else STAGE_SEQ_LEN[1]
            lens["selection.stage2"] = self.config.selection.stage_config(2).data_seq_len
        if "final" in stages:
            lens["final.stage2"] = self.config.final.stage2.data_seq_len
        return lens

    def check_recall_mix(self, stages) -> None:
        """Refuse, before any training, sequence lengths too short for the data's recall documents (a
        stage would otherwise fail only when it starts, after the earlier stages' work)."""
        from ..data.sources import DataSourceError

        mix = self.config.data.recall_mix()
        if mix is None:
            return
        for section, seq_len in self.data_seq_lens(stages).items():
            try:
                mix.check_fits(self.tokenizer, seq_len)
            except DataSourceError as err:
                raise ConfigError(f"{section}.seq_len {seq_len} with data.recall_fraction: {err}") from None

    def run(self, stages: tuple[str, ...] = STAGES) -> dict:
        """Run (or skip, when done under the same settings) each stage; returns ``pipeline.json``'s content."""
        unknown = [s for s in stages if s not in STAGES]
        if unknown or not stages:
            raise ConfigError(f"unknown stage(s) {unknown}; choose from {','.join(STAGES)}" if unknown
                              else f"no stages given; choose from {','.join(STAGES)}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = PipelineState(self.run_dir)
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
            state.record(stage, key, wall_time_s=time.perf_counter() - t0, **info)
        return state.data


def run_pipeline(config: RunConfig | str | Path, run_dir: str | Path | None = None, progress: bool = True,
                 stages: tuple[str, ...] = STAGES) -> dict:
    """Run the whole pipeline (Python API of ``hybrid-distill run``); see the module docstring."""
    if not isinstance(config, RunConfig):
        config = RunConfig.from_file(config)
    return Pipeline(config, run_dir, progress).run(stages)
