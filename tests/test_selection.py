"""Layer selection end to end on a tiny teacher: GA-S2 / GR / AVG / SMART / distance / bypass / rule
selectors through `run_selection` and the CLI, candidate construction, restart without recomputation,
retries and failure reports, early stopping and racing, executors."""

from __future__ import annotations

import json
import math
import operator
import os
from pathlib import Path

import pytest
import torch

from hybrid_distill.distill import read_metrics, read_progress
from hybrid_distill.distill.config import ConfigError
from hybrid_distill.selection import SelectionConfig, run_selection, selected_layers, train_base_student
from hybrid_distill.selection import candidates as cand_mod
from hybrid_distill.selection import runner as runner_mod
from hybrid_distill.selection.executors import InlineExecutor, LocalExecutor, make_executor

TEACHER = "tiny:llama-gqa"
SEQ, BATCH = 32, 4
STEP_TOKENS = SEQ * BATCH


def _stage(steps, **kw):
    return {"target_tokens": steps * STEP_TOKENS, "seq_len": SEQ, "global_batch_size": BATCH, "eval_max_batches": 2, **kw}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    data = {"source": "default", "max_tokens": 40_000, "cache_dir": str(root / "tokens")}
    stage1, base = train_base_student(TEACHER, root / "base", data, "gdn", _stage(3), _stage(2))
    return {"root": root, "data": data, "stage1": stage1, "base": base}


def _config(**kw):
    fields = dict(selector="ga-s2", budgets=[0.25, 0.5], stage2=_stage(4), snapshot_every_tokens=STEP_TOKENS)
    fields.update(kw)
    return SelectionConfig(**fields)


def _run(env, run_dir, **kw):
    config = kw.pop("config", None) or _config(**kw)
    return run_selection(config, TEACHER, run_dir, data=env["data"], base_student=env["base"],
                         stage1_student=env["stage1"], progress=False)


def test_ga_s2_scores_are_held_out_kl_of_one_swap_candidates(env, tmp_path):
    sel = _run(env, tmp_path)
    assert sorted(sel["ranking"]) == [0, 1, 2, 3]
    for layer in range(4):
        metrics = read_metrics(tmp_path / "candidates" / "ga" / f"layer_{layer:02d}" / "stage2", "eval")
        assert [r["tokens"] for r in metrics] == [STEP_TOKENS * i for i in (1, 2, 3, 4)]
        assert sel["scores"][str(layer)] == pytest.approx(-metrics[-1]["eval_kl"])  # I(l) = -held-out KL
        assert sel["snapshots"]["ga"]["kl"][str(layer)] == [r["eval_kl"] for r in metrics]
    best = max(range(4), key=lambda i: sel["scores"][str(i)])
    assert sel["budgets"]["25%"] == {"k": 1, "layers": [best], "adjacency": 0, "expected_adjacency": 0.0}
    assert sel["budgets"]["50%"]["layers"] == sorted(sel["ranking"][:2])
    assert selected_layers(sel, 0.5) == sel["budgets"]["50%"]["layers"]
    assert sel["tokens"]["spent"] == sel["tokens"]["full_budget"] == 4 * 4 * STEP_TOKENS
    saved = json.loads((tmp_path / "ga-s2" / "selection.json").read_text())
    assert saved["ranking"] == sel["ranking"] and saved["probe"] == "gdn"
    for png in ("importance.png", "selected_layers.png", "kl_ga.png", "stability_ga_k1.png"):
        assert (tmp_path / "ga-s2" / png).stat().st_size > 1000
    # GA-S1 reuses the same candidates (their Stage-1 loss); nothing is trained again.
    s1 = _run(env, tmp_path, selector="ga-s1")
    assert s1["candidates"]["reused"] == 4 and s1["tokens"]["spent"] == sel["tokens"]["spent"]
    losses = {i: json.loads((tmp_path / "candidates/ga" / f"layer_{i:02d}" / "stage1_eval.json").read_text())["s1_loss"] for i in range(4)}
    assert s1["ranking"] == sorted(range(4), key=lambda i: (losses[i], i))  # lower remaining MSE = more important


def test_candidate_students_are_one_swaps(env, tmp_path):
    from hybrid_distill.checkpoint import load_student
    from hybrid_distill.surgery import derive_student, load_teacher

    teacher, base, stage1 = load_teacher(TEACHER), load_student(env["base"]), load_student(env["stage1"])
    ga = derive_student(teacher, base, ["gdn", "softmax", "gdn", "gdn"])
    gr = derive_student(teacher, stage1, ["softmax", "softmax", "gdn", "softmax"])
    t, b, s1 = teacher.state_dict(), base.state_dict(), stage1.state_dict()
    for key, value in ga.state_dict().items():
        ref = t[key] if key.startswith("model.layers.1.self_attn.") else b[key]
        assert torch.equal(value, ref), key  # layer 1 restored to the teacher's attention, the rest from base
    for key, value in gr.state_dict().items():
        ref = s1[key] if key.startswith("model.layers.2.self_attn.") else t[key]
        assert torch.equal(value, ref), key  # greedy removal starts from the teacher, layer 2 Stage-1 mixer
    assert gr.config.mixers == ["softmax", "softmax", "gdn", "softmax"]


def test_gr_avg_smart_and_distance_selectors(env, tmp_path):
    gr = _run(env, tmp_path, selector="gr-s2")
    assert all(m.count("gdn") == 1 for m in (json.loads(p.read_text())["mixers"]
                                             for p in (tmp_path / "candidates" / "gr").glob("*/candidate.json")))
    kl = {int(k): v[-1] for k, v in gr["snapshots"]["gr"]["kl"].items()}
    assert gr["ranking"] == sorted(range(4), key=lambda i: (-kl[i], i))  # removal that hurts most = most important
    ga = _run(env, tmp_path, selector="ga-s2")
    avg = _run(env, tmp_path, selector="avg-s2")
    assert avg["candidates"]["reused"] == 8
    pos = {i: ga["ranking"].index(i) + gr["ranking"].index(i) for i in range(4)}
    assert avg["ranking"] == sorted(range(4), key=lambda i: (pos[i], ga["ranking"].index(i)))
    smart = _run(env, tmp_path, selector="smart")
    assert smart["ranking"] is None and all(len(e["layers"]) == e["k"] for e in smart["budgets"].values())
    dist = _run(env, tmp_path, config=_config(selector="ga-s2-dist", distance_lambda=0.0))
    assert dist["budgets"] == ga["budgets"]  # lambda = 0 is plain GA-S2
    far = _run(env, tmp_path, config=_config(selector="ga-s2-dist", distance_lambda=1e3, distance_sigma=1.0, budgets=[2]))
    first = ga["ranking"][0]
    chosen = far["budgets"]["K=2"]["layers"]
    assert first in chosen and abs(chosen[0] - chosen[1]) == max(abs(first - j) for j in range(4))


def test_bypass_and_rule_selectors(env, tmp_path):
    for selector in ("act-mse", "lm-ppl"):
        sel = _run(env, tmp_path, config=_config(selector=selector, task_length=SEQ, bypass_batches=2, batch_size=2))
        assert sorted(sel["ranking"]) == [0, 1, 2, 3] and len(sel["scores"]) == 4
    uni = _run(env, tmp_path, config=_config(selector="uniform", budgets=[1, 2]))
    assert uni["budgets"]["K=2"]["layers"] == [1, 3] and uni["scores"] is None
    given = _run(env, tmp_path, config=_config(selector="given", layers=[3, 0]))
    assert list(given["budgets"].values())[0]["layers"] == [0, 3]
    with pytest.raises(ValueError, match="K = 1..3 softmax layers"):
        _run(env, tmp_path, config=_config(selector="uniform", budgets=[4]))
    with pytest.raises(ConfigError, match="SelectionConfig.selector"):
        SelectionConfig(selector="best-guess")


class _Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so no executor catches it."""


def test_restart_recomputes_nothing_finished(env, tmp_path, monkeypatch):
    real = cand_mod.run_candidate
    trained = []

    def dies_on_third(job):
        if len(trained) == 2:
            raise _Killed
        out = real(job)
        trained.append(job["layer"])
        return out

    monkeypatch.setattr(runner_mod, "run_candidate", dies_on_third)
    with pytest.raises(_Killed):
        _run(env, tmp_path)
    assert trained == [0, 1]

    def counting(job):
        out = real(job)
        trained.append((job["layer"], out["reused"]))
        return out

    trained.clear()
    monkeypatch.setattr(runner_mod, "run_candidate", counting)
    sel = _run(env, tmp_path)
    assert trained == [(0, True), (1, True), (2, False), (3, False)]
    assert sel["candidates"]["reused"] == 2
    with pytest.raises(ValueError, match="other settings"):  # a changed budget must not silently reuse
        _run(env, tmp_path, stage2=_stage(5))


def test_a_base_student_retrained_in_place_is_not_reused(env, tmp_path):
    """Candidates record a fingerprint of the base's weights, not only its path: a base overwritten by
    another run (same path, same shapes) must not silently score from the old candidates."""
    import shutil

    from safetensors.torch import load_file, save_file

    from hybrid_distill.checkpoint import weights_fingerprint

    base = tmp_path / "base"
    shutil.copytree(env["base"], base)
    config = _config(budgets=[1], stage2=_stage(1))
    run_selection(config, TEACHER, tmp_path / "sel", data=env["data"], base_student=str(base),
                  stage1_student=env["stage1"], progress=False)
    assert run_selection(config, TEACHER, tmp_path / "sel", data=env["data"], base_student=str(base),
                         stage1_student=env["stage1"], progress=False)["candidates"]["reused"] == 4
    # the same weights elsewhere (a moved run directory) and the token cache moved: candidates are kept
    moved = tmp_path / "moved-base"
    shutil.copytree(base, moved)
    data = {**env["data"], "cache_dir": str(tmp_path / "tokens-moved")}
    assert run_selection(config, TEACHER, tmp_path / "sel", data=data, base_student=str(moved),
                         stage1_student=env["stage1"], progress=False)["candidates"]["reused"] == 4
    before = weights_fingerprint(base)
    weights = load_file(str(base / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(base / "model.safetensors"), metadata={"format": "pt"})
    assert weights_fingerprint(base) != before
    with pytest.raises(ValueError, match=r"other settings.*base_weights"):
        run_selection(config, TEACHER, tmp_path / "sel", data=env["data"], base_student=str(base),
                      stage1_student=env["stage1"], progress=False)


def test_failed_candidate_is_retried_once_then_reported(env, tmp_path, monkeypatch):
    real = cand_mod.run_candidate
    calls = []

    def flaky(job):
        calls.append(job["layer"])
        if job["layer"] == 3:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        if job["layer"] == 1 and calls.count(1) == 1:
            raise RuntimeError("transient")
        return real(job)

    monkeypatch.setattr(runner_mod, "run_candidate", flaky)
    sel = _run(env, tmp_path, budgets=[1])
    assert calls.count(3) == 2 and calls.count(1) == 2 and calls.count(0) == 1
    assert list(sel["failed"]) == ["ga-3"] and "out of memory" in sel["failed"]["ga-3"]
    assert sorted(sel["ranking"]) == [0, 1, 2]


def test_early_stop_and_racing_save_tokens(env, tmp_path):
    full = _run(env, tmp_path / "full", stage2=_stage(6), budgets=[1])
    early = run_selection(_config(stage2=_stage(6), budgets=[1], early_stop=True, early_stop_window=2,
                                  early_stop_min_jaccard=0.5, round_snapshots=2),
                          TEACHER, tmp_path / "early", data=env["data"], base_student=env["base"],
                          stage1_student=env["stage1"], reference=tmp_path / "full" / "ga-s2", progress=False)
    stop = early["early_stop"]["stop_snapshot"]["ga"]
    assert stop is not None and stop >= 1
    sets = early["snapshots"]["ga"]["sets"]["1"]
    assert sets[stop] == sets[stop - 1]  # window of 2 with |union| <= K+1 and backbone >= K-1: the rule held
    assert early["tokens"]["spent"] < full["tokens"]["spent"]
    kl_at_stop = {int(k): v[stop] for k, v in early["snapshots"]["ga"]["kl"].items()}
    assert early["ranking"][0] == min(kl_at_stop, key=lambda i: (kl_at_stop[i], i))
    assert 0.0 <= early["reference"]["jaccard"]["K=1"] <= 1.0
    assert early["reference"]["tokens_saved_fraction"] == pytest.approx(1 - early["tokens"]["spent"] / full["tokens"]["spent"])

    racing = run_selection(_config(stage2=_stage(6), budgets=[1], racing=True, racing_keep_fraction=0.5,
                                   racing_min_keep=2, round_snapshots=2),
                           TEACHER, tmp_path / "racing", data=env["data"], base_student=env["base"],
                           stage1_student=env["stage1"], reference=tmp_path / "full" / "ga-s2", progress=False)
    eliminated = racing["racing"]["eliminated_round"]["ga"]
    assert len(eliminated) == 2 and racing["tokens"]["spent"] < full["tokens"]["spent"]
    survivors = [i for i in range(4) if str(i) not in eliminated]
    assert sorted(racing["ranking"][:2]) == survivors  # survivors rank above every eliminated candidate
    assert "K=1" in racing["reference"]["jaccard"]

    # Replaying the full run's snapshots through the round logic gives what the live runs did.
    from hybrid_distill.selection.replay import replay_selection

    rep = replay_selection(tmp_path / "full" / "ga-s2", early_stop=True, early_stop_window=2, early_stop_min_jaccard=0.5,
                           round_snapshots=2)
    assert rep["stop_snapshot"] == early["early_stop"]["stop_snapshot"]
    assert rep["budgets"]["1"]["layers"] == early["budgets"]["K=1"]["layers"]
    assert rep["budgets"]["1"]["full_layers"] == full["budgets"]["K=1"]["layers"]
    assert rep["tokens_spent"] == early["tokens"]["spent"] and rep["full_tokens"] == full["tokens"]["spent"]
    rep = replay_selection(tmp_path / "full" / "ga-s2", early_stop=False, racing=True, racing_keep_fraction=0.5,
                           racing_min_keep=2, round_snapshots=2)
    assert rep["eliminated_round"] == racing["racing"]["eliminated_round"]
    assert rep["ranking"] == racing["ranking"] and rep["tokens_spent"] == racing["tokens"]["spent"]
    rep = replay_selection(full, early_stop=False)  # no rounds: the full run itself
    assert rep["tokens_spent"] == full["tokens"]["spent"] and rep["ranking"] == full["ranking"]
    with pytest.raises(ValueError, match="full-budget"):
        replay_selection(early)


# A snapshot interval the tokens per optimizer step do not divide (the usual case): the trainer logs each
# snapshot at the first step at or past k * interval and pauses a round at the first step at or past its
# pause point, so a round ends (and logs its last snapshot) above the pause point. Rounds of 2 snapshots:
# pause at 320 tokens -> paused after step 3 (384 tokens) with snapshots at 256 and 384.
OVERSHOOT = dict(stage2=_stage(4), snapshot_every_tokens=STEP_TOKENS * 5 // 4, round_snapshots=2)
# K=3 of 4 layers: any two top-3 sets have Jaccard >= 0.5 and share >= 2 layers, so a window of 2 always
# stops at the second snapshot: the early stop happens in round 1, whatever the scores.
OVERSHOOT_EARLY = dict(OVERSHOOT, budgets=[3], early_stop=True, early_stop_window=2, early_stop_min_jaccard=0.5)


@pytest.fixture(scope="module")
def overshoot(env, tmp_path_factory):
    """A full-budget run and a live early-stopped run (paused after round 1) with OVERSHOOT rounds."""
    root = tmp_path_factory.mktemp("overshoot")
    full = _run(env, root / "full", budgets=[3], **OVERSHOOT)
    early = _run(env, root / "early", **OVERSHOOT_EARLY)
    return {"root": root, "full": full, "early": early}


def _outcome(sel):
    keys = ("ranking", "scores", "score_tables", "budgets", "snapshots", "early_stop", "racing", "rounds", "tokens")
    return {k: sel[k] for k in keys}


def _rerun_counting(env, run_dir, monkeypatch, **kw):
    calls = []
    real = cand_mod.run_candidate

    def counting(job):
        out = real(job)
        calls.append((job["layer"], out["reused"], out["stage2_tokens"]))
        return out

    monkeypatch.setattr(runner_mod, "run_candidate", counting)
    return _run(env, run_dir, **kw), calls


def test_paused_candidates_refuse_other_settings(env, overshoot, tmp_path, monkeypatch):
    import dataclasses
    import shutil

    early_dir = overshoot["root"] / "early"
    layer0 = early_dir / "candidates" / "ga" / "layer_00"
    metrics = (layer0 / "stage2" / "metrics.jsonl").read_text()
    calls = []
    monkeypatch.setattr(runner_mod, "run_candidate", lambda job: calls.append(job) or cand_mod.run_candidate(job))
    config = _config(**OVERSHOOT_EARLY)
    with pytest.raises(ValueError, match=r"partly trained candidate trained with other settings.*base_weights: .*delete"):
        run_selection(config, TEACHER, early_dir, data=env["data"], base_student=env["stage1"],  # another base student
                      stage1_student=env["stage1"], progress=False)
    with pytest.raises(ValueError, match=r"other settings.*stage2\.lr_other"):
        _run(env, early_dir, config=_config(**{**OVERSHOOT_EARLY, "stage2": _stage(4, lr_other=1e-5)}))
    with pytest.raises(ValueError, match=r"other settings.*data\.max_tokens"):
        run_selection(config, TEACHER, early_dir, data={**env["data"], "max_tokens": 30_000}, base_student=env["base"],
                      stage1_student=env["stage1"], progress=False)
    assert calls == [] and (layer0 / "stage2" / "metrics.jsonl").read_text() == metrics  # refused before any work

    # A partly trained candidate without a settings record (an older version's) cannot be checked: refused too.
    copy = tmp_path / "layer_00"
    shutil.copytree(layer0, copy)
    (copy / "job.json").unlink()
    job = cand_mod.CandidateJob(kind="ga", layer=0, run_dir=str(copy), teacher=TEACHER, base_student=env["base"],
                                mixers=["softmax", "gdn", "gdn", "gdn"], data=env["data"], stage1=None,
                                stage2=_stage(4), pause_at_tokens=320)
    with pytest.raises(ValueError, match="no record of its settings"):
        cand_mod.run_candidate(job)
    assert cand_mod.check_reusable(dataclasses.replace(job, run_dir=str(tmp_path / "new"))) is None  # nothing there yet


def test_restart_and_replay_see_the_live_rounds_when_snapshots_overshoot(env, overshoot, monkeypatch):
    from hybrid_distill.selection.replay import replay_selection

    root, full, early = overshoot["root"], overshoot["full"], overshoot["early"]
    assert full["snapshots"]["ga"]["tokens"] == [256, 384, 512]
    assert early["early_stop"]["stop_snapshot"] == {"ga": 1} and early["early_stop"]["stop_tokens"] == {"ga": 384}
    assert early["snapshots"]["ga"]["tokens"] == [256, 384] and early["tokens"]["spent"] == 4 * 384
    for layer in range(4):  # paused, not finished
        assert not (root / "early" / "candidates" / "ga" / f"layer_{layer:02d}" / "candidate.json").exists()

    # An identical re-run in the same directory trains nothing and gives the live result.
    again, calls = _rerun_counting(env, root / "early", monkeypatch, **OVERSHOOT_EARLY)
    assert calls == [(layer, True, 384) for layer in range(4)]
    assert _outcome(again) == _outcome(early) and again["candidates"]["reused"] == 4
    # Replaying the full run reports what the live run did and spent.
    rep = replay_selection(full, early_stop=True, early_stop_window=2, early_stop_min_jaccard=0.5, round_snapshots=2)
    assert rep["stop_snapshot"] == {"ga": 1} and rep["stop_tokens"] == {"ga": 384}
    assert rep["tokens_spent"] == early["tokens"]["spent"]
    assert rep["budgets"]["3"]["layers"] == early["budgets"]["K=3"]["layers"]

    # Racing: round 1 (paused at 384 tokens) eliminates 2 of 4; the survivors finish.
    racing_cfg = dict(OVERSHOOT, budgets=[1], racing=True, racing_keep_fraction=0.5, racing_min_keep=2)
    monkeypatch.setattr(runner_mod, "run_candidate", cand_mod.run_candidate)
    racing = _run(env, root / "racing", **racing_cfg)
    eliminated = racing["racing"]["eliminated_round"]["ga"]
    assert len(eliminated) == 2 and racing["tokens"]["spent"] == 2 * 384 + 2 * 512
    again, calls = _rerun_counting(env, root / "racing", monkeypatch, **racing_cfg)
    assert all(reused for _, reused, _ in calls) and _outcome(again) == _outcome(racing)
    full1 = _run(env, root / "full", budgets=[1], **OVERSHOOT)  # the full run's candidates, K=1
    assert full1["candidates"]["reused"] == 4
    rep = replay_selection(full1, early_stop=False, racing=True, racing_keep_fraction=0.5, racing_min_keep=2,
                           round_snapshots=2)
    assert rep["eliminated_round"] == racing["racing"]["eliminated_round"] and rep["ranking"] == racing["ranking"]
    assert rep["tokens_spent"] == racing["tokens"]["spent"]


def test_replay_cli(env, tmp_path, capsys):
    from hybrid_distill.cli import main

    _run(env, tmp_path, stage2=_stage(6), budgets=[1])
    assert main(["replay", str(tmp_path / "ga-s2"), "--racing", "--keep-fraction", "0.5", "--round-snapshots", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["racing"] and not out["early_stop"] and out["settings"]["round_snapshots"] == 2
    assert 0 < out["tokens_spent"] < out["full_tokens"] and out["budgets"]["1"]["full_layers"]
    with pytest.raises(SystemExit, match="--early-stop, --racing"):
        main(["replay", str(tmp_path / "ga-s2")])


def test_select_cli_end_to_end(tmp_path, capsys):
    from hybrid_distill.cli import main

    args = ["select", "--selector", "ga-s2", "--budget", "0.25", "--teacher", TEACHER, "--run-dir", str(tmp_path),
            "--data-cache-dir", str(tmp_path / "tok"), "--max-data-tokens", "40000", "--seq-len", str(SEQ),
            "--global-batch-size", str(BATCH), "--candidate-tokens", str(2 * STEP_TOKENS),
            "--snapshot-every", str(STEP_TOKENS), "--base-stage1-tokens", str(2 * STEP_TOKENS),
            "--base-stage2-tokens", "0", "--no-progress"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["budgets"]["25%"]) == 1 and sorted(out["ranking"]) == [0, 1, 2, 3]
    assert (tmp_path / "ga-s2" / "selection.json").is_file() and read_progress(tmp_path / "base" / "stage1").done
    assert main(args[:4] + ["4"] + args[5:]) == 2  # budget = number of layers: clear error, exit code 2
    assert "layers" in capsys.readouterr().err


# -- executors --------------------------------------------------------------------------------------


def test_inline_executor_retries_and_reports():
    outs = InlineExecutor(retries=1, progress=False).map(math.sqrt, [4.0, -1.0, 9.0])
    assert [o.value for o in outs if o.ok] == [2.0, 3.0]
    assert not outs[1].ok and outs[1].attempts == 2 and "math domain error" in outs[1].error


def test_local_executor_runs_jobs_in_worker_processes():
    ex = LocalExecutor(workers=2, retries=1, progress=False, threads_per_worker=1)
    try:
        outs = ex.map(math.sqrt, [16.0, -4.0, 25.0])
        pids = ex.map(_os_getpid_of, [0, 1, 2, 3])
    finally:
        ex.close()
    assert [o.value for o in outs] == [4.0, None, 5.0] and outs[1].attempts == 2
    import os

    assert all(o.ok for o in pids) and os.getpid() not in {o.value for o in pids}


def _os_getpid_of(_):  # module-level: picklable by reference; spawned workers import this module
    import os

    return os.getpid()


@pytest.mark.parametrize("name", ["ray", "slurm"])
def test_cluster_executors(name, tmp_path, monkeypatch):
    pytest.importorskip("ray" if name == "ray" else "submitit")
    from hybrid_distill.cuda_allocator import ALLOCATOR_ENV_VARS

    for var in ALLOCATOR_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    options = {"init_options": {"num_cpus": 2, "include_dashboard": False}} if name == "ray" else {"cluster": "local", "timeout_min": 5}
    ex = make_executor(name, retries=1, options=options, folder=tmp_path / "logs", progress=False)
    try:
        outs = ex.map(operator.neg, [1, 2]) + ex.map(math.sqrt, [-1.0])
        # Set after Ray started its workers: only the executor can hand it on (as to workers on other nodes).
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        confs = ex.map(os.getenv, ["PYTORCH_CUDA_ALLOC_CONF"])
    finally:
        ex.close()
        if name == "ray":
            import ray

            ray.shutdown()
    assert [o.value for o in outs[:2]] == [-1, -2]
    assert not outs[2].ok and outs[2].attempts == 2 and "math domain error" in outs[2].error
    assert confs[0].value == "expandable_segments:True", confs[0].error


def test_worker_keeps_its_own_allocator_settings(monkeypatch):
    from hybrid_distill.selection.executors import _call

    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:256")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "")  # unset for torch; monkeypatch restores it afterwards
    driver = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert not _call(os.getenv, "PYTORCH_CUDA_ALLOC_CONF", driver)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    assert _call(os.getenv, "PYTORCH_CUDA_ALLOC_CONF", driver) == "expandable_segments:True"


def test_candidates_warm_up_by_default():
    def warmup(**stage2):
        return SelectionConfig(stage2=stage2).stage_config(2).warmup_tokens

    assert warmup() == 10_000_000  # 10% of the default 100M tokens
    assert warmup(target_tokens=40_960, global_batch_size=16, seq_len=256) == 3 * 4096  # 10% is 1 step: 3 steps
    assert warmup(target_tokens=20_480, global_batch_size=16, seq_len=256) == 6144  # 3 steps > 30%: 30%
    assert warmup(target_tokens=40_960, global_batch_size=16, seq_len=256, warmup_tokens=0) == 0  # explicit wins


def test_config_validation_names_fields():
    with pytest.raises(ConfigError, match="SelectionConfig.probe"):
        SelectionConfig(probe="mamba")
    with pytest.raises(ConfigError, match="SelectionConfig.stage2.*target_tokens"):
        SelectionConfig(stage2={"target_tokens": 0})
    with pytest.raises(ConfigError, match="SelectionConfig.layers"):
        SelectionConfig(selector="given")
    with pytest.raises(ConfigError, match="Unknown SelectionConfig field"):
        SelectionConfig.from_dict({"selecter": "ga-s2"})
    assert Path(runner_mod.selection_path("r", "ga-s2")) == Path("r/ga-s2/selection.json")


def test_removal_candidates_need_the_stage1_student(env, tmp_path):
    with pytest.raises(ValueError, match=r"gr-s2 trains greedy-removal candidates.*stage1_student"):
        run_selection(_config(selector="gr-s2"), TEACHER, tmp_path / "gr", data=env["data"], base_student=env["base"],
                      progress=False)
    assert not list((tmp_path / "gr").rglob("candidate.json"))
