"""Layer selection end to end on a tiny teacher: GA-S2 / GR / AVG / SMART / distance / bypass / rule / random
selectors through `run_selection` and the CLI, candidate start points, null candidates and seeds, restart without
recomputation, failures, early stopping and racing, executors."""

from __future__ import annotations

import json
import math
import operator
import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

from hybrid_distill.artifacts import StaleStepError
from hybrid_distill.config import ConfigError
from hybrid_distill.data import DataConfig
from hybrid_distill.distill import read_metrics, read_progress
from hybrid_distill.layout import SelectionLayout
from hybrid_distill.selection import SelectionConfig, SelectionResult, run_selection, rules, train_base_student
from hybrid_distill.selection import candidates as cand_mod
from hybrid_distill.selection import recipe as recipe_mod
from hybrid_distill.selection.executors import InlineExecutor, LocalExecutor, make_executor

TEACHER = "tiny:llama-gqa"
SEQ, BATCH = 32, 4
STEP_TOKENS = SEQ * BATCH


def _stage(steps, **kw):
    return {"target_tokens": steps * STEP_TOKENS, "seq_len": SEQ, "global_batch_size": BATCH, "eval_max_batches": 2, **kw}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("select")
    data = DataConfig(source="default", max_tokens=40_000, cache_dir=str(root / "tokens"))
    stage1, base = train_base_student(TEACHER, root / "base", data, "gdn", _stage(3), _stage(2))
    return {"root": root, "data": data, "stage1": stage1, "base": base}


def _config(**kw):
    fields = dict(selector="ga-s2", budgets=[0.25, 0.5], stage2=_stage(4), snapshot_every_tokens=STEP_TOKENS,
                  snapshot_batches=2, null_candidates=0)
    fields.update(kw)
    return SelectionConfig(**fields)


def _run(env, run_dir, **kw):
    config = kw.pop("config", None) or _config(**kw)
    return run_selection(config, TEACHER, run_dir, data=env["data"], base_student=env["base"],
                         stage1_student=env["stage1"], progress=False)


def _candidate(root, kind, layer, seed=0, start="stage1"):
    return cand_mod.candidate_folder(root, kind, start, cand_mod.candidate_name(kind, layer, 0, seed))


def test_ga_s2_scores_are_held_out_kl_of_one_swap_candidates(env, tmp_path):
    sel = _run(env, tmp_path)
    assert sorted(sel.ranking) == [0, 1, 2, 3] and sel.candidate_start == "stage1" and sel.source == "s2"
    for layer in range(4):
        metrics = read_metrics(_candidate(tmp_path, "ga", layer) / "stage2", "eval")
        assert [r["tokens"] for r in metrics] == [STEP_TOKENS * i for i in (1, 2, 3, 4)]
        assert sel.scores[layer] == pytest.approx(-metrics[-1]["eval_kl"])  # I(l) = -held-out KL
        assert sel.candidates["ga"].kl[layer] == [r["eval_kl"] for r in metrics]
    best = max(range(4), key=lambda i: sel.scores[i])
    assert (sel.budgets["25%"].k, sel.budgets["25%"].layers, sel.budgets["25%"].adjacency) == (1, [best], 0)
    assert sel.budgets["50%"].layers == sorted(sel.ranking[:2]) == sel.set_for(0.5)
    assert sel.tokens["spent"] == sel.tokens["full_budget"] == 4 * 4 * STEP_TOKENS
    saved = SelectionResult.load(tmp_path / "ga-s2")
    assert saved.to_dict() == sel.to_dict() and saved.probe == "gdn"
    for png in ("importance.png", "selected_layers.png", "kl_ga.png", "stability_ga_k1.png"):
        assert (tmp_path / "ga-s2" / png).stat().st_size > 1000
    # GA-S1 reuses the same candidates (their Stage-1 loss); nothing is trained again.
    s1 = _run(env, tmp_path, selector="ga-s1")
    assert s1.candidates["ga"].reused == 4 and s1.tokens["spent"] == sel.tokens["spent"]
    losses = {i: json.loads((_candidate(tmp_path, "ga", i) / "stage1_eval.json").read_text())["s1_loss"] for i in range(4)}
    assert s1.ranking == sorted(range(4), key=lambda i: (losses[i], i))  # lower remaining MSE = more important


class _Recording:
    """Stands in for the trainer inside candidates: records the student it is handed, then trains it."""

    def __init__(self, real, seen):
        self.real, self.seen = real, seen

    def __call__(self, student, teacher, data, config, run_dir, **kw):
        self.seen.append((Path(run_dir), {k: v.detach().clone() for k, v in student.state_dict().items()}, config.seed))
        return self.real(student, teacher, data, config, run_dir, **kw)


def test_candidates_start_where_asked(env, tmp_path, monkeypatch):
    from hybrid_distill.checkpoint import load_student
    from hybrid_distill.surgery import load_teacher

    seen = []
    monkeypatch.setattr(cand_mod, "Trainer", _Recording(cand_mod.Trainer, seen))
    teacher, stage1, stage2 = (load_teacher(TEACHER).state_dict(), load_student(env["stage1"]).state_dict(),
                               load_student(env["base"]).state_dict())
    for start, base in (("stage1", stage1), ("stage2", stage2)):
        seen.clear()
        sel = _run(env, tmp_path / start, budgets=[1], stage2=_stage(1), candidate_start=start)
        assert sel.candidate_start == start and SelectionResult.load(tmp_path / start / "ga-s2").candidate_start == start
        for layer in range(4):
            [(_, weights, _)] = [s for s in seen if s[0] == _candidate(tmp_path / start, "ga", layer, start=start) / "stage2"]
            for key, value in weights.items():  # before training: the base, with layer l the teacher's attention
                ref = teacher[key] if key.startswith(f"model.layers.{layer}.self_attn.") else base[key]
                assert torch.equal(value, ref.to(value.dtype)), (start, layer, key)
    # The paper's Algorithm 1 as written: the Stage-2 student with layer l restored, Stage 1 again, then Stage 2.
    seen.clear()
    with pytest.raises(ConfigError, match="stage1 must give the candidates' Stage 1"):
        _config(candidate_start="stage2-s1")
    sel = _run(env, tmp_path / "s2s1", budgets=[1], stage2=_stage(1), stage1=_stage(1), candidate_start="stage2-s1")
    folder = _candidate(tmp_path / "s2s1", "ga", 2, start="stage2-s1")
    assert [s[0] for s in seen if s[0].parent == folder] == [folder / "stage1", folder / "stage2"]
    first = next(s[1] for s in seen if s[0] == folder / "stage1")
    assert all(torch.equal(v, (teacher[k] if k.startswith("model.layers.2.self_attn.") else stage2[k]).to(v.dtype))
               for k, v in first.items())
    assert read_progress(folder / "stage1").done and sel.tokens["per_candidate_stage1"] == STEP_TOKENS


def test_null_candidates_measure_the_noise_floor(env, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cand_mod, "Trainer", _Recording(cand_mod.Trainer, seen))
    sel = _run(env, tmp_path, budgets=[1, 2], null_candidates=3)
    null = sel.candidates["null"]
    assert sorted(null.kl) == [0, 1, 2] and all(len(v) == 4 for v in null.kl.values())
    starts = [s for s in seen if "null" in s[0].parent.name]
    assert [s[2] for s in starts] == [1, 2, 3]  # the null candidates differ in their data-order seed ...
    assert all(torch.equal(starts[0][1][k], s[1][k]) for s in starts[1:] for k in starts[0][1])  # ... not their weights
    assert len({v for v in null.kl_initial.values()}) == 1  # the same student before training
    assert len({tuple(v) for v in null.kl.values()}) == 3  # trained on other batches: other curves
    floor = sel.noise_floor[-1]
    kls = [v[-1] for v in null.kl.values()]
    assert floor["null_mean"] == pytest.approx(sum(kls) / 3) and floor["null_std"] > 0
    for layer, delta in floor["delta"].items():
        assert delta == pytest.approx(sel.candidates["ga"].kl[int(layer)][-1] - floor["null_mean"])
    assert floor["snr"] == pytest.approx(floor["spread"] / floor["null_std"])
    ordered = sorted(v[-1] for v in sel.candidates["ga"].kl.values())
    assert sel.budgets["K=1"].resolved == (ordered[1] - ordered[0] > 2 * floor["null_std"])
    assert sel.tokens["candidates"] == 4 + 3 and (tmp_path / "ga-s2" / "kl_ga.png").is_file()


def test_candidate_seeds_average_the_scores(env, tmp_path):
    sel = _run(env, tmp_path, budgets=[1], stage2=_stage(2), candidate_seeds=[5], candidate_seed_layers=[0, 2])
    ga = sel.candidates["ga"]
    assert sorted(ga.seed_kl) == [0, 2] and all(sorted(v) == [0, 5] for v in ga.seed_kl.values())
    for layer in (0, 2):
        assert ga.kl[layer][-1] == pytest.approx(sum(ga.seed_kl[layer].values()) / 2)
    assert _candidate(tmp_path, "ga", 2, seed=5).is_dir() and not _candidate(tmp_path, "ga", 1, seed=5).exists()
    assert sel.tokens["candidates"] == 6


def test_gr_avg_smart_and_distance_selectors(env, tmp_path):
    gr = _run(env, tmp_path, selector="gr-s2")
    folders = sorted((tmp_path / "candidates" / "gr").iterdir())
    assert len(folders) == 4 and all(json.loads((f / "step.json").read_text())["settings"]["mixers"].count("gdn") == 1
                                     for f in folders)
    kl = {k: v[-1] for k, v in gr.candidates["gr"].kl.items()}
    assert gr.ranking == sorted(range(4), key=lambda i: (-kl[i], i))  # removal that hurts most = most important
    ga = _run(env, tmp_path, selector="ga-s2")
    avg = _run(env, tmp_path, selector="avg-s2")
    assert avg.candidates["ga"].reused == 4 and avg.candidates["gr"].reused == 4
    pos = {i: ga.ranking.index(i) + gr.ranking.index(i) for i in range(4)}
    assert avg.ranking == sorted(range(4), key=lambda i: (pos[i], ga.ranking.index(i)))
    smart = _run(env, tmp_path, selector="smart")
    assert smart.ranking is None and all(len(e.layers) == e.k for e in smart.budgets.values())
    dist = _run(env, tmp_path, config=_config(selector="ga-s2-dist", distance_lambda=0.0))
    assert {label: b.layers for label, b in dist.budgets.items()} == {label: b.layers for label, b in ga.budgets.items()}
    far = _run(env, tmp_path, config=_config(selector="ga-s2-dist", distance_lambda=1e3, distance_sigma=1.0, budgets=[2]))
    first = ga.ranking[0]
    chosen = far.budgets["K=2"].layers
    assert first in chosen and abs(chosen[0] - chosen[1]) == max(abs(first - j) for j in range(4))


def test_bypass_rule_and_random_selectors(env, tmp_path):
    for selector in ("act-mse", "lm-ppl"):
        sel = _run(env, tmp_path, config=_config(selector=selector, task_length=SEQ, bypass_batches=2, batch_size=2))
        assert sorted(sel.ranking) == [0, 1, 2, 3] and len(sel.scores) == 4 and sel.degenerate is None
    uni = _run(env, tmp_path, config=_config(selector="uniform", budgets=[1, 2]))
    assert uni.budgets["K=2"].layers == [1, 3] and uni.scores is None
    given = _run(env, tmp_path, config=_config(selector="given", layers=[3, 0]))
    assert list(given.budgets.values())[0].layers == [0, 3]
    rnd = _run(env, tmp_path, config=_config(selector="random", budgets=[2], random_sets=4, seed=7))
    sets = rnd.budgets["K=2"].sets
    assert len(sets) == 4 and all(len(s) == 2 == len(set(s)) for s in sets) and rnd.budgets["K=2"].layers == sets[0]
    assert sets == rules.random_layer_sets(4, 2, 4, seed=7) == _run(env, tmp_path, config=_config(
        selector="random", budgets=[2], random_sets=4, seed=7)).budgets["K=2"].sets  # seeded
    with pytest.raises(ValueError, match="K = 1..3 softmax layers"):
        _run(env, tmp_path, config=_config(selector="uniform", budgets=[4]))
    with pytest.raises(ConfigError, match="SelectionConfig.selector"):
        SelectionConfig(selector="best-guess")


def test_bypass_scores_are_reused_until_their_settings_change(env, tmp_path, monkeypatch):
    config = _config(selector="act-mse", task_length=SEQ, bypass_batches=2, batch_size=2)
    first = _run(env, tmp_path, config=config)
    assert SelectionLayout(tmp_path).scores("act-mse").joinpath("step.json").is_file()
    calls = []
    real = recipe_mod.bypass_scores
    monkeypatch.setattr(recipe_mod, "bypass_scores", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    again = _run(env, tmp_path, config=config.replace(budgets=[1]))  # budgets do not decide the scores
    assert calls == [] and again.scores == first.scores and again.bypass["batches"] == first.bypass["batches"]
    other = _run(env, tmp_path, config=config.replace(bypass_batches=1))  # scoring settings do
    assert len(calls) == 1 and other.bypass["batches"] == 1
    kv = _config(selector="kv", budgets=[1], task_length=160, task_samples=4, batch_size=4)
    _run(env, tmp_path, config=kv)
    reused = _run(env, tmp_path, config=kv)  # a degenerate verdict is reused with its scores
    assert len(calls) == 2 and "tie-break noise" in reused.degenerate


def test_a_task_the_teacher_cannot_do_gives_no_ranking(env, tmp_path):
    sel = _run(env, tmp_path, config=_config(selector="kv", budgets=[1], task_length=160, task_samples=4, batch_size=4))
    assert sel.bypass["baseline"]["accuracy"] == 0.0  # a random-weight teacher retrieves nothing
    assert "tie-break noise" in sel.degenerate and sel.budgets == {} and sel.ranking is None
    details = {"baseline": {"accuracy": 0.9}, "num_samples": 100, "task": "kv_retrieval", "length": 512,
               "details": {0: {"accuracy_drop": 0.05}, 1: {"accuracy_drop": 0.02}}}
    assert "by more than its noise" in recipe_mod.degenerate_task(details)  # 2 x sqrt(0.9 x 0.1 / 100) = 0.06 > 0.05
    details["details"][1]["accuracy_drop"] = 0.5
    assert recipe_mod.degenerate_task(details) is None


def test_uniform_places_its_layers_at_block_ends_by_default():
    assert SelectionConfig().uniform_anchor == "end"
    assert rules.uniform_layers(16, 4, anchor="end") == [3, 7, 11, 15]
    assert rules.uniform_layers(28, 7, anchor="end") == [3, 7, 11, 15, 19, 23, 27]
    assert rules.uniform_layers(16, 4, anchor="center") == [2, 6, 10, 14]


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

    monkeypatch.setattr(recipe_mod, "run_candidate", dies_on_third)
    with pytest.raises(_Killed):
        _run(env, tmp_path)
    assert trained == [0, 1]

    def counting(job):
        out = real(job)
        trained.append((job["layer"], out["reused"]))
        return out

    trained.clear()
    monkeypatch.setattr(recipe_mod, "run_candidate", counting)
    sel = _run(env, tmp_path)
    assert trained == [(0, True), (1, True), (2, False), (3, False)]
    assert sel.candidates["ga"].reused == 2
    with pytest.raises(StaleStepError, match=r"other settings.*stage2\.target_tokens"):  # a changed budget: no reuse
        _run(env, tmp_path, stage2=_stage(5))


def test_a_base_student_retrained_in_place_is_not_reused(env, tmp_path):
    """Candidates record a fingerprint of the base's weights, not only its path: a base overwritten by another run
    (same path, same shapes) must not silently score from the old candidates."""
    import shutil

    from safetensors.torch import load_file, save_file

    from hybrid_distill.checkpoint import weights_fingerprint

    stage1 = tmp_path / "stage1"
    shutil.copytree(env["stage1"], stage1)
    config = _config(budgets=[1], stage2=_stage(1))

    def select(data=env["data"], student=stage1):
        return run_selection(config, TEACHER, tmp_path / "sel", data=data, base_student=env["base"],
                             stage1_student=str(student), progress=False)

    select()
    assert select().candidates["ga"].reused == 4
    # the same weights elsewhere (a moved run directory) and the token cache moved: candidates are kept
    moved = tmp_path / "moved"
    shutil.copytree(stage1, moved)
    assert select(env["data"].replace(cache_dir=str(tmp_path / "tokens-moved")), moved).candidates["ga"].reused == 4
    before = weights_fingerprint(stage1)
    weights = load_file(str(stage1 / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in weights.items()}, str(stage1 / "model.safetensors"), metadata={"format": "pt"})
    assert weights_fingerprint(stage1) != before
    with pytest.raises(StaleStepError, match=r"other settings.*base:"):
        select()


def test_candidate_failures_are_reported_and_bugs_raised(env, tmp_path, monkeypatch):
    from hybrid_distill.selection.executors import CandidateFailure, JobError

    real = cand_mod.run_candidate
    calls = []

    def flaky(job):
        calls.append(job["layer"])
        if job["layer"] == 3:
            raise CandidateFailure("loss diverged at step 2")
        if job["layer"] == 1 and calls.count(1) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(job)

    monkeypatch.setattr(recipe_mod, "run_candidate", flaky)
    sel = _run(env, tmp_path, budgets=[1])
    assert calls.count(3) == 1 and calls.count(1) == 2 and calls.count(0) == 1  # the out-of-memory one retried
    assert list(sel.candidates["ga"].failures) == [3] and "loss diverged" in sel.candidates["ga"].failures[3]
    assert sorted(sel.ranking) == [0, 1, 2]

    def buggy(job):
        raise KeyError("no such field")

    monkeypatch.setattr(recipe_mod, "run_candidate", buggy)
    with pytest.raises(JobError, match="KeyError"):
        _run(env, tmp_path / "bug", budgets=[1])


def test_early_stop_fires_per_budget_and_racing_saves_tokens(env, tmp_path):
    full = _run(env, tmp_path / "full", stage2=_stage(8), budgets=[1, 2])
    early = run_selection(_config(stage2=_stage(8), budgets=[1, 2], early_stop=True, early_stop_window=2,
                                  early_stop_min_jaccard=0.5),
                          TEACHER, tmp_path / "early", data=env["data"], base_student=env["base"],
                          stage1_student=env["stage1"], reference=tmp_path / "full" / "ga-s2", progress=False)
    stop = early.candidates["ga"].stop_by_budget
    assert all(v is not None for v in stop.values()) and max(stop.values()) < 7  # fired before the last snapshot
    assert early.tokens["spent"] < full.tokens["spent"]
    kls = early.candidates["ga"].kl
    for label, budget in early.budgets.items():  # each budget takes its set at its own stop snapshot
        s = stop[budget.k]
        assert budget.stop_snapshot == s
        assert budget.layers == sorted(sorted(range(4), key=lambda i: (kls[i][s], i))[: budget.k])
        sets = [sorted(sorted(range(4), key=lambda i: (kls[i][j], i))[: budget.k]) for j in range(s + 1)]
        assert rules.EarlyStopRule(window=2, min_jaccard=0.5).first_stop(sets, budget.k) == s
    assert 0.0 <= early.reference["jaccard"]["K=1"] <= 1.0
    assert early.reference["tokens_saved_fraction"] == pytest.approx(1 - early.tokens["spent"] / full.tokens["spent"])

    racing = run_selection(_config(stage2=_stage(8), budgets=[1], racing=True, racing_keep_fraction=0.5,
                                   racing_min_keep=2, round_snapshots=2),
                           TEACHER, tmp_path / "racing", data=env["data"], base_student=env["base"],
                           stage1_student=env["stage1"], progress=False)
    eliminated = racing.candidates["ga"].eliminated
    assert len(eliminated) == 2 and racing.tokens["spent"] < full.tokens["spent"]
    survivors = [i for i in range(4) if i not in eliminated]
    assert sorted(racing.ranking[:2]) == survivors  # survivors rank above every eliminated candidate

    # Replaying the full run's snapshots through the round logic gives what the live runs did.
    from hybrid_distill.selection.replay import replay_selection

    rep = replay_selection(tmp_path / "full" / "ga-s2", early_stop=True, early_stop_window=2, early_stop_min_jaccard=0.5)
    assert rep["stop_snapshot"] == {str(k): v for k, v in stop.items()}
    assert rep["budgets"]["1"]["layers"] == early.budgets["K=1"].layers
    assert rep["budgets"]["1"]["full_layers"] == full.budgets["K=1"].layers
    assert rep["tokens_spent"] == early.tokens["spent"] and rep["full_tokens"] == full.tokens["spent"]
    rep = replay_selection(full, early_stop=False, racing=True, racing_keep_fraction=0.5, racing_min_keep=2,
                           round_snapshots=2, budgets=[1])  # racing keeps enough candidates for the largest budget
    assert rep["eliminated_round"] == {"ga": {str(k): v for k, v in eliminated.items()}}
    assert rep["ranking"] == racing.ranking and rep["tokens_spent"] == racing.tokens["spent"]
    rep = replay_selection(full, early_stop=False)  # no rounds: the full run itself
    assert rep["tokens_spent"] == full.tokens["spent"] and rep["ranking"] == full.ranking
    with pytest.raises(ConfigError, match="full-budget"):
        replay_selection(early)


def test_defaults_give_the_early_stopping_rule_room_and_cheap_snapshots():
    cfg = SelectionConfig(stage2={"target_tokens": 100_000_000, "seq_len": 4096, "global_batch_size": 8})
    assert cfg.snapshot_interval() * 40 == 100_000_000 and cfg.round_snapshots == 1 and cfg.early_stop_window == 10
    batch_tokens = 8 * 4096
    per_snapshot = cfg.snapshot_eval_batches(batch_tokens) * batch_tokens
    # a snapshot runs teacher + student forward (~4N FLOPs a token), training ~8N a token: at most 10% of the compute
    assert 4 * per_snapshot <= 0.1 * 8 * cfg.snapshot_interval() and cfg.snapshot_eval_batches(batch_tokens) >= 1
    assert SelectionConfig(snapshot_batches=3).snapshot_eval_batches(batch_tokens) == 3
    # the schedule counts the batches a candidate's trainer evaluates: its micro-batch, or eval_batch_size
    micro = SelectionConfig(stage2={"target_tokens": 100_000_000, "seq_len": 4096, "global_batch_size": 8,
                                    "micro_batch_size": 2})
    interval, batches = micro.snapshot_schedule()
    assert interval == 2_500_000 and batches == 2_500_000 // (5 * 2 * 4096)
    assert 0.9 * interval / 5 <= batches * 2 * 4096 <= interval / 5
    sized = SelectionConfig(stage2={**micro.stage2, "eval_batch_size": 4})
    assert sized.snapshot_schedule()[1] == 2_500_000 // (5 * 4 * 4096)


def test_restart_replays_paused_rounds(env, tmp_path, monkeypatch):
    """A selection killed while its candidates are paused (early stopping in rounds) resumes them where they
    stopped; an identical re-run of a finished one trains nothing and gives the same result."""
    kw = dict(stage2=_stage(6), budgets=[3], early_stop=True, early_stop_window=2, early_stop_min_jaccard=0.5,
              executor="local", workers=1)
    first = _run(env, tmp_path, **kw)
    assert first.candidates["ga"].stop_by_budget == {3: 1}  # K=3 of 4: any two top-3 sets satisfy the rule
    calls = []
    real = cand_mod.run_candidate

    def counting(job):
        out = real(job)
        calls.append((job["layer"], out["reused"], out["stage2_tokens"]))
        return out

    monkeypatch.setattr(recipe_mod, "run_candidate", counting)
    again = _run(env, tmp_path, **{**kw, "executor": "inline"})
    assert calls == [(layer, True, r * STEP_TOKENS) for r in (1, 2) for layer in range(4)]
    assert again.candidates["ga"].kl == first.candidates["ga"].kl and again.budgets["K=3"].layers == first.budgets["K=3"].layers


def test_select_cli_end_to_end(tmp_path, capsys):
    from hybrid_distill.cli import main

    args = ["select", "--selector", "ga-s2", "--budget", "0.25", "--teacher", TEACHER, "--run-dir", str(tmp_path),
            "--data-cache-dir", str(tmp_path / "tok"), "--max-data-tokens", "40000", "--seq-len", str(SEQ),
            "--global-batch-size", str(BATCH), "--candidate-tokens", str(2 * STEP_TOKENS),
            "--snapshot-every", str(STEP_TOKENS), "--base-stage1-tokens", str(2 * STEP_TOKENS),
            "--base-stage2-tokens", "0", "--null-candidates", "2", "--no-progress"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["budgets"]["25%"]) == 1 and sorted(out["ranking"]) == [0, 1, 2, 3]
    assert out["candidate_start"] == "stage1" and out["resolved"]["25%"] in (True, False)
    assert (tmp_path / "ga-s2" / "selection.json").is_file() and read_progress(tmp_path / "base" / "stage1").done
    assert main(args[:4] + ["4"] + args[5:]) == 2  # budget = number of layers: clear error, exit code 2
    assert "layers" in capsys.readouterr().err
    # a config file's selector and budgets hold unless a flag is given
    (tmp_path / "sel.yaml").write_text(yaml.safe_dump({"selector": "uniform", "budgets": [1, 2]}))
    rest = ["--teacher", TEACHER, "--run-dir", str(tmp_path / "u"), "--config", str(tmp_path / "sel.yaml"), "--no-progress"]
    assert main(["select", *rest]) == 0
    assert json.loads(capsys.readouterr().out)["budgets"] == {"K=1": [3], "K=2": [1, 3]}
    assert main(["select", *rest, "--budget", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["budgets"] == {"K=3": [0, 1, 3]}


def test_replay_cli(env, tmp_path, capsys):
    from hybrid_distill.cli import main

    _run(env, tmp_path, stage2=_stage(6), budgets=[1])
    assert main(["replay", str(tmp_path / "ga-s2"), "--racing", "--keep-fraction", "0.5", "--round-snapshots", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["racing"] and not out["early_stop"] and out["settings"]["round_snapshots"] == 2
    assert 0 < out["tokens_spent"] < out["full_tokens"] and out["budgets"]["1"]["full_layers"]
    assert main(["replay", str(tmp_path / "ga-s2")]) == 2
    assert "--early-stop, --racing" in capsys.readouterr().err


# -- executors --------------------------------------------------------------------------------------


def _sqrt_or_fail(x: float) -> float:
    """Module-level (picklable): -1 fails transiently, -2 as the job's own failure, -3 with a bug."""
    from hybrid_distill.selection.executors import CandidateFailure

    if x == -1:
        raise ConnectionResetError("lost the node")
    if x == -2:
        raise CandidateFailure("loss diverged")
    if x == -3:
        raise TypeError("a bug")
    return math.sqrt(x)


def test_inline_executor_retries_transient_failures_only_and_raises_bugs():
    from hybrid_distill.config import ConfigError
    from hybrid_distill.selection.executors import JobError

    outs = InlineExecutor(retries=1, progress=False).map(_sqrt_or_fail, [4.0, -1.0, 9.0, -2.0])
    assert [o.value for o in outs if o.ok] == [2.0, 3.0]
    assert (outs[1].kind, outs[1].attempts) == ("transient", 2) and "lost the node" in outs[1].error
    assert (outs[3].kind, outs[3].attempts) == ("failed", 1) and "loss diverged" in outs[3].error
    with pytest.raises(JobError, match="(?s)not a candidate failure.*TypeError: a bug"):
        InlineExecutor(retries=3, progress=False).map(_sqrt_or_fail, [1.0, -3.0])

    def bad_setting(_):
        raise ConfigError("stage2.tau must be > 0")

    with pytest.raises(ConfigError, match="tau"):  # a user error keeps its type: the command line prints its message
        InlineExecutor(retries=3, progress=False).map(bad_setting, [0])


def test_local_executor_runs_jobs_in_worker_processes():
    ex = LocalExecutor(workers=2, retries=1, progress=False, threads_per_worker=1)
    try:
        outs = ex.map(_sqrt_or_fail, [16.0, -1.0, 25.0])
        pids = ex.map(_os_getpid_of, [0, 1, 2, 3])
    finally:
        ex.close()
    assert [o.value for o in outs] == [4.0, None, 5.0] and outs[1].attempts == 2 and outs[1].kind == "transient"
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
        # a closed port refuses the connection: a transient failure from a function the workers can import
        outs = ex.map(operator.neg, [1, 2]) + ex.map(socket.create_connection, [("127.0.0.1", 1)])
        # Set after Ray started its workers: only the executor can hand it on (as to workers on other nodes).
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        confs = ex.map(os.getenv, ["PYTORCH_CUDA_ALLOC_CONF"])
    finally:
        ex.close()
        if name == "ray":
            import ray

            ray.shutdown()
    assert [o.value for o in outs[:2]] == [-1, -2]
    assert not outs[2].ok and outs[2].attempts == 2 and "Connection refused" in outs[2].error
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
    assert SelectionLayout("r").selection_file("ga-s2") == Path("r/ga-s2/selection.json")


def test_removal_candidates_need_the_stage1_student(env, tmp_path):
    with pytest.raises(ValueError, match=r"gr-s2 starts candidates from the all-linear student after Stage 1.*stage1_student"):
        run_selection(_config(selector="gr-s2"), TEACHER, tmp_path / "gr", data=env["data"], base_student=env["base"],
                      progress=False)
    assert not list((tmp_path / "gr").rglob("candidate.json"))
