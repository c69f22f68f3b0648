"""Trainer: SIGKILL + resume reproduces the uninterrupted loss curve, a finished run is a no-op, config refusal on resume,
schedule and optimizer groups, config validation. Doubles as the worker script of the kill test:
``python tests/test_trainer_resume.py RUN_DIR STAGE SECONDS_PER_BATCH``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybrid_distill.artifacts import STEP_FILE, StepRecord
from hybrid_distill.distill import (
    ConfigError,
    DistillConfig,
    TensorTokenDataset,
    distill,
    latest_checkpoint,
    read_metrics,
)
from hybrid_distill.distill.optim import build_optimizer, lr_factor, lr_mixer_parameter_names
from hybrid_distill.fileio import atomic_write_json

SEQ, GLOBAL, STEPS = 16, 4, 14


def _models(seed=0):
    from hybrid_distill.surgery import build_student
    from hybrid_distill.tiny_teachers import tiny_teacher

    teacher = tiny_teacher("qwen2-bias-tied", seed=seed)
    torch.manual_seed(seed)
    return build_student(teacher, ["gdn", "softmax", "gla", "gdn"]), teacher


class _SlowData(TensorTokenDataset):
    """Sleeps per batch so the test can kill the run between checkpoints."""

    delay = 0.0

    def get_batch(self, indices):
        time.sleep(self.delay)
        return super().get_batch(indices)


def _data(delay=0.0):
    tokens = torch.randint(3, 512, (40, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(tokens)
    mask[::5, -3:] = 0
    data = _SlowData(tokens, mask, heldout_sequences=4)
    data.delay = delay
    return data


def _config(stage, **kw):
    base = dict(
        stage=stage,
        target_tokens=GLOBAL * SEQ * STEPS,
        global_batch_size=GLOBAL,
        micro_batch_size=2,
        save_every_tokens=GLOBAL * SEQ * 4,
        keep_last=2,
        progress=False,
        eval_every_tokens=GLOBAL * SEQ * 5,
        eval_max_batches=2,
        warmup_tokens=GLOBAL * SEQ * 2,
        schedule="cosine",
        lr_other=1e-4,
    )
    base.update(kw)
    return DistillConfig(**base)


def worker(run_dir: str, stage: int, delay: float) -> None:
    torch.set_num_threads(1)
    student, teacher = _models()
    distill(student, teacher, _data(delay), _config(stage), run_dir)


def _spawn(run_dir: Path, stage: int, delay: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, __file__, str(run_dir), str(stage), str(delay)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc: subprocess.Popen, timeout=120) -> None:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]


def finished(run_dir: Path) -> bool:
    """Whether the run folder's step record says done."""
    record = StepRecord.read(run_dir)
    return record is not None and record.state == "done"


def reopen(run_dir: Path) -> None:
    """Make a finished run look stopped after its last checkpoint (its step record back to "started")."""
    record = StepRecord.read(run_dir)
    record.state, record.result = "started", None
    atomic_write_json(run_dir / STEP_FILE, record.to_dict())


def _logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return max(steps)


@pytest.mark.parametrize("stage", [1, 2])
def test_kill_and_resume_reproduces_loss_curve(tmp_path, stage):
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = _spawn(ref_dir, stage, 0.0)
    victim = _spawn(run_dir, stage, 0.12)
    deadline = time.time() + 90
    while latest_checkpoint(run_dir) is None:  # first checkpoint at step 4
        assert victim.poll() is None, "worker ended before writing a checkpoint"
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    first_ckpt = int(latest_checkpoint(run_dir).name.split("_")[1])
    while _logged_steps(run_dir) <= first_ckpt:  # run past the checkpoint: logged steps must be redone
        assert victim.poll() is None and time.time() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not finished(run_dir), "run finished before the kill; slow it down"
    killed_at = _logged_steps(run_dir)
    ckpt_step = int(latest_checkpoint(run_dir).name.split("_")[1])
    assert ckpt_step < STEPS

    _wait(_spawn(run_dir, stage, 0.0))
    _wait(ref)
    got, want = read_metrics(run_dir), read_metrics(ref_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["lr_mixer"] for r in got] == [r["lr_mixer"] for r in want]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
    eval_key = "eval_align_loss" if stage == 1 else "eval_kl"
    assert [r[eval_key] for r in read_metrics(run_dir, "eval")] == [r[eval_key] for r in read_metrics(ref_dir, "eval")]
    assert finished(run_dir)
    result = StepRecord.read(run_dir).result
    assert result["resumed_from_step"] == ckpt_step and result["steps"] == STEPS
    assert killed_at > first_ckpt
    from safetensors.torch import load_file

    a, b = (
        load_file(str(run_dir / "final" / "model.safetensors")),
        load_file(str(ref_dir / "final" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in b)
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(kept) <= 2 and not any(n.startswith(".tmp") for n in kept)


def test_done_run_is_a_noop_and_loads_final_weights(tmp_path):
    student, teacher = _models()
    cfg = _config(2, target_tokens=GLOBAL * SEQ * 3, save_every_tokens=None)
    first = distill(student, teacher, _data(), cfg, tmp_path / "run")
    assert finished(tmp_path / "run") and not first.already_done
    trained = {k: v.clone() for k, v in student.state_dict().items()}
    fresh, teacher2 = _models()
    t0 = time.perf_counter()
    again = distill(fresh, teacher2, _data(), cfg, tmp_path / "run")
    assert again.already_done and again.steps == first.steps and again.final_loss == first.final_loss
    assert time.perf_counter() - t0 < 5
    assert all(torch.equal(trained[k], v) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="tau"):
        distill(fresh, teacher2, _data(), cfg.replace(tau=2.0), tmp_path / "run")


def test_done_run_found_by_relative_path_after_a_move(tmp_path, monkeypatch):
    student, teacher = _models()
    cfg = _config(2, target_tokens=GLOBAL * SEQ * 3, save_every_tokens=None)
    monkeypatch.chdir(tmp_path)
    distill(student, teacher, _data(), cfg, "run")  # stored as a relative path
    trained = {k: v.clone() for k, v in student.state_dict().items()}
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run").rename(tmp_path / "elsewhere" / "run")  # the stored "run/final" resolves nowhere now
    fresh, teacher2 = _models()
    again = distill(fresh, teacher2, _data(), cfg, tmp_path / "elsewhere" / "run")
    assert again.already_done and again.final_model_dir == str(tmp_path / "elsewhere" / "run" / "final")
    assert all(torch.equal(trained[k], v) for k, v in fresh.state_dict().items())
    import shutil

    shutil.rmtree(tmp_path / "elsewhere" / "run" / "final")
    with pytest.raises(FileNotFoundError, match=r"final model .*final is missing.*delete .*elsewhere/run to train it again"):
        distill(fresh, teacher2, _data(), cfg, tmp_path / "elsewhere" / "run")


def test_refused_resume_leaves_no_hooks_on_the_teacher(tmp_path):
    student, teacher = _models()
    cfg = _config(1, target_tokens=GLOBAL * SEQ * 4, save_every_tokens=GLOBAL * SEQ * 2)
    distill(student, teacher, _data(), cfg, tmp_path / "run")
    reopen(tmp_path / "run")  # stopped after its last checkpoint

    def hooks():
        return sum(len(m._forward_hooks) for m in teacher.modules())

    assert hooks() == 0
    for _ in range(2):
        with pytest.raises(ValueError, match="lr_mixer"):
            distill(student, teacher, _data(), cfg.replace(lr_mixer=5e-4), tmp_path / "run")
    assert hooks() == 0  # the Stage-1 capture hooks were removed although setting up failed


def test_checkpoints_by_time_without_a_token_interval(tmp_path):
    student, teacher = _models()
    cfg = _config(2, target_tokens=GLOBAL * SEQ * 4, save_every_tokens=None, save_every_minutes=1e-9)
    distill(student, teacher, _data(), cfg, tmp_path / "timed")
    assert latest_checkpoint(tmp_path / "timed").name == "step_00000003"  # every step (the last is the final model)
    student, teacher = _models()
    distill(student, teacher, _data(), cfg.replace(save_every_minutes=0), tmp_path / "off")
    assert latest_checkpoint(tmp_path / "off") is None
    assert DistillConfig().save_every_minutes == 30.0


def test_settings_without_effect_do_not_block_a_resume(tmp_path):
    from hybrid_distill.surgery import build_student
    from hybrid_distill.tiny_teachers import tiny_teacher

    teacher = tiny_teacher("qwen2-bias-tied", seed=0)
    linear = build_student(teacher, ["gdn"] * 4)
    cfg = _config(2, target_tokens=GLOBAL * SEQ * 3, save_every_tokens=None)
    distill(linear, teacher, _data(), cfg, tmp_path / "run")
    again = distill(linear, teacher, _data(), cfg.replace(softmax_lr="other"), tmp_path / "run")
    assert again.already_done  # an all-linear student has no softmax layer whose learning rate could differ
    student, teacher = _models()
    distill(student, teacher, _data(), cfg, tmp_path / "hybrid")
    with pytest.raises(ValueError, match="softmax_lr"):
        distill(student, teacher, _data(), cfg.replace(softmax_lr="other"), tmp_path / "hybrid")


def test_pause_and_continue_equals_uninterrupted(tmp_path):
    """Training in rounds (pause_at_tokens, as layer selection does) gives the same run as one go."""
    cfg = _config(2, save_every_tokens=None)
    student, teacher = _models()
    ref = distill(student, teacher, _data(), cfg, tmp_path / "ref")
    per_step = GLOBAL * SEQ
    for pause in (3 * per_step, 7 * per_step, None):
        student, teacher = _models()
        part = distill(student, teacher, _data(), cfg, tmp_path / "rounds", pause_at_tokens=pause)
        if pause is not None:
            assert part.paused and part.tokens == pause and not finished(tmp_path / "rounds")
            assert latest_checkpoint(tmp_path / "rounds").name == f"step_{pause // per_step:08d}"
    assert not part.paused and part.steps == ref.steps == STEPS
    assert [r["loss"] for r in read_metrics(tmp_path / "rounds")] == [r["loss"] for r in read_metrics(tmp_path / "ref")]
    got, want = read_metrics(tmp_path / "rounds", "eval"), read_metrics(tmp_path / "ref", "eval")
    assert [(r["step"], r["eval_kl"]) for r in got] == [(r["step"], r["eval_kl"]) for r in want]


def test_a_run_stopped_at_its_deadline_checkpoints_and_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """`Trainer.run(deadline=...)`: past the deadline the run stops after the step it is in, with a checkpoint (not a
    regular one: none is due), and another trainer resumes it to the weights of a run that never stopped."""
    from types import SimpleNamespace

    from hybrid_distill.distill import Trainer
    from hybrid_distill.distill import trainer as trainer_module

    cfg = _config(2, save_every_tokens=None)
    student, teacher = _models()
    distill(student, teacher, _data(), cfg, tmp_path / "ref")
    want = {k: v.clone() for k, v in student.state_dict().items()}

    calls = iter(range(1, 1000))  # the trainer reads the wall clock only for its deadline: once after each step
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(time=lambda: next(calls), perf_counter=time.perf_counter,
                                                                monotonic=time.monotonic))
    student, teacher = _models()
    stopped = Trainer(student, teacher, _data(), cfg, tmp_path / "run").run(deadline=5)
    assert stopped.deadline_reached and not stopped.done and stopped.step == 5
    assert latest_checkpoint(tmp_path / "run").name == "step_00000005" and not finished(tmp_path / "run")
    monkeypatch.undo()

    student, teacher = _models()
    progress = Trainer(student, teacher, _data(), cfg, tmp_path / "run").run()
    assert progress.done and not progress.deadline_reached and progress.result.resumed_from_step == 5
    assert all(torch.equal(v, want[k]) for k, v in student.state_dict().items())
    assert [r["loss"] for r in read_metrics(tmp_path / "run")] == [r["loss"] for r in read_metrics(tmp_path / "ref")]


def test_resume_refuses_changed_config(tmp_path):
    student, teacher = _models()
    cfg = _config(2, target_tokens=GLOBAL * SEQ * 5, save_every_tokens=GLOBAL * SEQ * 2)
    distill(student, teacher, _data(), cfg, tmp_path / "run")
    reopen(tmp_path / "run")  # pretend it stopped after its last checkpoint
    student, teacher = _models()
    with pytest.raises(ValueError, match=r"train\.lr_mixer: 0\.0001 -> 0\.0005"):
        distill(student, teacher, _data(), cfg.replace(lr_mixer=5e-4), tmp_path / "run")
    with pytest.raises(ValueError, match="global_batch_size"):
        distill(student, teacher, _data(), cfg.replace(global_batch_size=8, micro_batch_size=4), tmp_path / "run")
    # Fields that do not change the trajectory may differ.
    result = distill(student, teacher, _data(), cfg.replace(log_every_steps=2, kl_chunk_size=5), tmp_path / "run")
    assert result.resumed_from_step == 4 and result.steps == 5


def test_out_of_memory_names_the_fixes_and_the_run_resumes_with_smaller_micro_batches(tmp_path, monkeypatch):
    """An OOM in step 5 says what to change and where the run resumes; with half the micro-batch size the
    resumed run finishes on the uninterrupted run's loss curve."""
    from hybrid_distill.cuda_allocator import ALLOCATOR_ENV_VARS
    from hybrid_distill.distill import trainer

    for name in ALLOCATOR_ENV_VARS:  # unconfigured allocator: the advice names expandable segments
        monkeypatch.delenv(name, raising=False)
    cfg = _config(2, target_tokens=GLOBAL * SEQ * 6, save_every_tokens=GLOBAL * SEQ * 2, eval_max_batches=0)
    student, teacher = _models()
    distill(student, teacher, _data(), cfg, tmp_path / "ref")

    real_make_stage = trainer.make_stage
    calls = {"n": 0}

    def oom_in_step_5(*args, **kwargs):
        stage = real_make_stage(*args, **kwargs)
        run = stage.run

        def run_or_fail(*a, **k):
            calls["n"] += 1
            if calls["n"] == 9:  # step 5's first micro-batch (2 per step)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
            return run(*a, **k)

        stage.run = run_or_fail
        return stage

    monkeypatch.setattr(trainer, "make_stage", oom_in_step_5)
    student, teacher = _models()
    with pytest.raises(torch.OutOfMemoryError) as info:
        distill(student, teacher, _data(), cfg, tmp_path / "run")
    message = str(info.value)
    assert "Stage 2 ran out of memory in step 5 with micro-batches of 2 x 16 tokens" in message
    assert "resumes from step_00000004" in message
    assert "micro_batch_size: 1" in message and "activation_checkpointing: true" in message
    assert "kl_chunk_size: 512" in message and "expandable_segments" in message
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)

    monkeypatch.setattr(trainer, "make_stage", real_make_stage)
    student, teacher = _models()
    result = distill(student, teacher, _data(), cfg.replace(micro_batch_size=1), tmp_path / "run")
    assert result.resumed_from_step == 4 and result.steps == 6
    got = [r["loss"] for r in read_metrics(tmp_path / "run")]
    want = [r["loss"] for r in read_metrics(tmp_path / "ref")]
    assert got == pytest.approx(want, rel=1e-5)


def test_token_budget_and_metrics(tmp_path):
    student, teacher = _models()
    cfg = _config(2, target_tokens=GLOBAL * SEQ * 2 + 1, save_every_tokens=None, log_every_steps=2)
    result = distill(student, teacher, _data(), cfg, tmp_path / "run")
    assert result.steps == 3 and result.tokens == 3 * GLOBAL * SEQ  # ceil(target / tokens per step)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 3]
    assert set(rows[0]) >= {"step", "tokens", "loss", "lr_mixer", "lr_other", "grad_norm", "tokens_per_s", "elapsed"}
    assert read_metrics(tmp_path / "run", "eval")[-1]["step"] == 3


def test_lr_schedule():
    assert [lr_factor(s, 10, 2, "constant", 0.0) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[-1] > 0.1 and all(a >= b for a, b in zip(cos[2:], cos[3:]))
    assert lr_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("softmax_lr", ["mixer", "other"])
def test_optimizer_groups_and_weight_decay(softmax_lr):
    student, _ = _models()  # layer 1 keeps softmax attention
    cfg = DistillConfig(stage=2, lr_mixer=1e-3, lr_other=1e-5, weight_decay=0.1, softmax_lr=softmax_lr)
    opt = build_optimizer(student, cfg, lr_mixer_parameter_names(student, cfg))
    names = {id(p): n for n, p in student.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            softmax_at_mixer_lr = softmax_lr == "mixer" or not n.startswith("model.layers.1.")
            assert g["name"] == ("mixer" if ".self_attn." in n and softmax_at_mixer_lr else "other"), n
            assert g["lr"] == (1e-3 if g["name"] == "mixer" else 1e-5)
            nodecay = p.dim() < 2 or n.endswith(("A_log", "dt_bias"))
            assert g["weight_decay"] == (0.0 if nodecay else 0.1), n
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(student.parameters()))
    group_of = {names[id(p)]: g["name"] for g in opt.param_groups for p in g["params"]}
    assert group_of["model.layers.1.self_attn.q_proj.weight"] == softmax_lr
    assert group_of["model.layers.0.self_attn.q_proj.weight"] == "mixer"
    assert group_of["model.layers.1.mlp.up_proj.weight"] == "other"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"stage": 4}, "stage"),
        ({"target_tokens": 0}, "target_tokens"),
        ({"tau": -1.0}, "tau"),
        ({"global_batch_size": 6, "micro_batch_size": 4}, "micro_batch_size"),
        ({"schedule": "linear"}, "schedule"),
        ({"lr_mixer": float("nan")}, "lr_mixer"),
        ({"precision": "fp8"}, "precision"),
        ({"stage1_loss_norm": "mean"}, "stage1_loss_norm"),
        ({"report_to": ("mlflow",)}, "report_to"),
        ({"keep_last": 0}, "keep_last"),
        ({"adam_betas": (0.9, 1.5)}, "adam_betas"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
        ({"seq_len": 1}, "seq_len"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"DistillConfig\.{field}\b"):
        DistillConfig(**kwargs)


def test_config_defaults_files_and_args(tmp_path):
    import argparse

    from hybrid_distill.distill.config import add_distill_config_flags, distill_config_from_flags

    assert DistillConfig(stage=1).lr_mixer == 1e-3 and DistillConfig(stage=2).schedule == "constant"
    with pytest.raises(ConfigError, match="bogus"):
        DistillConfig.from_dict({"bogus": 1})
    (tmp_path / "c.yaml").write_text("stage: 2\ntau: 2.0\nglobal_batch_size: 8\n")
    parser = argparse.ArgumentParser()
    add_distill_config_flags(parser)
    args = parser.parse_args(
        [
            "--config",
            str(tmp_path / "c.yaml"),
            "--lr-mixer",
            "3e-4",
            "--activation-checkpointing",
            "true",
            "--report-to",
            "tensorboard",
        ]
    )
    cfg = distill_config_from_flags(args)
    assert (cfg.tau, cfg.global_batch_size, cfg.lr_mixer, cfg.activation_checkpointing, cfg.report_to) == (
        2.0,
        8,
        3e-4,
        True,
        ("tensorboard",),
    )
    with pytest.raises(ConfigError, match="world size"):
        DistillConfig(global_batch_size=6).micro_batch(4)
    assert DistillConfig(global_batch_size=8, micro_batch_size=2).grad_accum(2) == 2
    a, b = DistillConfig(), DistillConfig(log_every_steps=7, kl_chunk_size=3)
    assert a.fingerprint() == b.fingerprint() != DistillConfig(tau=2.0).fingerprint()


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
