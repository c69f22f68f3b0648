"""Evaluation: scoring of recall predictions, the recall suite and needle-in-a-haystack grids.

The recall tasks themselves (samples, templates, the registry) are in :mod:`hybrid_distill.tasks`.
"""

from .scoring import (
    METRICS,
    aggregate,
    first_int_exact,
    mqar_accuracy,
    score_sample,
    string_match_all,
    string_match_part,
)
from .niah import niah_grid_samples, niah_table, plot_niah_heatmap

__all__ = [
    "METRICS",
    "aggregate",
    "first_int_exact",
    "mqar_accuracy",
    "niah_grid_samples",
    "niah_table",
    "plot_niah_heatmap",
    "score_sample",
    "string_match_all",
    "string_match_part",
]
