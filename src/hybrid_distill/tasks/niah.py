"""Needle in a haystack (RULER's NIAH family): keys with hidden values in a haystack, some keys asked.

Template families: ``eval`` is RULER's wording (``One of the special magic numbers for X is: N.``),
``train`` another one (``Keep in mind: X maps to the number N.``) with the same structure: the asked
keys occur once in the question and once in the answer prefix, every value once.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .base import DEPTHS, Draft, Plan, TaskContext, UniqueValues, count_ci, interleave, join_query
from .haystack import UnitStream


@dataclass(frozen=True)
class NiahTemplates:
    """One wording of the NIAH prompt. Slots: ``{type_v}`` (plural value type, e.g. ``numbers``),
    ``{type_s}`` (singular), ``{query}``, ``{context}``, ``{key}``, ``{value}``."""

    question: str  # several values asked
    answer_prefix: str
    question_single: str  # one value asked
    answer_prefix_single: str
    needle: str


NIAH_TEMPLATES = {
    "eval": NiahTemplates(
        question=(
            "Some special magic {type_v} are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_v} afterwards.\n{context}\n"
            "What are all the special magic {type_v} for {query} mentioned in the provided text?"
        ),
        answer_prefix=" The special magic {type_v} for {query} mentioned in the provided text are",
        question_single=(
            "A special magic {type_s} is hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the {type_s} afterwards.\n{context}\n"
            "What is the special magic {type_s} for {query} mentioned in the provided text?"
        ),
        answer_prefix_single=" The special magic {type_s} for {query} mentioned in the provided text is",
        needle="One of the special magic {type_v} for {key} is: {value}.",
    ),
    "train": NiahTemplates(
        question=(
            "Below is a long passage with hidden facts about {type_v}. Read it carefully.\n{context}\n"
            "Question: To which {type_v} does {query} map?"
        ),
        answer_prefix=" Answer: {query} maps to the {type_v}",
        question_single=(
            "Below is a long passage with one hidden fact about a {type_s}. Read it carefully.\n{context}\n"
            "Question: To which {type_s} does {query} map?"
        ),
        answer_prefix_single=" Answer: {query} maps to the {type_s}",
        needle="Keep in mind: {key} maps to the {type_s} {value}.",
    ),
}
NEEDLE = NIAH_TEMPLATES["eval"].needle  # RULER's needle, also the NIAH grid's


def niah_needle(value_type: str, key: str, value: str, template: str = "eval") -> str:
    """The needle sentence that gives ``key`` the value ``value`` (``value_type``: ``numbers`` or ``uuids``)."""
    return NIAH_TEMPLATES[template].needle.format(type_v=value_type, type_s=value_type[:-1], key=key, value=value)


def niah_question(value_type: str, query: str, plural: bool, template: str = "eval") -> tuple[str, str]:
    """(question with a ``{context}`` slot, answer prefix) of the NIAH prompt."""
    t = NIAH_TEMPLATES[template]
    if plural:
        tmpl, prefix = t.question, t.answer_prefix
    else:
        tmpl, prefix = t.question_single, t.answer_prefix_single
    slots = {"type_v": value_type, "type_s": value_type[:-1], "query": query}
    for name, value in slots.items():
        tmpl = tmpl.replace("{" + name + "}", value)
    return tmpl, prefix.format(**slots)


def niah_plan(
    ctx: TaskContext,
    rng: random.Random,
    *,
    haystack_type: str = "text",
    key_type: str = "words",
    value_type: str = "numbers",
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    depth: float | Sequence[float] | None = None,
) -> Plan:
    """RULER NIAH: ``num_keys`` keys with ``num_values`` needles each; ``num_queries`` keys asked.

    ``haystack_type="text"`` uses ``ctx.haystack``; ``"needle"`` makes every line a distractor
    needle (RULER multikey_2/3). ``depth``: percent(s) for the needles (default: random
    distinct entries of RULER's 40-point depth grid).
    """
    if not 1 <= num_queries <= num_keys:
        raise ValueError("need 1 <= num_queries <= num_keys")
    keygen = UniqueValues(rng, key_type, mutual=True)
    keys = [keygen() for _ in range(num_keys)]
    valgen = UniqueValues(rng, value_type, avoid=keys, mutual=True)
    values = [[valgen() for _ in range(num_values)] for _ in keys]
    needles = [niah_needle(value_type, k, v, ctx.template) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    if depth is None:
        depths = rng.sample(DEPTHS, len(needles))
    elif isinstance(depth, (int, float)):
        depths = [float(depth)] * len(needles)
    else:
        depths = [float(d) for d in depth]
        if len(depths) != len(needles):
            raise ValueError(f"need {len(needles)} depths, got {len(depths)}")
    items = sorted(zip((d / 100 for d in depths), needles), key=lambda it: it[0])
    q_idx = sorted(rng.sample(range(num_keys), num_queries), reverse=True)
    queries = [keys[i] for i in q_idx]
    answers = [v for i in q_idx for v in values[i]]
    query = join_query(queries)
    template, prefix = niah_question(value_type, query, plural=num_queries * num_values > 1, template=ctx.template)

    if haystack_type == "needle":
        dkeys = UniqueValues(rng, key_type, avoid=keys)
        dvals = UniqueValues(rng, value_type, avoid=[v for vs in values for v in vs] + keys)

        def distractors():
            while True:
                yield niah_needle(value_type, dkeys(), dvals(), ctx.template)

        stream = UnitStream(distractors(), joiner="\n")
        hay_name = "needle"
    elif haystack_type == "text":
        assert ctx.haystack is not None
        stream = ctx.haystack.stream(rng.getrandbits(64))
        hay_name = ctx.haystack.name
    else:
        raise ValueError(f"unknown haystack_type {haystack_type!r}")

    meta = {"keys": keys, "queries": queries, "depths": [d * 100 for d, _ in items], "value_type": value_type,
            "key_type": key_type, "haystack_type": hay_name}

    def build(n: int, pad: str) -> Draft:
        context = stream.joiner.join(interleave(stream.take(n), items)) + pad
        return Draft(template.replace("{context}", context), prefix, answers, meta)

    def validate(d: Draft) -> bool:
        low = d.text.lower()
        if any(count_ci(low, a) != 1 for a in answers):
            return False
        per_key = Counter(k for k, vs in zip(keys, values) for _ in vs)
        return all(count_ci(low, q) == per_key[q] + 2 for q in queries)

    return Plan(build, validate, 0, lambda n: stream.continuation(n))
