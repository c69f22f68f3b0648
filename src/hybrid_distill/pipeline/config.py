"""`RunConfig`: the YAML of ``hybrid-distill run``, validated up front with messages naming the field.

::

    teacher: Qwen/Qwen2.5-1.5B-Instruct      # HF path / hub id, tiny:<variant>, or "default" (shipped teacher)
    run_dir: runs/qwen15
    data: {source: HuggingFaceFW/fineweb-edu, text_field: text, max_tokens: 2_000_000_000}
    student: {linear: gdn, mixer_options: {}}
    stage1: {target_tokens: 100_000_000, seq_len: 512, global_batch_size: 96}     # all-linear Stage 1
    stage2: {target_tokens: 600_000_000, seq_len: 4096, global_batch_size: 32}    # all-linear Stage 2
    selection:
      selectors: [ga-s2, uniform]
      budgets: [0.125, 0.25, 0.5]
      stage2: {target_tokens: 150_000_000, seq_len: 4096, global_batch_size: 32}  # per candidate
      early_stop: true
    final: {stage2: {target_tokens: 600_000_000, seq_len: 4096, global_batch_size: 32}}
    eval: {suite: [recall, niah, quality], lengths: [4096], num_samples: 50}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..distill.config import ConfigError, DistillConfig
from ..selection.config import SelectionConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "tiny_teacher"

_TOP_LEVEL = ("teacher", "tokenizer", "run_dir", "seed", "data", "student", "stage1", "stage2", "selection", "final",
              "eval", "report")
# eval fields of the efficiency suite (`evaluate_model`'s keyword arguments of the same names)
EFFICIENCY_EVAL_KEYS = ("efficiency_lengths", "efficiency_batches", "decode_steps", "compile_decode", "prefill_rows",
                        "efficiency_dtype")
_EVAL_KEYS = ("suite", "tasks", "lengths", "num_samples", "niah_lengths", "niah_depths", "niah_samples", "batch_size",
              "quality_seq_len", "quality_sequences", "seed", *EFFICIENCY_EVAL_KEYS)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def resolve_teacher_spec(teacher: str) -> str:
    """``"default"`` -> the teacher shipped with the package; other specs unchanged."""
    return str(SHIPPED_TEACHER) if teacher == "default" else str(teacher)


@dataclass
class RunConfig:
    """The whole pipeline's settings (see the module docstring for the YAML layout)."""

    teacher: str
    run_dir: str = "runs/hybrid-distill"
    tokenizer: str | None = None
    seed: int = 0
    data: dict[str, Any] = field(default_factory=lambda: {"source": "default"})
    student: dict[str, Any] = field(default_factory=lambda: {"linear": "gdn", "mixer_options": None})
    stage1: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] | None = field(default_factory=dict)  # None: no all-linear Stage 2
    selection: dict[str, Any] = field(default_factory=lambda: {"selectors": ["ga-s2"], "budgets": [0.25]})
    final: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    source: str | None = None  # the file the config came from

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None, check_paths: bool = True) -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"the run config must be a mapping of {list(_TOP_LEVEL)}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_TOP_LEVEL))
        if unknown:
            raise ConfigError(f"unknown top-level field(s) {unknown} in the run config; valid: {list(_TOP_LEVEL)}")
        if "teacher" not in data or not data["teacher"]:
            raise ConfigError("teacher: missing; give a Hugging Face path / hub id, tiny:<variant>, or 'default'")
        config = cls(**copy.deepcopy(data), source=source)
        config.validate(check_paths=check_paths)
        return config

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None, check_paths: bool = True) -> RunConfig:
        """Load a YAML file (``"default"``: the embedded default config); ``overrides`` replace top-level fields."""
        import yaml

        path = DEFAULT_CONFIG if str(path) == "default" else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of {list(_TOP_LEVEL)}")
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data, source=str(path), check_paths=check_paths)

    # -- validation -----------------------------------------------------------------------------
    def validate(self, check_paths: bool = True) -> None:
        """Raise `ConfigError` (or FileNotFoundError for a missing teacher) naming the bad field."""
        from ..data import DataSpec
        from ..data.sources import DataSourceError
        from ..modeling.configuration_hybrid import LINEAR_MIXERS
        from ..selection import BudgetError, resolve_budgets
        from ..selection.runner import teacher_num_layers

        teacher = self.teacher_spec
        if check_paths and not teacher.startswith("tiny:"):
            path = Path(teacher).expanduser()
            looks_local = teacher.startswith((".", "/", "~")) or path.exists()
            if looks_local and not (path / "config.json").is_file():
                raise FileNotFoundError(f"teacher: {teacher!r} has no config.json (expected a Hugging Face model directory)")
        try:
            DataSpec.from_dict(self.data)
        except DataSourceError as err:
            raise ConfigError(str(err)) from err
        if not isinstance(self.run_dir, (str, Path)) or not str(self.run_dir):
            raise ConfigError(f"run_dir must be a folder path, got {self.run_dir!r}")
        if self.student is not None and not isinstance(self.student, dict):
            raise ConfigError(f"student must be a mapping such as {{linear: gdn}}, got {self.student!r}")
        options = (self.student or {}).get("mixer_options")
        if options is not None:
            from ..modeling.configuration_hybrid import resolve_mixer_options

            if not isinstance(options, dict):
                raise ConfigError(f"student.mixer_options must be a mapping of mixer options, got {options!r}")
            try:
                resolve_mixer_options(options)
            except ValueError as err:
                raise ConfigError(f"student.mixer_options: {err}") from err
        linear = (self.student or {}).get("linear", "gdn")
        if linear not in LINEAR_MIXERS:
            raise ConfigError(f"student.linear must be one of {list(LINEAR_MIXERS)}, got {linear!r}")
        unknown = sorted(set(self.student or {}) - {"linear", "mixer_options"})
        if unknown:
            raise ConfigError(f"unknown student field(s) {unknown}; valid: ['linear', 'mixer_options']")
        for name, stage in (("stage1", 1), ("stage2", 2)):
            if getattr(self, name) is not None:
                self.distill_config(name, stage)
        if not isinstance(self.final, dict) or sorted(set(self.final) - {"stage2", "reuse_stage1_mixers", "extra_sets"}):
            raise ConfigError(
                "final may only hold 'stage2' (DistillConfig fields), 'reuse_stage1_mixers' and 'extra_sets'"
            )
        self.distill_config("final", 2)
        self._check_extra_sets(None)
        selectors = self.selectors
        for sel in selectors:
            self.selection_config(sel)  # validates selector names and SelectionConfig fields
        self._check_eval()
        if not isinstance(self.report, dict) or sorted(set(self.report) - {"title"}):
            raise ConfigError(f"report must be a mapping with at most 'title', got {self.report!r}")
        if check_paths:
            try:
                num_layers = teacher_num_layers(teacher)
            except (OSError, ValueError) as err:
                what = "" if str(err).startswith("Unsupported architecture") else "cannot read the config of "
                raise ConfigError(f"teacher: {what}{teacher!r}: {err}") from err
            try:
                resolve_budgets(self.selection.get("budgets", [0.25]), num_layers)
            except BudgetError as err:
                raise ConfigError(f"selection.budgets: {err}") from err
            for sel in selectors:
                layers = self.selection_config(sel).layers or []
                if sel == "given" and any(i >= num_layers for i in layers):
                    raise ConfigError(f"selection.layers {layers} out of range for a {num_layers}-layer teacher")
            self._check_extra_sets(num_layers)

    def _check_eval(self) -> None:
        """eval's fields, checked before any training so that a typo does not surface after the last stage."""
        from ..tasks import TASKS
        from ..evaluation.suite import MODEL_DTYPES, parse_suite

        if not isinstance(self.eval, dict):
            raise ConfigError("eval must be a mapping")
        bad = sorted(set(self.eval) - set(_EVAL_KEYS))
        if bad:
            raise ConfigError(f"unknown eval field(s) {bad}; valid: {list(_EVAL_KEYS)}")
        if "suite" in self.eval:
            suite = self.eval["suite"]
            if not isinstance(suite, (str, list)) or (isinstance(suite, list) and not all(isinstance(x, str) for x in suite)):
                raise ConfigError(f"eval.suite must be a name or a list of names (recall, niah, quality, efficiency), got {suite!r}")
            try:
                parse_suite(suite)
            except ValueError as err:
                raise ConfigError(f"eval.suite: {err}") from err
        seed = self.eval.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"eval.seed must be an integer, got {seed!r}")
        compile_decode = self.eval.get("compile_decode")
        if compile_decode is not None and not isinstance(compile_decode, bool):
            raise ConfigError(f"eval.compile_decode must be true or false, got {compile_decode!r}")
        dtype = self.eval.get("efficiency_dtype")
        if dtype is not None and dtype not in MODEL_DTYPES:
            raise ConfigError(f"eval.efficiency_dtype must be float32, bfloat16 or float16, got {dtype!r}")
        tasks = self.eval.get("tasks")
        if tasks is not None:
            if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
                raise ConfigError(f"eval.tasks must be a non-empty list of task names, got {tasks!r}")
            unknown = [t for t in tasks if t not in TASKS]
            if unknown:
                raise ConfigError(f"eval.tasks: unknown task(s) {unknown}; known: {sorted(TASKS)}")
        for key in ("lengths", "niah_lengths", "efficiency_lengths", "efficiency_batches"):
            value = self.eval.get(key)
            if value is not None and (not isinstance(value, list) or not value or not all(_positive_int(v) for v in value)):
                raise ConfigError(f"eval.{key} must be a non-empty list of positive integers, e.g. [4096, 16384]; got {value!r}")
        for key in ("num_samples", "niah_samples", "batch_size", "quality_seq_len", "quality_sequences", "decode_steps",
                    "prefill_rows"):
            value = self.eval.get(key)
            if value is not None and not _positive_int(value):
                raise ConfigError(f"eval.{key} must be a positive integer, got {value!r}")
        depths = self.eval.get("niah_depths")
        if depths is not None and (
            not isinstance(depths, list) or not depths
            or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 100 for d in depths)
        ):
            raise ConfigError(f"eval.niah_depths must be a non-empty list of percentages in [0, 100], got {depths!r}")

    def _check_extra_sets(self, num_layers: int | None) -> None:
        """``final.extra_sets``: {label: [softmax layers]} distilled and evaluated beside the selectors' sets."""
        extra = self.final.get("extra_sets") or {}
        if not isinstance(extra, dict):
            raise ConfigError("final.extra_sets must map a label to a list of softmax layers, e.g. {probe: [0, 4, 9]}")
        for label, layers in extra.items():
            ok = isinstance(layers, (list, tuple)) and layers and all(isinstance(i, int) and i >= 0 for i in layers)
            if not ok or len(set(layers)) != len(layers):
                raise ConfigError(f"final.extra_sets.{label}: expected distinct 0-based layer indices, got {layers!r}")
            if num_layers is not None and max(layers) >= num_layers:
                raise ConfigError(f"final.extra_sets.{label}: {layers} out of range for a {num_layers}-layer teacher")

    # -- derived ------------------------------------------------------------------------------
    @property
    def teacher_spec(self) -> str:
        return resolve_teacher_spec(self.teacher)

    @property
    def linear(self) -> str:
        return (self.student or {}).get("linear", "gdn")

    @property
    def mixer_options(self) -> dict | None:
        return (self.student or {}).get("mixer_options")

    @property
    def selectors(self) -> list[str]:
        sels = self.selection.get("selectors", ["ga-s2"]) if isinstance(self.selection, dict) else None
        if not isinstance(sels, list) or not sels:
            raise ConfigError("selection.selectors must be a non-empty list of selector names")
        return sels

    def distill_config(self, name: str, stage: int) -> DistillConfig:
        """The `DistillConfig` of ``stage1``/``stage2``/``final`` (fields validated, named on error)."""
        raw = self.final.get("stage2", {}) if name == "final" else getattr(self, name)
        if not isinstance(raw, dict):
            raise ConfigError(f"{name} must be a mapping of DistillConfig fields")
        try:
            cfg = DistillConfig.from_dict({"seed": self.seed, **raw, "stage": stage})
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from err
        return cfg.replace(seq_len=cfg.seq_len or (512 if stage == 1 else 4096))

    def selection_config(self, selector: str) -> SelectionConfig:
        fields = {k: v for k, v in self.selection.items() if k != "selectors"}
        fields.setdefault("probe", self.linear)
        fields.setdefault("seed", self.seed)
        if self.mixer_options is not None:
            fields.setdefault("mixer_options", self.mixer_options)
        try:
            return SelectionConfig.from_dict({**fields, "selector": selector})
        except ConfigError as err:
            raise ConfigError(f"selection: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return {k: copy.deepcopy(getattr(self, k)) for k in _TOP_LEVEL}
