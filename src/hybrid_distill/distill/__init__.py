"""RADLADS-style distillation of a softmax teacher into a hybrid student.

Stage 1 aligns each linear mixer's output with the teacher attention output (teacher inputs),
Stage 2 matches the output distributions (τ²·KL, chunked over tokens), optional Stage 3 fine-tunes
with next-token cross-entropy. `Trainer` (or `distill`) runs one stage into a run folder (resumable,
pausable); `read_progress` reads a run folder's progress; `run_distill_from_args` builds everything from
command-line options (``hybrid-distill distill``).
"""

from .batches import TensorTokenDataset
from .checkpointing import latest_checkpoint
from .config import ConfigError, DistillConfig
from .losses import alignment_loss_sum, chunked_cross_entropy, chunked_kl_div, kl_div_reference
from .metrics import read_metrics
from .recipe import add_distill_arguments, run_distill_from_args
from .stages import evaluate_kl, evaluate_stage, make_stage, mixer_parameter_names
from .trainer import DistillResult, Trainer, TrainProgress, TrainState, distill, read_progress

__all__ = [
    "ConfigError",
    "DistillConfig",
    "DistillResult",
    "TensorTokenDataset",
    "TrainProgress",
    "TrainState",
    "Trainer",
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
    "read_progress",
    "run_distill_from_args",
]
