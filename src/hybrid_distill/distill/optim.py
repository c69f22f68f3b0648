"""AdamW over the student's trainable parameters in named lr groups, the warm-up + cosine / constant schedule,
and one optimizer step (gradient clipping, a skipped update on a non-finite gradient norm)."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from . import distributed as hd_dist
from .config import DistillConfig
from .stages import attention_parameter_names, mixer_parameter_names

logger = logging.getLogger(__name__)


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (any parameter with < 2 dims) and GDN's A_log / dt_bias are not decayed."""
    leaf = name.rsplit(".", 1)[-1]
    return param.dim() < 2 or leaf in ("A_log", "dt_bias") or getattr(param, "_no_weight_decay", False)


def lr_mixer_parameter_names(student: nn.Module, config: DistillConfig) -> set[str]:
    """Parameters trained at ``lr_mixer``: the linear mixers', and the softmax layers' with ``softmax_lr="mixer"``.

    (Stage 1 trains the linear mixers only, so the softmax layers' group matters in Stages 2 and 3.)
    """
    names = mixer_parameter_names(student)
    if config.softmax_lr == "mixer":
        names |= attention_parameter_names(student)
    return names


def build_optimizer(student: nn.Module, config: DistillConfig, mixer_names: set[str]) -> torch.optim.AdamW:
    """AdamW over the trainable student parameters in up to four groups: {mixer, other} × {decay, no decay}.

    Each group carries ``name`` ("mixer" or "other") for logging (`group_lrs`). On CUDA the fused
    implementation updates all parameters in one kernel instead of one launch per tensor; CPU keeps the default.
    """
    groups: dict[tuple[str, bool], list] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        kind = "mixer" if name in mixer_names else "other"
        groups.setdefault((kind, no_weight_decay(name, p)), []).append(p)
    if not groups:
        raise ValueError("the student has no trainable parameters for this stage")
    lrs = {"mixer": config.lr_mixer, "other": config.lr_other}
    param_groups = [
        {"params": params, "name": kind, "lr": lrs[kind], "weight_decay": 0.0 if nodecay else config.weight_decay}
        for (kind, nodecay), params in sorted(groups.items())
    ]
    on_cuda = all(p.is_cuda for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, betas=tuple(config.adam_betas), eps=config.adam_eps, fused=on_cuda or None)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base lr for the update at 0-based ``step``: linear warm-up, then cosine or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, config: DistillConfig, total_steps: int, tokens_per_step: int):
    """`lr_factor` as a LambdaLR; the warm-up is ``warmup_tokens`` rounded up to whole steps."""
    warmup = math.ceil(config.warmup_tokens / tokens_per_step) if config.warmup_tokens else 0

    def fn(step: int) -> float:
        return lr_factor(step, total_steps, warmup, config.schedule, config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def group_lrs(optimizer) -> dict[str, float]:
    """``{"lr_mixer": ..., "lr_other": ...}``: the current lr of each named group (for the metrics)."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out.setdefault(f"lr_{g.get('name', 'group')}", float(g["lr"]))
    return out


def optimizer_step(optimizer, scheduler, params, grad_clip: float | None, step: int) -> float:
    """Clip (or just measure) the gradient norm, step optimizer and schedule, zero the gradients; returns the
    norm. A non-finite norm skips the update (the schedule still advances), with a warning naming ``step + 1``."""
    max_norm = grad_clip if grad_clip else float("inf")
    grad_norm = float(hd_dist.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    if math.isfinite(grad_norm):
        optimizer.step()
    else:
        logger.warning("step %d: non-finite grad norm %s; update skipped", step + 1, grad_norm)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


__all__ = [
    "build_optimizer",
    "build_scheduler",
    "group_lrs",
    "lr_factor",
    "lr_mixer_parameter_names",
    "no_weight_decay",
    "optimizer_step",
]
