"""Aggregation tasks (RULER's ``cwe`` and ``fwe``): name the words that occur most often.

Template families: ``eval`` is RULER's wording and list format (``1. word 2. word``), ``train``
another one (``1: word 2: word``) with the same layout (the list on the prompt's second line).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from .base import Draft, Plan, TaskContext, related
from .haystack import ADJECTIVES, ADVERBS, NOUNS, VERBS, UnitStream


@dataclass(frozen=True)
class CweTemplates:
    """One wording of ``cwe``. Slots: ``{context}``, ``{num_cw}``; ``item``: ``{i}``, ``{word}``."""

    question: str
    answer_prefix: str
    item: str
    item_pattern: str  # regex with one group, the word, matching ``item``


CWE_TEMPLATES = {
    "eval": CweTemplates(
        question=(
            "Below is a numbered list of words. In these words, some appear more often than others. "
            "Memorize the ones that appear most often.\n{context}\nQuestion: What are the {num_cw} most common words "
            "in the above list?"
        ),
        answer_prefix=" Answer: The top {num_cw} words that appear most often in the list are:",
        item="{i}. {word}",
        item_pattern=r"\d+\. ([a-z]+)",
    ),
    "train": CweTemplates(
        question=(
            "Here is a word list in which several words repeat many times.\n{context}\n"
            "Question: Name the {num_cw} words that repeat the most."
        ),
        answer_prefix=" Answer: The {num_cw} most repeated words are:",
        item="{i}: {word}",
        item_pattern=r"\d+: ([a-z]+)",
    ),
}

_REAL_WORDS = tuple(dict.fromkeys(ADJECTIVES + NOUNS + VERBS + ADVERBS))


def _word_pool(rng: random.Random):
    """Embedded real words in seeded order, then endless pronounceable pseudo-words."""
    real = list(_REAL_WORDS)
    rng.shuffle(real)
    yield from real
    seen = set(real)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    while True:
        w = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(2, 3)))
        if w not in seen:
            seen.add(w)
            yield w


def cwe_config(length: int) -> tuple[int, int, int]:
    """``(freq_cw, freq_ucw, num_cw)`` by length: RULER's (30, 3, 10) from 4096 tokens,
    its short-context (6, 1, 10) from 1024, and (3, 1, 5) below so that 256 tokens fit."""
    if length >= 4096:
        return 30, 3, 10
    if length >= 1024:
        return 6, 1, 10
    return 3, 1, 5


def cwe_plan(
    ctx: TaskContext,
    rng: random.Random,
    freq_cw: int | None = None,
    freq_ucw: int | None = None,
    num_cw: int | None = None,
) -> Plan:
    """RULER common words extraction (no one-shot example): ``num_cw`` words ``freq_cw`` times,
    the haystack units are uncommon words ``freq_ucw`` times each, shuffled, numbered."""
    t = CWE_TEMPLATES[ctx.template]
    d_cw, d_ucw, d_num = cwe_config(ctx.length)
    freq_cw, freq_ucw, num_cw = freq_cw or d_cw, freq_ucw or d_ucw, num_cw or d_num
    if freq_cw <= freq_ucw + 1:
        raise ValueError("need freq_cw > freq_ucw + 1 (a truncated tail item may add one occurrence)")
    template = t.question.replace("{num_cw}", str(num_cw))
    prefix = t.answer_prefix.format(num_cw=num_cw)
    fixed_text = (template + prefix).lower()
    pool = _word_pool(rng)
    common: list[str] = []
    while len(common) < num_cw:
        w = next(pool)
        if w not in fixed_text and not any(related(w, c) for c in common):
            common.append(w)

    def uncommon_gen():
        for w in pool:
            if not any(related(w, c) for c in common):
                yield w

    uncommon = UnitStream(uncommon_gen())
    shuffle_seed = rng.getrandbits(64)
    meta = {"freq_cw": freq_cw, "freq_ucw": freq_ucw, "num_cw": num_cw}

    def items(n: int) -> list[str]:
        words = common * freq_cw + uncommon.take(n) * freq_ucw
        random.Random(shuffle_seed + n).shuffle(words)
        return words

    def build(n: int, pad: str) -> Draft:
        context = " ".join(t.item.format(i=i + 1, word=w) for i, w in enumerate(items(n))) + pad
        return Draft(template.replace("{context}", context), prefix, list(common), meta)

    def continuation(n: int) -> str:
        start = num_cw * freq_cw + n * freq_ucw
        extra = uncommon.take(n + 8)[n:]
        return "".join(" " + t.item.format(i=start + k + 1, word=w) for k, w in enumerate(extra))

    def validate(d: Draft) -> bool:
        body = d.prompt.split("\n")[1]
        counts = Counter(re.findall(t.item_pattern, body))
        top = min(counts[c] for c in common)
        rest = max((v for w, v in counts.items() if w not in common), default=0)
        return top > rest

    return Plan(build, validate, 0, continuation)


@dataclass(frozen=True)
class FweTemplates:
    """One wording of ``fwe``. Slot: ``{context}`` (the coded text, on the question's first line)."""

    question: str
    answer_prefix: str


FWE_TEMPLATES = {
    "eval": FweTemplates(
        question=(
            "Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
            "dots '....'. What are the three most frequently appeared words in the above coded text?"
        ),
        answer_prefix=" Answer: According to the coded text above, the three most frequently appeared words are:",
    ),
    "train": FweTemplates(
        question=(
            "Count how often each coded word occurs in the text that follows, skipping the filler '....'. "
            "{context}\nQuestion: Which three coded words occur most often, filler aside?"
        ),
        answer_prefix=" Answer: The three most frequent coded words are:",
    ),
}
FWE_NOISE = "...."


def _zeta(alpha: float, terms: int = 10_000) -> float:
    return sum(k**-alpha for k in range(1, terms + 1)) + terms ** (1 - alpha) / (alpha - 1)


def fwe_counts(num_words: int, alpha: float = 2.0) -> list[int]:
    """Zipf counts ``floor(N k^-alpha / zeta(alpha))`` for ranks 1..K; ranks 2-4 are raised where
    needed so that ``c2 > c3 > c4 > c5`` (ties happen for small N)."""
    z = _zeta(alpha)
    counts = []
    k = 1
    while True:
        c = int(num_words * k**-alpha / z)
        if c < 1 and k > 5:
            break
        counts.append(c)
        k += 1
    for i in (3, 2, 1):
        counts[i] = max(counts[i], counts[i + 1] + 1)
    return counts


def fwe_plan(ctx: TaskContext, rng: random.Random, alpha: float = 2.0, word_len: int = 6) -> Plan:
    """RULER frequent words extraction: coded words with Zipf(alpha) counts; the top word is the
    noise ``....``; the gold answers are ranks 2-4. Haystack units = total word count N."""
    t = FWE_TEMPLATES[ctx.template]
    forbidden = (t.question + t.answer_prefix).lower()

    def vocab_gen():
        seen: set[str] = set()
        while True:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(word_len))
            if w not in seen and w not in forbidden:
                seen.add(w)
                yield w

    vocab = UnitStream(vocab_gen())
    shuffle_seed = rng.getrandbits(64)
    answers = vocab.take(3)
    meta = {"alpha": alpha}
    head = t.question.split("{context}")[0]

    def build(n: int, pad: str) -> Draft:
        counts = fwe_counts(n, alpha)
        words = [FWE_NOISE] * counts[0]
        for w, c in zip(vocab.take(len(counts) - 1), counts[1:]):
            words += [w] * c
        random.Random(shuffle_seed + n).shuffle(words)
        context = " ".join(words) + pad
        return Draft(t.question.replace("{context}", context), t.answer_prefix, list(answers), meta)

    def validate(d: Draft) -> bool:
        body = d.prompt[len(head) :].split("\nQuestion:")[0]
        counts = Counter(w for w in body.split() if w.strip("."))
        ranked = counts.most_common()
        if [w for w, _ in ranked[:3]] != answers:
            return False
        c = [v for _, v in ranked] + [0]
        return c[0] > c[1] > c[2] > c[3]

    return Plan(build, validate, 8, lambda n: (" " + FWE_NOISE) * 64)
