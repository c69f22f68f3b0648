"""`RunConfig`: the YAML of ``hybrid-distill run``, one typed tree validated up front with errors naming the field.

::

    teacher: Qwen/Qwen2.5-1.5B-Instruct      # HF path / hub id, tiny:<variant>, or "default" (shipped teacher)
    run_dir: runs/qwen15
    data: {source: HuggingFaceFW/fineweb-edu, text_field: text, max_tokens: 2_000_000_000}   # DataConfig
    student: {linear: gdn, layout: qwen3_5, mixer_options: {}}                               # StudentConfig
    stage1: {target_tokens: 100_000_000, seq_len: 512, global_batch_size: 96}     # DistillConfig (Stage 1)
    stage2: {target_tokens: 600_000_000, seq_len: 4096, global_batch_size: 32}    # DistillConfig (Stage 2); null: none
    selection:                                                                    # RunSelectionConfig
      selectors: [ga-s2, uniform]
      budgets: [0.125, 0.25, 0.5]
      stage2: {target_tokens: 150_000_000, seq_len: 4096, global_batch_size: 32}  # per candidate
      early_stop: true
    final: {stage2: {target_tokens: 600_000_000, seq_len: 4096, global_batch_size: 32}}      # FinalConfig
    eval: {suite: [recall, niah, quality], lengths: [4096], num_samples: 50}                # EvalConfig
    export: {format: qwen3_5}                                                                 # ExportConfig
    report: {title: "..."}

Sections a run config leaves out take their dataclass defaults. Three defaults come from other sections: each
DistillConfig's ``seed`` is the run's ``seed``; the selection's ``probe`` and ``mixer_options`` are the
student's ``linear`` and ``mixer_options``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (
    Config,
    ConfigError,
    Invalid,
    boolean,
    integer,
    list_of,
    mapping,
    non_empty_str,
    one_of,
    optional,
    read_config_file,
    setting,
)
from ..data import DataConfig
from ..distill.config import DistillConfig
from ..evaluation.config import EvalConfig
from ..export import EXPORT_FORMATS, exportable
from ..modeling.configuration_hybrid import LINEAR_MIXERS, STUDENT_LAYOUTS, layout_mixer_options, resolve_mixer_options
from ..selection.config import SelectionConfig, check_selector_name, split_selector
from ..selection.rules import BudgetError, resolve_budgets
from ..surgery import teacher_config

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"
SHIPPED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "tiny_teacher"


def resolve_teacher_spec(teacher: str) -> str:
    """``"default"`` -> the teacher shipped with the package; other specs unchanged."""
    return str(SHIPPED_TEACHER) if teacher == "default" else str(teacher)


def _mixer_options(value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Invalid("must be a mapping of mixer options")
    try:
        resolve_mixer_options(value)
    except ValueError as err:
        raise Invalid(f"has a bad value: {err}", show_value=False) from None
    return dict(value)


@dataclass
class StudentConfig(Config):
    """The student's linear mixer and its options."""

    error_root = "student"

    linear: str = setting("gdn", check=one_of(*LINEAR_MIXERS), help="linear mixer of the non-softmax layers")
    layout: str = setting("default", check=one_of(*STUDENT_LAYOUTS),
                          help="preset of mixer options: 'qwen3_5' trains GDN layers that export exactly to Qwen3.5")
    mixer_options: dict[str, Any] | None = setting(None, check=_mixer_options, help="mixer options (JSON)")

    def validate(self) -> None:
        try:
            self.options()
        except ValueError as err:
            raise self.invalid("mixer_options", str(err), show_value=False) from None
        if self.layout == "qwen3_5" and self.linear != "gdn":
            raise self.invalid("layout", f"'qwen3_5' needs linear: gdn (Qwen3.5 has Gated DeltaNet layers), not {self.linear!r}")

    def options(self) -> dict[str, Any] | None:
        """The mixer options the student is built with: the layout's preset with ``mixer_options`` on top."""
        if self.layout == "default":
            return self.mixer_options
        return layout_mixer_options(self.layout, self.mixer_options)


def _selectors(value: Any) -> list[str]:
    names = list_of(check_selector_name, what="selector names")(value)
    if len(set(names)) != len(names):
        raise Invalid("lists a selector twice")
    return names


@dataclass
class RunSelectionConfig(SelectionConfig):
    """The run's selection: `SelectionConfig` fields shared by every selector, and the selectors to run."""

    error_root = "selection"

    selectors: list[str] = setting(default_factory=lambda: ["ga-s2"], check=_selectors, help="selectors to run")

    def validate(self) -> None:
        for name in self.selectors:
            self.for_selector(name)  # rules of one selector (e.g. 'given' needs layers)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("selector")  # a run lists its selectors under ``selectors``
        return out

    def for_selector(self, selector: str) -> SelectionConfig:
        """The `SelectionConfig` of one of ``selectors``."""
        fields = {k: v for k, v in self.to_dict().items() if k != "selectors"}
        start = split_selector(selector)[1]  # "ga-s2@stage2": this selector's candidates start elsewhere
        if start is not None:
            fields["candidate_start"] = start
        try:
            return SelectionConfig.from_dict({**fields, "selector": selector})
        except ConfigError as err:
            raise err.relocated(["selection"]) from None


def _layer_sets(value: Any) -> dict[str, list[int]]:
    sets = mapping(value or {})
    for label, layers in sets.items():
        ok = isinstance(layers, (list, tuple)) and layers and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        if not ok or len(set(layers)) != len(layers):
            raise Invalid(f"must map a label to distinct 0-based layer indices; {label}: {layers!r}")
    return {str(k): list(v) for k, v in sets.items()}


@dataclass
class FinalConfig(Config):
    """The final hybrids: one Stage-2 run per distinct layer set."""

    error_root = "final"

    stage2: DistillConfig = setting(default_factory=lambda: DistillConfig(stage=2), flag=False,
                                    help="Stage-2 settings of every final hybrid")
    reuse_stage1_mixers: bool = setting(True, check=boolean,
                                        help="start the linear layers from the all-linear Stage-1 student's mixers")
    extra_sets: dict[str, list[int]] = setting(default_factory=dict, check=_layer_sets,
                                               help="{label: [softmax layers]} distilled and evaluated beside the selectors' sets")


@dataclass
class ExportConfig(Config):
    """Export of every final hybrid for serving engines (``null`` format: no export)."""

    error_root = "export"

    format: str | None = setting(None, check=optional(one_of(*EXPORT_FORMATS)),
                                 help="export every final hybrid in this format (null: no export)")
    approximate: bool = setting(False, check=boolean,
                                help="export also what the format cannot compute exactly, with the measured logit error")
    dtype: str | None = setting(None, check=optional(one_of("float32", "bfloat16")),
                                help="of the exported weights (default: the student's)")


@dataclass
class ReportConfig(Config):
    error_root = "report"

    title: str | None = setting(None, check=optional(non_empty_str), help="the report's title")


def _stage_section(value: Any, stage: int, seed: int, name: str) -> DistillConfig:
    if isinstance(value, DistillConfig):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping of DistillConfig fields, got {value!r}", [name])
    if value.get("stage", stage) != stage:
        raise ConfigError(f"{name}.stage must be {stage} (or left out), got {value['stage']!r}", [name, "stage"])
    try:
        return DistillConfig.from_dict({"seed": seed, **value, "stage": stage})
    except ConfigError as err:
        raise err.relocated([name]) from None


@dataclass
class RunConfig(Config):
    """The whole pipeline's settings (see the module docstring for the YAML layout)."""

    error_root = ""

    teacher: str = setting(check=non_empty_str, help="HF path / hub id, tiny:<variant>, or 'default'")
    run_dir: str = setting("runs/hybrid-distill", check=non_empty_str, help="the run folder")
    tokenizer: str | None = setting(None, help="tokenizer path (default: the teacher's)")
    seed: int = setting(0, check=integer(0))
    data: DataConfig = setting(default_factory=DataConfig)
    student: StudentConfig = setting(default_factory=StudentConfig)
    stage1: DistillConfig = setting(default_factory=lambda: DistillConfig(stage=1))
    stage2: DistillConfig | None = setting(default_factory=lambda: DistillConfig(stage=2))  # None: no all-linear Stage 2
    selection: RunSelectionConfig = setting(default_factory=RunSelectionConfig)
    final: FinalConfig = setting(default_factory=FinalConfig)
    eval: EvalConfig = setting(default_factory=EvalConfig)
    export: ExportConfig = setting(default_factory=ExportConfig)
    report: ReportConfig = setting(default_factory=ReportConfig)
    source: str | None = setting(None, flag=False, help="the file the config came from")

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str | None = None, check_paths: bool = True) -> RunConfig:  # type: ignore[override]
        """Build from the YAML's mapping: sections become their configs (with the defaults they take from other
        sections); ``check_paths`` also reads the teacher's config to check layer indices and budgets."""
        if not isinstance(data, dict):
            raise ConfigError(f"the run config must be a mapping of {cls.field_names()}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(cls.field_names()) - {"source"})
        if unknown:
            raise ConfigError(f"unknown top-level field(s) {unknown} in the run config; valid: {cls.field_names()}")
        if not data.get("teacher"):
            raise ConfigError("teacher: missing; give a Hugging Face path / hub id, tiny:<variant>, or 'default'",
                              ["teacher"])
        raw = copy.deepcopy(data)
        seed = integer(0)(raw.get("seed", 0)) if not isinstance(raw.get("seed", 0), bool) else raw["seed"]
        raw["stage1"] = _stage_section(raw.get("stage1"), 1, seed, "stage1")
        if raw.get("stage2", {}) is not None:
            raw["stage2"] = _stage_section(raw.get("stage2"), 2, seed, "stage2")
        final = raw.get("final") or {}
        if isinstance(final, dict):
            raw["final"] = {**final, "stage2": _stage_section(final.get("stage2"), 2, seed, "final.stage2")}
        raw["student"] = student = StudentConfig.from_dict(raw.get("student") or {})
        selection = raw.get("selection") or {}
        if isinstance(selection, dict):
            if "selector" in selection:
                raise ConfigError("selection.selector: a run config lists its selectors under selection.selectors",
                                  ["selection", "selector"])
            selection = {"probe": student.linear, "seed": seed, **selection}
            if student.options() is not None:
                selection.setdefault("mixer_options", student.options())
            raw["selection"] = selection
        config = cls(**raw, source=source)
        if check_paths:
            config.check_teacher()
        return config

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None, check_paths: bool = True) -> RunConfig:  # type: ignore[override]
        """Load a YAML file (``"default"``: the embedded default config); ``overrides`` replace top-level fields."""
        path = DEFAULT_CONFIG if str(path) == "default" else Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config {str(path)!r} does not exist")
        data = read_config_file(path)
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data, source=str(path), check_paths=check_paths)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("source")
        return out

    # -- checks against the teacher ------------------------------------------------------------
    def check_teacher(self) -> None:
        """The teacher exists and its layer count fits the budgets and layer lists (reads only its config)."""
        teacher = self.teacher_spec
        if not teacher.startswith("tiny:"):
            path = Path(teacher).expanduser()
            looks_local = teacher.startswith((".", "/", "~")) or path.exists()
            if looks_local and not (path / "config.json").is_file():
                raise FileNotFoundError(f"teacher: {teacher!r} has no config.json (expected a Hugging Face model directory)")
        try:
            config = teacher_config(teacher)
        except (OSError, ValueError) as err:
            what = "" if str(err).startswith("Unsupported architecture") else "cannot read the config of "
            raise ConfigError(f"teacher: {what}{teacher!r}: {err}") from err
        num_layers = config.num_hidden_layers
        try:
            resolve_budgets(self.selection.budgets, num_layers)
        except BudgetError as err:
            raise ConfigError(f"selection.budgets: {err}") from err
        layers = self.selection.layers or []
        if "given" in self.selection.selectors and any(i >= num_layers for i in layers):
            raise ConfigError(f"selection.layers {layers} out of range for a {num_layers}-layer teacher")
        for label, extra in self.final.extra_sets.items():
            if max(extra) >= num_layers:
                raise ConfigError(f"final.extra_sets.{label}: {extra} out of range for a {num_layers}-layer teacher")
        if self.export.format is not None and not self.export.approximate:
            # every final hybrid has linear and softmax layers: what either kind would block, the export refuses
            blockers = [b for mixer in (self.linear, "softmax")
                        for b in exportable(config, [mixer] * num_layers, self.mixer_options, self.export.format)]
            if blockers:
                reasons = sorted({b.reason + " -> " + b.fix for b in blockers})
                raise ConfigError(f"export.format {self.export.format!r}: the final hybrids could not be exported exactly: "
                                  + "; ".join(reasons) + ". Use student.layout: qwen3_5 where that is the fix, or "
                                  "export.approximate: true to export anyway with the measured logit error",
                                  ["export", "format"])

    # -- derived ------------------------------------------------------------------------------
    @property
    def teacher_spec(self) -> str:
        return resolve_teacher_spec(self.teacher)

    @property
    def linear(self) -> str:
        return self.student.linear

    @property
    def mixer_options(self) -> dict | None:
        """The student's mixer options with its layout's preset."""
        return self.student.options()

    @property
    def selectors(self) -> list[str]:
        return list(self.selection.selectors)

    def selection_config(self, selector: str) -> SelectionConfig:
        return self.selection.for_selector(selector)


__all__ = [
    "DEFAULT_CONFIG",
    "SHIPPED_TEACHER",
    "ExportConfig",
    "FinalConfig",
    "ReportConfig",
    "RunConfig",
    "RunSelectionConfig",
    "StudentConfig",
    "resolve_teacher_spec",
]
