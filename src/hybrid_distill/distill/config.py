"""`DistillConfig`: every setting of one distillation stage, checked at creation, with per-stage defaults.

Fields left as ``None`` take the stage's default (the RADLADS / paper-code values) at creation, so a created
config is always concrete. Errors name the field (``DistillConfig.<field>``, or its path in a run config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import (
    Config,
    ConfigError,
    Invalid,
    add_flags,
    boolean,
    flag_values,
    integer,
    list_of,
    one_of,
    optional,
    parse_float,
    real,
    setting,
)

# Per-stage defaults (paper code / RADLADS): Stage 1 100M tokens @512, lr 1e-3 cosine -> 0;
# Stage 2 600M tokens @4096, lr 1e-4 for mixers and 7e-6 for the rest, constant; Stage 3 CE 100M @4096.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"target_tokens": 100_000_000, "lr_mixer": 1e-3, "lr_other": 0.0, "schedule": "cosine"},
    2: {"target_tokens": 600_000_000, "lr_mixer": 1e-4, "lr_other": 7e-6, "schedule": "constant"},
    3: {"target_tokens": 100_000_000, "lr_mixer": 1e-5, "lr_other": 1e-5, "schedule": "cosine"},
}
# Sequence length a recipe loads data at when the config leaves seq_len unset (the trainer itself then takes
# the data's own length).
STAGE_SEQ_LEN: dict[int, int] = {1: 512, 2: 4096, 3: 4096}

# Fields that do not change the training trajectory: a checkpoint may be resumed with other values.
RESUME_INSENSITIVE_FIELDS = frozenset(
    {
        "micro_batch_size",
        "activation_checkpointing",
        "compile_layers",
        "fsdp",
        "kl_chunk_size",
        "log_every_steps",
        "eval_every_tokens",
        "eval_max_batches",
        "eval_batch_size",
        "save_every_tokens",
        "save_every_minutes",
        "keep_last",
        "save_final_model",
        "save_dtype",
        "progress",
        "report_to",
        "run_name",
        "device",
    }
)

_REPORTERS = ("tensorboard", "wandb")


def _betas(value: Any) -> tuple[float, float]:
    values = list_of(real(0.0, below=1.0), min_len=2, what="numbers in [0, 1)")(value)
    if len(values) != 2:
        raise Invalid("must be two numbers in [0, 1)")
    return (values[0], values[1])


def _reporters(value: Any) -> tuple[str, ...]:
    return tuple(list_of(one_of(*_REPORTERS), min_len=0, what=f"names in {list(_REPORTERS)}")(value or ()))


@dataclass
class DistillConfig(Config):
    """Settings of one distillation run (stage 1, 2 or 3).

    Batch geometry: ``global_batch_size`` sequences of ``seq_len`` tokens per optimizer step,
    processed as micro-batches of ``micro_batch_size`` per process, so
    ``global_batch_size = micro_batch_size × grad_accum × world_size`` (``grad_accum`` is derived).
    Budgets are in tokens: ``steps = ceil(target_tokens / (global_batch_size × seq_len))``.
    """

    stage: int = setting(2, check=lambda v: one_of(1, 2, 3)(integer()(v)),
                         help="1: attention alignment, 2: KL, 3: CE fine-tune")
    target_tokens: int | None = setting(None, check=integer(1), help="token budget (default: the stage's)")
    seq_len: int | None = setting(None, check=optional(integer(2)),
                                  help="tokens per sequence (default: the data's; recipes load data at the stage's "
                                  f"length {STAGE_SEQ_LEN})")
    global_batch_size: int = setting(32, check=integer(1), help="sequences per optimizer step, over all processes")
    micro_batch_size: int | None = setting(None, check=optional(integer(1)),
                                           help="sequences per forward per process (default: global / world size)")

    # Optimizer (AdamW) and schedule. lr_mixer: parameters of linear-attention mixers; lr_other: the rest.
    lr_mixer: float | None = setting(None, check=real(0.0, exclusive=True), help="lr of the linear mixers")
    lr_other: float | None = setting(None, check=real(0.0), help="lr of every other trained parameter")
    softmax_lr: str = setting("mixer", check=one_of("mixer", "other"),
                              help="lr group of the softmax layers a hybrid keeps: 'mixer' (as the paper's code "
                              "trains every parameter with 'attn' in its name) or 'other'")
    weight_decay: float = setting(0.01, check=real(0.0))
    adam_betas: tuple[float, float] = setting((0.9, 0.95), check=_betas, parse=parse_float, nargs=2, metavar="BETA",
                                              help="AdamW betas")
    adam_eps: float = setting(1e-8, check=real(0.0, exclusive=True))
    grad_clip: float | None = setting(1.0, check=optional(real(0.0)), help="gradient-norm clip (0 or none: off)")
    schedule: str | None = setting(None, check=one_of("cosine", "constant"), help="lr schedule after warm-up")
    warmup_tokens: int = setting(0, check=integer(0), help="linear warm-up length in tokens")
    min_lr_ratio: float = setting(0.0, check=real(0.0, maximum=1.0), help="cosine decays to lr * min_lr_ratio")

    # Losses.
    tau: float = setting(1.0, check=real(0.0, exclusive=True), help="Stage-2 temperature (1.0 as the paper's code)")
    stage1_loss_norm: str = setting("none", check=one_of("none", "hidden"),
                                    help="'none': squared L2 per token (paper Eq. 4); 'hidden': divided by the hidden size")
    kl_chunk_size: int = setting(1024, check=integer(1), help="tokens per lm_head chunk (KL, CE, evaluation)")

    # Execution.
    precision: str = setting("auto", check=one_of("auto", "bf16", "fp32"),
                             help="'auto': bf16 autocast on CUDA, fp32 on CPU")
    device: str = setting("auto", check=None, help="'auto' (cuda:<LOCAL_RANK> when available, else cpu) or a device")
    fsdp: str = setting("auto", check=one_of("auto", "on", "off"),
                        help="'auto': on when world_size > 1; 'off': replicas with all-reduced gradients")
    activation_checkpointing: bool = setting(False, check=boolean)
    compile_layers: str = setting("off", check=one_of("off", "teacher", "all"),
                                  help="torch.compile decoder layers in Stages 2 and 3: the frozen teacher's, or "
                                  "teacher's and student's")
    seed: int = setting(0, check=integer(0))

    # Logging, evaluation, checkpoints.
    log_every_steps: int = setting(1, check=integer(1))
    eval_every_tokens: int | None = setting(None, check=optional(integer(1)),
                                            help="held-out evaluation interval (default: at the end only)")
    eval_max_batches: int = setting(16, check=integer(0), help="held-out batches per process and evaluation")
    eval_batch_size: int | None = setting(None, check=optional(integer(1)), help="default: micro_batch_size")
    save_every_tokens: int | None = setting(None, check=optional(integer(1)), help="checkpoint interval in tokens")
    save_every_minutes: float | None = setting(30.0, check=optional(real(0.0)),
                                               help="also checkpoint once this many minutes passed (0: off)")
    keep_last: int = setting(2, check=integer(1), help="checkpoints kept")
    save_final_model: bool = setting(True, check=boolean)
    # The final model IS the stage's output: with bfloat16 the trained weights are rounded to it before saving (the
    # student in memory too), so a later stage or evaluation sees the same weights whether or not it ran in the
    # same process. Half the size on disk (a run folder carried between machines, docs/reproduction.md).
    save_dtype: str = setting("float32", check=one_of("float32", "bfloat16"),
                              help="dtype the final model is saved in; bfloat16 rounds the trained weights to it")
    progress: bool = setting(True, check=boolean, help="progress bar")
    report_to: tuple[str, ...] = setting((), check=_reporters, parse=str, nargs="*", metavar="NAME",
                                         help=f"extra metric sinks among {list(_REPORTERS)} (used when installed)")
    run_name: str | None = setting(None, help="name for W&B")

    def __post_init__(self):
        if isinstance(self.stage, bool) or self.stage not in STAGE_DEFAULTS:
            raise self.invalid("stage", "must be 1, 2 or 3")
        for name, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()

    def validate(self) -> None:
        if self.micro_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise self.invalid("micro_batch_size", f"must divide global_batch_size={self.global_batch_size}")
        if self.stage != 1 and self.lr_other == 0.0:
            raise self.invalid("lr_other", f"must be > 0 in Stage {self.stage} (it trains every parameter)")
        if not isinstance(self.device, str) or not self.device:
            raise self.invalid("device", "must be 'auto' or a torch device string such as 'cpu' or 'cuda:0'")

    @property
    def data_seq_len(self) -> int:
        """The sequence length recipes load data at: ``seq_len``, else the stage's default."""
        return self.seq_len or STAGE_SEQ_LEN[self.stage]

    # -- derived values -----------------------------------------------------------------------
    def micro_batch(self, world_size: int) -> int:
        """Per-process micro-batch size for ``world_size`` processes."""
        if self.global_batch_size % world_size:
            raise ConfigError(
                f"DistillConfig.global_batch_size={self.global_batch_size} is not divisible by the "
                f"world size {world_size}"
            )
        return self.micro_batch_size or self.global_batch_size // world_size

    def grad_accum(self, world_size: int) -> int:
        """Micro-batches per process and optimizer step."""
        micro = self.micro_batch(world_size)
        per_rank = self.global_batch_size // world_size
        if per_rank % micro:
            raise ConfigError(
                f"DistillConfig.micro_batch_size={micro} does not divide the per-process batch "
                f"{per_rank} (global_batch_size={self.global_batch_size} / world_size={world_size})"
            )
        return per_rank // micro

    @property
    def saved_weights_dtype(self) -> torch.dtype | None:
        """The dtype ``save_dtype`` rounds the final model's floating-point weights to (None: kept as trained)."""
        return None if self.save_dtype == "float32" else getattr(torch, self.save_dtype)

    def total_steps(self, seq_len: int) -> int:
        """Optimizer steps of the run: ceil(target_tokens / (global_batch_size × seq_len))."""
        return math.ceil(self.target_tokens / (self.global_batch_size * seq_len))

    @property
    def total_tokens(self) -> int:
        """Tokens the run trains as recipes load its data (at `data_seq_len`): whole optimizer steps."""
        return self.total_steps(self.data_seq_len) * self.global_batch_size * self.data_seq_len

    # -- fingerprint ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "adam_betas": list(self.adam_betas), "report_to": list(self.report_to)}

    def resume_fields(self) -> dict[str, Any]:
        """The fields a checkpoint must agree on to be resumed."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_INSENSITIVE_FIELDS}

    def fingerprint(self, extra: dict[str, Any] | None = None) -> str:
        """Hash of `resume_fields` (and ``extra``, e.g. the student's layer layout)."""
        payload = {"config": self.resume_fields(), "extra": extra or {}}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two `resume_fields`-style dicts (with nested ``extra``)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{key}: checkpoint {a!r} != now {b!r}")
    return out


def add_distill_config_flags(parser) -> None:
    """One ``--<field>`` option per `DistillConfig` field, ``--config FILE`` and ``--no-progress``."""
    add_flags(parser, DistillConfig, prefix="cfg_", title="distillation config (DistillConfig fields)")
    group = parser.add_argument_group("distillation config file")
    group.add_argument("--no-progress", dest="cfg_progress", action="store_const", const=False, default=argparse.SUPPRESS,
                       help="no progress bar (same as --progress false, and as run/select's --no-progress)")
    group.add_argument("--config", dest="cfg_file", default=None, help="JSON/YAML file of DistillConfig fields")


def distill_config_from_flags(ns: argparse.Namespace | dict) -> DistillConfig:
    """The `DistillConfig` of `add_distill_config_flags` options: the file's fields, then the flags given."""
    values = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns)
    flags = flag_values(values, DistillConfig, prefix="cfg_")
    if values.get("cfg_file"):
        return DistillConfig.from_file(values["cfg_file"], **flags)
    return DistillConfig.from_dict(flags)


__all__ = [
    "RESUME_INSENSITIVE_FIELDS",
    "STAGE_DEFAULTS",
    "STAGE_SEQ_LEN",
    "ConfigError",
    "DistillConfig",
    "add_distill_config_flags",
    "distill_config_from_flags",
    "resume_mismatch",
]
