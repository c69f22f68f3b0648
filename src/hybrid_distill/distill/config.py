"""`DistillConfig`: every setting of a distillation run, validated, with per-stage defaults.

Fields left as ``None`` take the stage's default (the RADLADS / paper-code values) at creation, so
a created config is always concrete. Validation errors name the field (``DistillConfig.<field>``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# Per-stage defaults (paper code / RADLADS): Stage 1 100M tokens @512, lr 1e-3 cosine -> 0;
# Stage 2 600M tokens, lr 1e-4 for mixers and 7e-6 for the rest, constant; Stage 3 CE 100M.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    1: {"target_tokens": 100_000_000, "lr_mixer": 1e-3, "lr_other": 0.0, "schedule": "cosine"},
    2: {"target_tokens": 600_000_000, "lr_mixer": 1e-4, "lr_other": 7e-6, "schedule": "constant"},
    3: {"target_tokens": 100_000_000, "lr_mixer": 1e-5, "lr_other": 1e-5, "schedule": "cosine"},
}

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
        "progress",
        "report_to",
        "run_name",
        "device",
    }
)

_SCHEDULES = ("cosine", "constant")
_PRECISIONS = ("auto", "bf16", "fp32")
_STAGE1_NORMS = ("none", "hidden")
_REPORTERS = ("tensorboard", "wandb")
_COMPILE_CHOICES = ("off", "teacher", "all")


class ConfigError(ValueError):
    """An invalid `DistillConfig` value; the message names the field."""


@dataclass
class DistillConfig:
    """Settings of one distillation run (stage 1, 2 or 3).

    Batch geometry: ``global_batch_size`` sequences of ``seq_len`` tokens per optimizer step,
    processed as micro-batches of ``micro_batch_size`` per process, so
    ``global_batch_size = micro_batch_size × grad_accum × world_size`` (``grad_accum`` is derived).
    Budgets are in tokens: ``steps = ceil(target_tokens / (global_batch_size × seq_len))``.
    """

    stage: int = 2
    target_tokens: int | None = None
    seq_len: int | None = None  # None: taken from the data (PackedDataset.seq_len or the first batch)
    global_batch_size: int = 32
    micro_batch_size: int | None = None  # None: global_batch_size // world_size (no accumulation)

    # Optimizer (AdamW) and schedule. lr_mixer: parameters of linear-attention mixers; lr_other: the rest.
    lr_mixer: float | None = None
    lr_other: float | None = None
    # Learning rate of the softmax attention layers a hybrid keeps (Stages 2 and 3): "mixer" (lr_mixer, as
    # the paper's code trains every parameter with "attn" in its name) or "other" (lr_other, as the MLPs).
    softmax_lr: str = "mixer"
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    grad_clip: float | None = 1.0  # None or 0 disables clipping
    schedule: str | None = None  # "cosine" or "constant"
    warmup_tokens: int = 0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio

    # Losses.
    tau: float = 1.0  # Stage-2 temperature (1.0 as the paper's code)
    stage1_loss_norm: str = "none"  # "none": squared L2 per token (paper Eq. 4); "hidden": / hidden size
    kl_chunk_size: int = 1024  # tokens per lm_head chunk (Stage 2 KL, Stage 3 CE, evaluation)

    # Execution.
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "bf16", "fp32"
    device: str = "auto"  # "auto": cuda:<LOCAL_RANK> when available, else cpu
    fsdp: str = "auto"  # "auto" (on when world_size > 1), "on", "off" (replicas + all-reduced gradients)
    activation_checkpointing: bool = False
    # torch.compile decoder layers (Stages 2 and 3; the first steps compile): "off", "teacher" (the frozen
    # teacher only) or "all" (teacher and student; on an H200 Stage 2 of a 1.5B shape went 24.5k -> 30-31k
    # tokens/s, and its peak memory 60.6 -> 47.6 GiB)
    compile_layers: str = "off"
    seed: int = 0

    # Logging, evaluation, checkpoints.
    log_every_steps: int = 1
    eval_every_tokens: int | None = None  # None: evaluate only at the end (if held-out data exists)
    eval_max_batches: int = 16  # per process
    eval_batch_size: int | None = None  # None: micro_batch_size
    save_every_tokens: int | None = None  # None: no checkpoints by token count
    # Also checkpoint once this many minutes passed since the last checkpoint (None or 0: off), so an
    # interrupted run loses at most that much work even when save_every_tokens is not set.
    save_every_minutes: float | None = 30.0
    keep_last: int = 2
    save_final_model: bool = True
    progress: bool = True
    report_to: tuple[str, ...] = ()  # subset of ("tensorboard", "wandb"); used only when installed
    run_name: str | None = None

    def __post_init__(self):
        self.report_to = tuple(self.report_to or ())
        self.adam_betas = tuple(self.adam_betas)
        self._check_int("stage", 1)
        if self.stage not in STAGE_DEFAULTS:
            raise ConfigError(f"DistillConfig.stage must be 1, 2 or 3, got {self.stage!r}")
        for name, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.validate()

    # -- validation ---------------------------------------------------------------------------
    def _fail(self, name: str, message: str):
        value = getattr(self, name)
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads a number like 1e-3 as text: write 1.0e-3)"
            except ValueError:
                pass
        raise ConfigError(f"DistillConfig.{name} {message}, got {value!r}{hint}")

    def _check_int(self, name: str, minimum: int, optional: bool = False):
        value = getattr(self, name)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(name, "must be an integer")
        if value < minimum:
            self._fail(name, f"must be >= {minimum}")

    def _check_float(self, name: str, minimum: float, exclusive: bool = False, maximum: float | None = None):
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(name, "must be a finite number")
        if value < minimum or (exclusive and value == minimum):
            self._fail(name, f"must be {'>' if exclusive else '>='} {minimum}")
        if maximum is not None and value > maximum:
            self._fail(name, f"must be <= {maximum}")

    def _check_choice(self, name: str, choices):
        if getattr(self, name) not in choices:
            self._fail(name, f"must be one of {list(choices)}")

    def validate(self) -> None:
        """Raise `ConfigError` naming the first invalid field."""
        self._check_int("target_tokens", 1)
        self._check_int("seq_len", 2, optional=True)
        self._check_int("global_batch_size", 1)
        self._check_int("micro_batch_size", 1, optional=True)
        if self.micro_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            self._fail("micro_batch_size", f"must divide global_batch_size={self.global_batch_size}")
        self._check_float("lr_mixer", 0.0, exclusive=True)
        self._check_float("lr_other", 0.0, exclusive=self.stage != 1)
        self._check_float("weight_decay", 0.0)
        if len(self.adam_betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.adam_betas):
            self._fail("adam_betas", "must be two numbers in [0, 1)")
        self._check_float("adam_eps", 0.0, exclusive=True)
        if self.grad_clip is not None:
            self._check_float("grad_clip", 0.0)
        self._check_choice("schedule", _SCHEDULES)
        self._check_choice("softmax_lr", ("mixer", "other"))
        self._check_int("warmup_tokens", 0)
        self._check_float("min_lr_ratio", 0.0, maximum=1.0)
        self._check_float("tau", 0.0, exclusive=True)
        self._check_choice("stage1_loss_norm", _STAGE1_NORMS)
        self._check_int("kl_chunk_size", 1)
        self._check_choice("precision", _PRECISIONS)
        if not isinstance(self.device, str) or not self.device:
            self._fail("device", "must be 'auto' or a torch device string such as 'cpu' or 'cuda:0'")
        self._check_choice("fsdp", ("auto", "on", "off"))
        if not isinstance(self.activation_checkpointing, bool):
            self._fail("activation_checkpointing", "must be true or false")
        self._check_choice("compile_layers", _COMPILE_CHOICES)
        self._check_int("seed", 0)
        self._check_int("log_every_steps", 1)
        self._check_int("eval_every_tokens", 1, optional=True)
        self._check_int("eval_max_batches", 0)
        self._check_int("eval_batch_size", 1, optional=True)
        self._check_int("save_every_tokens", 1, optional=True)
        if self.save_every_minutes is not None:
            self._check_float("save_every_minutes", 0.0)
        self._check_int("keep_last", 1)
        bad = [r for r in self.report_to if r not in _REPORTERS]
        if bad:
            self._fail("report_to", f"may only contain {list(_REPORTERS)}")

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

    def total_steps(self, seq_len: int) -> int:
        """Optimizer steps of the run: ceil(target_tokens / (global_batch_size × seq_len))."""
        return math.ceil(self.target_tokens / (self.global_batch_size * seq_len))

    # -- (de)serialisation and fingerprint ----------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["report_to"] = list(self.report_to)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        """Build from a mapping; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown DistillConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> DistillConfig:
        """Load a JSON or YAML file (``overrides`` replace its values)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of DistillConfig fields")
        return cls.from_dict({**data, **overrides})

    def replace(self, **changes) -> DistillConfig:
        return dataclasses.replace(self, **changes)

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


# --------------------------------------------------------------------------------------------
# argparse glue (the CLI owner wraps this)
# --------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--<field-name>`` option per `DistillConfig` field (default: the field's default)."""
    group = parser.add_argument_group("distillation config (DistillConfig fields)")
    for f in fields(DistillConfig):
        flag = "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f"cfg_{f.name}", "default": None, "help": f"default: {f.default!r}"}
        if f.name == "adam_betas":
            kw.update(type=float, nargs=2, metavar=("BETA1", "BETA2"))
        elif f.name == "report_to":
            kw.update(nargs="*", choices=_REPORTERS)
        elif f.name == "grad_clip":
            kw.update(type=float)
        elif f.type in (bool, "bool"):
            kw.update(type=_parse_bool, metavar="BOOL")
        elif f.name in ("lr_mixer", "lr_other", "weight_decay", "adam_eps", "min_lr_ratio", "tau", "save_every_minutes"):
            kw.update(type=float)
        elif "int" in str(f.type):
            kw.update(type=int)
        group.add_argument(flag, **kw)
    group.add_argument("--no-progress", dest="cfg_progress", action="store_const", const=False,
                       help="no progress bar (same as --progress false, and as run/select's --no-progress)")
    group.add_argument("--config", dest="cfg_file", default=None, help="JSON/YAML file of DistillConfig fields")


def config_from_args(args: argparse.Namespace | dict) -> DistillConfig:
    """`DistillConfig` from parsed `add_config_arguments` options (file values, then flags)."""
    ns = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    overrides = {k[4:]: v for k, v in ns.items() if k.startswith("cfg_") and k != "cfg_file" and v is not None}
    if ns.get("cfg_file"):
        return DistillConfig.from_file(ns["cfg_file"], **overrides)
    return DistillConfig.from_dict(overrides)


__all__ = [
    "RESUME_INSENSITIVE_FIELDS",
    "STAGE_DEFAULTS",
    "ConfigError",
    "DistillConfig",
    "add_config_arguments",
    "config_from_args",
    "resume_mismatch",
]
