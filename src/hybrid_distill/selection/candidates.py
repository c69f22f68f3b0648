"""One-swap candidates: build the student for one layer, train it briefly, record held-out scores.

A candidate is an independent job (`CandidateJob`, plain JSON-able fields) so any executor can run
it in another process or on another machine. Its run directory holds the short Stage-1 and Stage-2
runs (resumable, see `hybrid_distill.distill.distill`), ``job.json`` (the settings it is trained
with, written before any training) and, once the full budget is trained, ``candidate.json``; a
finished candidate is never trained again. A candidate found with other settings, finished or not
(e.g. paused by early stopping or racing), is refused with a ValueError (`check_reusable`).

* ``kind="ga"`` (greedy addition): the all-linear student with layer ``layer`` restored to the
  teacher's softmax attention. Score: held-out KL (lower = the layer helps more).
* ``kind="gr"`` (greedy removal): the teacher with only layer ``layer`` linear (its mixer from the
  Stage-1 all-linear student). Score: held-out KL (higher = removing the layer hurts more).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_json, read_json

CANDIDATE_FILE = "candidate.json"
JOB_FILE = "job.json"  # {"job_key", "settings"} of the job that trains this directory
STAGE1_EVAL_FILE = "stage1_eval.json"
INITIAL_EVAL_FILE = "initial_eval.json"
# What a candidate directory holds once training has started (all of it depends on the job's settings).
_PARTIAL_STATE = ("stage1", "stage2", STAGE1_EVAL_FILE, INITIAL_EVAL_FILE)
STAGE2_DEFAULT_SEQ_LEN = 4096  # a candidate's Stage-2 sequence length when its config leaves seq_len unset


@dataclass
class CandidateJob:
    """Everything one candidate needs; JSON-able so it can be shipped to a worker."""

    kind: str  # "ga" or "gr"
    layer: int
    run_dir: str
    teacher: str
    base_student: str  # checkpoint the candidate starts from (see module docstring)
    mixers: list[str]
    data: dict[str, Any]  # DataSpec fields
    stage1: dict[str, Any] | None  # DistillConfig dicts; stage1 None: evaluate the Stage-1 loss only
    stage2: dict[str, Any]
    tokenizer: str | None = None
    pause_at_tokens: int | None = None  # Stage-2 tokens to train up to in this call (None: to the end)
    eval_batches: int = 16
    extra: dict[str, Any] = field(default_factory=dict)
    base_weights: str | None = None  # `weights_fingerprint` of base_student: a base retrained in place is noticed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def name(self) -> str:
        return f"{self.kind}-layer{self.layer:02d}"


def _job_settings(job: CandidateJob) -> dict[str, Any]:
    """The settings that determine a candidate's training (not the pause point), JSON-able."""
    from ..data import HELDOUT_RULE
    from ..distill.config import DistillConfig

    def resume_fields(cfg):
        return None if cfg is None else DistillConfig.from_dict(cfg).resume_fields()

    from ..data import DataSpec

    # the base's weights, not its path, and the data, not its cache folder: a moved run directory or token
    # cache keeps its candidates
    base = {"base_weights": job.base_weights} if job.base_weights else {"base": str(job.base_student)}
    payload = {
        "kind": job.kind, "layer": job.layer, "teacher": job.teacher, **base,
        "mixers": job.mixers, "data": DataSpec.from_dict(job.data).identity(), "stage1": resume_fields(job.stage1), "stage2": resume_fields(job.stage2),
        "eval_batches": job.eval_batches, "heldout_rule": HELDOUT_RULE,  # scores depend on which text is held out
    }
    return json.loads(json.dumps(payload, sort_keys=True, default=str))


def _hash_settings(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def job_key(job: CandidateJob) -> str:
    """Hash of the settings that determine a candidate's training (not the pause point)."""
    return _hash_settings(_job_settings(job))


def _changed_settings(stored: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """``name: stored -> now`` for each setting that differs (nested mappings by dotted name)."""
    out = []
    for key in sorted(set(stored) | set(now)):
        a, b = stored.get(key, "<missing>"), now.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_settings(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_reusable(job: CandidateJob) -> dict[str, Any] | None:
    """The stored result of a finished candidate (None if unfinished); ValueError if the candidate's
    directory was trained with other settings, whether it finished or not (a candidate paused by
    early stopping or racing, or one killed mid-run, would otherwise resume from stale
    checkpoints and snapshots)."""
    run_dir = Path(job.run_dir)
    done = finished_candidate(run_dir)
    record = read_json(run_dir / JOB_FILE)
    if done is not None:
        stored_key, state = done.get("job_key"), "finished"
    elif record is not None:
        stored_key, state = record.get("job_key"), "partly trained"
    elif any((run_dir / name).exists() for name in _PARTIAL_STATE):
        raise ValueError(
            f"{run_dir} holds a partly trained candidate with no record of its settings ({JOB_FILE}, written by "
            "newer versions), so it cannot be resumed safely; use a new selection run directory, or delete "
            f"{run_dir} to train this candidate again"
        )
    else:
        return None
    settings = _job_settings(job)
    if stored_key != _hash_settings(settings):
        changed = []
        if record is not None and record.get("job_key") == stored_key and isinstance(record.get("settings"), dict):
            changed = _changed_settings(record["settings"], settings)
        raise ValueError(
            f"{run_dir} holds a {state} candidate trained with other settings (teacher, base student or its weights, data, "
            "mixers or stage configs differ"
            + (f": {'; '.join(changed)}" if changed else "")
            + f"); use a new selection run directory, or delete {run_dir} to train this candidate again"
        )
    return done


def _record_job(job: CandidateJob) -> None:
    """Write ``job.json`` (the job's key and settings) before the candidate's first training."""
    path = Path(job.run_dir) / JOB_FILE
    if read_json(path) is None:
        settings = _job_settings(job)
        atomic_write_json(path, {"job_key": _hash_settings(settings), "settings": settings})


def stage2_tokens_per_step(stage2: dict[str, Any] | Any) -> int:
    """Tokens per optimizer step of a candidate's Stage 2 (a `DistillConfig` or its dict), as
    `run_candidate` trains it."""
    from ..distill.config import DistillConfig

    cfg = DistillConfig.from_dict(stage2) if isinstance(stage2, dict) else stage2
    return cfg.global_batch_size * (cfg.seq_len or STAGE2_DEFAULT_SEQ_LEN)


def tokens_at_pause(pause_at_tokens: int | None, tokens_per_step: int, total_tokens: int) -> int:
    """Stage-2 tokens a candidate has trained when ``distill(..., pause_at_tokens=P)`` returns (from a
    checkpoint below P): the trainer pauses after the first whole optimizer step at or past P, so
    at the next multiple of ``tokens_per_step``, and never trains past the run's ``total_tokens``
    (reaching them finishes the run instead). ``None``: the whole run."""
    if pause_at_tokens is None:
        return total_tokens
    steps = -(-int(pause_at_tokens) // int(tokens_per_step))
    return min(steps * int(tokens_per_step), int(total_tokens))


def snapshots_until(snapshots: list[dict[str, Any]], pause_at_tokens: int | None, tokens_per_step: int,
                    total_tokens: int) -> tuple[list[dict[str, Any]], int]:
    """(the held-out snapshots a candidate has logged, the Stage-2 tokens it has trained) when a
    round with ``pause_at_tokens`` returns: exactly what the live round saw. The trainer logs a
    snapshot at the first step at or past each multiple of the interval, before it checks the pause
    point, so the pause step's own snapshot belongs to the round."""
    reached = tokens_at_pause(pause_at_tokens, tokens_per_step, total_tokens)
    return [s for s in snapshots if s["tokens"] <= reached], reached


def _paused_result(job: CandidateJob) -> dict[str, Any] | None:
    """When an earlier call already trained to or past ``job.pause_at_tokens`` (a restarted selection
    replaying its rounds), that round's result from the stored snapshots, without loading any model.
    Call `check_reusable` first: it refuses a directory trained with other settings."""
    from ..distill import read_progress

    run_dir = Path(job.run_dir)
    if job.pause_at_tokens is None:
        return None
    progress = read_progress(run_dir / "stage2")
    s1, initial = read_json(run_dir / STAGE1_EVAL_FILE), read_json(run_dir / INITIAL_EVAL_FILE)
    if progress is None or progress.total_tokens is None or s1 is None or initial is None:
        return None
    if progress.tokens < job.pause_at_tokens:
        return None
    snapshots, reached = snapshots_until(
        [{"tokens": r["tokens"], "kl": r["eval_kl"]} for r in progress.snapshots],
        job.pause_at_tokens, stage2_tokens_per_step(job.stage2), progress.total_tokens)
    return {
        "job_key": job_key(job), "kind": job.kind, "layer": job.layer, "mixers": job.mixers, "done": False,
        "s1_loss": s1["s1_loss"], "kl_initial": initial["kl"], "snapshots": snapshots,
        "tokens_trained": s1["tokens"] + reached, "stage2_tokens": reached,
        "wall_time_s": 0.0, "tokens_per_s": None, "reused": True,
    }


def candidate_dir(root: str | Path, kind: str, layer: int) -> Path:
    return Path(root) / "candidates" / kind / f"layer_{layer:02d}"


def finished_candidate(run_dir: str | Path) -> dict[str, Any] | None:
    """The stored result of a candidate that trained its whole budget, else None."""
    return read_json(Path(run_dir) / CANDIDATE_FILE)


# Worker processes reuse the teacher, tokenizer, base student and data between jobs.
_CACHE: dict[tuple, Any] = {}


def _cached(key: tuple, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def clear_cache() -> None:
    """Drop the models and datasets cached by `run_candidate` in this process."""
    _CACHE.clear()


def _load(job: CandidateJob):
    from ..checkpoint import load_student
    from ..data import DataSpec
    from ..surgery import load_teacher, load_tokenizer

    # On CUDA distillation runs the frozen teacher in bf16 (and casts it in place), so load it that way:
    # every candidate then sees the same teacher, and restored softmax layers hold its bf16 weights.
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    teacher = _cached(("teacher", job.teacher), lambda: load_teacher(job.teacher, dtype=dtype))
    tokenizer = _cached(
        ("tokenizer", job.teacher, job.tokenizer),
        lambda: load_tokenizer(job.teacher, job.tokenizer, teacher.config.vocab_size),
    )
    base = _cached(("base", job.base_student), lambda: load_student(job.base_student).float())
    spec = DataSpec.from_dict(job.data)
    return teacher, tokenizer, base, spec


def heldout_batches(data, batch_size: int, max_batches: int, purpose: str = "layer scoring") -> list:
    """The first ``max_batches`` held-out batches of a packed dataset; ValueError when it has none."""
    batches = list(itertools.islice(data.eval_batches("heldout", batch_size), max_batches))
    if not batches:
        raise ValueError(f"{purpose} needs held-out data; the dataset has no held-out sequences (data.heldout_fraction)")
    return batches


def run_candidate(job: CandidateJob | dict[str, Any]) -> dict[str, Any]:
    """Train one candidate up to ``job.pause_at_tokens`` Stage-2 tokens (or its whole budget).

    Returns ``{"kind", "layer", "done", "s1_loss", "kl_initial", "snapshots": [{"tokens", "kl"}],
    "tokens_trained", "wall_time_s", "tokens_per_s"}``; ``tokens_trained`` counts Stage-1 and
    Stage-2 tokens so far. Finished candidates return their stored result at once.
    """
    from ..distill import DistillConfig, distill, read_metrics
    from ..distill import distributed as hd_dist
    from ..distill.trainer import autocast_for
    from ..distill.stages import Stage1Alignment, evaluate_kl, evaluate_stage
    from ..surgery import derive_student

    if isinstance(job, dict):
        job = CandidateJob(**job)
    run_dir = Path(job.run_dir)
    done = check_reusable(job)
    if done is not None:
        return {**done, "reused": True}
    replay = _paused_result(job)
    if replay is not None:
        return replay
    _record_job(job)  # before any training: a restart with other settings is then refused

    t0 = time.perf_counter()
    teacher, tokenizer, base, spec = _load(job)
    torch.manual_seed(int(job.stage2.get("seed", 0)))
    student = derive_student(teacher, base, job.mixers).float()
    cfg2 = DistillConfig.from_dict(job.stage2)
    device = hd_dist.init_distributed(cfg2.device).device
    tokens_trained = 0

    # ---- Stage 1 (optional) and its held-out alignment loss (the GA-S1 / GR-S1 score) ----
    s1 = read_json(run_dir / STAGE1_EVAL_FILE)
    if job.stage1 is not None:
        cfg1 = DistillConfig.from_dict(job.stage1).replace(eval_max_batches=job.eval_batches)
        data1 = spec.load(tokenizer, cfg1.seq_len or 512, seed=cfg1.seed)
        r1 = distill(student, teacher, data1, cfg1.replace(seq_len=cfg1.seq_len or 512), run_dir / "stage1")
        tokens_trained += r1.tokens
        if s1 is None:
            s1 = {"s1_loss": r1.eval_value, "tokens": r1.tokens}
            atomic_write_json(run_dir / STAGE1_EVAL_FILE, s1)
    elif s1 is None:
        seq1 = cfg2.seq_len or STAGE2_DEFAULT_SEQ_LEN
        data1 = spec.load(tokenizer, seq1, seed=cfg2.seed)
        teacher.to(device)
        student.to(device)
        stage = Stage1Alignment(student, teacher, DistillConfig(stage=1, target_tokens=1))
        _, autocast = autocast_for(cfg2, device)  # a cached teacher may already be bf16 (distill casts it on CUDA)
        try:
            with autocast():
                loss = evaluate_stage(stage, heldout_batches(data1, cfg2.eval_batch_size or 4, job.eval_batches), device)
        finally:
            stage.close()
        s1 = {"s1_loss": loss, "tokens": 0}
        atomic_write_json(run_dir / STAGE1_EVAL_FILE, s1)

    # ---- Stage 2 with held-out KL snapshots ----
    seq2 = cfg2.seq_len or STAGE2_DEFAULT_SEQ_LEN
    cfg2 = cfg2.replace(seq_len=seq2, eval_max_batches=job.eval_batches, save_final_model=False, keep_last=1)
    data2 = spec.load(tokenizer, seq2, seed=cfg2.seed, require_sequences=cfg2.global_batch_size)
    initial = read_json(run_dir / INITIAL_EVAL_FILE)
    if initial is None:  # the one-swap student before any Stage-2 training
        teacher.to(device)
        student.to(device)
        batch = cfg2.eval_batch_size or cfg2.micro_batch(1)
        _, autocast = autocast_for(cfg2, device)  # the precision the snapshots use
        with autocast():
            kl = evaluate_kl(student, teacher, heldout_batches(data2, batch, job.eval_batches), cfg2.tau, cfg2.kl_chunk_size)
        initial = {"kl": kl}
        atomic_write_json(run_dir / INITIAL_EVAL_FILE, initial)
    r2 = distill(student, teacher, data2, cfg2, run_dir / "stage2", pause_at_tokens=job.pause_at_tokens)
    tokens_trained += r2.tokens
    snapshots = [{"tokens": r["tokens"], "kl": r["eval_kl"]} for r in read_metrics(run_dir / "stage2", "eval")]
    rows = read_metrics(run_dir / "stage2")
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    result = {
        "job_key": job_key(job),
        "kind": job.kind,
        "layer": job.layer,
        "mixers": job.mixers,
        "done": not r2.paused,
        "s1_loss": s1["s1_loss"],
        "kl_initial": initial["kl"],
        "snapshots": snapshots,
        "tokens_trained": tokens_trained,
        "stage2_tokens": r2.tokens,
        "wall_time_s": time.perf_counter() - t0,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "reused": False,
    }
    if result["done"]:
        atomic_write_json(run_dir / CANDIDATE_FILE, result)
        for stale in ("stage2/checkpoints", "stage1/checkpoints", "stage1/final"):  # large; no longer needed
            shutil.rmtree(run_dir / stale, ignore_errors=True)
    student.cpu()
    del student
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result
