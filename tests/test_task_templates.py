"""Template families of the recall tasks (eval vs train wording) and approximate-length generation."""

import dataclasses
import re
from collections import Counter

import pytest

from hybrid_distill.evaluation import score_sample
from hybrid_distill.tasks import TASKS, TEMPLATE_FAMILIES, count_tokens, generate_samples
from hybrid_distill.tasks.aggregation import CWE_TEMPLATES, FWE_TEMPLATES
from hybrid_distill.tasks.ar import AR_MH_TEMPLATES, AR_TEMPLATES
from hybrid_distill.tasks.base import APPROX_TOLERANCE
from hybrid_distill.tasks.kv import KV_TEMPLATES, MQAR_TEMPLATES
from hybrid_distill.tasks.niah import NIAH_TEMPLATES
from hybrid_distill.tasks.vt import VT_TEMPLATES
from hybrid_distill.tokenization import tiny_tokenizer

from test_recall_tasks import check_answers

ALL_TEMPLATES = {
    "niah": NIAH_TEMPLATES, "vt": VT_TEMPLATES, "cwe": CWE_TEMPLATES, "fwe": FWE_TEMPLATES, "kv": KV_TEMPLATES,
    "mqar": MQAR_TEMPLATES, "ar": AR_TEMPLATES, "ar_multihop": AR_MH_TEMPLATES,
}
BASE_TASKS = sorted({spec.base_task for spec in TASKS.values()})


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = _words(text)
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _fixed_fragments(templates) -> list[str]:
    """The fixed text of a template dataclass: its strings cut at the ``{slot}`` placeholders."""
    out = []
    for f in dataclasses.fields(templates):
        value = getattr(templates, f.name)
        strings = value if isinstance(value, tuple) else (value,)
        for s in strings:
            if isinstance(s, str) and not f.name.endswith("pattern"):
                out += re.split(r"\{+[a-z_]*\}+", s)
    return out


def test_every_task_has_both_families():
    assert TEMPLATE_FAMILIES == ("eval", "train")
    for name, templates in ALL_TEMPLATES.items():
        assert set(templates) == set(TEMPLATE_FAMILIES), name


@pytest.mark.parametrize("name", sorted(ALL_TEMPLATES))
def test_train_templates_share_no_fixed_text_with_eval(name):
    """No 4-word run of one family's fixed text occurs in the other's (the brief's bar is 6 words)."""
    templates = ALL_TEMPLATES[name]
    grams = {fam: set().union(*(_ngrams(frag, 4) for frag in _fixed_fragments(templates[fam]))) for fam in templates}
    assert grams["eval"] and grams["train"]
    assert not grams["eval"] & grams["train"], sorted(grams["eval"] & grams["train"])


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_sample_shares_no_six_words_with_eval_sample(task, tok):
    """Whole samples (haystack included) of the two families have no 6-word run in common: the
    ``train`` family also has its own noise filler."""
    ev = generate_samples(task, tok, 700, 1, seed=3)[0]
    tr = generate_samples(task, tok, 700, 1, seed=3, template="train")[0]
    assert ev.metadata["template"] == "eval" and tr.metadata["template"] == "train"
    common = _ngrams(ev.input_text, 6) & _ngrams(tr.input_text, 6)
    assert not common, sorted(common)[:5]


# ---------------------------------------------------------------------------------------
# train samples: the answer re-derived from the text, and the scorer's verdict on the gold completion


def _follow_vt(text: str, value: str) -> list[str]:
    assigned = dict((name, v) for v, name in re.findall(r"Put (\d+) into ([A-Z]{5})\.", text))
    copies = re.findall(r"Copy ([A-Z]{5}) into ([A-Z]{5})\.", text)
    holders = [n for n, v in assigned.items() if v == value]
    changed = True
    while changed:
        changed = False
        for src, dst in copies:
            if src in holders and dst not in holders:
                holders.append(dst)
                changed = True
    return holders


def check_train_answers(s) -> None:
    text, base = s.input_text, s.metadata["base_task"]
    if base == "niah":
        needles = re.findall(r"Keep in mind: (\S+) maps to the (?:number|uuid) (\S+)\.", s.prompt)
        values: dict[str, list[str]] = {}
        for k, v in needles:
            values.setdefault(k, []).append(v)
        assert sorted(s.answers) == sorted(v for q in s.metadata["queries"] for v in values[q])
        assert all(text.count(a) == 1 for a in s.answers)
        assert "special magic" not in text
    elif base == "vt":
        assert sorted(_follow_vt(s.prompt, str(s.metadata["values"][0]))) == sorted(s.answers)
        assert "VAR " not in text
    elif base == "cwe":
        counts = Counter(re.findall(r"\d+: ([a-z]+)", s.prompt.split("\n")[1]))
        top = [w for w, _ in counts.most_common(len(s.answers))]
        assert sorted(top) == sorted(s.answers)
        assert min(counts[a] for a in s.answers) > max(v for w, v in counts.items() if w not in s.answers)
    elif base == "fwe":
        body = s.prompt.split("'....'. ", 1)[1].split("\nQuestion:")[0]
        ranked = Counter(w for w in body.split() if w.strip(".")).most_common()
        assert [w for w, _ in ranked[:3]] == s.answers
    elif base == "kv_retrieval":
        pairs = re.findall(r"^([0-9a-f-]{36}) -> (\d+)$", s.prompt, flags=re.M)
        mapping = dict(pairs)
        assert len(mapping) == len(pairs) and mapping[s.metadata["key"]] == s.answers[0]
        assert sum(v == s.answers[0] for _, v in pairs) == 1
    elif base == "mqar":
        pairs = re.findall(r"([a-z]+)=(\d+)", s.prompt)
        mapping = dict(pairs)
        assert len(mapping) == len(pairs)
        assert [mapping[q] for q in s.metadata["queries"]] == s.answers
    elif base == "ar":
        mapping = dict(re.findall(r"^([a-z]+) -> (\d+)$", s.prompt, flags=re.M))
        assert str(sum(int(mapping[k]) for k in s.metadata["keys"])) == s.answers[0]
    elif base == "ar_multihop":
        values = dict(re.findall(r"^([a-z]+) stores (\d+)\.$", s.prompt, flags=re.M))
        alias_of = {a: n for a, n in re.findall(r"^([a-z]+) is a nickname of ([a-z]+)\.$", s.prompt, flags=re.M)}
        name = s.metadata["query"]
        while name not in values:
            name = alias_of[name]
        assert values[name] == s.answers[0]
    else:  # pragma: no cover
        raise AssertionError(f"no check for {s.task}")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_family_is_solvable_and_scored_alike(task, tok):
    for length in (512, 1024):
        for s in generate_samples(task, tok, length, 2, seed=11, template="train"):
            assert count_tokens(tok, s.input_text) + s.max_new_tokens == length
            check_train_answers(s)
            assert score_sample(s, s.completion) == 1.0
            assert s.metric == generate_samples(task, tok, length, 1, seed=11)[0].metric
    ev = generate_samples(task, tok, 512, 1, seed=11)[0]
    assert score_sample(ev, ev.completion) == 1.0


def test_unknown_template_family(tok):
    with pytest.raises(ValueError, match="template family"):
        generate_samples("vt", tok, 512, 1, template="other")


def test_vt_variants_ask_one_of_several_chains(tok):
    for task, chains in (("vt_2chains", 2), ("vt_3chains", 3)):
        for template in TEMPLATE_FAMILIES:
            s = generate_samples(task, tok, 1024, 1, seed=2, template=template)[0]
            assert len(s.metadata["chains"]) == chains and s.metadata["chains"][0] == s.answers
            assert s.completion.strip() == ", ".join(s.answers)  # vt's completion style (no period), as the base task's


# ---------------------------------------------------------------------------------------
# approximate lengths (training documents)


class _CountingTokenizer:
    """Counts the characters it tokenizes (tokenizing is most of a sample's cost)."""

    def __init__(self, tok):
        self.tok, self.chars = tok, 0

    def encode(self, text, add_special_tokens=False, verbose=False):
        self.chars += len(text)
        return self.tok.encode(text, add_special_tokens=add_special_tokens, verbose=verbose)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_approximate_length_is_close_below_and_valid(task, tok):
    for length in (512, 1024, 2048):
        exact = generate_samples(task, tok, length, 2, seed=4)
        for s, e in zip(generate_samples(task, tok, length, 2, seed=4, exact_length=False), exact):
            tokens = count_tokens(tok, s.input_text)
            budget = length - s.max_new_tokens
            assert tokens == s.metadata["input_tokens"] <= budget
            if s.metadata["attempt"] == e.metadata["attempt"]:  # the same draw: the exact fit's units bound it
                assert s.metadata["num_units"] <= e.metadata["num_units"] + 1
                # within the tolerance, or one more unit would not have fitted
                assert tokens >= budget * (1 - APPROX_TOLERANCE) or s.metadata["num_units"] >= e.metadata["num_units"]
            assert s.metadata["length_exact"] == (tokens == budget)
            check_answers(s)
            assert score_sample(s, s.completion) == 1.0
    a = generate_samples(task, tok, 900, 2, seed=4, exact_length=False, template="train")
    b = generate_samples(task, tok, 900, 2, seed=4, exact_length=False, template="train")
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    for s in a:
        check_train_answers(s)


def test_approximate_length_tokenizes_far_less(tok):
    counts = {}
    for exact in (True, False):
        counting = _CountingTokenizer(tok)
        for task in ("niah_multikey_1", "kv_retrieval", "vt", "mqar"):
            generate_samples(task, counting, 2048, 3, seed=1, exact_length=exact)
        counts[exact] = counting.chars
    assert counts[False] * 5 < counts[True], counts
