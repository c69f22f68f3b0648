"""Offline RULER-style in-context recall tasks with exact (or, for training documents, approximate) token lengths.

One module per task family (``niah``, ``vt``, ``aggregation``: cwe/fwe, ``kv``: kv_retrieval/mqar,
``ar``: ar/ar_multihop), their shared plumbing (``base``), haystack text (``haystack``) and the
registry (``registry``: ``TASKS``, task lists, ``generate_samples``). The package sits below both
``hybrid_distill.data`` (recall documents mixed into training text) and ``hybrid_distill.evaluation``
(the recall suite) and imports neither.
"""

from .base import TEMPLATE_FAMILIES, LengthError, RecallSample, TaskSpec, count_tokens, sample_seed
from .haystack import Haystack, NoiseHaystack, ProseHaystack, TextHaystack, resolve_haystack
from .registry import DEFAULT_RECALL_TASKS, RULER_OFFLINE_TASKS, TASKS, generate_samples

__all__ = [
    "DEFAULT_RECALL_TASKS",
    "RULER_OFFLINE_TASKS",
    "TASKS",
    "TEMPLATE_FAMILIES",
    "Haystack",
    "LengthError",
    "NoiseHaystack",
    "ProseHaystack",
    "RecallSample",
    "TaskSpec",
    "TextHaystack",
    "count_tokens",
    "generate_samples",
    "resolve_haystack",
    "sample_seed",
]
