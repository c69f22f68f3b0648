"""Recall task generators: exact lengths, answer placement, determinism, haystacks."""

import hashlib
import json
import random
import re
from collections import Counter

import pytest

from hybrid_distill.data import read_haystack
from hybrid_distill.evaluation import METRICS
from hybrid_distill.tasks import (
    DEFAULT_RECALL_TASKS,
    RULER_OFFLINE_TASKS,
    TASKS,
    LengthError,
    RecallSample,
    count_tokens,
    generate_samples,
    resolve_haystack,
    sample_seed,
)
from hybrid_distill.tasks import base
from hybrid_distill.tasks.aggregation import fwe_counts
from hybrid_distill.tasks.haystack import NOISE_SENTENCES, ProseHaystack, TextHaystack
from hybrid_distill.tokenization import tiny_tokenizer, train_tokenizer

LENGTHS = (512, 777, 1024, 2048)


def _stdlib_docs() -> list[str]:
    import argparse, collections, functools, itertools, json as js, logging, os, pathlib, re as rx, string, textwrap

    docs = []
    for mod in (argparse, collections, functools, itertools, js, logging, os, pathlib, rx, string, textwrap):
        docs.append(mod.__doc__ or "")
        docs += [getattr(mod, n).__doc__ or "" for n in dir(mod) if not n.startswith("_")]
    return [d for d in docs if d.strip()]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tok2():
    # a different tokenizer (other text, other vocabulary size) to show tokenizer independence
    return train_tokenizer(_stdlib_docs(), vocab_size=1024)


@pytest.fixture(scope="module", params=["tiny", "docs"])
def any_tok(request, tok, tok2):
    return tok if request.param == "tiny" else tok2


# ---------------------------------------------------------------------------------------
# per-task answer checks (independent re-derivation from the text)


def check_answers(s: RecallSample) -> None:
    text, low = s.input_text, s.input_text.lower()
    if s.task.startswith("niah"):
        expected = {"niah_multivalue": 4, "niah_multiquery": 4}.get(s.task, 1)
        assert len(s.answers) == expected
        for a in s.answers:
            assert low.count(a.lower()) == 1, a
            assert f" is: {a}." in s.prompt  # the needle itself
        for q in s.metadata["queries"]:
            assert q in s.answer_prefix
            assert f"for {q} is: " in s.prompt
        if s.task in ("niah_multikey_2", "niah_multikey_3"):
            lines = s.prompt.split("\n")[1:-2]  # the last context line may be trimmed
            assert len(lines) >= 1 and all(line.startswith("One of the special magic") for line in lines)
    elif s.task in ("vt", "vt_2chains", "vt_3chains"):
        assert len(s.metadata["chains"]) == {"vt": 1, "vt_2chains": 2, "vt_3chains": 3}[s.task]
        assert s.metadata["chains"][0] == s.answers
        for chain, value in zip(s.metadata["chains"], s.metadata["values"]):
            assert len(chain) == 5 and len(set(chain)) == 5
            assert text.count(f"VAR {chain[0]} = {value}.") == 1
            positions = [text.index(f"VAR {chain[0]} = {value}.")]
            for prev, cur in zip(chain, chain[1:]):
                stmt = f"VAR {cur} = VAR {prev}."
                assert text.count(stmt) == 1
                positions.append(text.index(stmt))
            assert positions == sorted(positions)  # the chain reads in order
            for name in chain:
                assert text.count(f"VAR {name} =") == 1
        assert str(s.metadata["values"][0]) in s.answer_prefix
        assert all(str(v) not in s.answer_prefix for v in s.metadata["values"][1:])
    elif s.task == "cwe":
        body = s.prompt.split("\n")[1]
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", body))
        freq_cw = s.metadata["freq_cw"]
        assert len(s.answers) == s.metadata["num_cw"]
        assert all(counts[a] == freq_cw for a in s.answers)
        assert max(v for w, v in counts.items() if w not in s.answers) < freq_cw
        numbers = [int(n) for n in re.findall(r"(\d+)\. ", body)]
        assert numbers == list(range(1, len(numbers) + 1))
    elif s.task == "fwe":
        body = s.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = Counter(w for w in body.split() if w.strip("."))
        ranked = counts.most_common()
        assert [w for w, _ in ranked[:3]] == s.answers
        c = [v for _, v in ranked] + [0]
        assert c[0] > c[1] > c[2] > c[3]
    elif s.task == "kv_retrieval":
        key = s.metadata["key"]
        pairs = re.findall(r'"([0-9a-f-]{36})": (\d+)', s.prompt)
        mapping = dict(pairs)
        assert len(mapping) == len(pairs)  # keys unique
        assert mapping[key] == s.answers[0]
        assert sum(v == s.answers[0] for _, v in pairs) == 1
        assert s.prompt.count(key) == 1 and key in s.answer_prefix
    elif s.task == "mqar":
        body = s.prompt.split("\n")[1]
        pairs = re.findall(r"([a-z]+) (\d+)(?= |$)", body)
        mapping = dict(pairs)
        assert len(mapping) == len(pairs)
        assert [mapping[q] for q in s.metadata["queries"]] == s.answers
        for a in s.answers:
            assert low.count(a) == 1
        assert s.prompt.split("\n")[2].endswith(" ".join(s.metadata["queries"]))
    elif s.task in ("ar", "ar_multihop"):
        from test_bypass_selectors import CHECKS  # the bypass selectors' tasks keep their checks there

        CHECKS[s.task](s)
    else:  # pragma: no cover
        raise AssertionError(f"no check for {s.task}")


# ---------------------------------------------------------------------------------------


def test_registry():
    required = {
        "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
        "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "kv_retrieval", "mqar",
    }
    assert required <= set(TASKS)
    assert set(DEFAULT_RECALL_TASKS) <= set(TASKS) and set(RULER_OFFLINE_TASKS) <= set(TASKS)
    for spec in TASKS.values():
        assert spec.metric in METRICS and spec.max_new_tokens > 0
    assert TASKS["niah_single_1"].max_new_tokens == 128 and TASKS["vt"].max_new_tokens == 30
    assert TASKS["cwe"].max_new_tokens == 120 and TASKS["fwe"].max_new_tokens == 50


@pytest.mark.parametrize("task", sorted(TASKS))
def test_exact_length_and_answers(task, any_tok):
    for length in LENGTHS:
        samples = generate_samples(task, any_tok, length, 2, seed=0)
        assert len(samples) == 2
        for i, s in enumerate(samples):
            assert (s.task, s.length, s.index) == (task, length, i)
            assert count_tokens(any_tok, s.prompt + s.answer_prefix) + s.max_new_tokens == length
            assert s.metadata["length_exact"] and s.metadata["total_tokens"] == length
            assert s.max_new_tokens == TASKS[task].max_new_tokens
            check_answers(s)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_determinism(task, tok):
    state = random.getstate()
    random.seed(1)
    a = generate_samples(task, tok, 700, 3, seed=5)
    random.seed(2)  # the global RNG must not matter
    b = generate_samples(task, tok, 700, 3, seed=5)
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    c = generate_samples(task, tok, 700, 3, seed=6)
    assert all(x.prompt != y.prompt for x, y in zip(a, c))
    assert len({s.prompt for s in a}) == 3  # distinct indices, distinct samples
    # sample i does not depend on how many samples were asked for
    assert generate_samples(task, tok, 700, 1, seed=5)[0].to_dict() == a[0].to_dict()
    random.setstate(state)


def test_global_rng_untouched(tok):
    random.seed(3)
    before = random.getstate()
    generate_samples("niah_multikey_1", tok, 600, 2)
    assert random.getstate() == before


def test_sample_seed():
    assert sample_seed(0, "vt", 512, 0) == sample_seed(0, "vt", 512, 0)
    seeds = {sample_seed(s, t, n, i) for s in (0, 1) for t in ("vt", "cwe") for n in (512, 1024) for i in range(3)}
    assert len(seeds) == 24


def test_short_lengths(tok):
    for task in ("niah_single_1", "niah_multikey_2", "kv_retrieval", "mqar"):
        for s in generate_samples(task, tok, 256, 2, max_new_tokens=16):
            assert count_tokens(tok, s.input_text) + 16 == 256 and s.max_new_tokens == 16
            check_answers(s)
    with pytest.raises(LengthError):
        generate_samples("niah_multiquery", tok, 200, 1)
    with pytest.raises(LengthError):
        generate_samples("vt", tok, 20, 1)


def test_sample_format_roundtrip(tok):
    s = generate_samples("niah_single_2", tok, 600, 1)[0]
    d = json.loads(json.dumps(s.to_dict()))
    assert RecallSample.from_dict(d) == s
    assert s.input_text == s.prompt + s.answer_prefix
    assert s.prompt.startswith("A special magic number is hidden within the following text.")
    assert s.answer_prefix == f" The special magic number for {s.metadata['queries'][0]} mentioned in the provided text is"
    assert s.metric == "string_match_all"


def test_niah_templates_plural(tok):
    s = generate_samples("niah_multivalue", tok, 800, 1)[0]
    assert s.prompt.startswith("Some special magic numbers are hidden")
    assert "What are all the special magic numbers for" in s.prompt
    assert s.answer_prefix.endswith("mentioned in the provided text are")
    q = generate_samples("niah_multiquery", tok, 800, 1)[0]
    keys = q.metadata["queries"]
    assert f"{', '.join(keys[:-1])}, and {keys[-1]}" in q.answer_prefix
    u = generate_samples("niah_single_3", tok, 800, 1)[0]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u.answers[0])
    n = generate_samples("niah_single_1", tok, 800, 1)[0]
    assert re.fullmatch(r"\d{7}", n.answers[0]) and "The grass is green. The sky is blue." in n.prompt


def test_needle_depth_option(tok):
    first = generate_samples("niah_single_2", tok, 1024, 1, depth=0)[0]
    last = generate_samples("niah_single_2", tok, 1024, 1, depth=100)[0]
    ctx_first = first.prompt.split("\n")[1]
    ctx_last = last.prompt.split("\n")[1]
    assert ctx_first.startswith("One of the special magic numbers")
    # at depth 100 the needle follows every full sentence; only the trimmed tail may follow
    tail = ctx_last.split(f"is: {last.answers[0]}.")[1]
    assert "." not in tail.strip()


def test_task_options(tok):
    kv = generate_samples("kv_retrieval", tok, 1024, 1, value_type="uuids")[0]
    assert kv.metric == "string_match_all" and len(kv.answers[0]) == 36
    assert kv.input_text.lower().count(kv.answers[0]) == 1
    mq = generate_samples("mqar", tok, 1024, 1, num_queries=4)[0]
    assert len(mq.answers) == 4 and mq.max_new_tokens == 32
    check_answers(mq)
    vt = generate_samples("vt", tok, 1500, 1, num_chains=2, num_hops=2)[0]
    assert len(vt.answers) == 3 and "3 variables are assgined" in vt.answer_prefix  # sic, RULER
    assert vt.prompt.count("VAR ") == 2 * 3 + 2 * 2  # each hop statement names two variables
    cwe = generate_samples("cwe", tok, 4096, 1, max_new_tokens=120)[0]
    assert (cwe.metadata["freq_cw"], cwe.metadata["num_cw"]) == (30, 10)
    check_answers(cwe)
    with pytest.raises(TypeError):
        generate_samples("vt", tok, 512, 1, no_such_option=1)


def test_fwe_counts_strict():
    for n in range(1, 400):
        c = fwe_counts(n)
        assert c[1] > c[2] > c[3] > max(c[4:])
    c = fwe_counts(10_000)
    assert c[1] == int(10_000 / 4 / (3.141592653589793**2 / 6))  # Zipf alpha=2


# ---------------------------------------------------------------------------------------
# haystacks


def test_prose_haystack_is_clean_and_prefix_stable():
    stream = ProseHaystack().stream(7)
    text = stream.text(200)
    assert not re.search(r"[0-9\-]", text)
    assert ProseHaystack().stream(7).take(50) == stream.take(50)
    assert ProseHaystack().stream(8).take(5) != stream.take(5)


def test_noise_haystack():
    s = resolve_haystack("noise").stream(0)
    assert s.text(5) == " ".join(NOISE_SENTENCES)
    assert s.continuation(5, 10).startswith(" The grass is green.")


def test_text_haystack_from_strings_and_file(tok, tmp_path):
    texts = [
        "Alice walked to the old mill by the river. It was raining hard. She carried a lantern.",
        "The mill had stood there for a century! Nobody remembered who built it? Owls lived in its roof.",
    ]
    s = generate_samples("niah_single_2", tok, 900, 1, haystack=texts)[0]
    assert s.metadata["haystack"] == "texts" and "It was raining hard." in s.prompt
    check_answers(s)
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(texts * 3))
    s2 = generate_samples("niah_single_3", tok, 900, 1, haystack=read_haystack(str(f)))[0]
    assert s2.metadata["haystack"].startswith("corpus:") and "Owls lived in its roof." in s2.prompt
    check_answers(s2)
    with pytest.raises(FileNotFoundError):
        generate_samples("niah_single_2", tok, 900, 1, haystack=read_haystack(str(tmp_path / "missing.txt")))
    assert isinstance(resolve_haystack(texts), TextHaystack)


def test_default_corpus_haystack(tok):
    s = generate_samples("niah_multikey_1", tok, 1500, 1, haystack=read_haystack("default:prose"))[0]
    assert s.metadata["haystack"] == "corpus:default:prose"
    assert count_tokens(tok, s.input_text) + s.max_new_tokens == 1500
    check_answers(s)


class _EvenTokenizer:
    """Two tokens per character: odd budgets cannot be met exactly."""

    def encode(self, text, add_special_tokens=False, verbose=False):
        return [0] * (2 * len(text))


def test_inexact_fallback_warns():
    with pytest.warns(UserWarning, match="could not reach exactly"):
        s = generate_samples("kv_retrieval", _EvenTokenizer(), 4001, 1, max_new_tokens=8)[0]
    assert not s.metadata["length_exact"]
    assert 4001 - 2 <= s.metadata["total_tokens"] < 4001


def test_values_never_collide_with_haystack(tok, monkeypatch):
    # only three possible values, two of which occur in the haystack text
    monkeypatch.setitem(base.RANDOM_VALUES, "numbers", lambda rng: rng.choice(["1111111", "2222222", "3333333"]))
    texts = ["The code 1111111 opened the door.", "Later 2222222 was printed on the sign.", "Nothing else happened."]
    for s in generate_samples("niah_single_2", tok, 700, 4, haystack=texts):
        assert s.answers == ["3333333"] and s.input_text.count("3333333") == 1
        assert "1111111" in s.prompt  # the haystack really contains the other values


def test_keys_are_not_substrings_of_each_other(tok, monkeypatch):
    pool = ["red-cat", "bored-cat", "big-dog", "small-fox", "tall-owl", "hired-cat"]
    monkeypatch.setitem(base.RANDOM_VALUES, "words", lambda rng: rng.choice(pool))
    for s in generate_samples("niah_multikey_1", tok, 900, 4):
        keys = s.metadata["keys"]
        assert len(keys) == 4
        assert not any(a != b and a in b for a in keys for b in keys)
        check_answers(s)


def test_recall_batches_do_not_depend_on_the_other_tasks(tok):
    from hybrid_distill.evaluation.runner import recall_batches

    def samples(tasks):
        return [s for t in tasks for n in (512, 1024) for s in generate_samples(t, tok, n, 5, seed=3)]

    both = samples(["niah_single_1", "vt"])
    batches = recall_batches(both, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(len(both)))
    for b in batches:
        assert len({(both[i].task, both[i].length) for i in b}) == 1
        # one task and length: the prompts have the same token count, so the batch needs no padding
        assert len({count_tokens(tok, both[i].prompt + both[i].answer_prefix) for i in b}) == 1
    alone = samples(["vt"])
    as_keys = lambda ss, bs: [[(ss[i].task, ss[i].length, ss[i].index) for i in b] for b in bs]
    vt_batches = [b for b in as_keys(both, batches) if b[0][0] == "vt"]
    assert vt_batches == as_keys(alone, recall_batches(alone, batch_size=2))
    with pytest.raises(ValueError, match="batch_size"):
        recall_batches(both, 0)


# SHA-256 (first 16 hex digits) of (task, length, prompt, answer prefix, answers, max_new_tokens, metric) of samples
# 0-1 at 700 tokens and sample 0 at 1500 tokens (seed 5, the tiny tokenizer), as the generators made them before
# the tasks moved to hybrid_distill.tasks: the eval templates must keep making these exact samples.
PINNED_SAMPLES = {
    "ar": "7e6015141a59c966", "ar_multihop": "e758288a73d69aa7", "cwe": "cdd9e6fc6e691249",
    "fwe": "c138c2cf43ac8b54", "kv_retrieval": "c89bdbe534ede83f", "mqar": "4fa9ab7575281573",
    "niah_multikey_1": "a80a2eb86cb4149a", "niah_multikey_2": "5b472949928fd52c",
    "niah_multikey_3": "1d5e01d3a155fd3c", "niah_multiquery": "612833bc186eaaa1",
    "niah_multivalue": "2070ffd16b83d4e0", "niah_single_1": "4fac685dea25e330",
    "niah_single_2": "ebaec4b5a053451a", "niah_single_3": "0e624e7469077603", "vt": "3ebf64e502f1dbd1",
}


def _digest(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        fields = [s.task, s.length, s.prompt, s.answer_prefix, s.answers, s.max_new_tokens, s.metric]
        h.update(json.dumps(fields, sort_keys=True).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("task", sorted(PINNED_SAMPLES))
def test_eval_template_samples_are_pinned(task, tok):
    samples = generate_samples(task, tok, 700, 2, seed=5) + generate_samples(task, tok, 1500, 1, seed=5)
    assert _digest(samples) == PINNED_SAMPLES[task]


def test_niah_grid_and_corpus_haystack_samples_are_pinned(tok):
    from hybrid_distill.evaluation import niah_grid_samples

    assert _digest(niah_grid_samples(tok, [600, 1100], [0, 40, 100], 1, seed=3)) == "3e05cfa8ef3badbf"
    corpus = read_haystack("default:prose")
    assert _digest(generate_samples("niah_multikey_1", tok, 900, 2, seed=5, haystack=corpus)) == "12c1326d507f13b0"
