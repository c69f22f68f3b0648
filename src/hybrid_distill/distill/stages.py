"""What one micro-batch does in each stage: the loss (a sum over tokens) and, when training, its backward.

- Stage 1 (attention-output alignment): forward hooks on the teacher's attention modules of the
  student's linear layers capture each one's input (the normed hidden states, with the rotary
  ``position_embeddings``) and output. Every linear mixer then runs on *its teacher input* and is
  pulled towards the teacher's attention output, so all layers train in one pass and the student's
  FFNs, norms and lm_head are never run; the teacher runs its decoder stack only (no logits).
- Stage 2 (distribution matching): τ²·KL(teacher ‖ student) per token through the chunked head loss.
- Stage 3 (fine-tuning): next-token cross-entropy through the chunked head loss.

A stage's ``run(input_ids, mask, grad_scale)`` returns the detached loss *sum* over its tokens and,
when ``grad_scale`` is given, back-propagates ``grad_scale × sum`` (the trainer passes
``world_size / global_token_count`` so that data-parallel averaging yields the global mean).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..modeling import LinearAttentionMixer
from .distributed import all_reduce_sum, forward_hidden, is_sharded
from .losses import (
    DEFAULT_CHUNK_SIZE,
    alignment_loss_sum,
    chunked_cross_entropy,
    chunked_kl_div,
    select_tokens,
    shifted_targets,
)


def unpack_batch(batch, device: torch.device | None = None) -> tuple[Tensor, Tensor | None]:
    """(input_ids [B, T], padding mask [B, T] or None) from a LongTensor or a dict with ``input_ids``."""
    if isinstance(batch, dict):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        ids, mask = batch, None
    if ids.dim() != 2:
        raise ValueError(f"expected token batches of shape [B, T], got {tuple(ids.shape)}")
    if device is not None:
        ids = ids.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True) if mask is not None else None
    if mask is not None and bool(mask.all()):
        mask = None
    return ids, mask


def mixer_modules(student: nn.Module) -> dict[int, LinearAttentionMixer]:
    """Linear-attention mixers of the student by layer index."""
    return {
        i: layer.self_attn
        for i, layer in enumerate(student.model.layers)
        if isinstance(layer.self_attn, LinearAttentionMixer)
    }


def mixer_parameter_names(student: nn.Module) -> set[str]:
    """Names of all parameters inside linear mixers (new gates and the transferred q/k/v/o)."""
    names = set()
    for mod_name, module in student.named_modules():
        if isinstance(module, LinearAttentionMixer):
            names.update(f"{mod_name}.{p}" for p, _ in module.named_parameters())
    return names


def attention_parameter_names(student: nn.Module) -> set[str]:
    """Names of all parameters of every layer's token mixer: linear mixers and softmax attention."""
    return {
        f"{mod_name}.{p}"
        for mod_name, module in student.named_modules()
        if mod_name.endswith(".self_attn")
        for p, _ in module.named_parameters()
    }


class _StopTeacher(Exception):
    """Raised by the last needed hook to skip the teacher's remaining layers (Stage 1, unsharded)."""


class Stage:
    """Base class; subclasses implement `run` and `count_tokens`."""

    number: int = 0
    metric: str = "loss"

    def __init__(self, student: nn.Module, teacher: nn.Module | None, config):
        self.student, self.teacher, self.config = student, teacher, config

    def set_trainable(self) -> None:
        """Set ``requires_grad`` on student parameters for this stage (teacher: frozen)."""
        self.student.requires_grad_(True)
        if self.teacher is not None:
            self.teacher.requires_grad_(False)

    def shard_units(self) -> list[nn.Module]:
        """Student modules that become FSDP units (the root holds the rest)."""
        return list(self.student.model.layers)

    def count_tokens(self, input_ids: Tensor, mask: Tensor | None) -> int:
        return int(mask.sum()) if mask is not None else input_ids.numel()

    def run(self, input_ids: Tensor, mask: Tensor | None, grad_scale: float | None) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Stage1Alignment(Stage):
    """Σ_ℓ ‖U_teacher − U_student‖² per token over the linear layers ℓ (sum over tokens; see losses)."""

    number = 1
    metric = "align_loss"

    def __init__(self, student, teacher, config):
        super().__init__(student, teacher, config)
        if teacher is None:
            raise ValueError("Stage 1 needs the teacher")
        self.mixers = mixer_modules(student)
        if not self.mixers:
            raise ValueError("Stage 1 needs a student with at least one linear (gdn/gla) layer; this one has none")
        self.layers = sorted(self.mixers)
        self._captured: dict[int, tuple] = {}
        self._stop_after: int | None = None
        teacher_layers = teacher.model.layers
        if len(teacher_layers) != len(student.model.layers):
            raise ValueError(f"teacher has {len(teacher_layers)} layers, student {len(student.model.layers)}")
        self._hooks = [
            teacher_layers[i].self_attn.register_forward_hook(functools.partial(self._capture, i), with_kwargs=True)
            for i in self.layers
        ]

    def set_trainable(self) -> None:
        self.student.requires_grad_(False)
        for mixer in self.mixers.values():
            mixer.requires_grad_(True)
        self.teacher.requires_grad_(False)

    def shard_units(self) -> list[nn.Module]:
        return [self.mixers[i] for i in self.layers]

    def _capture(self, i, module, args, kwargs, output):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn_out = output[0] if isinstance(output, tuple) else output
        self._captured[i] = (hidden.detach(), kwargs.get("position_embeddings"), attn_out.detach())
        if i == self._stop_after:
            raise _StopTeacher

    def _teacher_pass(self, input_ids, mask) -> None:
        self._captured = {}
        last, n = self.layers[-1], len(self.teacher.model.layers)
        # Raising out of an FSDP forward would leave its state half-way; only stop early unsharded.
        self._stop_after = last if last < n - 1 and not is_sharded(self.teacher) else None
        with torch.no_grad():
            try:
                if self._stop_after is not None:
                    self.teacher.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                else:
                    forward_hidden(self.teacher, input_ids, mask)
            except _StopTeacher:
                pass
        missing = [i for i in self.layers if i not in self._captured]
        if missing:
            raise RuntimeError(f"teacher attention hooks did not fire for layers {missing}")

    def run(self, input_ids, mask, grad_scale):
        self._teacher_pass(input_ids, mask)
        total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        for i in self.layers:
            x, pos, target = self._captured.pop(i)
            out, _ = self.mixers[i](hidden_states=x, attention_mask=mask, position_embeddings=pos)
            loss = alignment_loss_sum(out, target, mask, self.config.stage1_loss_norm)
            if grad_scale is not None:
                (loss * grad_scale).backward()  # per layer: only one mixer's graph is alive at a time
            total += loss.detach()
        return total

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _kl_sum(student, teacher, input_ids, mask, tau: float, chunk_size: int) -> Tensor:
    with torch.no_grad():
        t_hidden, t_head = forward_hidden(teacher, input_ids, mask, head_fn=lambda h, w: (select_tokens(h, mask), w))

    def head(h, w):
        return chunked_kl_div(select_tokens(h, mask), w, t_hidden, t_head, tau=tau, chunk_size=chunk_size)

    return forward_hidden(student, input_ids, mask, head_fn=head)


class Stage2KL(Stage):
    """τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) summed over valid tokens (paper Eq. 5 × token count)."""

    number = 2
    metric = "kl"

    def __init__(self, student, teacher, config):
        super().__init__(student, teacher, config)
        if teacher is None:
            raise ValueError("Stage 2 needs the teacher")

    def run(self, input_ids, mask, grad_scale):
        loss = _kl_sum(self.student, self.teacher, input_ids, mask, self.config.tau, self.config.kl_chunk_size)
        if grad_scale is not None:
            (loss * grad_scale).backward()
        return loss.detach().float()


class Stage3CE(Stage):
    """Next-token cross-entropy summed over positions whose target is a real token."""

    number = 3
    metric = "ce"

    def count_tokens(self, input_ids, mask):
        valid, _ = shifted_targets(input_ids, mask)
        return int(valid.sum())

    def run(self, input_ids, mask, grad_scale):
        valid, labels = shifted_targets(input_ids, mask)
        chunk = self.config.kl_chunk_size
        loss = forward_hidden(
            self.student,
            input_ids,
            mask,
            head_fn=lambda h, w: chunked_cross_entropy(select_tokens(h, valid), w, labels[valid], chunk),
        )
        if grad_scale is not None:
            (loss * grad_scale).backward()
        return loss.detach().float()


STAGES = {1: Stage1Alignment, 2: Stage2KL, 3: Stage3CE}


def make_stage(number: int, student, teacher, config) -> Stage:
    if number not in STAGES:
        raise ValueError(f"stage must be 1, 2 or 3, got {number!r}")
    return STAGES[number](student, teacher, config)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters())
    return p.device if not hasattr(p, "to_local") else p.to_local().device


@torch.no_grad()
def evaluate_stage(stage: Stage, batches: Iterable, device: torch.device | None = None) -> float:
    """Mean per-token loss of ``stage`` over ``batches`` (no gradients); summed over processes."""
    device = device or _device_of(stage.student)
    was_training = stage.student.training
    stage.student.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            ids, mask = unpack_batch(batch, device)
            total[0] += stage.run(ids, mask, grad_scale=None).double()
            total[1] += stage.count_tokens(ids, mask)
    finally:
        stage.student.train(was_training)
    all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


@torch.no_grad()
def evaluate_kl(student, teacher, batches: Iterable, tau: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE) -> float:
    """Mean token-level τ²·KL(teacher ‖ student) over held-out ``batches`` (τ=1: plain KL).

    Batches are LongTensors [B, T] or dicts with ``input_ids``/``attention_mask`` (padding is
    excluded). Under torch.distributed, every process passes its shard and all get the global mean.
    """
    device = _device_of(student)
    was_training = student.training
    student.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    try:
        for batch in batches:
            ids, mask = unpack_batch(batch, device)
            total[0] += _kl_sum(student, teacher, ids, mask, tau, chunk_size).double()
            total[1] += int(mask.sum()) if mask is not None else ids.numel()
    finally:
        student.train(was_training)
    all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


__all__ = [
    "STAGES",
    "Stage",
    "Stage1Alignment",
    "Stage2KL",
    "Stage3CE",
    "evaluate_kl",
    "evaluate_stage",
    "make_stage",
    "mixer_modules",
    "attention_parameter_names",
    "mixer_parameter_names",
    "unpack_batch",
]
