"""The one-command pipeline (``hybrid-distill run``): config, stages, dry-run plan and report."""

from .config import DEFAULT_CONFIG, SHIPPED_TEACHER, RunConfig, resolve_teacher_spec
from .plan import plan_run
from .report import write_report
from .run import STAGES, Pipeline, run_pipeline

__all__ = [
    "DEFAULT_CONFIG",
    "SHIPPED_TEACHER",
    "STAGES",
    "Pipeline",
    "RunConfig",
    "plan_run",
    "resolve_teacher_spec",
    "run_pipeline",
    "write_report",
]
