"""The decisive comparison over run folders: selectors' hybrids found through their selections, compared on the
same samples, paired over seeds, against the best baseline, Uniform and the random sets."""

import json

import numpy as np
import pytest

from hybrid_distill.layout import RunLayout
from hybrid_distill.pipeline.endpoint import endpoint
from hybrid_distill.pipeline.models import hybrid_name
from hybrid_distill.selection.result import BudgetSet, SelectionResult

TASKS, LENGTHS, N = ["kv_retrieval", "vt_2chains"], [1024, 2048], 32


def _run(root, seed: int, sets: dict[str, list[list[int]]], accuracy: dict[str, float], kl: dict[str, float],
         degenerate: tuple[str, ...] = ()):
    """A run folder with one selection per selector (budget K = 4, labelled "K=4" as selections label it) and the evaluation of each chosen set: sample i
    of a model scores 1 when u_i < its accuracy, with the same u_i for every model of the run (paired samples)."""
    layout = RunLayout(root)
    rng = np.random.default_rng(seed)
    u = {(t, n, i): rng.random() for t in TASKS for n in LENGTHS for i in range(N)}
    for selector, chosen in sets.items():
        budgets = {} if selector in degenerate else {"K=4": BudgetSet.of(4, chosen, 16)}
        SelectionResult(selector=selector, teacher="t", num_layers=16, config={}, data={}, created="now",
                        budgets=budgets, degenerate="teacher cannot do the task" if selector in degenerate else None,
                        ).save(layout.selection.selection_file(selector))
    for layers in {tuple(s) for chosen in sets.values() for s in chosen}:
        name = hybrid_name(list(layers), "gdn")
        acc = accuracy[name]
        preds = [{"task": t, "length": n, "index": i, "score": float(u[(t, n, i)] < acc)}
                 for (t, n, i) in u] + [{"task": "ar", "length": 1024, "index": 0, "score": 1.0}]
        folder = layout.eval(name)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({"recall": {"predictions": preds}, "quality": {"kl": kl[name]}}))
    return root


SETS = {"ga-s2": [[0, 3, 7, 12]], "uniform": [[3, 7, 11, 15]], "lm-ppl": [[0, 1, 2, 3]], "ar": [[0, 1, 2, 3]],
        "random": [[1, 5, 9, 13], [2, 6, 10, 14], [4, 8, 9, 10]]}
NAMES = {tuple(s): hybrid_name(s, "gdn") for chosen in SETS.values() for s in chosen}
ACC = {NAMES[(0, 3, 7, 12)]: 0.8, NAMES[(3, 7, 11, 15)]: 0.3, NAMES[(0, 1, 2, 3)]: 0.5,
       NAMES[(1, 5, 9, 13)]: 0.2, NAMES[(2, 6, 10, 14)]: 0.25, NAMES[(4, 8, 9, 10)]: 0.6}
KL = {name: 1.0 - acc for name, acc in ACC.items()}  # lower KL, more recall: Spearman -1


def test_endpoint_compares_the_primary_with_the_best_baseline_and_uniform(tmp_path):
    runs = [_run(tmp_path / f"seed{s}", s, SETS, ACC, KL, degenerate=("ar",)) for s in (0, 1)]
    res = endpoint(runs, "4", TASKS, LENGTHS, resamples=500)  # as the pre-registration and a config write it
    assert res.budget == "K=4" and endpoint(runs, 4, TASKS, LENGTHS, resamples=500).to_dict() == res.to_dict()
    assert endpoint(runs, "K=4", TASKS, LENGTHS, resamples=500).to_dict() == res.to_dict()
    assert res.seeds == 2 and set(res.outcomes) == {"ga-s2", "uniform", "lm-ppl"}
    assert res.missing["ar"] == "teacher cannot do the task"  # degenerate: said, not ranked
    assert res.best_baseline == "lm-ppl"
    ga, best = res.outcomes["ga-s2"].recall, res.outcomes["lm-ppl"].recall
    assert res.versus_best.samples == len(TASKS) * len(LENGTHS) * N and res.versus_best.seeds == 2
    assert res.versus_best.mean == pytest.approx(ga - best) and res.versus_best.verdict == "a > b"
    assert res.versus_uniform.mean == pytest.approx(ga - res.outcomes["uniform"].recall)
    assert res.versus_uniform.mean > res.versus_best.mean
    assert ga == pytest.approx(0.8, abs=0.1)  # the "ar" cell outside the endpoint is left out
    assert res.outcomes["ga-s2"].random_percentile == 100.0 and res.outcomes["uniform"].random_percentile < 100.0
    assert len(res.random_recall) == 3 and res.outcomes["ga-s2"].layers == [[0, 3, 7, 12]] * 2
    assert res.spearman_kl_recall < -0.9 and res.hybrids_correlated == 2 * 6  # a set two selectors chose: once
    text = res.markdown()
    assert "ga-s2 − best baseline (lm-ppl)" in text and "a > b" in text and "ar: no outcome" in text
    json.dumps(res.to_dict())


def test_endpoint_with_equal_models_is_undecided_and_a_missing_primary_has_no_comparison(tmp_path):
    same = {name: 0.5 for name in ACC}
    runs = [_run(tmp_path / f"seed{s}", s, SETS, same, KL) for s in (0, 1)]
    res = endpoint(runs, "4", TASKS, LENGTHS, resamples=300)
    assert res.versus_best.mean == 0.0 and res.versus_best.verdict == "undecided"
    res = endpoint(runs, "2", TASKS, LENGTHS, resamples=100)  # no selection has this budget
    assert res.outcomes == {} and res.versus_best is None and "ga-s2" in res.missing
