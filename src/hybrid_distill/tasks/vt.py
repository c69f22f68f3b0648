"""Variable tracking (RULER's ``vt``): chains of assignments hidden in a haystack; name every
variable of the chain that starts with the asked value.

Template families: ``eval`` is RULER's (``VAR B = VAR A.``), ``train`` another wording
(``Copy A into B.``) with the same counts: each name occurs once per statement that mentions it,
the asked value once in its statement, once in the question and once in the answer prefix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .base import Draft, Plan, TaskContext, count_ci, interleave
from .haystack import NOISE_SENTENCES, TRAIN_NOISE_SENTENCES


@dataclass(frozen=True)
class VtTemplates:
    """One wording of the task. Slots: ``{context}``, ``{query}`` (the value), ``{num_v}``,
    ``{name}``, ``{value}``, ``{source}``."""

    question: str
    answer_prefix: str
    assign_value: str  # the chain's first statement
    assign_name: str  # each hop
    noise: tuple[str, ...]  # the filler sentences of this family's noise haystack (kept out of names)


VT_TEMPLATES = {
    "eval": VtTemplates(
        question=(
            "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
            "Question: Find all variables that are assigned the value {query} in the text above."
        ),
        # "assgined" is RULER's own spelling (its constants.py and lm-eval's copy): kept so the prompt is RULER's.
        answer_prefix=(
            " Answer: According to the chain(s) of variable assignment in the text above, "
            "{num_v} variables are assgined the value {query}, they are: "
        ),
        assign_value="VAR {name} = {value}.",
        assign_name="VAR {name} = VAR {source}.",
        noise=NOISE_SENTENCES,
    ),
    "train": VtTemplates(
        question=(
            "The text below hides a few chains of copies between variables; follow every chain.\n\n{context}\n"
            "Question: Which variables end up holding {query}?"
        ),
        answer_prefix=" Answer: The {num_v} variables holding {query} are: ",
        assign_value="Put {value} into {name}.",
        assign_name="Copy {source} into {name}.",
        noise=TRAIN_NOISE_SENTENCES,
    ),
}


def vt_plan(ctx: TaskContext, rng: random.Random, num_chains: int = 1, num_hops: int = 4) -> Plan:
    """Variable tracking: a value assigned to a variable, then ``num_hops`` copies per chain.

    Chain statements are spread over the haystack in order; the answer is every variable of
    the first chain. Names are 5 upper-case letters not occurring (any case) in the fixed text.
    """
    assert ctx.haystack is not None
    if num_chains < 1 or num_hops < 1:
        raise ValueError(f"need num_chains >= 1 and num_hops >= 1, got {num_chains} and {num_hops}")
    t = VT_TEMPLATES[ctx.template]
    forbidden = (t.question + t.answer_prefix + " ".join(t.noise)).lower()
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names and name.lower() not in forbidden:
            names.append(name)
    values: list[int] = []
    while len(values) < num_chains:
        v = rng.randint(10000, 99999)
        if v not in values:
            values.append(v)
    chains = []
    items: list[tuple[float, str]] = []
    for c in range(num_chains):
        chain = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        chains.append(chain)
        stmts = [t.assign_value.format(name=chain[0], value=values[c])]
        stmts += [t.assign_name.format(name=chain[j + 1], source=chain[j]) for j in range(num_hops)]
        items += zip(sorted(rng.random() for _ in stmts), stmts)
    items.sort(key=lambda it: it[0])
    query = str(values[0])
    stream = ctx.haystack.stream(rng.getrandbits(64))
    prefix = t.answer_prefix.format(num_v=num_hops + 1, query=query)
    meta = {"chains": chains, "values": values, "num_hops": num_hops}

    def build(n: int, pad: str) -> Draft:
        context = stream.joiner.join(interleave(stream.take(n), items)) + pad
        return Draft(t.question.format(context=context, query=query), prefix, list(chains[0]), meta)

    def validate(d: Draft) -> bool:
        low = d.text.lower()
        for chain in chains:
            for j, name in enumerate(chain):
                if count_ci(low, name) != (1 if j == len(chain) - 1 else 2):
                    return False
        return all(count_ci(low, str(v)) == (3 if i == 0 else 1) for i, v in enumerate(values))

    return Plan(build, validate, 0, lambda n: stream.continuation(n))
