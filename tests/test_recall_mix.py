"""Synthetic recall documents mixed into distillation data (`data.recall_fraction`)."""

import itertools

import pytest

from hybrid_distill.data import DataConfig, build_token_dataset
from hybrid_distill.data.recall_mix import DEFAULT_RECALL_MIX, RecallMix
from hybrid_distill.evaluation.scoring import score_sample
from hybrid_distill.pipeline.config import ConfigError, RunConfig
from hybrid_distill.surgery import load_tokenizer
from hybrid_distill.tasks import TASKS, generate_samples
from hybrid_distill.pipeline.config import SHIPPED_TEACHER


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(SHIPPED_TEACHER))


@pytest.mark.parametrize("task", sorted(DEFAULT_RECALL_MIX))
def test_completion_is_a_correct_answer(tok, task):
    for sample in generate_samples(task, tok, 240 + TASKS[task].max_new_tokens, 3, seed=5):
        assert score_sample(sample, sample.completion) == 1.0
        assert sample.input_text.count(sample.answers[0]) >= 1  # the answer is recalled from the prompt


def test_documents_are_deterministic_and_fit_the_sequence(tok):
    mix = RecallMix(0.3)
    first = list(itertools.islice(mix.documents(tok, 256), 12))
    assert first == list(itertools.islice(RecallMix(0.3).documents(tok, 256), 12))
    assert first != list(itertools.islice(RecallMix(0.3, seed=7).documents(tok, 256), 12))
    lengths = [len(tok(d, add_special_tokens=False).input_ids) for d in first]
    assert all(96 <= n <= 256 + 40 for n in lengths), lengths  # prompt 96..240 tokens + a short answer


def test_interleave_hits_the_fraction_and_keeps_every_text(tok):
    texts = [f"plain document {i}. " * 40 for i in range(60)]
    out = list(RecallMix(0.25).interleave(texts, tok, 256))
    assert [d for d in out if d in texts] == texts
    recall_chars = sum(len(d) for d in out if d not in texts)
    share = recall_chars / sum(len(d) for d in out)
    assert 0.22 < share < 0.30, share


def test_dataset_with_recall_mix_has_its_own_cache_and_meta(tmp_path, tok):
    plain = DataConfig(source="default", max_tokens=40_000, cache_dir=str(tmp_path)).load(tok, 128)
    mixed = DataConfig(source="default", max_tokens=40_000, cache_dir=str(tmp_path), recall_fraction=0.3).load(tok, 128)
    assert plain.path != mixed.path
    assert plain.meta["recall_mix"] is None and mixed.meta["recall_mix"]["fraction"] == 0.3
    text = tok.decode(mixed.get_batch(mixed.indices("all")).flatten().tolist())
    first_doc = next(RecallMix(0.3).documents(tok, 128))
    assert first_doc in text and first_doc not in tok.decode(plain.get_batch(plain.indices("all")).flatten().tolist())
    again = build_token_dataset("default", tok, 128, tmp_path, max_tokens=40_000)
    assert again.path == plain.path  # a plain source keeps its cache key


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"recall_fraction": 1.5}, "recall_fraction"),
        ({"recall_fraction": 0.3, "recall_tasks": ["nope"]}, "recall_tasks"),
        ({"recall_fraction": 0.3, "recall_tasks": {"mqar": 0}}, "recall_tasks"),
        ({"recall_fraction": 0.3, "recall_tasks": "mqar"}, "recall_tasks"),
    ],
)
def test_bad_recall_fields_fail_clearly(fields, match):
    with pytest.raises(ConfigError, match=rf"data\.{match}"):
        DataConfig(source="default", **fields)
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict({"teacher": "tiny:llama-gqa", "data": {"source": "default", **fields}}).validate()


def test_task_list_and_mapping_forms():
    assert DataConfig(recall_fraction=0.2, recall_tasks=["mqar", "vt"]).recall_mix().tasks == {"mqar": 1.0, "vt": 1.0}
    assert DataConfig(recall_fraction=0.2, recall_tasks={"mqar": 3}).recall_mix().tasks == {"mqar": 3.0}
    assert DataConfig().recall_mix() is None
