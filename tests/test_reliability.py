"""Reliability and security of run folders, on the command line with tiny teachers (docs/reliability.md lists
every case): no code runs from a received run folder, another teacher or other data never passes silently, one
writer per folder, a diverged training is no success, and bad input or a failing disk gets one clear line."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybrid_distill.artifacts import LOCK_FILE, STEP_FILE
from hybrid_distill.cli import main
from hybrid_distill.distill import latest_checkpoint, read_metrics
from hybrid_distill.distill.checkpointing import checkpoint_dirs, checkpoint_step
from hybrid_distill.tiny_teachers import tiny_teacher
from test_trainer_resume import finished, reopen

TEACHER = "tiny:llama-gqa"
SEQ, BATCH = 32, 2
STEP_TOKENS = SEQ * BATCH


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One token cache for the module: the built-in corpus tokenized once per sequence length."""
    return tmp_path_factory.mktemp("tokens")


def distill_args(run_dir: Path, cache: Path, *extra: str, teacher: str = TEACHER, steps: int = 4,
                 stage: int = 2) -> list[str]:
    return ["distill", "--teacher", teacher, "--run-dir", str(run_dir), "--stage", str(stage), "--seq-len", str(SEQ),
            "--global-batch-size", str(BATCH), "--target-tokens", str(steps * STEP_TOKENS), "--data-cache-dir",
            str(cache), "--max-data-tokens", "20000", "--eval-max-batches", "1", "--no-progress", *extra]


def checkpointed_run(run_dir: Path, cache: Path, capsys, *extra: str) -> list[str]:
    """A run with checkpoints at steps 1-3 of 4 (the newest two kept, unless ``extra`` says otherwise), stopped as
    if killed before the end; returns its command line."""
    args = distill_args(run_dir, cache, "--save-every-tokens", str(STEP_TOKENS), *extra)
    assert main(args) == 0
    capsys.readouterr()
    reopen(run_dir)
    assert [checkpoint_step(p) for p in checkpoint_dirs(run_dir)][-1] == 3
    return args


def one_error_line(capsys, command: str = "distill") -> str:
    """The command's stderr: exactly one line, the error (no traceback)."""
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith(f"hybrid-distill {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# 1. No code runs from a run folder


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("name", ["optimizer.pt", "model.pt"])
def test_a_planted_pickle_payload_is_refused_and_never_runs(tmp_path, cache, capsys, name):
    run, marker = tmp_path / "run", tmp_path / "marker"
    args = checkpointed_run(run, cache, capsys)
    planted = latest_checkpoint(run) / name
    torch.save({"state": Payload(marker)}, planted)
    assert main(args) == 2
    line = one_error_line(capsys)
    assert f"Refusing to load {planted}" in line and "run their code" in line
    assert not marker.exists() and not finished(run)
    assert checkpoint_step(latest_checkpoint(run)) == 3  # an altered file is no reason to fall back quietly


def test_pickle_files_of_earlier_versions_are_never_read(tmp_path, cache, capsys):
    """``trainer.pt`` and ``rng_rank0.pt`` (where the audit planted its payload) are not checkpoint files any more."""
    run, marker = tmp_path / "run", tmp_path / "marker"
    args = checkpointed_run(run, cache, capsys)
    for name in ("trainer.pt", "rng_rank0.pt"):
        torch.save({"state": Payload(marker)}, latest_checkpoint(run) / name)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] == 3
    assert not marker.exists() and finished(run)


# ----------------------------------------------------------------------------------------------
# 2. Another teacher or other data never passes silently


def test_a_teacher_overwritten_in_place_or_other_data_is_refused_by_name(tmp_path, cache, capsys):
    teacher = tmp_path / "teacher"
    tiny_teacher("llama-gqa", seed=0).save_pretrained(teacher)
    run = tmp_path / "run"
    args = distill_args(run, cache, "--tokenizer", "tiny", teacher=str(teacher))
    assert main(args) == 0
    capsys.readouterr()
    tiny_teacher("llama-gqa", seed=1).save_pretrained(teacher)  # same family and path, other weights
    assert main(args) == 2  # re-run of the finished folder
    line = one_error_line(capsys)
    assert "identity.teacher.weights:" in line and " -> " in line and "use a new run_dir" in line
    tiny_teacher("llama-gqa", seed=0).save_pretrained(teacher)
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["already_done"]

    other_data = [a if a != "20000" else "30000" for a in args]  # --max-data-tokens: other tokens come out
    assert main(other_data) == 2
    line = one_error_line(capsys)
    assert "identity.data.max_tokens: 20000 -> 30000" in line


def test_a_checkpoint_is_not_resumed_under_another_teacher(tmp_path, cache, capsys):
    teacher = tmp_path / "teacher"
    tiny_teacher("llama-gqa", seed=0).save_pretrained(teacher)
    run = tmp_path / "run"
    args = checkpointed_run(run, cache, capsys, "--tokenizer", "tiny")  # tiny:llama-gqa
    args[args.index("--teacher") + 1] = str(teacher)
    assert main(args) == 2
    line = one_error_line(capsys)
    # a local teacher is named by its weights, not its path (a run folder may move between machines)
    assert "identity.teacher.spec: 'tiny:llama-gqa' -> '<missing>'" in line and "identity.teacher.weights: '<missing>' -> " in line
    assert checkpoint_step(latest_checkpoint(run)) == 3 and not finished(run)


@pytest.mark.parametrize("other", ["tiny:qwen3-qknorm", "deeper"])
def test_distill_refuses_a_student_made_from_another_teacher(tmp_path, cache, capsys, other):
    student, layers = tmp_path / "student", 4
    if other == "deeper":  # same family, another layer count
        other, layers = str(tmp_path / "deeper-teacher"), 6
        tiny_teacher("llama-gqa", num_hidden_layers=layers).save_pretrained(other)
    assert main(["convert", "--teacher", other, "--mixers", ",".join(["gdn"] * layers), "--out", str(student)]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    assert main(distill_args(run, cache, "--student", str(student))) == 2
    line = one_error_line(capsys)
    assert str(student) in line and TEACHER in line
    assert ("model_type" in line) if "qwen3" in other else ("num_hidden_layers: 6 vs 4" in line)
    assert not run.exists()  # refused before training, before the run folder is made


def test_select_refuses_a_base_student_of_another_teacher_before_any_candidate(tmp_path, capsys, monkeypatch):
    from hybrid_distill.selection import recipe

    def no_candidates(*args, **kwargs):
        raise AssertionError("a candidate was started")

    monkeypatch.setattr(recipe, "run_candidate", no_candidates)
    student = tmp_path / "student"
    assert main(["convert", "--teacher", "tiny:qwen3-qknorm", "--mixers", "gdn,gdn,gdn,gdn", "--out", str(student)]) == 0
    capsys.readouterr()
    args = ["select", "--selector", "ga-s2", "--budget", "1", "--teacher", TEACHER, "--run-dir", str(tmp_path / "sel"),
            "--base", str(student), "--candidate-start", "stage2", "--no-progress"]
    assert main(args) == 2
    line = one_error_line(capsys, "select")
    assert f"base_student {student}" in line and TEACHER in line and "model_type" in line


# ----------------------------------------------------------------------------------------------
# 3. One writer per run folder


def plant_stale_lock(folder: Path) -> None:
    """The lock file a killed writer leaves: its holder (a process that no longer exists), no lock held."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": "x"}))


def pipeline_config(tmp_path: Path) -> Path:
    import yaml

    stage = {"target_tokens": 2 * STEP_TOKENS, "seq_len": SEQ, "global_batch_size": BATCH, "eval_max_batches": 1}
    cfg = {"teacher": TEACHER, "run_dir": str(tmp_path / "pipe"),
           "data": {"source": "default", "max_tokens": 20_000, "cache_dir": str(tmp_path / "tokens")},
           "stage1": stage, "stage2": stage}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("command", ["distill", "select", "run"])
def test_a_second_writer_is_refused_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path, cache, capsys, command,
                                                                                      lock_holder):
    if command == "distill":
        folder = tmp_path / "run"
        args = distill_args(folder, cache)
    elif command == "select":
        folder = tmp_path / "sel"
        args = ["select", "--teacher", TEACHER, "--run-dir", str(folder), "--selector", "uniform", "--budget", "1",
                "--no-progress"]
    else:
        folder = tmp_path / "pipe"
        args = ["run", str(pipeline_config(tmp_path)), "--stages", "stage1", "--no-progress"]
    holder = lock_holder(folder)
    assert main(args) == 2
    line = one_error_line(capsys, command)
    assert f"{folder} is in use by another process (host {socket.gethostname()}, pid {holder.pid}" in line
    holder.stdin.close()
    holder.wait()
    plant_stale_lock(folder)
    assert main(args) == 0
    if command == "distill":
        assert finished(folder)
    elif command == "select":
        assert (folder / "uniform" / "selection.json").is_file()
    else:
        assert json.loads((folder / "pipeline.json").read_text())["stages"]["stage1"]["tokens"] == 2 * STEP_TOKENS


# ----------------------------------------------------------------------------------------------
# 4. A diverged training is no success


def test_a_non_finite_loss_stops_the_stage_naming_where_it_began(tmp_path, cache, capsys):
    run = tmp_path / "run"
    # lr 1e6 without clipping: the first update blows the weights up, every later loss is NaN
    args = distill_args(run, cache, "--lr-mixer", "1e6", "--lr-other", "1e6", "--grad-clip", "0",
                        "--save-every-tokens", str(STEP_TOKENS), steps=12)
    assert main(args) == 2
    line = one_error_line(capsys)
    rows = read_metrics(run)
    began = next(r["step"] for r in rows if r["loss"] is None)
    assert f"not finite since step {began} " in line and str(run) in line
    assert not finished(run) and not (run / "final").exists()
    assert rows[-1]["step"] < 12  # stopped, not trained to the end
    for path in [run / STEP_FILE, run / "metrics.jsonl", *run.rglob("state.json")]:
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text
        for line_ in text.splitlines() if path.suffix == ".jsonl" else [text]:
            json.loads(line_)
    # no checkpoint holds a non-finite model: a resume starts from the last good one
    assert all(json.loads((c / "state.json").read_text())["step"] < began for c in checkpoint_dirs(run))


# ----------------------------------------------------------------------------------------------
# 5. Sequences longer than the teacher's positions


def test_seq_len_beyond_the_teachers_positions_is_refused_or_warned_with_rope_scaling(tmp_path, cache, capsys):
    short = tmp_path / "short-teacher"
    tiny_teacher("llama-gqa", max_position_embeddings=16).save_pretrained(short)
    run = tmp_path / "run"
    assert main(distill_args(run, cache, "--tokenizer", "tiny", teacher=str(short))) == 2
    line = one_error_line(capsys)
    assert "seq_len 32" in line and "max_position_embeddings 16" in line and str(short) in line
    assert not run.exists()

    scaled = tmp_path / "scaled-teacher"
    tiny_teacher("llama3-rope-tied", max_position_embeddings=16).save_pretrained(scaled)
    assert main(distill_args(run, cache, "--tokenizer", "tiny", teacher=str(scaled), steps=1)) == 0
    err = capsys.readouterr().err
    assert "seq_len 32" in err and "max_position_embeddings 16" in err and "llama3" in err and finished(run)


# ----------------------------------------------------------------------------------------------
# 6. One clear line instead of a traceback


def test_a_run_dir_that_is_a_file_is_named(tmp_path, cache, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert main(distill_args(path, cache)) == 2
    line = one_error_line(capsys)
    assert f"--run-dir {path} is a file" in line and path.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod cannot make a folder read-only")
def test_a_read_only_run_dir_is_named(tmp_path, cache, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert not os.access(folder, os.W_OK)
        assert main(distill_args(folder / "run", cache)) == 2
        assert str(folder) in one_error_line(capsys)
    finally:
        folder.chmod(0o755)


def test_malformed_distill_config_yaml_is_named_in_one_line(tmp_path, cache, capsys):
    bad = tmp_path / "stage.yaml"
    bad.write_text("stage: [2\nlr_mixer: : 1\n")
    assert main(distill_args(tmp_path / "run", cache, "--config", str(bad))) == 2
    line = one_error_line(capsys)
    assert f"{bad} is not valid YAML" in line and "line 2" in line
    assert not (tmp_path / "run").exists()


def test_student_and_teacher_vocab_mismatch_is_named_before_training(tmp_path, cache, capsys):
    teacher = tmp_path / "teacher-256"
    tiny_teacher("llama-gqa", vocab_size=256).save_pretrained(teacher)
    student = tmp_path / "student"
    assert main(["convert", "--teacher", TEACHER, "--mixers", "gdn,gdn,gdn,gdn", "--out", str(student)]) == 0
    capsys.readouterr()
    assert main(distill_args(tmp_path / "run", cache, "--student", str(student), "--tokenizer", "tiny",
                             teacher=str(teacher))) == 2
    assert "vocab_size: 512 vs 256" in one_error_line(capsys)


@pytest.mark.parametrize("base", ["teacher", "gpt2"])
def test_select_base_that_is_no_student_fails_before_the_first_candidate(tmp_path, capsys, monkeypatch, base):
    from hybrid_distill.selection import recipe

    def no_candidates(*args, **kwargs):
        raise AssertionError("a candidate was started")

    monkeypatch.setattr(recipe, "run_candidate", no_candidates)
    path = tmp_path / base
    if base == "teacher":  # a plain Llama model, not a hybrid student
        tiny_teacher("llama-gqa").save_pretrained(path)
    else:  # an architecture hybrid-distill does not support
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(path)
    args = ["select", "--selector", "ga-s2", "--budget", "1", "--teacher", TEACHER, "--run-dir", str(tmp_path / "sel"),
            "--base", str(path), "--candidate-start", "stage2", "--no-progress"]
    assert main(args) == 2
    line = one_error_line(capsys, "select")
    assert str(path) in line and "not a hybrid student" in line


def test_ctrl_c_says_where_to_resume_and_exits_130(tmp_path, cache, capsys, monkeypatch):
    from hybrid_distill.distill import trainer

    run = tmp_path / "run"
    args = distill_args(run, cache, "--save-every-tokens", str(STEP_TOKENS))
    step = trainer.Trainer._train_step
    calls = []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(self, *a, **kw)

    monkeypatch.setattr(trainer.Trainer, "_train_step", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"interrupted; run the same command again to resume ({run})" in err and "Traceback" not in err
    monkeypatch.setattr(trainer.Trainer, "_train_step", step)
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["resumed_from_step"] == 2


# ----------------------------------------------------------------------------------------------
# 7. Messages: a full disk, damaged checkpoint files, bad option values


def test_a_full_disk_while_saving_names_the_path(tmp_path, cache, capsys, monkeypatch):
    from hybrid_distill import fileio

    run = tmp_path / "run"
    save = torch.save

    def full_disk(obj, f, *a, **kw):  # torch.save writing into an open file on a full disk
        if not isinstance(f, (str, os.PathLike)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(distill_args(run, cache, "--save-every-tokens", str(STEP_TOKENS))) == 2
    line = one_error_line(capsys)
    assert "disk is full" in line and str(run / "checkpoints") in line and "model.pt" in line
    assert not list((run / "checkpoints").glob(".*tmp*"))  # the half-written checkpoint is gone
    monkeypatch.setattr(torch, "save", save)

    atomic_write = fileio.atomic_write

    def full_disk_at_the_end(path, write):  # the disk fills up as the finished run's record is written
        def write_then_fail(tmp):
            write(tmp)
            if Path(path).name == STEP_FILE and '"done"' in Path(tmp).read_text():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return atomic_write(path, write_then_fail)

    monkeypatch.setattr(fileio, "atomic_write", full_disk_at_the_end)
    assert main(distill_args(run, cache, "--save-every-tokens", str(STEP_TOKENS))) == 2
    line = one_error_line(capsys)
    assert "disk is full" in line and str(run / STEP_FILE) in line
    assert not finished(run)
    monkeypatch.setattr(fileio, "atomic_write", atomic_write)  # space freed: the same command finishes the run
    assert main(distill_args(run, cache, "--save-every-tokens", str(STEP_TOKENS))) == 0 and finished(run)


def test_a_truncated_optimizer_file_falls_back_to_the_previous_checkpoint_and_says_so(tmp_path, cache, capsys):
    run = tmp_path / "run"
    args = checkpointed_run(run, cache, capsys)
    previous, newest = checkpoint_dirs(run)
    damaged = newest / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert str(damaged) in err and f"falling back to {previous}" in err
    assert "resuming from step 2 (tokens 128)" in err
    assert json.loads(out)["resumed_from_step"] == 2 and finished(run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_a_truncated_optimizer_file_with_no_earlier_checkpoint_is_named(tmp_path, cache, capsys):
    run = tmp_path / "run"
    args = checkpointed_run(run, cache, capsys, "--keep-last", "1")
    damaged = latest_checkpoint(run) / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert main(args) == 2
    line = one_error_line(capsys)
    assert str(damaged) in line and "damaged" in line


@pytest.mark.parametrize("name", ["state.json", STEP_FILE])
def test_garbage_state_files_are_named(tmp_path, cache, capsys, name):
    run = tmp_path / "run"
    args = checkpointed_run(run, cache, capsys, "--keep-last", "1")
    path = latest_checkpoint(run) / name if name == "state.json" else run / name
    path.write_text("\x00garbage{")
    assert main(args) == 2
    line = one_error_line(capsys)
    assert str(path) in line


def test_bad_option_values_are_named(tmp_path, cache, capsys):
    for argv, option in (
        (["select", "--teacher", TEACHER, "--run-dir", str(tmp_path / "s"), "--selector", "uniform", "--budget", "abc"],
         "--budget"),
        (distill_args(tmp_path / "r", cache, "--mixer-options", "{bad"), "--mixer-options"),
        (["convert", "--teacher", TEACHER, "--out", str(tmp_path / "c"), "--mixer-options", "[1"], "--mixer-options"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert f"argument {option}:" in capsys.readouterr().err
    assert main(["eval", "--model", TEACHER, "--tasks", "kv_retrieval", "--lengths=-5", "--out", str(tmp_path / "e"),
                 "--device", "cpu"]) == 2
    assert "eval.lengths" in one_error_line(capsys, "eval")
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists() and not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------------------------
# 8. Leftovers and silence


def test_a_kill_during_the_final_save_leaves_nothing_behind_and_a_resume_is_announced(tmp_path, cache, capsys):
    run = tmp_path / "run"
    args = checkpointed_run(run, cache, capsys)
    leftover = run / ".final.tmp-k1ll3d"  # what a kill during the final model's write leaves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1024)
    half_checkpoint = run / "checkpoints" / ".step_4.tmp-k1ll3d"
    half_checkpoint.mkdir()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "resuming from step 3 (tokens 192)" in err
    assert not leftover.exists() and not half_checkpoint.exists()
    assert finished(run) and json.loads(out)["resumed_from_step"] == 3
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [LOCK_FILE]
