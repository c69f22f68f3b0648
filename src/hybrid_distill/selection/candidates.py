"""One-swap candidates: build the student of one candidate, train it briefly, record held-out scores.

A candidate is an independent job (`CandidateJob`, plain JSON-able fields), so any executor can run it in
another process or on another machine. Its folder (`CandidateLayout`) is a `Step` under the job's settings;
it holds the short Stage-1 and Stage-2 runs (each resumable, `Trainer.run(until_tokens=...)` pausing it for
the rounds of early stopping and racing), the Stage-1 score and the KL before training. A finished candidate
is never trained again; a folder trained with other settings is refused, naming what changed.

* ``kind="ga"`` (greedy addition): the all-linear student (after Stage 1 or Stage 2, ``start``) with layer
  ``layer`` restored to the teacher's softmax attention. Score: held-out KL (lower = the layer helps more).
* ``kind="null"``: the same student with no layer restored, trained on the same schedule under another
  data-order seed: the noise floor of the GA scores.
* ``kind="gr"`` (greedy removal): the teacher with only layer ``layer`` linear (its mixer from the Stage-1
  all-linear student). Score: held-out KL (higher = removing the layer hurts more).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import Step
from ..checkpoint import load_student
from ..data import HELDOUT_RULE, DataConfig
from ..data.sources import DataSourceError
from ..distill import DistillConfig, Trainer, read_metrics, read_progress
from ..distill.trainer import autocast_for
from ..distill import distributed as hd_dist
from ..distill.stages import Stage1Alignment, evaluate_kl, evaluate_stage
from ..errors import TimeLimitReached
from ..fileio import atomic_write_json, read_json
from ..layout import CandidateLayout, SelectionLayout
from ..surgery import derive_student, load_teacher, load_tokenizer


@dataclass
class CandidateJob:
    """Everything one candidate needs; JSON-able so it can be shipped to a worker.

    ``base_student``: the checkpoint it starts from; ``stage1``/``stage2``: `DistillConfig` dicts (``stage1``
    None: no Stage-1 training, its loss is only evaluated); ``until_tokens``: Stage-2 tokens to train up to in
    this call (None: to the end). ``teacher_weights`` / ``base_weights``: weights fingerprints, so a model
    retrained in place at the same path is noticed. ``deadline``: a ``time.time()`` past which the job stops (its
    training checkpointed) with `TimeLimitReached`; not a setting."""

    kind: str  # "ga", "gr" or "null"
    layer: int | None
    start: str  # ga / null: "stage1", "stage2", "stage2-s1"; gr: "teacher"
    seed: int
    run_dir: str
    teacher: str
    base_student: str
    mixers: list[str]
    data: dict[str, Any]
    stage1: dict[str, Any] | None
    stage2: dict[str, Any]
    replicate: int = 0
    tokenizer: str | None = None
    until_tokens: int | None = None
    eval_batches: int = 16
    teacher_weights: str | None = None
    base_weights: str | None = None
    keep_trainer: bool = False  # the same process runs every round (inline executor): keep the paused trainer
    deadline: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def name(self) -> str:
        return candidate_name(self.kind, self.layer, self.replicate, self.seed)


def candidate_name(kind: str, layer: int | None, replicate: int, seed: int) -> str:
    """``ga-layer03-seed0``, ``null2-seed3``: a candidate's name in logs and failure tables."""
    who = f"null{replicate}" if kind == "null" else f"{kind}-layer{layer:02d}"
    return f"{who}-seed{seed}"


def job_settings(job: CandidateJob) -> dict[str, Any]:
    """The settings that decide a candidate's training (not where it lives, nor its pause point)."""
    resume = {name: None if cfg is None else DistillConfig.from_dict(cfg).resume_fields()
              for name, cfg in (("stage1", job.stage1), ("stage2", job.stage2))}
    return {
        "kind": job.kind, "layer": job.layer, "start": job.start, "seed": job.seed, "replicate": job.replicate,
        # weights, not paths: a moved selection folder or token cache keeps its candidates
        "teacher": job.teacher_weights or job.teacher, "base": job.base_weights or str(job.base_student),
        "mixers": job.mixers, "data": DataConfig.from_value(job.data).identity(), **resume,
        "eval_batches": job.eval_batches, "heldout_rule": HELDOUT_RULE,  # scores depend on which text is held out
    }


def candidate_step(job: CandidateJob) -> Step:
    return Step(job.run_dir, job_settings(job), what=f"{job.kind} candidate")


def tokens_at_pause(until_tokens: int | None, tokens_per_step: int, total_tokens: int) -> int:
    """Stage-2 tokens a candidate has trained when ``Trainer.run(until_tokens=P)`` returns: it stops after the
    first whole optimizer step at or past P, and never trains past the run's ``total_tokens`` (reaching them
    finishes the run instead). ``None``: the whole run."""
    if until_tokens is None:
        return total_tokens
    steps = -(-int(until_tokens) // int(tokens_per_step))
    return min(steps * int(tokens_per_step), int(total_tokens))


def snapshots_until(snapshots: list[dict[str, Any]], until_tokens: int | None, tokens_per_step: int,
                    total_tokens: int) -> tuple[list[dict[str, Any]], int]:
    """(the held-out snapshots a candidate has logged, the Stage-2 tokens it has trained) when a round with
    ``until_tokens`` returns: exactly what the live round saw. The trainer evaluates at the first step at or
    past each multiple of the interval, before it checks the pause point, so the pause step's own snapshot
    belongs to the round."""
    reached = tokens_at_pause(until_tokens, tokens_per_step, total_tokens)
    return [s for s in snapshots if s["tokens"] <= reached], reached


def stage2_tokens_per_step(stage2: dict[str, Any] | DistillConfig) -> int:
    """Tokens per optimizer step of a candidate's Stage 2, as `run_candidate` trains it."""
    cfg = DistillConfig.from_dict(stage2) if isinstance(stage2, dict) else stage2
    return cfg.global_batch_size * cfg.data_seq_len


def _kl_snapshots(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``metrics.jsonl``'s held-out KL records (a non-finite KL, stored as null, read back as NaN)."""
    return [{"tokens": r["tokens"], "kl": math.nan if r["eval_kl"] is None else r["eval_kl"]}
            for r in rows if "eval_kl" in r]


def _replayed_round(job: CandidateJob, layout: CandidateLayout) -> dict[str, Any] | None:
    """When an earlier call already trained this candidate to or past ``job.until_tokens`` (a restarted
    selection replaying its rounds), that round's result from the stored files, without loading any model."""
    if job.until_tokens is None:
        return None
    s1, initial = read_json(layout.s1_eval), read_json(layout.initial_eval)
    progress = read_progress(layout.stage2.root)
    if progress is None or s1 is None or initial is None or progress.tokens < job.until_tokens:
        return None
    tokens_per_step = stage2_tokens_per_step(job.stage2)
    total = progress.total_tokens or progress.tokens
    snapshots, reached = snapshots_until(_kl_snapshots(read_metrics(layout.stage2.root, "eval")), job.until_tokens,
                                         tokens_per_step, total)
    return _record(job, False, s1, initial, snapshots, s1["tokens"] + reached, reached, 0.0, None, reused=True)


def _record(job: CandidateJob, done: bool, s1: dict, initial: dict, snapshots: list[dict[str, Any]], tokens_trained: int,
            stage2_tokens: int, wall: float, tokens_per_s: float | None, reused: bool = False) -> dict[str, Any]:
    return {"kind": job.kind, "layer": job.layer, "seed": job.seed, "replicate": job.replicate, "start": job.start,
            "done": done, "s1_loss": s1["s1_loss"], "kl_initial": initial["kl"], "snapshots": snapshots,
            "tokens_trained": tokens_trained, "stage2_tokens": stage2_tokens, "wall_time_s": wall,
            "tokens_per_s": tokens_per_s, "reused": reused}


# Worker processes reuse the teacher, tokenizer, base students and data between jobs.
_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def clear_cache() -> None:
    """Drop the models, datasets and paused trainers cached by `run_candidate` in this process."""
    _CACHE.clear()
    _TRAINERS.clear()


# Paused candidates whose trainers this process keeps, so that the next round continues in memory (no student to
# rebuild, no checkpoint to write and read back). Each holds a student with its gradients and optimizer moments
# (about 16 bytes a parameter); they are kept while all of them fit in this share of the device's memory.
_TRAINERS: dict[str, tuple[str, Trainer]] = {}
KEEP_TRAINERS_MEMORY_SHARE = 0.3


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _may_keep(student: torch.nn.Module, device: torch.device) -> bool:
    per = 16 * sum(p.numel() for p in student.parameters())
    return per * (len(_TRAINERS) + 1) <= KEEP_TRAINERS_MEMORY_SHARE * _device_memory(device)


def _load(job: CandidateJob):
    # On CUDA distillation runs the frozen teacher in bf16 (and casts it in place), so load it that way:
    # every candidate then sees the same teacher, and restored softmax layers hold its bf16 weights.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    teacher = _cached(("teacher", job.teacher), lambda: load_teacher(job.teacher, dtype=dtype))
    tokenizer = _cached(("tokenizer", job.teacher, job.tokenizer),
                        lambda: load_tokenizer(job.teacher, job.tokenizer, teacher.config.vocab_size))
    base = _cached(("base", job.base_student), lambda: load_student(job.base_student).float())
    return teacher, tokenizer, base, DataConfig.from_value(job.data)


def heldout_batches(data, batch_size: int, max_batches: int, purpose: str = "layer scoring") -> list:
    """The first ``max_batches`` held-out batches of a packed dataset; DataSourceError when it has none."""
    batches = list(itertools.islice(data.eval_batches("heldout", batch_size), max_batches))
    if not batches:
        raise DataSourceError(f"{purpose} needs held-out data; the dataset has no held-out sequences (data.heldout_fraction)")
    return batches


def run_candidate(job: CandidateJob | dict[str, Any]) -> dict[str, Any]:
    """Train one candidate up to ``job.until_tokens`` Stage-2 tokens (or its whole budget).

    Returns ``{"kind", "layer", "seed", "replicate", "start", "done", "s1_loss", "kl_initial", "snapshots":
    [{"tokens", "kl"}], "tokens_trained", "stage2_tokens", "wall_time_s", "tokens_per_s", "reused"}``;
    ``tokens_trained`` counts Stage-1 and Stage-2 tokens so far. A finished candidate returns its stored result.
    Past ``job.deadline`` (at the start, or when its training stops there) it raises `TimeLimitReached`.
    """
    if isinstance(job, dict):
        job = CandidateJob(**job)
    layout = CandidateLayout(job.run_dir)
    step = candidate_step(job)
    record = step.begin(on_stale="refuse", fresh_hint="use a new selection folder, or delete this candidate's "
                                                       "folder to train it again")
    if record.state == "done":
        return {**record.result, "reused": True}
    if job.deadline is not None and time.time() >= job.deadline:
        raise TimeLimitReached(f"candidate {job.name}", during=True)
    t0 = time.perf_counter()
    kept = _TRAINERS.get(job.run_dir)
    if kept is not None and kept[0] == step.key:  # paused by this process in an earlier round
        progress = _within_deadline(job, kept[1].run(job.until_tokens, checkpoint_at_pause=False, deadline=job.deadline))
        return _result(job, step, layout, progress, read_json(layout.s1_eval), read_json(layout.initial_eval), t0)
    replay = _replayed_round(job, layout)
    if replay is not None:
        return replay

    teacher, tokenizer, base, data = _load(job)
    torch.manual_seed(job.seed)
    student = derive_student(teacher, base, job.mixers).float()
    cfg2 = DistillConfig.from_dict(job.stage2)
    cfg2 = cfg2.replace(seq_len=cfg2.data_seq_len, eval_max_batches=job.eval_batches, save_final_model=False, keep_last=1)
    device = hd_dist.init_distributed(cfg2.device).device
    _, autocast = autocast_for(cfg2, device)  # the precision the snapshots use
    identity = {"candidate": step.key}  # the inner runs belong to this candidate's settings

    # ---- Stage 1 (optional) and its held-out alignment loss (the GA-S1 / GR-S1 score) ----
    s1 = read_json(layout.s1_eval)
    if job.stage1 is not None:
        cfg1 = DistillConfig.from_dict(job.stage1)
        cfg1 = cfg1.replace(seq_len=cfg1.data_seq_len, eval_max_batches=job.eval_batches, keep_last=1)
        data1 = data.load(tokenizer, cfg1.seq_len, seed=cfg1.seed)
        r1 = _within_deadline(job, Trainer(student, teacher, data1, cfg1, layout.stage1.root, identity=identity)
                              .run(deadline=job.deadline)).result
        if s1 is None:
            s1 = {"s1_loss": r1.eval_value, "tokens": r1.tokens}
            atomic_write_json(layout.s1_eval, s1)
    elif s1 is None:
        teacher.to(device)
        student.to(device)
        stage = Stage1Alignment(student, teacher, DistillConfig(stage=1, target_tokens=1))
        try:
            with autocast():
                batches = heldout_batches(data.load(tokenizer, cfg2.seq_len, seed=cfg2.seed), cfg2.eval_batch_size or 4,
                                          job.eval_batches)
                s1 = {"s1_loss": evaluate_stage(stage, batches, device), "tokens": 0}
        finally:
            stage.close()
        atomic_write_json(layout.s1_eval, s1)

    # ---- Stage 2 with held-out KL snapshots ----
    data2 = data.load(tokenizer, cfg2.seq_len, seed=cfg2.seed, require_sequences=cfg2.global_batch_size)
    initial = read_json(layout.initial_eval)
    if initial is None:  # the candidate before any Stage-2 training
        teacher.to(device)
        student.to(device)
        with autocast():
            batches = heldout_batches(data2, cfg2.eval_batch_size or cfg2.micro_batch(1), job.eval_batches)
            initial = {"kl": evaluate_kl(student, teacher, batches, cfg2.tau, cfg2.kl_chunk_size)}
        atomic_write_json(layout.initial_eval, initial)
    trainer = Trainer(student, teacher, data2, cfg2, layout.stage2.root, identity=identity)
    keep = job.keep_trainer and job.until_tokens is not None and _may_keep(student, device)
    progress = _within_deadline(job, trainer.run(job.until_tokens, checkpoint_at_pause=not keep, deadline=job.deadline))
    if keep and not progress.done:
        _TRAINERS[job.run_dir] = (step.key, trainer)
    return _result(job, step, layout, progress, s1, initial, t0)


def _within_deadline(job: CandidateJob, progress):
    """``progress``, or `TimeLimitReached` when the training stopped at ``job.deadline`` (with a checkpoint)."""
    if progress.deadline_reached:
        raise TimeLimitReached(f"candidate {job.name}", during=True)
    return progress


def _result(job: CandidateJob, step: Step, layout: CandidateLayout, progress, s1: dict, initial: dict,
            t0: float) -> dict[str, Any]:
    """The job's answer after a round; a finished candidate publishes it and drops its large files."""
    speeds = [r["tokens_per_s"] for r in read_metrics(layout.stage2.root) if r.get("tokens_per_s")]
    result = _record(job, progress.done, s1, initial, _kl_snapshots(progress.snapshots), s1["tokens"] + progress.tokens,
                     progress.tokens, time.perf_counter() - t0, sum(speeds) / len(speeds) if speeds else None)
    if progress.done:
        step.publish(result)
        _TRAINERS.pop(job.run_dir, None)
        for stale in (layout.stage2.checkpoints, layout.stage1.checkpoints, layout.stage1.final):  # large; not needed
            shutil.rmtree(stale, ignore_errors=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def candidate_folder(root: str | Path, kind: str, start: str, name: str) -> Path:
    """Where a candidate lives in a selection folder: ``candidates/<kind>-<start>/<name>`` (``gr``: no start)."""
    family = kind if kind == "gr" else f"{kind}-{start}"
    return SelectionLayout(root).candidate(family, name).root


__all__ = [
    "CandidateJob",
    "candidate_folder",
    "candidate_name",
    "candidate_step",
    "clear_cache",
    "heldout_batches",
    "job_settings",
    "run_candidate",
    "snapshots_until",
    "stage2_tokens_per_step",
    "tokens_at_pause",
]
