"""Process-group setup, FSDP2 sharding of student and teacher, collectives and full state dicts.

Everything here also works in a single process without ``torch.distributed`` (the helpers become
no-ops), and with gloo on CPU (FSDP2's ``fully_shard`` runs there too).

FSDP2 only all-gathers a module's parameters around its ``forward``. The distillation losses use
the final hidden states *and* the lm_head weight, so both models get an extra forward method,
``hd_forward`` (registered with ``register_fsdp_forward_method``), that runs the decoder stack and
hands ``(hidden, lm_head.weight)`` to a callback while the root's parameters are gathered.
"""

from __future__ import annotations

import datetime
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

HD_FORWARD = "hd_forward"


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto", backend: str | None = None, timeout_s: int = 1800) -> DistContext:
    """Join the process group when launched by torchrun (one process too, so ``fsdp="on"`` can shard on one
    GPU); else a single process without one.

    Idempotent. Backend: nccl on CUDA, gloo on CPU. ``device="auto"`` picks ``cuda:<LOCAL_RANK>``
    when CUDA is available, else cpu.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not is_initialized() and (env_world > 1 or "TORCHELASTIC_RUN_ID" in os.environ):
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    return DistContext(0, 1, 0, dev)


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (identity in a single process)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min_int(value: int, device: torch.device) -> int:
    if not (is_initialized() and dist.get_world_size() > 1):
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------
# Forward method that exposes the final hidden states and the lm_head weight
# --------------------------------------------------------------------------------------------


def _hd_forward(self, input_ids, attention_mask=None, head_fn: Callable | None = None):
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state
    if head_fn is None:
        return hidden
    return head_fn(hidden, self.lm_head.weight)


def install_forward_method(model: nn.Module) -> None:
    """Give a causal LM ``model.hd_forward(input_ids, attention_mask, head_fn)`` (FSDP-aware if sharded).

    Call after sharding. ``head_fn(hidden, lm_head_weight)`` runs inside the method, so with FSDP
    the root's parameters (embeddings, final norm, lm_head) are gathered while it runs.
    """
    if HD_FORWARD in model.__dict__:
        return
    setattr(model, HD_FORWARD, types.MethodType(_hd_forward, model))
    from torch.distributed.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, HD_FORWARD)


def forward_hidden(model: nn.Module, input_ids, attention_mask=None, head_fn: Callable | None = None):
    """``head_fn(final_hidden, lm_head.weight)`` (or the hidden states when ``head_fn`` is None)."""
    fn = model.__dict__.get(HD_FORWARD)
    if fn is None:
        return _hd_forward(model, input_ids, attention_mask, head_fn)
    return fn(input_ids, attention_mask, head_fn)


# --------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _mesh(ctx: DistContext):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ctx.device.type, (ctx.world_size,))


def shard_teacher(teacher: nn.Module, ctx: DistContext) -> None:
    """FSDP2 for the frozen teacher: one unit per decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(teacher):  # already sharded by an earlier run in this process (e.g. layer selection)
        return
    mesh = _mesh(ctx)
    for layer in teacher.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(teacher, mesh=mesh)


def shard_student(student: nn.Module, ctx: DistContext, units: list[nn.Module]) -> None:
    """FSDP2 for the student: each module of ``units`` is one unit, the root holds the rest.

    Stage 2/3 pass the decoder layers; Stage 1 passes the linear mixers (called on their own).
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(student):
        raise ValueError("the student is already FSDP-sharded; pass a fresh (unsharded) student to each run")
    mesh = _mesh(ctx)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(student, mesh=mesh)


def average_gradients(params) -> None:
    """All-reduce-average gradients over processes (the data-parallel path without FSDP)."""
    if not (is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (plain tensors pass through)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# --------------------------------------------------------------------------------------------
# State dicts (full, world-size independent; FQN keys for the optimizer)
# --------------------------------------------------------------------------------------------


def _sd_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kw)


def gather_model_state(model: nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Full model state dict on CPU (on rank 0 when sharded; other ranks get {}), optionally only ``names``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if is_sharded(model):
        sd = get_model_state_dict(model, options=_sd_options(full_state_dict=True, cpu_offload=True))
    else:
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if names is not None:
        sd = {k: v for k, v in sd.items() if k in names}
    return sd


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
    """Load a full state dict (read on rank 0 only when sharded: it is broadcast)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if is_sharded(model):
        set_model_state_dict(
            model, state, options=_sd_options(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        )
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (strict and missing):
        raise RuntimeError(f"state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Full optimizer state keyed by parameter names (rank 0 when sharded)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    opts = _sd_options(full_state_dict=True, cpu_offload=True) if is_sharded(model) else _sd_options()
    return get_optimizer_state_dict(model, optimizer, options=opts)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if is_sharded(model):
        opts = _sd_options(full_state_dict=True, broadcast_from_rank0=True)
    else:
        opts = _sd_options()
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=opts)


__all__ = [
    "DistContext",
    "all_reduce_min_int",
    "all_reduce_sum",
    "average_gradients",
    "barrier",
    "broadcast_object",
    "forward_hidden",
    "full_tensor",
    "gather_model_state",
    "gather_optimizer_state",
    "init_distributed",
    "install_forward_method",
    "is_initialized",
    "is_sharded",
    "load_model_state",
    "load_optimizer_state",
    "shard_student",
    "shard_teacher",
]
