"""`hybrid-distill outcome` over fabricated run folders: the paper's table against hand-computed means, its
difference column against `paired_difference` and `endpoint()`, every budget, the selection diagnostics read from
`SelectionResult`, ranking agreement across seeds and start points, missing pieces listed, bad input refused."""

import json

import numpy as np
import pytest

from hybrid_distill.cli import main
from hybrid_distill.evaluation.stats import StatsError, paired_difference, sample_scores
from hybrid_distill.layout import RunLayout
from hybrid_distill.pipeline.endpoint import endpoint
from hybrid_distill.pipeline.models import hybrid_name
from hybrid_distill.pipeline.outcome import outcome
from hybrid_distill.selection.result import BudgetSet, CandidateScoring, SelectionResult

TASKS, LENGTHS, N, L = ["kv_retrieval", "vt_2chains"], [1024, 2048], 24, 16

SETS = {
    "ga-s2": {2: [[0, 7]], 4: [[0, 3, 7, 12]], 8: [[0, 1, 3, 5, 7, 9, 12, 14]]},
    "uniform": {2: [[7, 15]], 4: [[3, 7, 11, 15]], 8: [[1, 3, 5, 7, 9, 11, 13, 15]]},
    "lm-ppl": {2: [[0, 1]], 4: [[0, 1, 2, 3]], 8: [[0, 1, 2, 3, 4, 5, 6, 7]]},
    "random": {2: [[1, 5], [2, 6], [4, 9]], 4: [[1, 5, 9, 13], [2, 6, 10, 14], [4, 8, 9, 10]],
               8: [[0, 2, 4, 6, 8, 10, 12, 14], [1, 2, 3, 4, 5, 6, 7, 8], [8, 9, 10, 11, 12, 13, 14, 15]]},
}
ACC = {(0, 7): 0.4, (0, 3, 7, 12): 0.8, (0, 1, 3, 5, 7, 9, 12, 14): 0.9, (3, 7, 11, 15): 0.3, (0, 1, 2, 3): 0.5,
       (1, 5, 9, 13): 0.2, (2, 6, 10, 14): 0.25, (4, 8, 9, 10): 0.6}  # other sets: 0.3
TEACHER, LINEAR = 0.95, 0.05


def _acc(layers) -> float:
    return ACC.get(tuple(layers), 0.3)


def _evaluate(layout: RunLayout, name: str, acc: float, u: dict, tasks=TASKS) -> None:
    """``eval/<name>/results.json``: sample i scores 1 when u_i < acc (the same u_i for every model of the run:
    paired samples); held-out KL 1 - acc; plus a cell outside the tasks asked for."""
    preds = [{"task": t, "length": n, "index": i, "score": float(u[(t, n, i)] < acc)} for (t, n, i) in u
             if t in tasks] + [{"task": "ar", "length": 1024, "index": 0, "score": 1.0}]
    folder = layout.eval(name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"recall": {"predictions": preds}, "quality": {"kl": 1 - acc}}))


def _learned(selector: str, budgets: dict[int, list[list[int]]], scores: dict[int, float], start: str) -> SelectionResult:
    """A GA-S2 selection with candidates, a noise floor per snapshot (snr 1, 2, 3, 4) and early stopping that fired
    for K = 4 at snapshot 1 and did not for the other budgets; K = 4's boundary inside the null band."""
    tokens = [1000, 2000, 3000, 4000]
    sets = {f"K={k}": BudgetSet.of(k, s, L, stop_snapshot=1 if k == 4 else None, resolved=k != 4)
            for k, s in budgets.items()}
    floors = [{"null_mean": 1.0, "null_std": 0.01 * (i + 1), "delta": {}, "spread": 0.1, "snr": float(i + 1)}
              for i in range(4)]
    ga = CandidateScoring(kind="ga", start=start, snapshot_tokens=tokens, kl={}, kl_initial={}, s1_loss={})
    return SelectionResult(
        selector=selector, teacher="t", num_layers=L, config={}, data={}, created="now", budgets=sets, source="s2",
        candidate_start=start, scores=scores, candidates={"ga": ga}, noise_floor=floors,
        early_stop={"enabled": True, "stop_snapshot": {"2": None, "4": 1, "8": None},
                    "stop_tokens": {"2": None, "4": 2000, "8": None}},
        tokens={"spent": 30_000, "saved_fraction": 0.25})


def _run(root, seed: int, sets=SETS, scores=None, tasks=TASKS, extra: dict | None = None, degenerate=()):
    """A run folder: a selection per selector with ``sets`` per budget, every chosen set evaluated, the teacher and
    the all-linear student evaluated. Returns (folder, the run's u_i)."""
    layout = RunLayout(root)
    rng = np.random.default_rng(seed)
    u = {(t, n, i): rng.random() for t in tasks for n in LENGTHS for i in range(N)}
    scores = scores or {layer: -0.01 * layer for layer in range(L)}
    for selector, budgets in {**sets, **(extra or {})}.items():
        if selector.startswith("ga-s2"):
            sel = _learned(selector, budgets, scores, "stage2" if "@" in selector else "stage1")
        else:
            sel = SelectionResult(selector=selector, teacher="t", num_layers=L, config={}, data={}, created="now",
                                  budgets={} if selector in degenerate else
                                  {f"K={k}": BudgetSet.of(k, s, L) for k, s in budgets.items()},
                                  degenerate="teacher cannot do the task" if selector in degenerate else None)
        sel.save(layout.selection.selection_file(selector))
    for layers in {tuple(s) for budgets in sets.values() for chosen in budgets.values() for s in chosen}:
        _evaluate(layout, hybrid_name(list(layers), "gdn"), _acc(layers), u, tasks)
    for name in {tuple(s) for budgets in (extra or {}).values() for chosen in budgets.values() for s in chosen}:
        _evaluate(layout, hybrid_name(list(name), "gdn"), _acc(name), u, tasks)
    _evaluate(layout, "teacher", TEACHER, u, tasks)
    _evaluate(layout, "all-gdn", LINEAR, u, tasks)
    return root, u


def _mean(us, acc, task=None) -> float:
    """Hand-computed recall: per run the share of samples (of ``task``) with u_i < acc, averaged over runs."""
    return float(np.mean([np.mean([u[k] < acc for k in u if task is None or k[0] == task]) for u in us]))


def _scores_of(run, layers) -> dict:
    return sample_scores(json.loads((RunLayout(run).eval(hybrid_name(layers, "gdn")) / "results.json").read_text()),
                         TASKS, LENGTHS)


def test_table_means_and_differences_match_hand_computed_means_stats_and_endpoint_at_every_budget(tmp_path):
    (r0, u0), (r1, u1) = (_run(tmp_path / f"seed{s}", s) for s in (0, 1))
    res = outcome([r0, r1], resamples=300)
    assert res.tasks == TASKS and res.lengths == LENGTHS  # the cells every evaluation shares ("ar" only in some: no)
    assert [(b.label, b.k) for b in res.budgets] == [("K=2", 2), ("K=4", 4), ("K=8", 8)]
    for b in res.budgets:
        names = [r.name for r in b.rows]
        assert names == ["ga-s2", "lm-ppl", "uniform", "random #1", "random #2", "random #3", "teacher", "all-gdn"]
        for row in b.rows:
            acc = {"teacher": TEACHER, "all-gdn": LINEAR}.get(row.name) or _acc(row.layers[0])
            assert row.runs == 2 and row.recall == pytest.approx(_mean([u0, u1], acc))
            assert row.per_task == pytest.approx({t: _mean([u0, u1], acc, t) for t in TASKS})
            assert row.kl == pytest.approx(1 - acc)
        selector, ga = b.row("lm-ppl"), SETS["ga-s2"][b.k][0]
        reference = paired_difference([_scores_of(r, ga) for r in (r0, r1)],
                                      [_scores_of(r, selector.layers[0]) for r in (r0, r1)], resamples=300)
        assert selector.versus_primary.to_dict() == reference.to_dict()
        assert b.row("ga-s2").versus_primary is None and b.row("teacher").versus_primary.mean < 0
        preregistered = endpoint([r0, r1], b.label, TASKS, LENGTHS, resamples=300).to_dict()  # every baseline
        assert b.endpoint.to_dict() == {**preregistered, "missing": {}}  # less the baselines no run folder has
        assert set(preregistered["missing"]) == {"gr-s2", "avg-s2", "act-mse", "smart", "ar", "kv"}
        best = b.row(b.endpoint.best_baseline)
        assert best.versus_primary.to_dict() == b.endpoint.versus_best.to_dict()
        assert b.row("uniform").versus_primary.to_dict() == b.endpoint.versus_uniform.to_dict()
    k4 = res.budget("K=4")
    assert k4.endpoint.best_baseline == "lm-ppl" and k4.endpoint.versus_best.verdict == "a > b"
    assert k4.row("random #3").layers == [[4, 8, 9, 10]] * 2
    summary = res.summary()
    d = k4.endpoint.versus_best
    assert f"At K = 4 (2 seed(s)), ga-s2 recall {k4.row('ga-s2').recall:.3f}" in summary
    assert f"minus the best baseline (lm-ppl, {best_recall(k4):.3f}) = {d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]: " \
           "supported" in summary
    assert "interval lies above 0 supports" in summary and f"Teacher recall {_mean([u0, u1], TEACHER):.3f}" in summary
    text = res.markdown()
    assert "## K = 2 of 16 (budget K=2)" in text and "## K = 8 of 16 (budget K=8)" in text
    json.dumps(res.to_dict())


def best_recall(b) -> float:
    return b.row(b.endpoint.best_baseline).recall


def test_selection_diagnostics_are_read_from_the_selection_result(tmp_path):
    run, _ = _run(tmp_path / "seed0", 0, degenerate=("lm-ppl",))
    res = outcome([run], resamples=100)
    ga = next(d for d in res.diagnostics if d.selector == "ga-s2")
    sel = SelectionResult.load(RunLayout(run).selection.selection_file("ga-s2"))
    by_label = {x.label: x for x in ga.budgets}
    assert by_label["K=4"].early_stop == "fired" and by_label["K=4"].stop_snapshot == 1
    assert by_label["K=4"].stop_tokens == 2000
    assert by_label["K=4"].snr == sel.noise_floor[1]["snr"] == 2.0 and by_label["K=4"].null_std == 0.02
    assert by_label["K=4"].resolved is False and by_label["K=8"].resolved is True
    for label in ("K=2", "K=8"):  # not fired: the set (and the noise floor) of the last snapshot
        assert by_label[label].early_stop == "not fired" and by_label[label].stop_tokens is None
        assert by_label[label].snr == sel.noise_floor[-1]["snr"] == 4.0
    assert ga.tokens_spent == 30_000 and ga.candidate_start == "stage1"
    uniform = next(d for d in res.diagnostics if d.selector == "uniform")
    assert all(x.early_stop is None and x.snr is None for x in uniform.budgets)
    lm = next(d for d in res.diagnostics if d.selector == "lm-ppl")
    assert lm.degenerate == "teacher cannot do the task" and lm.budgets == []
    text = res.markdown()
    assert "snapshot 1 (2,000 tokens)" in text and "not fired" in text and "inside: not a finding" in text
    assert "Degenerate: lm-ppl in run #1: teacher cannot do the task" in text
    assert res.budget("K=4").missing["lm-ppl"] == ["degenerate: teacher cannot do the task in run #1"]


@pytest.mark.parametrize("reverse, rho", [(False, 1.0), (True, -1.0)])
def test_ranking_agreement_across_seeds_and_start_points(tmp_path, reverse, rho):
    scores = {layer: -0.01 * layer for layer in range(L)}
    other = {layer: (0.01 * layer if reverse else v) for layer, v in scores.items()}
    stage2 = {"ga-s2@stage2": {2: [[0, 7]], 4: [[0, 3, 8, 13]], 8: [[0, 1, 2, 3, 4, 5, 6, 7]]}}
    r0, _ = _run(tmp_path / "seed0", 0, scores=scores, extra=stage2)
    r1, _ = _run(tmp_path / "seed1", 1, scores=other, extra=stage2)
    res = outcome([r0, r1], budgets=["4", "0.5", "K=2"], resamples=100)
    assert [b.label for b in res.budgets] == ["K=2", "K=4", "K=8"]  # a count, a ratio (8 of 16) and a label
    (across,) = [a for a in res.seed_agreement if a.selector_a == "ga-s2"]
    assert (across.run_a, across.run_b, across.layers) == (0, 1, L) and across.spearman == pytest.approx(rho)
    assert across.jaccard == {"K=2": 1.0, "K=4": 1.0, "K=8": 1.0}  # the same sets in both runs
    starts = {a.run_a: a for a in res.start_agreement}
    assert set(starts) == {0, 1} and all(a.selector_b == "ga-s2@stage2" for a in starts.values())
    assert starts[0].jaccard == pytest.approx({"K=2": 1.0, "K=4": 2 / 6, "K=8": 5 / 11})  # K=4: {0, 3} of 6
    assert starts[1].spearman == pytest.approx(1.0)  # both start points scored alike within a run
    assert "ga-s2@stage2" in [r.name for r in res.budget("K=4").rows]


def test_missing_pieces_are_listed_and_rows_pair_the_runs_they_have(tmp_path):
    r0, u0 = _run(tmp_path / "seed0", 0)
    r1, _ = _run(tmp_path / "seed1", 1, sets={k: v for k, v in SETS.items() if k != "lm-ppl"})
    uniform_eval = RunLayout(r1).eval(hybrid_name([3, 7, 11, 15], "gdn"))
    (uniform_eval / "results.json").unlink()  # uniform's K = 4 hybrid not evaluated in run #2
    res = outcome([r0, r1], budgets=["4"], resamples=200)
    (b,) = res.budgets
    assert b.missing["lm-ppl"] == ["no selection in run #2"]
    assert b.missing["uniform"] == [f"not evaluated in run #2 (no {uniform_eval}/results.json)"]
    lm, uniform = b.row("lm-ppl"), b.row("uniform")
    assert lm.models[1] is None and lm.layers == [[0, 1, 2, 3], None] and lm.runs == 1
    assert lm.recall == pytest.approx(_mean([u0], 0.5)) and lm.versus_primary.seeds == 1
    assert lm.versus_primary.mean == pytest.approx(_mean([u0], 0.8) - _mean([u0], 0.5))
    assert uniform.runs == 1 and uniform.versus_primary.seeds == 1
    # the endpoint keeps to selectors evaluated in every run folder: neither is in it
    assert set(b.endpoint.missing) >= {"lm-ppl", "uniform"} and b.endpoint.best_baseline is None
    assert b.row("ga-s2").runs == 2
    text = res.markdown()
    assert "- lm-ppl: no selection in run #2" in text
    assert "no baseline evaluated in every run folder" in res.summary() and "missing piece(s)" in res.summary()


def test_run_folders_that_share_no_tasks_or_nothing_comparable_are_refused(tmp_path):
    r0, _ = _run(tmp_path / "a", 0, tasks=["kv_retrieval"])
    r1, _ = _run(tmp_path / "b", 1, tasks=["vt_2chains"])
    with pytest.raises(StatsError, match=r"differ in their recall tasks: .*a lacks vt_2chains.*b lacks kv_retrieval.*"
                                         r"share none"):
        outcome([r0, r1], resamples=10)
    with pytest.raises(StatsError, match=r"b: no evaluation there covers kv_retrieval@1024"):
        outcome([r0, r1], tasks=["kv_retrieval"], resamples=10)
    empty = tmp_path / "empty"
    SelectionResult(selector="uniform", teacher="t", num_layers=L, config={}, data={}, created="now",
                    budgets={"K=4": BudgetSet.of(4, [[3, 7, 11, 15]], L)}).save(
        RunLayout(empty).selection.selection_file("uniform"))
    with pytest.raises(StatsError, match=rf"{empty} holds no evaluation with recall predictions"):
        outcome([r0, empty], resamples=10)
    with pytest.raises(StatsError, match=r"holds no selection"):
        outcome([tmp_path / "a" / "eval"], resamples=10)
    with pytest.raises(StatsError, match=r"no selection in the run folders has budget 3 \(K=3\)"):
        outcome([r0], budgets=["3"], resamples=10)


def test_cli_writes_both_files_for_the_budgets_asked(tmp_path, capsys):
    runs = [str(_run(tmp_path / f"seed{s}", s)[0]) for s in (0, 1)]
    out = tmp_path / "outcome"
    assert main(["outcome", *runs, "--out", str(out), "--budgets", "4", "--resamples", "200",
                 "--lengths", "1024,2048"]) == 0
    data = json.loads((out / "outcome.json").read_text())
    assert [b["label"] for b in data["budgets"]] == ["K=4"] and data["lengths"] == LENGTHS
    assert data["budgets"][0]["endpoint"]["best_baseline"] == "lm-ppl"
    text = (out / "outcome.md").read_text()
    assert "## K = 4 of 16" in text and "K = 2" not in text and "K = 8" not in text
    assert data["summary"] in text and data["summary"] in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["outcome", *runs, "--out", str(out), "--lengths", "a,b"])
    assert main(["outcome", runs[0], "--out", str(out), "--tasks", "cwe"]) == 2
    assert "no evaluation there covers cwe@1024" in capsys.readouterr().err
