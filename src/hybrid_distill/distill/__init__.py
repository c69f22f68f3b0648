"""RADLADS-style distillation of a softmax teacher into a hybrid student.

Stage 1 aligns each linear mixer's output with the teacher attention output (teacher inputs),
Stage 2 matches the output distributions (τ²·KL, chunked over tokens), optional Stage 3 fine-tunes
with next-token cross-entropy. `distill` runs one stage into a run directory (resumable);
`run_distill_from_args` builds everything from command-line options.
"""

from .config import ConfigError, DistillConfig
from .losses import alignment_loss_sum, chunked_cross_entropy, chunked_kl_div, kl_div_reference
from .stages import evaluate_kl, evaluate_stage, make_stage, mixer_parameter_names
from .trainer import (
    DistillResult,
    TensorTokenDataset,
    add_distill_arguments,
    distill,
    latest_checkpoint,
    read_metrics,
    run_distill_from_args,
)

__all__ = [
    "ConfigError",
    "DistillConfig",
    "DistillResult",
    "TensorTokenDataset",
    "add_distill_arguments",
    "alignment_loss_sum",
    "chunked_cross_entropy",
    "chunked_kl_div",
    "distill",
    "evaluate_kl",
    "evaluate_stage",
    "kl_div_reference",
    "latest_checkpoint",
    "make_stage",
    "mixer_parameter_names",
    "read_metrics",
    "run_distill_from_args",
]
