"""Evaluation: offline RULER-style recall tasks, scoring and needle-in-a-haystack grids."""

from .haystack import Haystack, NoiseHaystack, ProseHaystack, TextHaystack, resolve_haystack
from .niah import niah_grid_samples, niah_table, plot_niah_heatmap
from .recall_tasks import (
    DEFAULT_RECALL_TASKS,
    RULER_OFFLINE_TASKS,
    TASKS,
    LengthError,
    RecallSample,
    TaskSpec,
    count_tokens,
    generate_samples,
    sample_seed,
)
from .scoring import (
    METRICS,
    aggregate,
    first_int_exact,
    mqar_accuracy,
    score_sample,
    string_match_all,
    string_match_part,
)

__all__ = [
    "DEFAULT_RECALL_TASKS",
    "METRICS",
    "RULER_OFFLINE_TASKS",
    "TASKS",
    "Haystack",
    "LengthError",
    "NoiseHaystack",
    "ProseHaystack",
    "RecallSample",
    "TaskSpec",
    "TextHaystack",
    "aggregate",
    "count_tokens",
    "first_int_exact",
    "generate_samples",
    "mqar_accuracy",
    "niah_grid_samples",
    "niah_table",
    "plot_niah_heatmap",
    "resolve_haystack",
    "sample_seed",
    "score_sample",
    "string_match_all",
    "string_match_part",
]
