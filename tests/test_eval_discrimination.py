"""The recall harness separates a model that solves the tasks from one that cannot.

The shipped teacher (``src/hybrid_distill/assets/tiny_teacher``, pretrained by
``scripts/pretrain_teacher.py`` on text plus the generators' own recall documents with seeds >=
10,000) is the trained model; a twin with the same config and tokenizer but random weights is the
untrained one. Both go through the real path: fresh seed-0 samples from ``generate_samples`` ->
``run_samples`` (left-padded greedy ``generate()``) -> RULER-style scoring -> ``evaluate_model``.
"""

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from hybrid_distill.evaluation.runner import run_samples
from hybrid_distill.evaluation.suite import evaluate_model
from hybrid_distill.pipeline import SHIPPED_TEACHER
from hybrid_distill.surgery import load_teacher
from hybrid_distill.tasks import generate_samples

TASKS, LENGTH, SAMPLES = ("niah_single_1", "kv_retrieval", "vt"), 256, 8


@pytest.fixture(scope="module")
def models():
    tok = AutoTokenizer.from_pretrained(SHIPPED_TEACHER)
    trained = load_teacher(str(SHIPPED_TEACHER)).eval()
    torch.manual_seed(0)
    untrained = LlamaForCausalLM(trained.config).eval()
    return tok, trained, untrained


def _accuracy(model, tok, task):
    samples = generate_samples(task, tok, LENGTH, SAMPLES, seed=0)
    preds = run_samples(model, tok, samples, batch_size=SAMPLES, progress=False)
    return sum(p.score for p in preds) / len(preds), preds


@pytest.mark.parametrize("task", TASKS)
def test_trained_model_scores_high_random_model_near_zero(models, task):
    tok, trained, untrained = models
    good, preds = _accuracy(trained, tok, task)
    bad, _ = _accuracy(untrained, tok, task)
    assert good >= 0.75, [(p.prediction, p.answers) for p in preds]
    assert bad <= 0.125
    assert good - bad >= 0.6


def test_evaluate_model_reports_the_gap(models, tmp_path):
    tok, trained, untrained = models
    scores = {}
    for name, model in (("trained", trained), ("random", untrained)):
        res = evaluate_model(model, tok, tmp_path / name, suite="recall", tasks=["niah_single_1", "mqar"],
                             lengths=[LENGTH], num_samples=4, model_name=name)
        scores[name] = res["recall"]["aggregate"]["overall"]
        assert json.loads((tmp_path / name / "results.json").read_text())["recall"]["aggregate"]["overall"] == scores[name]
    assert scores["trained"] >= 0.75 and scores["random"] <= 0.1
