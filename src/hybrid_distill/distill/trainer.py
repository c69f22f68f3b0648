"""The distillation loop: `Trainer` trains one stage into a run folder over a `TrainState`, to the end or to a pause
point; `distill` is the one-call form; `read_progress` reads a run folder's progress without loading any model.

The run folder (`hybrid_distill.layout.TrainLayout`) is a `hybrid_distill.artifacts.Step`: its ``step.json``
records the settings key the run trains under — the config fields that change the trajectory, the student's
layout, and the caller's ``identity`` (e.g. the teacher's weights fingerprint and the data's identity) — and,
once finished, the `DistillResult`. A finished run under the same key returns that result (loading the final
weights into the student); a folder made under other settings is refused, naming the changes, or set aside;
checkpoints (`checkpointing`) carry the key too and are resumed only under it. One process writes a run folder
at a time (`hybrid_distill.artifacts.FolderLock`; rank 0 holds it under torchrun).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..artifacts import FolderLock, FolderLockedError, StaleStepError, Step, StepRecord
from ..checkpoint import CheckpointError
from ..cuda_allocator import expandable_segments_configured, prefer_expandable_segments_in_process
from ..dtypes import cast_model
from ..errors import HybridDistillError
from ..layout import TrainLayout
from ..surgery import check_positions, check_student_fits_teacher
from . import distributed as hd_dist
from .batches import heldout_batches, infer_seq_len, micro_batches, train_iterator
from .checkpointing import (
    FRESH_START,
    STATE_FILE,
    CheckpointContent,
    UnsafeFileError,
    checkpoint_dirs,
    checkpoint_step,
    decode_rng_state,
    latest_checkpoint,
    load_final_weights,
    read_checkpoint,
    read_json_file,
    remove_interrupted_writes,
    rng_state,
    save_checkpoint,
    save_final_model,
    set_aside_damaged,
    set_rng_state,
)
from .compiling import compile_decoder_layers
from .config import DistillConfig
from .metrics import MetricsWriter, read_metrics
from .optim import build_optimizer, build_scheduler, group_lrs, lr_mixer_parameter_names, optimizer_step
from .stages import Stage, attention_parameter_names, evaluate_kl, evaluate_stage, make_stage, mixer_parameter_names

logger = logging.getLogger(__name__)

# A run whose loss stays NaN or infinite for this many steps in a row has diverged: it stops with an error. (A
# step with a non-finite gradient norm skips its update, so one bad batch does not spoil the weights.)
NONFINITE_STEPS_LIMIT = 3


class DivergedError(HybridDistillError):
    """The training loss stayed non-finite: the stage stops without a result."""


# --------------------------------------------------------------------------------------------
# Results and state
# --------------------------------------------------------------------------------------------


@dataclass
class DistillResult:
    """Outcome of one distillation run (stored in its ``step.json`` once finished)."""

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
    paused: bool = False  # stopped at a pause point with a checkpoint; training again continues the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DistillResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class TrainState:
    """Where a run stands: optimizer steps and tokens trained, seconds spent training, the data position."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    data_state: dict[str, Any] | None = None
    resumed_from: int | None = None  # the checkpoint step this process started from


@dataclass
class TrainProgress:
    """What `Trainer.run` (or `read_progress`) reports: whether the run is finished, how far it is, and its
    held-out evaluation records so far (``metrics.jsonl`` rows of kind "eval": ``step``, ``tokens``,
    ``eval_<metric>``)."""

    done: bool
    step: int
    tokens: int
    total_tokens: int | None
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    result: DistillResult | None = None  # when done
    deadline_reached: bool = False  # stopped at `Trainer.run`'s deadline, with a checkpoint


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def autocast_for(config: DistillConfig, device: torch.device) -> tuple[bool, Callable[[], Any]]:
    """(bf16?, context factory): bf16 autocast with fp32 master weights (``precision`` "bf16", or "auto" on
    CUDA), else plain fp32."""
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if bf16:
        return True, lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return False, contextlib.nullcontext


def model_fingerprint(student: nn.Module, teacher: nn.Module | None) -> dict[str, Any]:
    """The student's layout (and the teacher's model type): part of a run's settings key."""
    cfg = student.config
    return {
        "mixers": list(getattr(cfg, "mixers", [])),
        "mixer_options": dict(getattr(cfg, "mixer_options", {}) or {}),
        "hidden_size": cfg.hidden_size,
        "num_layers": cfg.num_hidden_layers,
        "vocab_size": cfg.vocab_size,
        "teacher_type": getattr(getattr(teacher, "config", None), "model_type", None),
    }


def check_models(student: nn.Module, teacher: nn.Module | None, seq_len: int) -> str | None:
    """Refuse, before anything is trained, a student not made from a teacher like ``teacher`` (another family,
    depth, width or vocabulary) and sequences longer than the teacher's positions; returns the warning to show
    where rope scaling may extend them (else None)."""
    def described(model: nn.Module, role: str) -> str:
        name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        return f"{role} {name}" if name else role

    if teacher is not None:
        check_student_fits_teacher(student.config, teacher.config, described(student, "the student"),
                                   described(teacher, "the teacher"))
    reference = teacher if teacher is not None else student
    return check_positions(reference.config, seq_len, described(reference, "the teacher" if teacher is not None
                                                                else "the student"))


def crossed(before: int, after: int, every: int | None) -> bool:
    """Whether a multiple of ``every`` tokens lies in (before, after]."""
    return bool(every) and after // every > before // every


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


def _stored_result(record: StepRecord, layout: TrainLayout) -> DistillResult:
    """The result a finished run folder recorded, with its paths as found now (the folder may have moved)."""
    result = DistillResult.from_dict(record.result or {})
    result.already_done = True
    result.run_dir, result.metrics_path = str(layout.root), str(layout.metrics)
    if result.final_model_dir:
        result.final_model_dir = str(layout.final)
    return result


def read_progress(run_dir: str | Path) -> TrainProgress | None:
    """How far a run folder has trained, from its files only (no model is loaded): None when it holds no run.

    An unfinished run reports its newest checkpoint (the point it resumes from) and the evaluations up to it.
    It does not check the folder's settings: ask for the progress of a folder whose settings you know.
    """
    layout = TrainLayout(run_dir)
    record = StepRecord.read(layout.root)
    if record is None:
        return None
    snapshots = read_metrics(layout.root, "eval")
    if record.state == "done":
        result = _stored_result(record, layout)
        return TrainProgress(True, result.steps, result.tokens, result.tokens, snapshots, result)
    ckpt = latest_checkpoint(layout.root)
    state = read_json_file(ckpt / STATE_FILE, f"checkpoint {ckpt}") if ckpt is not None else None
    if not isinstance(state, dict) or state.get("key") != record.key:
        return TrainProgress(False, 0, 0, None, [])
    return TrainProgress(False, state["step"], state["tokens"], state.get("total_tokens"),
                         [r for r in snapshots if r.get("step", 0) <= state["step"]])


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """One distillation stage (``config.stage``: 1 alignment, 2 KL, 3 CE) of ``student`` from ``teacher`` into
    ``run_dir``.

    ``data``: a `hybrid_distill.data.PackedDataset`, a `TensorTokenDataset`, or any object with the
    same ``batches(split, batch_size, seed, epoch, start_step, rank, world_size)`` method; or an
    iterator of rank-local per-step batches (``[B, T]`` LongTensors or dicts with ``input_ids`` and
    ``attention_mask``; ``load_state_dict`` makes it resumable). Held-out batches come from
    ``eval_data`` or the dataset's ``eval_batches("heldout", ...)``. ``tokenizer`` is saved with the final
    model, so that ``final/`` loads with ``AutoTokenizer`` too.

    ``identity``: what else the run's content depends on (e.g. ``{"teacher": <weights fingerprint>, "data":
    <data identity>}``), recorded in the settings key; ``upstream``: run ids of the steps it was made from.
    ``on_stale``: "refuse" (StaleStepError naming the changed settings) or "set_aside" (moved into
    ``superseded``) for a folder made under other settings. Under torchrun every process makes and runs one.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, data, config: DistillConfig,
                 run_dir: str | Path, *, eval_data: Iterable | Callable[[], Iterable] | None = None, tokenizer=None,
                 identity: Mapping[str, Any] | None = None, upstream: Mapping[str, str | None] | None = None,
                 on_stale: str = "refuse", superseded: str | Path | None = None):
        if on_stale not in ("refuse", "set_aside") or (on_stale == "set_aside" and superseded is None):
            raise ValueError(f"on_stale must be 'refuse', or 'set_aside' with a superseded folder; got {on_stale!r}")
        self.student, self.teacher, self.data, self.config = student, teacher, data, config
        self.eval_data, self.tokenizer = eval_data, tokenizer
        self.on_stale, self.superseded = on_stale, superseded
        self.layout = TrainLayout(run_dir)
        self.ctx = hd_dist.init_distributed(config.device)
        warning = check_models(student, teacher, infer_seq_len(data, config))
        if warning and self.ctx.is_main:
            logger.warning(warning)
        model = model_fingerprint(student, teacher)
        self.config_hash = config.fingerprint(model)
        train_key = {**config.resume_fields(), "model": model}
        if config.stage == 1 or not attention_parameter_names(student) - mixer_parameter_names(student):
            train_key.pop("softmax_lr")  # no softmax layer trains: the setting cannot change this run
        if config.save_dtype != "float32":  # the output's dtype (not the trajectory's; float32 keeps earlier keys)
            train_key["save_dtype"] = config.save_dtype
        self.artifact = Step(self.layout.root, {"train": train_key, "identity": dict(identity or {})}, upstream,
                             what=f"Stage-{config.stage} distillation run")
        self.state: TrainState | None = None  # set up on the first `run`
        self.result: DistillResult | None = None
        self._paused_rng: dict[str, Any] | None = None
        self._last_loss: float | None = None
        self._nonfinite_since: tuple[int, int] | None = None  # (step, tokens) where the loss stopped being finite
        self._eval: tuple[str | None, float | None] = (None, None)

    # -- the public entry ---------------------------------------------------------------------
    def run(self, until_tokens: int | None = None, checkpoint_at_pause: bool = True,
            deadline: float | None = None) -> TrainProgress:
        """Train to the end, or stop once ``until_tokens`` are trained (after that step) and return; calling again
        continues exactly as if the run had not stopped. The pause is checkpointed, so that another process can
        continue the run; ``checkpoint_at_pause=False`` skips that write when this object will continue it (the
        regular checkpoints, ``save_every_*``, still happen).

        ``deadline``: a ``time.time()`` past which the run stops at the end of the step it is in, checkpointed
        whatever ``checkpoint_at_pause`` says, and returns with ``deadline_reached`` (a caller's time limit, checked
        after every step, so a call trains at least one). It is not a setting: the run continues from there exactly
        as if it had not stopped."""
        if self.result is not None:
            return self._progress()
        with self._writing() as record:
            if record.state == "done":
                return self._load_finished(record)
            if self.state is None:
                self._setup()
                self._load_state()
            elif (ckpt := latest_checkpoint(self.layout.root)) is not None and checkpoint_step(ckpt) > self.state.step:
                self._load_state()  # another process trained this folder on since this one paused
            return self._train(until_tokens, checkpoint_at_pause, deadline)

    def finished_result(self) -> DistillResult | None:
        """The stored result of a finished run in the folder under this trainer's settings and upstream (None when
        there is none), read from its record alone: no weights are loaded and the folder is not touched, so a
        caller that does not need the trained weights (its output already saved elsewhere) can skip `run`."""
        record = self.artifact.finished()
        return _stored_result(record, self.layout) if record is not None else None

    # -- the loop -----------------------------------------------------------------------------
    def _train(self, until_tokens: int | None, checkpoint_at_pause: bool = True,
               deadline: float | None = None) -> TrainProgress:
        cfg, s, total = self.config, self.state, self.total_steps
        if self._paused_rng is not None:  # the RNGs as they were at the pause, whatever ran in between
            set_rng_state(decode_rng_state(self._paused_rng))
        self.student.train()
        stage = make_stage(cfg.stage, self.student, self.teacher, cfg)
        metrics = MetricsWriter(self.layout.root, self.ctx.is_main, s.step, cfg.report_to, cfg)
        bar = self._progress_bar()
        self._last_save = time.monotonic()
        self._clock = (s.elapsed, time.perf_counter())  # (seconds trained before this call, when it began)
        window: list[tuple[float, float]] = []  # (loss, seconds) since the last log line
        paused = until_tokens is not None and s.tokens >= until_tokens and s.step < total
        late = False  # the deadline passed
        try:
            while s.step < total and not paused:
                t0 = time.perf_counter()
                loss, lrs, grad_norm = self._train_step(stage, next(self.batches))
                prev_tokens = s.tokens
                s.step, s.tokens = s.step + 1, s.tokens + self.tokens_per_step
                self._tick()
                self._last_loss = loss
                window.append((loss, time.perf_counter() - t0))
                if self._diverged(loss):
                    metrics.write(self._train_record(window, lrs, grad_norm))
                    raise DivergedError(self._diverged_message())
                if s.step % cfg.log_every_steps == 0 or s.step == total:
                    metrics.write(self._train_record(window, lrs, grad_norm))
                    window = []
                if bar is not None:
                    bar.update(self.tokens_per_step)
                    bar.set_postfix(loss=f"{loss:.4g}", lr=f"{next(iter(lrs.values())):.2e}")
                if s.step == total:
                    break
                if self.heldout and crossed(prev_tokens, s.tokens, cfg.eval_every_tokens):
                    self._evaluate(stage, metrics)
                saved = crossed(prev_tokens, s.tokens, cfg.save_every_tokens) or self._checkpoint_due()
                late = self._past(deadline)
                paused = late or (until_tokens is not None and s.tokens >= until_tokens)
                if (saved or (paused and (checkpoint_at_pause or late))) and self._nonfinite_since is None:
                    self._save()  # no checkpoint while the loss is not finite
            if self.heldout and not paused:
                self._evaluate(stage, metrics)
        except torch.OutOfMemoryError as exc:
            when = f"in step {s.step + 1}" if s.step < total else "in its final evaluation"
            raise torch.OutOfMemoryError(out_of_memory_advice(cfg, self.micro, self.seq_len, when, self.layout.root,
                                                              self.ctx.device)) from exc
        finally:
            if bar is not None:
                bar.close()
            metrics.close()
            stage.close()
        if paused:
            self._paused_rng = rng_state()
            if late and self.ctx.is_main:
                logger.info("stage %d: the deadline passed at step %d (tokens %d); checkpointed in %s", cfg.stage,
                            s.step, s.tokens, self.layout.root)
            return self._progress(deadline_reached=late)
        return self._finish()

    def _past(self, deadline: float | None) -> bool:
        """Whether ``deadline`` (a ``time.time()``) has passed, on any process (all of them stop alike)."""
        if deadline is None:
            return False
        return not hd_dist.all_reduce_min_int(int(time.time() < deadline), self.ctx.device)

    def _diverged(self, loss: float) -> bool:
        """Track a run of non-finite losses; True once it is `NONFINITE_STEPS_LIMIT` steps long, or the run ends
        in one."""
        s = self.state
        if math.isfinite(loss):
            self._nonfinite_since = None
            return False
        if self._nonfinite_since is None:
            self._nonfinite_since = (s.step, s.tokens)
        return s.step - self._nonfinite_since[0] + 1 >= NONFINITE_STEPS_LIMIT or s.step == self.total_steps

    def _diverged_message(self) -> str:
        (step, tokens), s, cfg = self._nonfinite_since, self.state, self.config
        ckpt = latest_checkpoint(self.layout.root)
        where = (f"its newest checkpoint ({ckpt.name}) is from before then, so a re-run resumes there and diverges "
                 "again" if ckpt is not None else "no checkpoint was written, so a re-run starts over and diverges again")
        return (f"Stage {cfg.stage} diverged: the training loss is not finite since step {step} (tokens {tokens}), "
                f"{s.step - step + 1} steps in a row up to step {s.step}; the run in {self.layout.root} stopped without "
                f"a result and {where}. Train in a new run_dir with a lower lr_mixer / lr_other (now {cfg.lr_mixer} / "
                f"{cfg.lr_other}), grad_clip on (now {cfg.grad_clip}), or precision fp32")

    def _tick(self) -> None:
        """Bring ``state.elapsed`` up to now."""
        before, start = self._clock
        self.state.elapsed = before + time.perf_counter() - start

    def _train_step(self, stage: Stage, batch) -> tuple[float, dict[str, float], float]:
        """One optimizer step over this process's batch: (mean loss over all processes, lrs used, grad norm)."""
        ctx, device = self.ctx, self.ctx.device
        micro = micro_batches(batch, self.micro, self.accum, self.seq_len, device)
        counts = torch.tensor([float(sum(stage.count_tokens(ids, mask) for ids, mask in micro))],
                              dtype=torch.float64, device=device)
        global_count = max(float(hd_dist.all_reduce_sum(counts).item()), 1.0)
        grad_scale = ctx.world_size / global_count  # data-parallel averaging then yields the global mean
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        for ids, mask in micro:
            with self.autocast():
                loss_sum += stage.run(ids, mask, grad_scale).double()
        loss = float(hd_dist.all_reduce_sum(loss_sum).item()) / global_count
        if not self.use_fsdp:  # replicated models under torchrun with fsdp="off": plain gradient averaging
            hd_dist.average_gradients(self.params)
        lrs = group_lrs(self.optimizer)  # the lr this update uses
        grad_norm = optimizer_step(self.optimizer, self.scheduler, self.params, self.config.grad_clip, self.state.step)
        return loss, lrs, grad_norm

    def _train_record(self, window: list[tuple[float, float]], lrs: dict[str, float], grad_norm: float) -> dict:
        secs = sum(w[1] for w in window)
        return {"kind": "train", "step": self.state.step, "tokens": self.state.tokens,
                "loss": sum(w[0] for w in window) / len(window), **lrs, "grad_norm": grad_norm,
                "tokens_per_s": len(window) * self.tokens_per_step / secs if secs > 0 else None,
                "elapsed": self.state.elapsed}

    def _evaluate(self, stage: Stage, metrics: MetricsWriter) -> None:
        """Held-out KL (Stages 2, 3) or the stage's own loss (Stage 1), logged as an "eval" record."""
        with self.autocast():
            if self.config.stage in (2, 3) and self.teacher is not None:
                name, value = "kl", evaluate_kl(self.student, self.teacher, self.heldout, self.config.tau,
                                                self.config.kl_chunk_size)
            else:
                name, value = stage.metric, evaluate_stage(stage, self.heldout, self.ctx.device)
        s = self.state
        self._tick()
        metrics.write({"kind": "eval", "step": s.step, "tokens": s.tokens, f"eval_{name}": value, "elapsed": s.elapsed})
        self._eval = (name, value)

    def _checkpoint_due(self) -> bool:
        """``save_every_minutes`` passed since the last checkpoint (agreed by every process, so all of them save)."""
        if not self.config.save_every_minutes:
            return False
        due = time.monotonic() - self._last_save >= 60.0 * self.config.save_every_minutes
        return bool(hd_dist.all_reduce_min_int(int(due), self.ctx.device))

    def _save(self) -> None:
        self._last_save = time.monotonic()
        self._tick()
        s, cfg = self.state, self.config
        model_state = hd_dist.gather_model_state(self.student, self.trainable_names if cfg.stage == 1 else None)
        optim_state = hd_dist.gather_optimizer_state(self.student, self.optimizer)
        state = {
            "step": s.step, "tokens": s.tokens, "elapsed": s.elapsed,
            "key": self.artifact.key, "settings": self.artifact.settings,
            "total_tokens": self.total_steps * self.tokens_per_step, "world_size": self.ctx.world_size,
            "config_hash": self.config_hash, "config": cfg.to_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data_state": self.batches.state_dict() if hasattr(self.batches, "state_dict") else None,
        }
        save_checkpoint(self.layout.root, self.ctx, s.step, model_state, optim_state, state, cfg.keep_last)

    def _finish(self) -> TrainProgress:
        """Final model, result, and the step published as done."""
        final_dir = None
        if self.config.save_final_model:
            final_dir = self.layout.final
            save_dtype = self.config.saved_weights_dtype
            if save_dtype is not None:  # the saved weights are the output: the student holds them too
                with torch.no_grad():
                    for p in self.student.parameters():
                        p.copy_(p.to(save_dtype))
            save_final_model(self.student, final_dir, self.ctx, tokenizer=self.tokenizer, dtype=save_dtype)
        self._tick()
        self.result = self._make_result(final_dir)
        if self.ctx.is_main:
            self.artifact.publish(self.result.to_dict())
        hd_dist.barrier()
        logger.info("stage %d done in %.1fs (%d steps)", self.config.stage, self.state.elapsed, self.state.step)
        return self._progress()

    def _make_result(self, final_dir: Path | None, paused: bool = False) -> DistillResult:
        s = self.state
        last_loss = self._last_loss
        if last_loss is None:  # resumed at the very end: take the last logged loss
            rows = read_metrics(self.layout.root)
            last_loss = rows[-1]["loss"] if rows else None
        return DistillResult(
            run_dir=str(self.layout.root), stage=self.config.stage, steps=s.step, tokens=s.tokens,
            final_loss=last_loss, eval_metric=self._eval[0], eval_value=self._eval[1],
            final_model_dir=str(final_dir) if final_dir else None, metrics_path=str(self.layout.metrics),
            config_hash=self.config_hash, wall_time_s=s.elapsed, resumed_from_step=s.resumed_from, paused=paused,
        )

    def _progress(self, deadline_reached: bool = False) -> TrainProgress:
        hd_dist.barrier()  # rank 0 wrote the metrics
        if self.result is not None:
            r = self.result
            return TrainProgress(True, r.steps, r.tokens, r.tokens, read_metrics(self.layout.root, "eval"), r)
        s = self.state
        return TrainProgress(False, s.step, s.tokens, self.total_steps * self.tokens_per_step,
                             read_metrics(self.layout.root, "eval"), deadline_reached=deadline_reached)

    # -- the run folder -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self) -> Iterator[StepRecord]:
        """Hold the run folder (rank 0: its lock; a folder of other settings refused or set aside) and yield its
        step record, the same on every process."""
        root, lock, error, outcome = self.layout.root, None, None, None
        if self.ctx.is_main:
            try:
                lock = FolderLock(root).acquire()
                remove_interrupted_writes(root)
                hint = FRESH_START if self.artifact.record() is not None else f"use a new run_dir, or delete {root}"
                moves = self.on_stale == "set_aside" and self.artifact.stale_reason() is not None
                record = self.artifact.begin(self.on_stale, self.superseded, fresh_hint=hint)
                if moves:  # the held lock file went with the old folder: lock the new one
                    lock, old = FolderLock(root).acquire(), lock
                    old.release()
                outcome = record.to_dict()
            except Exception as err:  # the other processes raise it too, instead of waiting for rank 0
                error, outcome = err, (type(err).__name__, str(err))
        outcome = hd_dist.broadcast_object(outcome)
        try:
            if error is not None:
                raise error
            if isinstance(outcome, tuple):
                kinds = {"StaleStepError": StaleStepError, "FolderLockedError": FolderLockedError}
                raise kinds.get(outcome[0], RuntimeError)(f"rank 0 could not open {root}: {outcome[1]}")
            yield StepRecord(**outcome)
        finally:
            if lock is not None:
                lock.release()

    def _load_finished(self, record: StepRecord) -> TrainProgress:
        """A finished run under the same settings: its stored result, with the final weights in the student."""
        self.result = _stored_result(record, self.layout)
        if self.result.final_model_dir:
            final = self.layout.final
            if not final.is_dir():
                raise FileNotFoundError(
                    f"{self.layout.root} holds a finished run whose final model {final} is missing: restore it, or "
                    f"delete {self.layout.root} to train it again"
                )
            load_final_weights(self.student, final)
        return self._progress()

    # -- setup --------------------------------------------------------------------------------
    def _setup(self) -> None:
        """Place, cast, compile and shard the models; build optimizer, schedule and held-out batches."""
        cfg, ctx = self.config, self.ctx
        student, teacher, device = self.student, self.teacher, ctx.device
        torch.manual_seed(cfg.seed)
        if device.type == "cuda" and prefer_expandable_segments_in_process():
            logger.info("CUDA allocator: expandable segments on (set PYTORCH_CUDA_ALLOC_CONF to choose otherwise)")
        bf16, self.autocast = autocast_for(cfg, device)
        self.use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and ctx.world_size > 1)
        # Under FSDP, fully_shard moves each unit to the device as it shards it: the whole model never sits on one GPU.
        if teacher is not None:
            if not self.use_fsdp:
                teacher.to(device)
            if bf16:  # frozen: no master weights needed
                cast_model(teacher, torch.bfloat16)  # rotary inv_freq stays fp32
            teacher.eval()
        if not self.use_fsdp:
            student.to(device)
        if bf16 and any(p.dtype != torch.float32 for p in student.parameters()):
            logger.warning("bf16 autocast works best with fp32 student weights (AdamW master copy); call student.float()")
        student.train()
        student.config.use_cache = False

        stage = make_stage(cfg.stage, student, teacher, cfg)
        try:  # the stage holds hooks on the teacher (Stage 1): removed however setting up ends
            stage.set_trainable()
            mixer_names = lr_mixer_parameter_names(student, cfg)
            if cfg.activation_checkpointing and cfg.stage != 1:
                student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if cfg.stage != 1 and cfg.compile_layers != "off":  # Stage 1 calls the mixers, not the layers
                for model in (teacher, student if cfg.compile_layers == "all" else None):
                    if model is not None:
                        compile_decoder_layers(model)
            if self.use_fsdp:
                if not hd_dist.is_initialized():
                    raise RuntimeError("DistillConfig.fsdp='on' needs torch.distributed (launch with torchrun)")
                if teacher is not None:
                    hd_dist.shard_teacher(teacher, ctx)
                hd_dist.shard_student(student, ctx, stage.shard_units())
        finally:
            stage.close()
        hd_dist.install_forward_method(student)
        if teacher is not None:
            hd_dist.install_forward_method(teacher)
        self.trainable_names = {n for n, p in student.named_parameters() if p.requires_grad}

        self.seq_len = infer_seq_len(self.data, cfg)
        self.micro, self.accum = cfg.micro_batch(ctx.world_size), cfg.grad_accum(ctx.world_size)
        self.tokens_per_step = cfg.global_batch_size * self.seq_len
        self.total_steps = cfg.total_steps(self.seq_len)
        self.optimizer = build_optimizer(student, cfg, mixer_names)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps, self.tokens_per_step)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.heldout = (heldout_batches(self.data, self.eval_data, cfg, ctx, self.micro)
                        if cfg.eval_max_batches > 0 else None)

    def _load_state(self) -> None:
        """The state of the newest checkpoint (or a fresh one) and the training batches from there on."""
        self.state = self._restore()
        self.batches = train_iterator(self.data, self.config, self.ctx, self.state.step, self.state.data_state)
        self._paused_rng = None
        self._nonfinite_since = None

    def _restore(self) -> TrainState:
        """The state of the newest readable checkpoint, loaded into student, optimizer, schedule and RNGs (a fresh
        state when there is none)."""
        ctx, student = self.ctx, self.student
        tensors = ctx.is_main or not hd_dist.is_sharded(student)  # sharded: rank 0 reads, then broadcasts
        content = self._read_checkpoint(tensors)
        if content is None:
            return TrainState()
        hd_dist.load_model_state(student, content.model, strict=False)
        hd_dist.load_optimizer_state(student, self.optimizer, content.optimizer)
        self.scheduler.load_state_dict(content.state["scheduler"])
        if content.rng is not None:
            set_rng_state(content.rng)
        st = content.state
        if ctx.is_main:
            logger.info("stage %d: resuming from step %d (tokens %d) in %s", self.config.stage, st["step"], st["tokens"],
                        self.layout.root)
        return TrainState(st["step"], st["tokens"], st["elapsed"], st.get("data_state"), resumed_from=st["step"])

    def _read_checkpoint(self, tensors: bool) -> CheckpointContent | None:
        """The newest checkpoint every process can read (None: there is none). Every process reads what it needs
        first; if any cannot, all of them go on alike. A damaged checkpoint (a file missing, truncated or not JSON)
        is set aside with a warning and the one before it is read; one made under other settings, or holding objects
        other than plain data, is refused."""
        ctx = self.ctx
        while (ckpt := latest_checkpoint(self.layout.root)) is not None:
            error, fatal, content = None, False, None
            try:
                content = read_checkpoint(ckpt, ctx.rank, tensors, self.artifact.key, self.artifact.settings)
            except (UnsafeFileError, StaleStepError) as err:
                error, fatal = err, True
            except CheckpointError as err:
                error = err
            if hd_dist.all_reduce_min_int(int(error is None), ctx.device):
                return content
            fatal = not hd_dist.all_reduce_min_int(int(not fatal), ctx.device)
            earlier = checkpoint_dirs(self.layout.root)[:-1]
            if fatal or not earlier:
                if error is None:
                    raise CheckpointError(f"another process could not read the checkpoint {ckpt}; see its error")
                if fatal:
                    raise error
                raise CheckpointError(f"{error}; no earlier checkpoint is kept to resume from: delete {ckpt} to train "
                                      "this run from its start, or use a new run_dir") from None
            if ctx.is_main:
                kept = set_aside_damaged(ckpt)
                logger.warning("%s; falling back to %s (the damaged checkpoint is kept as %s: delete it once you no "
                               "longer need it)", error or f"another process could not read {ckpt}", earlier[-1], kept)
            hd_dist.barrier()
        return None

    def _progress_bar(self):
        if not (self.config.progress and self.ctx.is_main):
            return None
        return tqdm(total=self.total_steps * self.tokens_per_step, initial=self.state.tokens, unit="tok",
                    unit_scale=True, desc=f"stage {self.config.stage}", dynamic_ncols=True)


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    data,
    config: DistillConfig,
    run_dir: str | Path,
    eval_data: Iterable | Callable[[], Iterable] | None = None,
    pause_at_tokens: int | None = None,
    tokenizer=None,
    *,
    identity: Mapping[str, Any] | None = None,
    upstream: Mapping[str, str | None] | None = None,
    on_stale: str = "refuse",
    superseded: str | Path | None = None,
) -> DistillResult:
    """Run one distillation stage into ``run_dir`` (a `Trainer`; see it for the arguments) and return its result.

    Resumes from the newest checkpoint; a finished run under the same settings returns its stored result
    (``already_done``) with the final weights loaded into ``student``. ``pause_at_tokens``: stop once this many
    tokens are trained, with a checkpoint, and return a result with ``paused=True`` (no final model); calling
    again with a larger (or no) pause point continues the run exactly as if it had not stopped.
    """
    trainer = Trainer(student, teacher, data, config, run_dir, eval_data=eval_data, tokenizer=tokenizer,
                      identity=identity, upstream=upstream, on_stale=on_stale, superseded=superseded)
    progress = trainer.run(until_tokens=pause_at_tokens)
    if progress.done:
        return progress.result
    return trainer._make_result(None, paused=True)


__all__ = [
    "DistillResult",
    "TrainProgress",
    "TrainState",
    "Trainer",
    "autocast_for",
    "crossed",
    "distill",
    "model_fingerprint",
    "out_of_memory_advice",
    "read_progress",
]
