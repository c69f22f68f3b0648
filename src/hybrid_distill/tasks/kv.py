"""Key-value retrieval: a dictionary of uuid keys with one key asked (``kv_retrieval``, the
layer-selection probe), and multi-query associative recall as text (``mqar``, Zoology's MQAR).

Template families: ``eval`` (``Memorize the following dictionary:`` / ``"key": value``), ``train``
another intro and entry format (``key -> value``, one a line) with the same counts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .base import DEPTHS, RANDOM_VALUES, Draft, Plan, TaskContext, UniqueValues, count_ci, interleave, random_uuid
from .haystack import UnitStream


@dataclass(frozen=True)
class KvTemplates:
    """One wording of ``kv_retrieval``. ``question``: ``{context}``; ``answer_prefix``: ``{key}``;
    ``entry`` / ``entry_quoted`` (uuid values): ``{key}``, ``{value}``; ``value_pattern``: a regex
    matching the asked value where an entry gives it, with ``{answer}`` for the value."""

    question: str
    answer_prefix: str
    entry: str
    entry_quoted: str
    joiner: str
    value_pattern: str


KV_TEMPLATES = {
    "eval": KvTemplates(
        question="Memorize the following dictionary:\n{{{context}}}\n",
        answer_prefix="The value of the key '{key}' is",
        entry='"{key}": {value}',
        entry_quoted='"{key}": "{value}"',
        joiner=", ",
        value_pattern='": {answer}(?=[,}])',
    ),
    "train": KvTemplates(
        question="Study this table of keys and values, one entry per line:\n{context}\n",
        answer_prefix="Question: What does {key} point to? Answer:",
        entry="{key} -> {value}",
        entry_quoted="{key} -> {value}",
        joiner="\n",
        value_pattern="-> {answer}(?=\n)",
    ),
}


def kv_plan(
    ctx: TaskContext,
    rng: random.Random,
    value_type: str = "int",
    value_range: tuple[int, int] = (0, 100),
    depth: float | None = None,
) -> Plan:
    """Dictionary of uuid keys; ask one key. ``value_type``: ``"int"`` (in ``value_range``, as in
    the probe; distractors never share the answer's value; metric ``first_int_exact``),
    ``"numbers"`` (7 digits, ``first_int_exact``) or ``"uuids"`` (``string_match_all``)."""
    if value_type not in ("int", "numbers", "uuids"):
        raise ValueError(f"value_type must be int, numbers or uuids, got {value_type!r}")
    t = KV_TEMPLATES[ctx.template]
    key = random_uuid(rng)
    keys = UniqueValues(rng, "uuids", avoid=[key])
    if value_type == "int":
        lo, hi = value_range
        answer = str(rng.randint(lo, hi))
        others = [str(v) for v in range(lo, hi + 1) if str(v) != answer]

        def value() -> str:
            return rng.choice(others)
    else:
        answer = RANDOM_VALUES[value_type](rng)
        vals = UniqueValues(rng, value_type, avoid=[answer])

        def value() -> str:
            return vals()

    entry = t.entry_quoted if value_type == "uuids" else t.entry

    def entries():
        while True:
            yield entry.format(key=keys(), value=value())

    stream = UnitStream(entries(), joiner=t.joiner)
    frac = (rng.choice(DEPTHS) if depth is None else depth) / 100
    item = [(frac, entry.format(key=key, value=answer))]
    prefix = t.answer_prefix.format(key=key)
    meta = {"key": key, "value_type": value_type, "depths": [frac * 100]}
    answer_pattern = t.value_pattern.replace("{answer}", answer)

    def build(n: int, pad: str) -> Draft:
        context = stream.joiner.join(interleave(stream.take(n), item)) + pad
        return Draft(t.question.format(context=context), prefix, [answer], meta)

    def validate(d: Draft) -> bool:
        low = d.text.lower()
        if count_ci(low, key) != 2:
            return False
        if value_type == "uuids":
            return count_ci(low, answer) == 1
        return len(re.findall(answer_pattern, d.prompt)) == 1

    metric = "string_match_all" if value_type == "uuids" else "first_int_exact"
    return Plan(build, validate, 0, lambda n: stream.continuation(n), metric=metric)


@dataclass(frozen=True)
class MqarTemplates:
    """One wording of ``mqar``. ``question``: ``{context}``, ``{queries}``; ``pair``: ``{key}``, ``{value}``."""

    question: str
    answer_prefix: str
    pair: str


MQAR_TEMPLATES = {
    "eval": MqarTemplates(
        question=(
            "Memorize the following key-value pairs. Each key is followed by its value.\n{context}\n"
            "Give the value of each of these keys, in this order: {queries}\n"
        ),
        answer_prefix="Values:",
        pair="{key} {value}",
    ),
    "train": MqarTemplates(
        question="Each pair below is written as key=value.\n{context}\nLook up these keys one after another: {queries}\n",
        answer_prefix="Results:",
        pair="{key}={value}",
    ),
}


def mqar_plan(ctx: TaskContext, rng: random.Random, num_queries: int = 8) -> Plan:
    """Zoology-style MQAR as text: ``k1 v1 k2 v2 ...`` (keys: lower-case letters, values: digits
    of one fixed width), then ``num_queries`` keys; the answer is their values in order
    (``mqar_accuracy`` scores each position). Key/value widths grow with ``length`` so that
    the pairs filling the context stay distinct."""
    t = MQAR_TEMPLATES[ctx.template]
    max_pairs = ctx.length // 2 + num_queries  # a pair takes at least 2 tokens
    digits = 3
    while 9 * 10 ** (digits - 1) < 2 * max_pairs:
        digits += 1
    letters = 3 if 26**3 >= 4 * max_pairs else 4
    fixed = (t.question + t.answer_prefix).lower()
    seen_k: set[str] = set()
    seen_v: set[str] = set()

    def new_key() -> str:
        while True:
            k = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(letters))
            if k not in seen_k and k not in fixed:
                seen_k.add(k)
                return k

    def new_value() -> str:
        while True:
            v = str(rng.randint(10 ** (digits - 1), 10**digits - 1))
            if v not in seen_v:
                seen_v.add(v)
                return v

    qkeys = [new_key() for _ in range(num_queries)]
    qvals = [new_value() for _ in range(num_queries)]
    pairs_q = (t.pair.format(key=k, value=v) for k, v in zip(qkeys, qvals))
    items = sorted(zip((rng.random() for _ in qkeys), pairs_q), key=lambda it: it[0])
    order = list(range(num_queries))
    rng.shuffle(order)
    queries = [qkeys[i] for i in order]
    answers = [qvals[i] for i in order]

    def pairs():
        while True:
            yield t.pair.format(key=new_key(), value=new_value())

    stream = UnitStream(pairs(), joiner=" ")
    prompt_tail = " ".join(queries)
    meta = {"queries": queries, "query_values": answers, "value_digits": digits, "key_letters": letters}

    def build(n: int, pad: str) -> Draft:
        context = " ".join(interleave(stream.take(n), items)) + pad
        return Draft(t.question.format(context=context, queries=prompt_tail), t.answer_prefix, answers, meta)

    def validate(d: Draft) -> bool:
        low = d.text.lower()
        return all(count_ci(low, a) == 1 for a in answers) and all(count_ci(low, q) == 2 for q in queries)

    return Plan(build, validate, 0, lambda n: stream.continuation(n))
