"""Needle-in-a-haystack grid: placement, exact lengths, heatmap."""

import pytest

from hybrid_distill.evaluation import (
    niah_grid_samples,
    niah_table,
    plot_niah_heatmap,
    score_sample,
)
from hybrid_distill.tasks import count_tokens
from hybrid_distill.tokenization import tiny_tokenizer, train_tokenizer

DEPTHS = (0, 10, 25, 50, 75, 90, 100)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _split(sample):
    """(haystack without the needle, haystack text before the needle)."""
    context = sample.prompt.split("\n", 1)[1].rsplit("\n", 1)[0]
    needle = sample.metadata["needle"]
    assert context.count(needle) == 1
    i = context.index(needle)
    if i == 0:
        return context[len(needle) + 1 :], ""
    assert context[i - 1] == " "
    return context[: i - 1] + context[i + len(needle) :], context[: i - 1]


def _check_placement(tok, s):
    hay, before = _split(s)
    depth = s.metadata["depth"]
    total = count_tokens(tok, hay)
    target = round(total * depth / 100)
    assert total == s.metadata["haystack_tokens"] and target == s.metadata["target_token"]
    # the needle starts at a sentence boundary at or before the target token ...
    assert before == "" or before.endswith(".")
    pos = count_tokens(tok, before)
    assert pos <= target
    # ... and was moved back by at most one sentence: the next sentence end lies past the target
    rest = hay[len(before) :]
    nxt = rest.find(". ", 1)
    if nxt != -1:
        assert count_tokens(tok, hay[: len(before) + nxt + 1]) > target
    return pos, total


@pytest.mark.parametrize("haystack", ["prose", "noise"])
def test_grid_lengths_and_placement(tok, haystack):
    lengths = (512, 1024, 2048)
    samples = niah_grid_samples(tok, lengths, DEPTHS, num_samples=1, seed=0, haystack=haystack)
    assert len(samples) == len(lengths) * len(DEPTHS)
    for s in samples:
        assert s.task == "niah" and s.metric == "string_match_all"
        assert count_tokens(tok, s.input_text) + s.max_new_tokens == s.length
        assert s.input_text.lower().count(s.answers[0]) == 1
        pos, total = _check_placement(tok, s)
        frac = pos / total
        assert frac <= s.metadata["depth"] / 100 + 1e-9
    at = {(s.length, s.metadata["depth"]): s for s in samples}
    assert _split(at[(1024, 0)])[1] == ""  # depth 0: first thing in the haystack


def test_grid_other_tokenizer():
    texts = ["The quick brown fox jumps over the lazy dog. Numbers like 12 and 345 appear too."] * 50
    tok2 = train_tokenizer(texts, vocab_size=1024)
    for s in niah_grid_samples(tok2, [777, 1500], [33, 66], seed=1):
        assert count_tokens(tok2, s.input_text) + s.max_new_tokens == s.length
        _check_placement(tok2, s)


def test_grid_determinism_and_scoring(tok):
    a = niah_grid_samples(tok, [600], [50], num_samples=2, seed=3)
    b = niah_grid_samples(tok, [600], [50], num_samples=2, seed=3)
    c = niah_grid_samples(tok, [600], [50], num_samples=2, seed=4)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert a[0].prompt != a[1].prompt and a[0].prompt != c[0].prompt
    s = a[0]
    assert score_sample(s, f" {s.answers[0]}.") == 1.0
    assert score_sample(s, "I do not know.") == 0.0
    with pytest.raises(ValueError):
        niah_grid_samples(tok, [600], [150])


def test_heatmap(tok, tmp_path):
    samples = niah_grid_samples(tok, [512, 1024], [0, 50, 100], num_samples=2)
    scores = [1.0 if s.metadata["depth"] < 100 or s.index == 0 else 0.0 for s in samples]
    table = niah_table(zip(samples, scores))
    assert table[(0.0, 512)] == 1.0 and table[(100.0, 1024)] == 0.5 and len(table) == 6
    path = plot_niah_heatmap(table, tmp_path / "niah.png")
    data = (tmp_path / "niah.png").read_bytes()
    assert path.endswith("niah.png") and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    nested = {0: {512: 1.0, 1024: 0.0}, 50: {512: 0.5}}
    plot_niah_heatmap(nested, tmp_path / "nested.png")
    assert (tmp_path / "nested.png").stat().st_size > 1000
    with pytest.raises(ValueError):
        plot_niah_heatmap({}, tmp_path / "empty.png")
