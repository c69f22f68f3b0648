"""The distillation loop: budgets in tokens, AdamW + schedule, micro-batching, logging, evaluation,
atomic checkpoints with exact resume, and a `DONE` marker that makes finished runs a no-op.

Run directory layout::

    run_dir/
      metrics.jsonl            one line per log step ("kind": "train") and per evaluation ("kind": "eval")
      checkpoints/step_XXXXXXXX/   model.pt, optimizer.pt, trainer.pt, rng_rank<r>.pt, state.json
      final/                   the trained student as a Hugging Face checkpoint (save_final_model)
      result.json, DONE        written last
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..cuda_allocator import expandable_segments_configured, prefer_expandable_segments_in_process
from ..data.loader import SplitBatchesMixin
from ..dtypes import cast_model
from ..fileio import fsync_directory, fsync_file, fsync_tree
from . import distributed as hd_dist
from .compiling import compile_decoder_layers
from .config import ConfigError, DistillConfig, add_distill_config_flags, distill_config_from_flags, resume_mismatch
from .stages import (
    attention_parameter_names,
    evaluate_kl,
    evaluate_stage,
    make_stage,
    mixer_parameter_names,
    unpack_batch,
)

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
DONE_FILE = "DONE"
RESULT_FILE = "result.json"


# --------------------------------------------------------------------------------------------
# In-memory token data with the PackedDataset interface
# --------------------------------------------------------------------------------------------


class TensorTokenDataset(SplitBatchesMixin):
    """Token sequences held in memory ([N, T] LongTensor, optional padding mask) behaving like
    `hybrid_distill.data.PackedDataset`: deterministic, resumable, rank-sharded ``batches`` and
    ordered ``eval_batches`` over a held-out split of ``heldout_sequences`` rows."""

    def __init__(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        heldout_sequences: int = 0,
        seed: int = 0,
    ):
        from ..data import split_indices

        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [num_sequences, seq_len], got {tuple(tokens.shape)}")
        if attention_mask is not None and attention_mask.shape != tokens.shape:
            raise ValueError("attention_mask must have the shape of tokens")
        self.tokens, self.mask = tokens.long(), attention_mask
        self.seq_len = tokens.shape[1]
        train, heldout = split_indices(len(tokens), 0.0, seed, heldout_sequences)
        self.train_indices, self.heldout_indices = train, heldout

    def __len__(self) -> int:
        return len(self.tokens)

    def indices(self, split: str) -> np.ndarray:
        return {"train": self.train_indices, "heldout": self.heldout_indices, "all": np.arange(len(self.tokens))}[split]

    def get_batch(self, indices):
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if self.mask is None:
            return self.tokens[idx]
        return {"input_ids": self.tokens[idx], "attention_mask": self.mask[idx]}

# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    """Outcome of `distill` (also stored as ``result.json`` in the run directory)."""

    run_dir: str
    stage: int
    steps: int
    tokens: int
    final_loss: float | None
    eval_metric: str | None
    eval_value: float | None
    final_model_dir: str | None
    metrics_path: str
    config_hash: str
    wall_time_s: float
    resumed_from_step: int | None = None
    already_done: bool = False
    paused: bool = False  # stopped at ``pause_at_tokens`` with a checkpoint; calling `distill` again continues

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


# --------------------------------------------------------------------------------------------
# Optimizer and schedule
# --------------------------------------------------------------------------------------------


def _no_decay(name: str, param: torch.Tensor) -> bool:
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

    No weight decay on biases, norm weights (any parameter with < 2 dims) and GDN's A_log / dt_bias.
    Each group carries ``name`` ("mixer" or "other") for logging.
    """
    groups: dict[tuple[str, bool], list] = {}
    for name, p in student.named_parameters():
        if not p.requires_grad:
            continue
        kind = "mixer" if name in mixer_names else "other"
        groups.setdefault((kind, _no_decay(name, p)), []).append(p)
    if not groups:
        raise ValueError("the student has no trainable parameters for this stage")
    lrs = {"mixer": config.lr_mixer, "other": config.lr_other}
    param_groups = [
        {"params": params, "name": kind, "lr": lrs[kind], "weight_decay": 0.0 if nodecay else config.weight_decay}
        for (kind, nodecay), params in sorted(groups.items())
    ]
    # One fused kernel over all CUDA parameters instead of per-tensor launches (the plain AdamW step was
    # 16% of a 1.5B Stage-2 step on an H100); CPU keeps the default implementation.
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
    warmup = math.ceil(config.warmup_tokens / tokens_per_step) if config.warmup_tokens else 0

    def fn(step: int) -> float:
        return lr_factor(step, total_steps, warmup, config.schedule, config.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _group_lrs(optimizer) -> dict[str, float]:
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out.setdefault(f"lr_{g.get('name', 'group')}", float(g["lr"]))
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    dirs = _checkpoint_dirs(Path(run_dir))
    return dirs[-1] if dirs else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(
    run_dir: Path,
    ctx: hd_dist.DistContext,
    step: int,
    model_state: dict,
    optim_state: dict,
    trainer_state: dict,
    state_json: dict,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically: temp dir, fsync every file, os.replace, prune to ``keep_last``."""
    root = run_dir / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if ctx.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    hd_dist.barrier()
    rng_file = tmp / f"rng_rank{ctx.rank}.pt"
    torch.save(_rng_state(), rng_file)
    fsync_file(rng_file)
    if ctx.is_main:
        torch.save(model_state, tmp / "model.pt")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(state_json, indent=1, default=str))
    hd_dist.barrier()
    if ctx.is_main:
        fsync_tree(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_directory(root)
        for old in _checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    hd_dist.barrier()
    return final


def _clean_temp_checkpoints(run_dir: Path) -> None:
    root = run_dir / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class MetricsWriter:
    """JSONL metrics (rank 0), plus TensorBoard / W&B when installed and asked for."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int, report_to: Iterable[str], config: DistillConfig):
        self.path = run_dir / METRICS_FILE
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        if self.path.exists():  # drop lines a killed run wrote after its last checkpoint (or half-wrote)
            keep = [
                ln
                for ln in self.path.read_text().splitlines()
                if (_parse_line(ln) or {}).get("step", 1 << 62) <= resume_step
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                logger.warning("report_to includes 'tensorboard' but tensorboard is not installed; skipping it")
        if "wandb" in report_to:
            try:
                import wandb

                self._wandb = wandb.init(
                    name=config.run_name or run_dir.name, config=config.to_dict(), resume="allow", dir=str(run_dir)
                )
            except ImportError:
                logger.warning("report_to includes 'wandb' but wandb is not installed; skipping it")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step",)}
        prefix = record.get("kind", "train")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(f"{prefix}/{k}", v, record["step"])
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _parse_line(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def read_metrics(run_dir: str | Path, kind: str = "train") -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` of one kind ("train" or "eval")."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = [_parse_line(ln) for ln in path.read_text().splitlines()]
    return [r for r in rows if r is not None and r.get("kind") == kind]


# --------------------------------------------------------------------------------------------
# Data plumbing
# --------------------------------------------------------------------------------------------


def _train_iterator(data, config: DistillConfig, ctx, start_step: int, saved_state: dict | None):
    """Rank-local batches of whole optimizer steps, positioned at ``start_step``."""
    if hasattr(data, "batches"):
        it = data.batches(
            "train",
            config.global_batch_size,
            seed=config.seed,
            start_step=start_step,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        if saved_state is not None and hasattr(it, "load_state_dict"):
            it.load_state_dict(saved_state)  # also checks the data order would be the same
        return it
    if not hasattr(data, "__next__"):
        raise TypeError(
            "data must be a PackedDataset-like object with .batches(...), a TensorTokenDataset, or an iterator "
            f"of rank-local [B, T] token batches; got {type(data).__name__}"
        )
    if start_step:
        if saved_state is not None and hasattr(data, "load_state_dict"):
            data.load_state_dict(saved_state)
        else:
            logger.warning("data iterator has no load_state_dict; skipping %d batches to resume", start_step)
            for _ in range(start_step):
                next(data)
    return data


def _eval_batches(data, eval_data, config: DistillConfig, ctx, micro: int) -> list | None:
    """This rank's held-out batches (the same count on every rank), or None when there are none."""
    if eval_data is not None:
        batches = list(eval_data() if callable(eval_data) else eval_data)
    elif hasattr(data, "eval_batches") and len(getattr(data, "heldout_indices", [])) > 0:
        batches = list(data.eval_batches("heldout", config.eval_batch_size or micro, ctx.rank, ctx.world_size))
    else:
        return None
    n = hd_dist.all_reduce_min_int(min(len(batches), config.eval_max_batches), ctx.device)
    return batches[:n] if n > 0 else None


def _infer_seq_len(data, config: DistillConfig) -> int:
    seq_len = getattr(data, "seq_len", None)
    if config.seq_len is not None:
        if seq_len is not None and int(seq_len) != config.seq_len:
            raise ValueError(f"DistillConfig.seq_len={config.seq_len} but the data has seq_len={seq_len}")
        return config.seq_len
    if seq_len is None:
        raise ValueError("DistillConfig.seq_len must be set when the data has no seq_len attribute")
    return int(seq_len)


# --------------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------------


def _autocast(config: DistillConfig, device: torch.device) -> tuple[bool, Callable]:
    """(bf16?, context factory): bf16 autocast with fp32 master weights, or plain fp32."""
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if bf16:
        return True, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return False, contextlib.nullcontext


def _model_fingerprint(student, teacher) -> dict[str, Any]:
    cfg = student.config
    return {
        "mixers": list(getattr(cfg, "mixers", [])),
        "mixer_options": dict(getattr(cfg, "mixer_options", {}) or {}),
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "teacher_type": getattr(getattr(teacher, "config", None), "model_type", None),
    }


def _unwrapped_class(model: nn.Module) -> type:
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if issubclass(cls, FSDPModule):
        return next(b for b in cls.__mro__[1:] if not issubclass(b, FSDPModule) and issubclass(b, nn.Module))
    return cls


def _save_final_model(student: nn.Module, path: Path, ctx, tokenizer=None) -> None:
    """The student (+ ``tokenizer``) as a Hugging Face checkpoint (gathered to rank 0 when sharded)."""
    from ..checkpoint import atomic_directory_write, save_student

    if not hd_dist.is_sharded(student):
        if ctx.is_main:
            save_student(student, path, tokenizer=tokenizer)
        hd_dist.barrier()
        return
    state = hd_dist.gather_model_state(student)
    if ctx.is_main:
        cls = _unwrapped_class(student)
        with torch.device("meta"):
            plain = cls(student.config)
        missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
        tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise RuntimeError(
                f"gathered state does not fit {cls.__name__}: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        plain.tie_weights()
        with atomic_directory_write(path) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    hd_dist.barrier()


def _load_final_weights(student: nn.Module, path: Path) -> None:
    """Copy a finished run's final weights into ``student`` (unsharded)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(student.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"final weights of {path} do not fit the student: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )


def _micro_batches(
    batch, micro: int, accum: int, seq_len: int, device
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Split one rank-local step batch into ``accum`` micro-batches of ``micro`` sequences, on ``device``."""
    ids, mask = unpack_batch(batch, None)
    if ids.shape[0] != micro * accum:
        raise ValueError(
            f"got a batch of {ids.shape[0]} sequences; expected {micro * accum} per process "
            f"(micro_batch_size {micro} x {accum} micro-batches)"
        )
    if ids.shape[1] != seq_len:
        raise ValueError(f"got sequences of {ids.shape[1]} tokens; DistillConfig.seq_len is {seq_len}")
    out = []
    for j in range(accum):
        sl = slice(j * micro, (j + 1) * micro)
        out.append(unpack_batch({"input_ids": ids[sl], "attention_mask": None if mask is None else mask[sl]}, device))
    return out


def _optimizer_step(optimizer, scheduler, params, grad_clip: float | None, step: int) -> float:
    """Clip (or just measure) the gradient norm, step optimizer and schedule; returns the norm."""
    max_norm = grad_clip if grad_clip else float("inf")
    grad_norm = float(hd_dist.full_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    if math.isfinite(grad_norm):
        optimizer.step()
    else:
        logger.warning("step %d: non-finite grad norm %s; update skipped", step + 1, grad_norm)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def out_of_memory_advice(config: DistillConfig, micro: int, seq_len: int, when: str, run_dir: Path, device) -> str:
    """What to change after an out-of-memory error, and where the run will resume (only fields a
    checkpoint may be resumed with are suggested)."""
    usage = ""
    if device.type == "cuda":
        gib = 2**30
        total = torch.cuda.get_device_properties(device).total_memory
        allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        usage = f" (peak {allocated / gib:.1f} GiB allocated, {reserved / gib:.1f} GiB reserved, of {total / gib:.1f} GiB)"
    ckpt = latest_checkpoint(run_dir)
    where = f"it resumes from {ckpt.name}" if ckpt is not None else "no checkpoint was written yet, so it starts over"
    fixes = []
    if micro > 1:
        fixes.append(f"micro_batch_size: {micro // 2} (same global batch, more micro-batches per step)")
    if not config.activation_checkpointing and config.stage != 1:
        fixes.append("activation_checkpointing: true")
    if config.stage in (2, 3) and config.kl_chunk_size > 256:
        fixes.append(f"kl_chunk_size: {config.kl_chunk_size // 2} (tokens per lm_head chunk)")
    if config.compile_layers != "all" and config.stage != 1:
        fixes.append("compile_layers: all (its fused kernels keep fewer activations)")
    if not expandable_segments_configured():  # on unless the user configured the allocator otherwise
        fixes.append(
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the environment, when much more memory is "
            "reserved than allocated (fragmentation)"
        )
    return (
        f"Stage {config.stage} ran out of memory {when} with micro-batches of {micro} x {seq_len} "
        f"tokens per process{usage}. Re-run the same command after one of these changes; {where}:\n  - "
        + "\n  - ".join(fixes)
    )


def _crossed(before: int, after: int, every: int | None) -> bool:
    """Whether a multiple of ``every`` tokens lies in (before, after]."""
    return bool(every) and after // every > before // every


def _restore(ckpt: Path, resume_key: dict, student, optimizer, scheduler, ctx) -> tuple[int, int, float, Any]:
    """Load a checkpoint into student/optimizer/scheduler/RNG; returns (step, tokens, elapsed, data state)."""
    state = json.loads((ckpt / "state.json").read_text())
    diff = resume_mismatch(state["resume_key"], resume_key)
    if diff:
        raise ValueError(
            f"Refusing to resume {ckpt}: its config differs in fields that change training: "
            + "; ".join(diff)
            + ". Use a new run_dir, or restore those values."
        )
    load_here = ctx.is_main or not hd_dist.is_sharded(student)  # sharded: rank 0 reads, then broadcasts
    model_state = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True) if load_here else {}
    hd_dist.load_model_state(student, model_state, strict=False)
    del model_state
    optim_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False) if load_here else {}
    hd_dist.load_optimizer_state(student, optimizer, optim_state)
    del optim_state
    trainer_state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = ckpt / f"rng_rank{ctx.rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state["step"], state["tokens"], state["elapsed"], trainer_state.get("data_state")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    data,
    config: DistillConfig,
    run_dir: str | Path,
    eval_data: Iterable | Callable[[], Iterable] | None = None,
    pause_at_tokens: int | None = None,
    tokenizer=None,
) -> DistillResult:
    """Run one distillation stage (``config.stage``: 1 alignment, 2 KL, 3 CE) into ``run_dir``.

    ``data``: a `hybrid_distill.data.PackedDataset`, a `TensorTokenDataset`, or any object with the
    same ``batches(split, batch_size, seed, epoch, start_step, rank, world_size)`` method; or an
    iterator of rank-local per-step batches (``[B, T]`` LongTensors or dicts with ``input_ids`` and
    ``attention_mask``; ``load_state_dict`` makes it resumable). Held-out batches come from
    ``eval_data`` or the dataset's ``eval_batches("heldout", ...)``.

    Resumes from the newest checkpoint in ``run_dir`` (refusing one whose config differs in a field
    that matters), and returns the stored result without training when ``run_dir`` has a ``DONE``
    marker (loading the final weights into ``student``). Under torchrun every process calls this.

    ``pause_at_tokens``: stop once this many tokens are trained, write a checkpoint and return a
    result with ``paused=True`` (no final model, no ``DONE``); calling again with a larger (or no)
    pause point continues the run exactly as if it had not stopped. It does not change the run's
    trajectory (layer selection uses it to train candidates in rounds).

    ``tokenizer``: saved with the final model, so that ``final/`` loads with ``AutoTokenizer`` too.
    """
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    ctx = hd_dist.init_distributed(config.device)
    fp_extra = _model_fingerprint(student, teacher)
    config_hash = config.fingerprint(fp_extra)
    resume_key = {**config.resume_fields(), "model": fp_extra}
    if config.stage == 1 or not attention_parameter_names(student) - mixer_parameter_names(student):
        resume_key.pop("softmax_lr")  # no softmax layer trains: the setting cannot change this run

    done = _check_done(run_dir, config_hash, resume_key, student)
    if done is not None:
        return done

    torch.manual_seed(config.seed)
    device = ctx.device
    if device.type == "cuda" and prefer_expandable_segments_in_process():
        logger.info("CUDA allocator: expandable segments on (set PYTORCH_CUDA_ALLOC_CONF to choose otherwise)")
    bf16, autocast = _autocast(config, device)
    use_fsdp = config.fsdp == "on" or (config.fsdp == "auto" and ctx.world_size > 1)
    # Under FSDP, fully_shard moves each unit to the device as it shards it: the whole model never sits on one GPU.
    if teacher is not None:
        if not use_fsdp:
            teacher.to(device)
        if bf16:  # frozen: no master weights needed
            cast_model(teacher, torch.bfloat16)  # rotary inv_freq stays fp32
        teacher.eval()
    if not use_fsdp:
        student.to(device)
    if bf16 and any(p.dtype != torch.float32 for p in student.parameters()):
        logger.warning("bf16 autocast works best with fp32 student weights (AdamW master copy); call student.float()")
    student.train()
    student.config.use_cache = False

    stage = make_stage(config.stage, student, teacher, config)
    try:  # from here on the stage holds hooks on the teacher (Stage 1): remove them if setting up fails
        stage.set_trainable()
        mixer_names = lr_mixer_parameter_names(student, config)
        if config.activation_checkpointing and config.stage != 1:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.stage != 1 and config.compile_layers != "off":  # Stage 1 calls the mixers, not the layers
            for model in (teacher, student if config.compile_layers == "all" else None):
                if model is not None:
                    compile_decoder_layers(model)
        if use_fsdp:
            if not hd_dist.is_initialized():
                raise RuntimeError("DistillConfig.fsdp='on' needs torch.distributed (launch with torchrun)")
            if teacher is not None:
                hd_dist.shard_teacher(teacher, ctx)
            hd_dist.shard_student(student, ctx, stage.shard_units())
        hd_dist.install_forward_method(student)
        if teacher is not None:
            hd_dist.install_forward_method(teacher)
        trainable_names = {n for n, p in student.named_parameters() if p.requires_grad}

        seq_len = _infer_seq_len(data, config)
        micro = config.micro_batch(ctx.world_size)
        accum = config.grad_accum(ctx.world_size)
        tokens_per_step = config.global_batch_size * seq_len
        total_steps = config.total_steps(seq_len)
        optimizer = build_optimizer(student, config, mixer_names)
        scheduler = build_scheduler(optimizer, config, total_steps, tokens_per_step)
        params = [p for g in optimizer.param_groups for p in g["params"]]

        # ---- resume ----
        step, tokens, elapsed_before, data_state, resumed_from = 0, 0, 0.0, None, None
        if ctx.is_main:
            _clean_temp_checkpoints(run_dir)
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None:
            step, tokens, elapsed_before, data_state = _restore(ckpt, resume_key, student, optimizer, scheduler, ctx)
            resumed_from = step
            if ctx.is_main:
                logger.info("resuming %s from step %d (%d tokens)", run_dir, step, tokens)

        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        hd_dist.barrier()
        metrics = MetricsWriter(run_dir, ctx.is_main, step, config.report_to, config)
        train_iter = _train_iterator(data, config, ctx, step, data_state)
        eval_set = _eval_batches(data, eval_data, config, ctx, micro) if config.eval_max_batches > 0 else None

        def run_eval() -> tuple[str, float]:
            with autocast():
                if config.stage in (2, 3) and teacher is not None:
                    return "kl", evaluate_kl(student, teacher, eval_set, config.tau, config.kl_chunk_size)
                return stage.metric, evaluate_stage(stage, eval_set, device)

        def log_eval(step_: int, tokens_: int, elapsed_: float) -> tuple[str, float]:
            name, value = run_eval()
            metrics.write({"kind": "eval", "step": step_, "tokens": tokens_, f"eval_{name}": value, "elapsed": elapsed_})
            return name, value

        last_save = [time.monotonic()]

        def checkpoint_due() -> bool:
            """save_every_minutes passed since the last checkpoint (on every process, so all of them save)."""
            if not config.save_every_minutes:
                return False
            due = time.monotonic() - last_save[0] >= 60.0 * config.save_every_minutes
            return bool(hd_dist.all_reduce_min_int(int(due), device))

        def save(step_: int, tokens_: int, elapsed_: float) -> None:
            last_save[0] = time.monotonic()
            model_state = hd_dist.gather_model_state(student, trainable_names if config.stage == 1 else None)
            optim_state = hd_dist.gather_optimizer_state(student, optimizer)
            trainer_state = {
                "scheduler": scheduler.state_dict(),
                "data_state": train_iter.state_dict() if hasattr(train_iter, "state_dict") else None,
            }
            state_json = {
                "step": step_,
                "tokens": tokens_,
                "elapsed": elapsed_,
                "config_hash": config_hash,
                "resume_key": resume_key,
                "config": config.to_dict(),
                "world_size": ctx.world_size,
                "total_steps": total_steps,
            }
            _save_checkpoint(run_dir, ctx, step_, model_state, optim_state, trainer_state, state_json, config.keep_last)
    except BaseException:
        stage.close()
        raise

    paused = False
    bar = None
    if config.progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps * tokens_per_step,
            initial=tokens,
            unit="tok",
            unit_scale=True,
            desc=f"stage {config.stage}",
            dynamic_ncols=True,
        )

    last_loss, eval_name, eval_value = None, None, None
    window: list[tuple[float, float]] = []  # (loss, seconds) since the last log line
    session_start = time.perf_counter()
    if pause_at_tokens is not None and tokens >= pause_at_tokens and step < total_steps:
        paused = True  # restored at or past the pause point: nothing to train in this call
    try:
        while step < total_steps and not paused:
            t0 = time.perf_counter()
            micro_batches = _micro_batches(next(train_iter), micro, accum, seq_len, device)
            counts = torch.tensor(
                [float(sum(stage.count_tokens(ids, mask) for ids, mask in micro_batches))],
                dtype=torch.float64,
                device=device,
            )
            global_count = max(float(hd_dist.all_reduce_sum(counts).item()), 1.0)
            grad_scale = ctx.world_size / global_count  # data-parallel averaging then yields the global mean

            loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
            for ids, mask in micro_batches:
                with autocast():
                    loss_sum += stage.run(ids, mask, grad_scale).double()
            loss = float(hd_dist.all_reduce_sum(loss_sum).item()) / global_count
            if not use_fsdp:  # replicated models under torchrun with fsdp="off": plain gradient averaging
                hd_dist.average_gradients(params)
            lrs = _group_lrs(optimizer)  # the lr this update uses
            grad_norm = _optimizer_step(optimizer, scheduler, params, config.grad_clip, step)

            step += 1
            prev_tokens, tokens = tokens, tokens + tokens_per_step
            last_loss = loss
            dt = time.perf_counter() - t0
            window.append((loss, dt))
            elapsed = elapsed_before + time.perf_counter() - session_start
            if step % config.log_every_steps == 0 or step == total_steps:
                secs = sum(w[1] for w in window)
                metrics.write(
                    {
                        "kind": "train",
                        "step": step,
                        "tokens": tokens,
                        "loss": sum(w[0] for w in window) / len(window),
                        **lrs,
                        "grad_norm": grad_norm,
                        "tokens_per_s": len(window) * tokens_per_step / secs if secs > 0 else None,
                        "elapsed": elapsed,
                    }
                )
                window = []
            if bar is not None:
                bar.update(tokens_per_step)
                bar.set_postfix(loss=f"{loss:.4g}", lr=f"{next(iter(lrs.values())):.2e}")

            if eval_set and _crossed(prev_tokens, tokens, config.eval_every_tokens) and step < total_steps:
                eval_name, eval_value = log_eval(step, tokens, elapsed)
            if (_crossed(prev_tokens, tokens, config.save_every_tokens) or checkpoint_due()) and step < total_steps:
                save(step, tokens, elapsed_before + time.perf_counter() - session_start)
            if pause_at_tokens is not None and tokens >= pause_at_tokens and step < total_steps:
                if not _crossed(prev_tokens, tokens, config.save_every_tokens):
                    save(step, tokens, elapsed_before + time.perf_counter() - session_start)
                paused = True
                break

        if eval_set and not paused:
            eval_name, eval_value = log_eval(step, tokens, elapsed_before + time.perf_counter() - session_start)
    except torch.OutOfMemoryError as exc:
        when = f"in step {step + 1}" if step < total_steps else "in its final evaluation"
        raise torch.OutOfMemoryError(out_of_memory_advice(config, micro, seq_len, when, run_dir, device)) from exc
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
        stage.close()

    final_dir = None
    if config.save_final_model and not paused:
        final_dir = run_dir / FINAL_DIR
        _save_final_model(student, final_dir, ctx, tokenizer=tokenizer)
    if last_loss is None:  # resumed at the very end: take the last logged loss
        rows = read_metrics(run_dir)
        last_loss = rows[-1]["loss"] if rows else None
    result = DistillResult(
        run_dir=str(run_dir),
        stage=config.stage,
        steps=step,
        tokens=tokens,
        final_loss=last_loss,
        eval_metric=eval_name,
        eval_value=eval_value,
        final_model_dir=str(final_dir) if final_dir else None,
        metrics_path=str(run_dir / METRICS_FILE),
        config_hash=config_hash,
        wall_time_s=elapsed_before + time.perf_counter() - session_start,
        resumed_from_step=resumed_from,
        paused=paused,
    )
    if paused:  # a checkpoint, no final model and no DONE: the next call continues
        hd_dist.barrier()
        return result
    if ctx.is_main:
        payload = {**result.to_dict(), "resume_key": resume_key}
        (run_dir / RESULT_FILE).write_text(json.dumps(payload, indent=1, default=str))
        done_tmp = run_dir / f".{DONE_FILE}.tmp"
        done_tmp.write_text(json.dumps(payload, default=str))
        fsync_file(done_tmp)
        os.replace(done_tmp, run_dir / DONE_FILE)
        fsync_directory(run_dir)
    hd_dist.barrier()
    logger.info("stage %d done in %.1fs (%d steps)", config.stage, time.perf_counter() - t_start, step)
    return result


def _check_done(run_dir: Path, config_hash: str, resume_key: dict, student) -> DistillResult | None:
    done = run_dir / DONE_FILE
    if not done.is_file():
        return None
    payload = json.loads(done.read_text())
    diff = resume_mismatch(payload.get("resume_key", {}), resume_key)
    if diff:
        raise ValueError(
            f"{run_dir} holds a finished run with a different config ("
            + "; ".join(diff)
            + "). Use a new run_dir, or restore those values."
        )
    result = DistillResult.from_dict(payload)
    result.already_done = True
    # Paths as found now: the run directory may have moved, or be reached from another working directory.
    result.run_dir, result.metrics_path = str(run_dir), str(run_dir / METRICS_FILE)
    if result.final_model_dir:
        final_dir = run_dir / FINAL_DIR
        if not final_dir.is_dir():
            raise FileNotFoundError(
                f"{run_dir} holds a finished run ({DONE_FILE}) whose final model {final_dir} is missing: restore it, "
                f"or delete {run_dir / DONE_FILE} to run it again (from its last checkpoint, if one was kept)"
            )
        result.final_model_dir = str(final_dir)
        if student is not None:
            _load_final_weights(student, final_dir)
    return result


# --------------------------------------------------------------------------------------------
# Entry point for the CLI
# --------------------------------------------------------------------------------------------


def add_distill_arguments(parser) -> None:
    """Options of ``run_distill_from_args`` (model/data/run-dir ones plus one per `DistillConfig` field)."""
    from ..data import add_data_flags

    g = parser.add_argument_group("models")
    g.add_argument("--teacher", required=True, help="HF path / hub id, or tiny:<variant> for a built-in test teacher")
    g.add_argument("--run-dir", required=True, help="run directory (checkpoints, metrics, final model)")
    g.add_argument("--student", default=None, help="existing student checkpoint to train (e.g. a Stage-1 result)")
    layout = g.add_mutually_exclusive_group()
    layout.add_argument("--mixers", default=None, help="comma-separated mixer per layer (softmax, gdn, gla, swa)")
    layout.add_argument("--softmax-layers", default=None, help="0-based layers kept softmax; the rest --linear")
    g.add_argument("--linear", default="gdn", help="linear mixer for non-softmax layers (default gdn)")
    g.add_argument("--mixer-options", default=None, help="JSON mixer options")
    g.add_argument(
        "--init-from", default=None, help="student checkpoint whose matching mixers initialize the new student"
    )
    g.add_argument(
        "--tokenizer", default=None, help="tokenizer path (default: the teacher's; tiny teachers: tiny_tokenizer)"
    )
    add_data_flags(parser)
    add_distill_config_flags(parser)


def run_distill_from_args(args) -> DistillResult:
    """Build teacher, student, data and `DistillConfig` from `add_distill_arguments` options and run `distill`.

    ``args``: an ``argparse.Namespace`` (or dict) with the options of `add_distill_arguments`.
    """
    from ..data import data_config_from_flags
    from ..surgery import build_student, load_teacher, load_tokenizer, resolve_mixers

    ns = dict(vars(args)) if not isinstance(args, dict) else dict(args)
    config = distill_config_from_flags(ns)
    spec = data_config_from_flags(ns)  # bad data options fail before the models load
    if ns.get("student"):
        ignored = [flag for flag, key in (("--mixers", "mixers"), ("--softmax-layers", "softmax_layers"),
                                          ("--mixer-options", "mixer_options"), ("--init-from", "init_from"))
                   if ns.get(key)] + (["--linear"] if ns.get("linear") not in (None, "gdn") else [])
        if ignored:
            raise ConfigError(f"--student trains an existing checkpoint as it is; {', '.join(ignored)} would be ignored. "
                             "Leave them out, or build a new student (no --student; --init-from reuses its mixers)")
    ctx = hd_dist.init_distributed(config.device)
    teacher = load_teacher(ns["teacher"])
    tokenizer = load_tokenizer(ns["teacher"], ns.get("tokenizer"), teacher.config.vocab_size)

    torch.manual_seed(config.seed)  # new mixer parameters are initialized from the seed
    if ns.get("student"):
        from ..checkpoint import load_student

        student = load_student(ns["student"])
    else:
        mixers = resolve_mixers(
            teacher.config.num_hidden_layers, ns.get("mixers"), ns.get("softmax_layers"), ns.get("linear") or "gdn"
        )
        options = json.loads(ns["mixer_options"]) if ns.get("mixer_options") else None
        init_from = None
        if ns.get("init_from"):
            from ..checkpoint import load_student

            init_from = load_student(ns["init_from"])
        student = build_student(teacher, mixers, options, init_from=init_from)
        del init_from
    student.float()

    config = config.replace(seq_len=config.data_seq_len)

    def load_data():
        return spec.load(tokenizer, config.seq_len, seed=config.seed, require_sequences=config.global_batch_size)

    if ctx.is_main:  # tokenize once; the other ranks then load the cache
        load_data()
    hd_dist.barrier()
    return distill(student, teacher, load_data(), config, ns["run_dir"], tokenizer=tokenizer)


__all__ = [
    "DistillResult",
    "MetricsWriter",
    "TensorTokenDataset",
    "add_distill_arguments",
    "build_optimizer",
    "build_scheduler",
    "distill",
    "latest_checkpoint",
    "lr_factor",
    "read_metrics",
    "run_distill_from_args",
]
