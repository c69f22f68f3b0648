"""Associative recall with aggregation (``ar``) and through alias chains (``ar_multihop``): the
paper's task-guided bypass probes (Table 5, "AR" and "AR-MH").

Template families: ``eval`` (``Memorize the following dictionary:`` / ``"key": value``;
``name is also called alias.`` / ``key: value.``), ``train`` another intro and statement forms
(``key -> value``; ``alias is a nickname of name.`` / ``key stores value.``) with the same counts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from .base import DEPTHS, Draft, Plan, TaskContext, count_ci, interleave, join_query
from .haystack import UnitStream


def _code_keys(rng: random.Random, length: int, forbidden: str) -> Callable[[], str]:
    """Distinct lower-case letter codes of one width (4 letters, more when ``length`` could need
    too many for that), none occurring in ``forbidden``. One width means no code is a substring of
    another; codes only ever stand between non-letters, so counting them in the text is exact."""
    max_units = length // 2 + 16
    width = 4
    while 26**width < 8 * max_units:
        width += 1
    seen: set[str] = set()

    def new() -> str:
        for _ in range(100_000):
            k = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(width))
            if k not in seen and k not in forbidden:
                seen.add(k)
                return k
        raise RuntimeError(f"ran out of distinct keys ({len(seen)} drawn)")  # pragma: no cover

    return new


@dataclass(frozen=True)
class ArTemplates:
    """One wording of ``ar``. ``question``: ``{context}``, ``{query}``; ``entry``: ``{key}``, ``{value}``;
    ``asked``: how the question names one key (``{key}``); ``value_pattern``: a regex whose group is
    the value an entry gives the key ``{key}``."""

    question: str
    answer_prefix: str
    entry: str
    joiner: str
    asked: str
    value_pattern: str


AR_TEMPLATES = {
    "eval": ArTemplates(
        question=(
            "Memorize the following dictionary:\n{{{context}}}\n"
            "Question: What is the sum of the values of the keys {query}?\n"
        ),
        answer_prefix="Answer: The sum of the values is",
        entry='"{key}": {value}',
        joiner=", ",
        asked='"{key}"',
        value_pattern=r'"{key}": (\d+)',
    ),
    "train": ArTemplates(
        question=(
            "Here is a table of keys and digits, one entry per line:\n{context}\n"
            "Question: Add up the digits stored under {query}.\n"
        ),
        answer_prefix="Answer: The total is",
        entry="{key} -> {value}",
        joiner="\n",
        asked="{key}",
        value_pattern=r"{key} -> (\d+)",
    ),
}


def ar_plan(
    ctx: TaskContext,
    rng: random.Random,
    num_queries: int = 3,
    value_range: tuple[int, int] = (0, 9),
    min_sum: int | None = None,
) -> Plan:
    """Associative recall with aggregation (the paper's AR probe): a dictionary of letter-code
    keys and small ints in ``value_range``; the question names ``num_queries`` keys (in an order
    unrelated to their positions) and the answer is the SUM of their values.

    Each asked key occurs exactly once in the dictionary (and once in the question). The asked
    values are redrawn until their sum is at least ``min_sum`` (default: the largest value + 1),
    so by default the answer never occurs in the context: it must be computed, not copied.
    Metric ``first_int_exact``."""
    lo, hi = (int(v) for v in value_range)
    if not 0 <= lo <= hi:
        raise ValueError(f"need 0 <= value_range[0] <= value_range[1], got {value_range}")
    if num_queries < 1:
        raise ValueError("need num_queries >= 1")
    min_sum = hi + 1 if min_sum is None else int(min_sum)
    if num_queries * hi < min_sum:
        raise ValueError(f"{num_queries} values <= {hi} cannot sum to min_sum={min_sum}")
    t = AR_TEMPLATES[ctx.template]
    new_key = _code_keys(rng, ctx.length, (t.question + t.answer_prefix).lower())
    keys = [new_key() for _ in range(num_queries)]
    while True:
        values = [rng.randint(lo, hi) for _ in keys]
        if sum(values) >= min_sum:
            break
    answer = str(sum(values))
    depths = sorted(rng.sample(DEPTHS, num_queries))
    items = [(dp / 100, t.entry.format(key=k, value=v)) for dp, k, v in zip(depths, keys, values)]
    order = list(range(num_queries))
    rng.shuffle(order)
    asked = [keys[i] for i in order]
    query = join_query([t.asked.format(key=k) for k in asked])

    def entries():
        while True:
            yield t.entry.format(key=new_key(), value=rng.randint(lo, hi))

    stream = UnitStream(entries(), joiner=t.joiner)
    meta = {"keys": asked, "values": [values[i] for i in order], "depths": depths,
            "value_range": [lo, hi]}

    def build(n: int, pad: str) -> Draft:
        context = stream.joiner.join(interleave(stream.take(n), items)) + pad
        return Draft(t.question.format(context=context, query=query), t.answer_prefix, [answer], meta)

    def validate(d: Draft) -> bool:
        low = d.text.lower()
        if any(count_ci(low, k) != 2 for k in keys):
            return False
        if any(re.findall(t.value_pattern.replace("{key}", k), d.prompt) != [str(v)] for k, v in zip(keys, values)):
            return False
        return int(answer) <= hi or re.search(rf"(?<!\d){answer}(?!\d)", d.prompt) is None

    return Plan(build, validate, 0, lambda n: stream.continuation(n))


@dataclass(frozen=True)
class ArMultihopTemplates:
    """One wording of ``ar_multihop``. ``question`` / ``answer_prefix``: ``{context}``, ``{query}``;
    ``alias``: ``{name}``, ``{alias}``; ``value``: ``{key}``, ``{value}``; ``value_pattern``: a regex
    whose group is the value of a value statement."""

    question: str
    answer_prefix: str
    alias: str
    value: str
    value_pattern: str


AR_MH_TEMPLATES = {
    "eval": ArMultihopTemplates(
        question=(
            "Memorize the following facts. A fact either gives the value of a key or another name for a key "
            "or for another name.\n{context}\nQuestion: What is the value of {query}?\n"
        ),
        answer_prefix="Answer: The value of {query} is",
        alias="{name} is also called {alias}.",
        value="{key}: {value}.",
        value_pattern=r": (\d+)",
    ),
    "train": ArMultihopTemplates(
        question=(
            "Each line below either stores a number under a name or says that one name is a nickname of "
            "another.\n{context}\nQuestion: Which number is reached from {query}?\n"
        ),
        answer_prefix="Answer: From {query} we reach",
        alias="{alias} is a nickname of {name}.",
        value="{key} stores {value}.",
        value_pattern=r"stores (\d+)\.",
    ),
}


def ar_multihop_plan(
    ctx: TaskContext,
    rng: random.Random,
    hops: int | None = None,
    value_range: tuple[int, int] = (0, 99),
    alias_rate: float = 0.3,
) -> Plan:
    """Associative recall through alias chains (the paper's AR-MH probe). Facts, one a line, give
    a key's value or another name (alias) of a name. The asked name is an alias ``hops`` steps
    (default: 1 or 2, drawn per sample) away from a key: ``K: V.``, ``K is also called A1.``,
    ``A1 is also called A2.``, question ``What is the value of A2?``, answer ``V``. The chain's
    facts sit at random depths in random order; distractor facts include aliases (a fraction
    ``alias_rate``) of earlier distractor names. ``V`` (an int in ``value_range``) occurs exactly once:
    no distractor has that value. Metric ``first_int_exact``."""
    if hops is None:
        hops = rng.choice((1, 2))
    if int(hops) < 1:
        raise ValueError("need hops >= 1")
    hops = int(hops)
    lo, hi = (int(v) for v in value_range)
    if not 0 <= lo < hi:
        raise ValueError(f"need 0 <= value_range[0] < value_range[1], got {value_range}")
    t = AR_MH_TEMPLATES[ctx.template]
    forbidden = (t.question + t.answer_prefix + t.alias + t.value).lower()
    new_name = _code_keys(rng, ctx.length, forbidden)
    chain = [new_name() for _ in range(hops + 1)]  # key, alias 1, ..., alias hops (asked)
    answer = str(rng.randint(lo, hi))
    others = [v for v in range(lo, hi + 1) if str(v) != answer]
    stmts = [t.value.format(key=chain[0], value=answer)]
    stmts += [t.alias.format(name=a, alias=b) for a, b in zip(chain, chain[1:])]
    rng.shuffle(stmts)
    depths = sorted(rng.sample(DEPTHS, len(stmts)))
    items = [(dp / 100, st) for dp, st in zip(depths, stmts)]
    query = chain[-1]

    def facts():
        names: list[str] = []
        while True:
            if names and rng.random() < alias_rate:
                src = rng.choice(names[-64:])
                alias = new_name()
                names.append(alias)
                yield t.alias.format(name=src, alias=alias)
            else:
                key = new_name()
                names.append(key)
                yield t.value.format(key=key, value=rng.choice(others))

    stream = UnitStream(facts(), joiner="\n")
    prefix = t.answer_prefix.format(query=query)
    meta = {"chain": chain, "query": query, "hops": hops, "depths": depths}

    def build(n: int, pad: str) -> Draft:
        context = stream.joiner.join(interleave(stream.take(n), items)) + pad
        return Draft(t.question.format(context=context, query=query), prefix, [answer], meta)

    def validate(d: Draft) -> bool:
        low = d.text.lower()
        if any(count_ci(low, name) != 2 for name in chain[:-1]) or count_ci(low, query) != 3:
            return False
        return re.findall(t.value_pattern, d.prompt).count(answer) == 1

    return Plan(build, validate, 0, lambda n: stream.continuation(n))
